"""Where the memory of one self-distillation micro-step goes: saved activations vs the loss's logits.

For the `cpu` profile's solver (embedded SmolLM2-135M-Instruct, fp32, LoRA r=16) and a micro-batch
of --batch rows with --prompt-tokens student prompt, --teacher-tokens teacher prompt and
--completion-tokens completion tokens (random ids: memory does not depend on the values; the
first --shared-tokens of every prompt are the same, as the solver's system prompt is):

    saved activations  bytes of the distinct tensor storages autograd saves during the student's
                       forward (`torch.autograd.graph.saved_tensors_hooks`) that are not the model's
                       parameters (frozen weights saved for the input gradient cost nothing), in
                       total and per token per layer, for `fused_mlp` and `share_prefix` off/on;
    logits (B, T, V)   the size of one fp32 completion-logits tensor, what a naive loss builds
                       (several times) and `chunked_sd_loss` never does;
    micro-step peak    for each --chunk-sizes value, in a fresh subprocess: the high-water RSS
                       (VmHWM, reset with /proc/self/clear_refs) of one `train.sd_micro_step`
                       (teacher forward, student forward, chunked loss, backward) above the RSS
                       just before it, for the same settings.

    .venv/bin/python bench/bench_sd_memory.py                     # about 1 min on 2 cores
    .venv/bin/python bench/bench_sd_memory.py --completion-tokens 2048 --batch 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header  # noqa: E402

GiB = 2**30


def _setup(args):
    import torch

    from sd_lib.config import get_config
    from sd_lib.models import EMBEDDED_SOLVER, add_lora, load_model_and_tokenizer

    cfg = get_config("cpu", condition="refsol")
    model, tok = load_model_and_tokenizer(EMBEDDED_SOLVER)
    model = add_lora(model, cfg)
    model.train()
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(100, 40_000, (n,), generator=g).tolist()  # noqa: E731
    shared, rows = ids(args.shared_tokens), range(args.batch)
    return (cfg, model, tok, [shared + ids(args.prompt_tokens - len(shared)) for _ in rows],
            [shared + ids(args.teacher_tokens - len(shared)) for _ in rows], [ids(args.completion_tokens) for _ in rows])


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split(f"{field}:")[1].split()[0]) * 1024


def saved_activations(args) -> dict:
    """Distinct non-parameter storages autograd keeps for the student's backward."""
    import torch

    from sd_lib.alignment import completion_hidden, pack_batch
    from sd_lib.fused_mlp import fused_swiglu

    cfg, model, tok, student, _, completion = _setup(args)
    batch = pack_batch(student, completion, pad_token_id=tok.pad_token_id)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), fused_swiglu(model, enabled=args.fused):
        completion_hidden(model, batch, share_prefix=bool(args.share))
    tokens = args.batch * (args.prompt_tokens + args.completion_tokens)
    layers = model.config.num_hidden_layers
    return {"fused": args.fused, "share": args.share, "bytes": sum(seen.values()), "storages": len(seen), "tokens": tokens,
            "per_token_layer": sum(seen.values()) / tokens / layers, "vocab": model.config.vocab_size}


def micro_step_peak(args) -> dict:
    """One sd_micro_step at args.chunk_size; peak RSS above the RSS just before it."""
    from dataclasses import replace

    from sd_lib.train import sd_micro_step

    cfg, model, tok, student, teacher, completion = _setup(args)
    cfg = replace(cfg, chunk_size=args.chunk_size, fused_mlp=bool(args.fused), share_prefix=bool(args.share))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base, t0 = _status("VmRSS"), time.perf_counter()
    sd_micro_step(model, cfg, student_ids=student, teacher_ids=teacher, completion_ids=completion,
                  weights=[1.0] * args.batch, pad_id=tok.pad_token_id, norm=float(args.batch * args.completion_tokens))
    return {"chunk_size": args.chunk_size, "fused": args.fused, "share": args.share, "peak_extra": _status("VmHWM") - base, "seconds": time.perf_counter() - t0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="rows per micro-batch (cpu profile: 8)")
    ap.add_argument("--prompt-tokens", type=int, default=90, help="student prompt length (cpu profile: ~90)")
    ap.add_argument("--teacher-tokens", type=int, default=250, help="teacher prompt length (RefSol, cpu: ~250)")
    ap.add_argument("--completion-tokens", type=int, default=76, help="completion length (cpu profile: ~76 mean)")
    ap.add_argument("--shared-tokens", type=int, default=73, help="prompt prefix all rows share (embedded: 73)")
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[128])
    ap.add_argument("--worker", choices=["saved", "peak"], help=argparse.SUPPRESS)
    ap.add_argument("--chunk-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--fused", type=int, choices=[0, 1], help=argparse.SUPPRESS)
    ap.add_argument("--share", type=int, choices=[0, 1], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(saved_activations(args) if args.worker == "saved" else micro_step_peak(args)))
        return 0

    def worker(kind, *extra):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--batch", str(args.batch),
               "--prompt-tokens", str(args.prompt_tokens), "--teacher-tokens", str(args.teacher_tokens),
               "--completion-tokens", str(args.completion_tokens), "--shared-tokens", str(args.shared_tokens), *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    print(header(sys.argv))
    settings = [("0", "0"), ("1", "0"), ("1", "1")]  # (fused_mlp, share_prefix): off, +fused, +shared prefix
    saved = [worker("saved", "--fused", f, "--share", p) for f, p in settings]
    peaks = [worker("peak", "--chunk-size", str(c), "--fused", f, "--share", p) for c in args.chunk_sizes
             for f, p in settings]
    logits = args.batch * args.completion_tokens * saved[0]["vocab"] * 4
    print(f"\nembedded SmolLM2-135M-Instruct fp32 + LoRA r=16 | micro-batch {args.batch} x (student {args.prompt_tokens} "
          f"+ completion {args.completion_tokens}) tokens, teacher prompt {args.teacher_tokens}, {args.shared_tokens} "
          f"prompt tokens shared by all rows | refsol, forward KL\n")
    print("| quantity | value |")
    print("|:---|---:|")
    for s in saved:
        print(f"| student saved activations, fused_mlp={bool(s['fused'])}, share_prefix={bool(s['share'])} "
              f"({s['storages']} storages) | "
              f"{s['bytes'] / GiB:.2f} GiB ({s['per_token_layer'] / 1024:.1f} KiB per batch token per layer) |")
    print(f"| one fp32 completion-logits tensor (B x T x V = {args.batch} x {args.completion_tokens} x "
          f"{saved[0]['vocab']:,}) | {logits / GiB:.3f} GiB |")
    for p in peaks:
        print(f"| sd_micro_step peak above baseline, chunk_size {p['chunk_size']}, fused_mlp={bool(p['fused'])}, "
              f"share_prefix={bool(p['share'])} | "
              f"{p['peak_extra'] / GiB:.2f} GiB ({p['seconds']:.1f} s) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
