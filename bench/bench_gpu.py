"""Self-distillation step at paper scale on one GPU: chunked loss vs naive logits, MFU, peak memory.

A randomly initialised model with Qwen3-1.7B's configuration (written out below, no weights
needed), bf16, LoRA r=64 / alpha=128 on the 7 projections (`sd_lib.models.add_lora`; peft keeps
the adapter weights in fp32), and one optimizer step over --batch (32) sequences:

    student row = --prompt-tokens (256) prompt + completion, --seq (2048) tokens in all;
    teacher row = the same prompt + --context-tokens (512) of context + the same completion;
    micro-batches of --micro-batch (4) rows with gradient accumulation (32 / 4 = 8 micro-steps),
    then one AdamW step on the adapter.

Per micro-batch, both paths pack rows with `alignment.pack_student_teacher` and run the
teacher with the adapter disabled (`teacher_mode(model, "base")`, no grad):

    chunked: `alignment.student_teacher_hidden` (decoder only) ->
             `losses.chunked_sd_loss(h_s, h_t, W, mask, divergence="forward_kl")` -> backward;
    naive:   student and teacher logits from the full model (`logits_to_keep=T+1`), upcast to
             fp32 -> `losses.forward_kl` -> masked sum -> backward (the (B, T, V) path TRL takes).

Step time: median over --repeats optimizer steps after one warm-up step (CUDA synchronised).
Peak memory: torch.cuda.max_memory_allocated over the timed steps, reset per path.
MFU = model FLOPs / step time / --peak-tflops (989: H100/H200 SXM dense bf16). Model FLOPs
(N = weights of the nn.Linear layers; T = completion tokens; L_s, L_t = row lengths):

    student  4 N_dec B L_s + 6 N_lora B L_s + 4 N_head B T    (frozen base: forward + activation
                                                             gradient; adapter: + weight gradient)
    teacher  2 N_dec B L_t + 2 N_head B T
    attention (causal, half the dense product; backward = 2 x forward), reported separately:
             student 6 n_layers d_attn L_s^2 B, teacher 2 n_layers d_attn L_t^2 B

Both paths do the same model FLOPs (the chunked loss projects the same T rows through the
head); norms, RoPE, softmax and the loss's elementwise work are neglected. The adapter's
matmuls run in fp32 (peft's default), counted at the same peak.

On a machine without CUDA it prints "no CUDA: skipped" and exits 0. It needs only the repo and
torch + transformers + peft; nothing is downloaded. About 1-2 minutes on an H200.

    python bench/bench_gpu.py                      # H100/H200 SXM, the full table
    python bench/bench_gpu.py --quick              # 4 layers, 8 x 512 tokens: a smoke test
    python bench/bench_gpu.py --peak-tflops 756    # another GPU's dense bf16 peak
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _common import header  # noqa: E402

# Qwen/Qwen3-1.7B's config.json, written out (no download)
QWEN3_1_7B = dict(
    vocab_size=151_936,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=40_960,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    tie_word_embeddings=True,
    attention_bias=False,
    attention_dropout=0.0,
    use_sliding_window=False,
)
# a toy size for checking the code path on a CPU (--cpu-smoke)
TINY = dict(QWEN3_1_7B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
GiB = 1024**3



def count_linear(model) -> tuple[int, int, int]:
    """(N_dec, N_head, N_lora): frozen decoder Linear weights, output layer, LoRA A/B weights."""
    import torch

    n_dec = n_head = n_lora = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if ".lora_A." in name + "." or ".lora_B." in name + ".":
            n_lora += module.weight.numel()
        elif name.endswith("lm_head"):
            n_head += module.weight.numel()
        else:
            n_dec += module.weight.numel()
    return n_dec, n_head, n_lora


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="sequences per optimizer step")
    parser.add_argument("--seq", type=int, default=2048, help="student row length (prompt + completion)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--context-tokens", type=int, default=512, help="teacher-only context")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per forward/backward")
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=1024, help="chunked_sd_loss rows per chunk")
    parser.add_argument("--repeats", type=int, default=3, help="timed optimizer steps per path")
    parser.add_argument("--paths", nargs="+", default=["chunked", "naive"], choices=["chunked", "naive"])
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    parser.add_argument("--quick", action="store_true", help="4 layers, 8 x 512 tokens, 1 timed step")
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # toy model on CPU
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.batch, args.seq, args.prompt_tokens, args.context_tokens = 4, 8, 512, 64, 128
        args.repeats = 1
    if args.cpu_smoke:
        args.batch, args.seq, args.prompt_tokens, args.context_tokens = 4, 48, 8, 8
        args.micro_batch, args.repeats, args.lora_r, args.chunk_size = 2, 1, 4, 16

    import torch

    cmd = [os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv))
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(header(cmd))
        print("no CUDA: skipped (this benchmark needs a GPU; run it on a machine with one)")
        return
    if args.batch % args.micro_batch or args.seq <= args.prompt_tokens:
        raise SystemExit("--batch must be a multiple of --micro-batch, and --seq > --prompt-tokens")

    from transformers import AutoModelForCausalLM, Qwen3Config
    from transformers.utils import logging as hf_logging

    from sd_lib.alignment import pack_student_teacher, student_teacher_hidden, teacher_mode
    from sd_lib.losses import chunked_sd_loss, forward_kl
    from sd_lib.models import add_lora

    hf_logging.set_verbosity_error()
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    values = dict(TINY if args.cpu_smoke else QWEN3_1_7B)
    if args.layers:
        values["num_hidden_layers"] = args.layers
    start = time.time()
    config = Qwen3Config(**values)
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = add_lora(model, r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in params]  # every path starts from the same adapter
    print(f"# model built in {time.time() - start:.1f} s", file=sys.stderr, flush=True)

    B, mb = args.batch, args.micro_batch
    T = args.seq - args.prompt_tokens
    L_s, L_t = args.seq, args.seq + args.context_tokens
    gen = torch.Generator().manual_seed(0)
    V = config.vocab_size
    prompts = torch.randint(1, V, (B, args.prompt_tokens), generator=gen).tolist()
    contexts = torch.randint(1, V, (B, args.context_tokens), generator=gen).tolist()
    completions = torch.randint(1, V, (B, T), generator=gen).tolist()
    teacher_prompts = [p + c for p, c in zip(prompts, contexts)]
    norm = float(B * T)  # token mean over the whole optimizer step

    def micro_step(path: str, rows: slice) -> None:
        student, teacher = pack_student_teacher(prompts[rows], teacher_prompts[rows], completions[rows],
                                                pad_token_id=0, device=device)
        mask = student.completion_mask  # (b, T)
        if path == "chunked":
            # every row in full, as in the naive path (random prompts share no prefix anyway)
            s_h, t_h, weight, _ = student_teacher_hidden(model, student, teacher, teacher_kind="base",
                                                         share_prefix=False)
            loss = chunked_sd_loss(s_h, t_h, weight, mask, divergence="forward_kl", chunk_size=args.chunk_size,
                                   reduction="sum") / norm
        else:
            keep = mask.size(1) + 1
            student_logits = model(**student.model_inputs(), logits_to_keep=keep, use_cache=False).logits[:, :-1]
            with teacher_mode(model, "base"):
                teacher_logits = model(**teacher.model_inputs(), logits_to_keep=keep, use_cache=False).logits[:, :-1]
            per_token = forward_kl(student_logits.float(), teacher_logits.float())  # (b, T)
            loss = (per_token * mask).sum() / norm
        loss.backward()
        losses.append(float(loss.detach()))

    def step(path: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for s in range(0, B, mb):
            micro_step(path, slice(s, s + mb))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    n_dec, n_head, n_lora = count_linear(model)
    d_attn = config.num_attention_heads * config.head_dim
    n_layers = config.num_hidden_layers
    flops_model = (4 * n_dec * B * L_s + 6 * n_lora * B * L_s + 4 * n_head * B * T
                   + 2 * n_dec * B * L_t + 2 * n_head * B * T)
    flops_attn = 6 * n_layers * d_attn * L_s**2 * B + 2 * n_layers * d_attn * L_t**2 * B

    results = {}
    for path in args.paths:
        with torch.no_grad():
            for p, p0 in zip(params, initial):
                p.copy_(p0)
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        losses: list[float] = []
        try:
            warm = step(path)
            first_loss = sum(losses)  # the warm-up step's loss, from the initial adapter
            if device.type == "cuda":
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            times = [step(path) for _ in range(args.repeats)]
            peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else float("nan")
            results[path] = {"warm": warm, "times": times, "peak": peak, "loss": first_loss,
                             "base": base if device.type == "cuda" else float("nan")}
        except torch.OutOfMemoryError as err:
            results[path] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        print(f"# {path}: {results[path]}", file=sys.stderr, flush=True)

    print(f"\n{header(cmd)}")
    print(f"random-init Qwen3-1.7B config ({n_layers} layers{', CPU toy' if args.cpu_smoke else ''}), "
          f"{str(dtype).removeprefix('torch.')}, LoRA r={args.lora_r} on 7 projections "
          f"(N_dec={n_dec / 1e9:.2f}B, N_head={n_head / 1e6:.0f}M, N_lora={n_lora / 1e6:.1f}M) | {B} sequences "
          f"x {L_s} student tokens ({args.prompt_tokens} prompt + {T} completion), teacher rows {L_t} | "
          f"micro-batch {mb} x {B // mb} accumulation steps, then AdamW | median of {args.repeats} steps after "
          f"1 warm-up | peak {args.peak_tflops:g} TFLOP/s | total {time.time() - start:.0f} s\n")
    print(f"model FLOPs per step: {flops_model / 1e12:.1f} TFLOP + attention (causal) {flops_attn / 1e12:.1f} "
          f"TFLOP\n")
    print("| path | step time s (median) | MFU, matmuls | MFU, with attention | peak allocated GiB | "
          "peak - before step GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for path, r in results.items():
        if "error" in r:
            print(f"| {path} | {r['error']} | | | | |")
            continue
        t = statistics.median(r["times"])
        peak_tf = args.peak_tflops * 1e12
        print(f"| {path} | {t:.2f} | {100 * flops_model / t / peak_tf:.1f}% | "
              f"{100 * (flops_model + flops_attn) / t / peak_tf:.1f}% | {r['peak'] / GiB:.1f} | "
              f"{(r['peak'] - r['base']) / GiB:.1f} |")
    if all(p in results and "error" not in results[p] for p in ("chunked", "naive")):
        c, n = results["chunked"], results["naive"]
        print(f"\nchunked / naive: time {statistics.median(c['times']) / statistics.median(n['times']):.2f}x, "
              f"peak memory {c['peak'] / n['peak']:.2f}x | first-step loss (same weights): chunked "
              f"{c['loss']:.6f}, naive {n['loss']:.6f}")


if __name__ == "__main__":
    main()
