"""Achieved FLOP/s of the student's forward+backward as a fraction of this machine's matmul FLOP/s.

Both numbers come from the same run, same process, same torch thread count:

    machine:  torch.mm of two square fp32 (n x n) matrices, n = --matmul-size (2048), 2 n^3 FLOPs
              per product, median over --matmul-repeats after two warm-up products;
    student:  the embedded SmolLM2-135M-Instruct (fp32) with LoRA r=16, alpha=32 on the 7
              projections (`sd_lib.models.add_lora`, the `cpu` profile's adapter), a batch of
              --batch x --seq random token ids, `model(input_ids, labels=input_ids).loss.backward()`
              (all positions scored: the logits and cross-entropy of an SFT step) with the MLPs
              as the trainer runs them (`fused_mlp.fused_swiglu`; `--no-fused` for peft's own),
              median wall time over --repeats passes after one warm-up pass.

FLOP count of one pass (`tokens` = batch x seq; N counts the weights of the nn.Linear layers):

    matmul FLOPs = 4 * N_base * tokens  +  6 * N_lora * tokens
      N_base: the frozen Linear weights, lm_head included (tied to the embedding: the embedding
              lookup itself is not a matmul and is not counted); forward 2 N per token, backward
              2 N per token for the activation gradient, no weight gradient (frozen);
      N_lora: the LoRA A and B matrices; forward 2, activation gradient 2, weight gradient 2.
    attention FLOPs (reported separately) = 3 * 2 * L * d_attn * seq^2 * batch
              (QK^T and AV: 4 d_attn seq^2 per layer for the dense product, halved for the causal
              mask; backward = 2 x forward), d_attn = heads x head_dim.

Neglected: RMSNorm, RoPE, SiLU, softmax and the loss's elementwise work; the activation
gradients of the first layer's q/k/v/gate/up projections, which autograd skips because the
embedding output needs no gradient (1 of 30 layers, the estimate is ~1% high there).
The fraction is (matmul FLOPs / time) / matmul FLOP/s (target >= 60%); the line below adds the
attention term.

    .venv/bin/python bench/bench_roofline.py             # full run, about 1.5-2.5 min on 2 cores
    .venv/bin/python bench/bench_roofline.py --quick     # smoke test, < 30 s

Run it on an otherwise idle machine: next to another CPU-heavy process, torch's default 2
OpenMP threads slow down many-fold (a 70-token prefill took 14.5 s at 2 threads and 0.64 s at 1
thread beside a running notebook); pass --threads 1 there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _common import header  # noqa: E402



def matmul_flops_per_s(n: int, repeats: int) -> tuple[float, list[float]]:
    """Median FLOP/s of an fp32 (n x n) @ (n x n) torch.mm, and the per-product times."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    c = torch.empty(n, n)
    for _ in range(2):
        torch.mm(a, b, out=c)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times), times


def count_params(model) -> tuple[int, int, int]:
    """(N_base, N_lora, N_all): frozen Linear weights (lm_head included), LoRA A/B weights, all parameters."""
    import torch

    n_base = n_lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if ".lora_A." in name + "." or ".lora_B." in name + ".":
                n_lora += module.weight.numel()
            else:
                n_base += module.weight.numel()
    n_all = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return n_base, n_lora, n_all


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward passes")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--matmul-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-fused", action="store_true", help="peft's own MLP forward (no fused_mlp)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, < 30 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.repeats, args.matmul_size, args.matmul_repeats = 1, 64, 2, 512, 5

    import torch
    from transformers.utils import logging as hf_logging

    from sd_lib.fused_mlp import fused_swiglu
    from sd_lib.models import EMBEDDED_SOLVER, add_lora, load_model_and_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    start = time.time()

    peak, mm_times = matmul_flops_per_s(args.matmul_size, args.matmul_repeats)
    print(f"# matmul {args.matmul_size}: {[round(t, 4) for t in mm_times]} s -> {peak / 1e9:.1f} GFLOP/s",
          file=sys.stderr, flush=True)

    model, _ = load_model_and_tokenizer(EMBEDDED_SOLVER, dtype=torch.float32)
    torch.manual_seed(0)
    model = add_lora(model, r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0)
    model.train()
    cfg = model.config
    n_base, n_lora, n_all = count_params(model)
    n_layers, heads = cfg.num_hidden_layers, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    d_attn = heads * head_dim
    tokens = args.batch * args.seq
    flops_matmul = 4 * n_base * tokens + 6 * n_lora * tokens
    flops_attn = 3 * 2 * n_layers * d_attn * args.seq**2 * args.batch

    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step() -> float:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with fused_swiglu(model, enabled=not args.no_fused):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return time.perf_counter() - t0

    warm = step()
    print(f"# warm-up pass: {warm:.2f} s", file=sys.stderr, flush=True)
    times = []
    for rep in range(args.repeats):
        times.append(step())
        print(f"# pass {rep}: {times[-1]:.2f} s", file=sys.stderr, flush=True)
    # a second look at the machine after the model ran, in case the clock or contention moved
    peak_after, _ = matmul_flops_per_s(args.matmul_size, args.matmul_repeats)
    t = statistics.median(times)
    achieved = flops_matmul / t
    achieved_attn = (flops_matmul + flops_attn) / t

    print(f"\n{header([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv)))}")
    print(f"embedded SmolLM2-135M-Instruct fp32 + LoRA r={args.lora_r} on 7 projections | batch "
          f"{args.batch} x {args.seq} tokens | N_base={n_base / 1e6:.1f}M (lm_head incl.), "
          f"N_lora={n_lora / 1e6:.2f}M, all params={n_all / 1e6:.1f}M | L={n_layers}, d_attn={d_attn} | "
          f"MLP {'peft (--no-fused)' if args.no_fused else 'fused_swiglu'} | "
          f"median of {args.repeats} passes | total {time.time() - start:.0f} s\n")
    print("| quantity | value |")
    print("|---|---:|")
    print(f"| fp32 matmul {args.matmul_size}^3, median of {args.matmul_repeats} (before / after the model) | "
          f"{peak / 1e9:.1f} / {peak_after / 1e9:.1f} GFLOP/s |")
    print(f"| forward+backward time (median; passes {', '.join(f'{x:.2f}' for x in times)} s) | {t:.2f} s |")
    print(f"| matmul FLOPs per pass, 4 N_base T + 6 N_lora T | {flops_matmul / 1e9:.1f} GFLOP |")
    print(f"| attention FLOPs per pass, causal (reported separately) | {flops_attn / 1e9:.1f} GFLOP "
          f"({100 * flops_attn / flops_matmul:.1f}% of the matmul term) |")
    print(f"| achieved, matmul term only | {achieved / 1e9:.1f} GFLOP/s |")
    print(f"| achieved, with attention | {achieved_attn / 1e9:.1f} GFLOP/s |")
    print(f"| **fraction of machine matmul FLOP/s (matmul term)** | **{100 * achieved / peak:.0f}%** |")
    print(f"| fraction with the attention term | {100 * achieved_attn / peak:.0f}% |")
    verdict = "met" if achieved / peak >= 0.60 else "NOT met"
    print(f"\nstudent forward+backward at {100 * achieved / peak:.0f}% of this machine's fp32 matmul FLOP/s "
          f"(target >= 60%: {verdict})")


if __name__ == "__main__":
    main()
