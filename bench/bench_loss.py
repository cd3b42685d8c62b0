"""Peak memory and time: naive (B, T, V) logits vs `chunked_sd_loss`, forward + backward.

Full-vocabulary forward KL(teacher || student) from hidden states through the output layer, at
Qwen3 scale (V = 151,936, H = 2,048), fp32, for B*T in {1024, 4096} completion tokens:

    naive:   teacher logits = h_t W^T (no grad); student logits = h_s W^T;
             masked_reduce(forward_kl(student_logits, teacher_logits), mask).backward()
    chunked: chunked_sd_loss(h_s, h_t, W, mask, chunk_size=C).backward()

The output layer is frozen by default (the paper trains LoRA adapters, lm_head not among
them); `--weight-grad` also differentiates W (full fine-tuning; adds a (V, H) gradient to
both). Every pass runs in a fresh subprocess: peak memory is the high-water RSS
(getrusage ru_maxrss) minus the RSS once the inputs exist, which sees every CPU tensor; on
CUDA it is torch.cuda.max_memory_allocated above the inputs. Time is the median wall time of
forward+backward passes, one per process, variants alternating; the CPU-time ratio (process
user+sys time) is the steadier number when other jobs share the cores. Ratios are chunked/naive.
The naive pass is skipped (and says so) when MemAvailable cannot hold its ~7 (N, V) buffers plus
`--headroom-gib` for other jobs (B*T = 4096 needs ~18 GiB: a quiet 24 GiB machine at least).

    .venv/bin/python bench/bench_loss.py                  # the README table (5-10 min on 2 cores)
    .venv/bin/python bench/bench_loss.py --tokens 1024 --repeats 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

GiB = 1024**3


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        info = dict(line.split(":", 1) for line in handle)
    return int(info["MemAvailable"].split()[0]) * 1024


def worker(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from sd_lib.losses import chunked_sd_loss, forward_kl, masked_reduce

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n_tokens, hidden, vocab = args.n, args.hidden, args.vocab
    seq = min(n_tokens, 512)
    gen = torch.Generator(device=device).manual_seed(0)
    # filled in place: no temporary that would lift the RSS high-water mark before the baseline
    weight = torch.empty(vocab, hidden, device=device).normal_(0.0, 0.02, generator=gen)
    h_s = torch.empty(n_tokens // seq, seq, hidden, device=device).normal_(generator=gen)
    h_t = torch.empty(n_tokens // seq, seq, hidden, device=device).normal_(generator=gen)
    h_s.requires_grad_(), weight.requires_grad_(args.weight_grad)
    mask = torch.ones(n_tokens // seq, seq, device=device)  # (B, T)

    def naive():
        with torch.no_grad():
            teacher_logits = h_t @ weight.T  # (B, T, V)
        student_logits = h_s @ weight.T  # (B, T, V)
        return masked_reduce(forward_kl(student_logits, teacher_logits), mask)

    def chunked():
        return chunked_sd_loss(h_s, h_t, weight, mask, divergence="forward_kl", chunk_size=args.chunk_size)

    run = naive if args.variant == "naive" else chunked
    if device == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = _rss_bytes()
    times, cpu_times, loss_value = [], [], None
    for _ in range(args.repeats):
        h_s.grad, weight.grad = None, None
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = run()
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        loss_value = loss.item()
        del loss
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    grad_norm = h_s.grad.norm().item()
    return {"variant": args.variant, "n": n_tokens, "device": device, "threads": torch.get_num_threads(),
            "time_s": statistics.median(times), "times": times, "cpu_s": statistics.median(cpu_times),
            "peak_extra": peak,
            "loss": loss_value, "grad_norm": grad_norm}


def _run_worker(args: argparse.Namespace, variant: str, n_tokens: int, repeats: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--variant", variant, "--n", str(n_tokens),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size),
           "--repeats", str(repeats)] + (["--weight-grad"] if args.weight_grad else [])
    out = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        return {"variant": variant, "n": n_tokens, "error": (out.stderr or "")[-300:] or f"rc={out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3,
                        help="passes per variant at the smallest B*T; max(1, repeats * smallest // B*T) above it")
    parser.add_argument("--weight-grad", action="store_true", help="also differentiate the output layer W")
    parser.add_argument("--headroom-gib", type=float, default=4.0,
                        help="skip the naive pass unless this much memory stays available beside it")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return

    rows, start = [], time.time()
    smallest = min(args.tokens)
    for n_tokens in args.tokens:
        # passes shrink with size (one at 4x) so each size costs about the same wall time
        repeats = max(1, args.repeats * smallest // n_tokens)
        # measured naive peak is ~7 (N, V) fp32 buffers above the inputs; on a shared machine keep
        # `--headroom-gib` free for the other jobs rather than invite the OOM killer
        need = 7.2 * n_tokens * args.vocab * 4 + args.vocab * args.hidden * 4 + (0.5 + args.headroom_gib) * GiB
        runs = {"chunked": [], "naive": []}
        for rep in range(repeats):
            # one pass per fresh process, variants alternating, so CPU contention drifts hit both
            for variant in ("naive", "chunked") if rep % 2 == 0 else ("chunked", "naive"):
                if variant == "naive" and need > _available_bytes():
                    runs[variant].append({"error": f"naive skipped: needs ~{need / GiB:.1f} GiB, "
                                                   f"{_available_bytes() / GiB:.1f} available"})
                    continue
                runs[variant].append(_run_worker(args, variant, n_tokens, 1))
                print(f"# {variant:7s} B*T={n_tokens}: {json.dumps(runs[variant][-1])}", file=sys.stderr, flush=True)
        pair = {}
        for variant, results in runs.items():
            errors = [r["error"] for r in results if "error" in r]
            pair[variant] = {"error": errors[0]} if errors else dict(
                results[0], time_s=statistics.median(r["time_s"] for r in results),
                cpu_s=statistics.median(r["cpu_s"] for r in results),
                peak_extra=max(r["peak_extra"] for r in results))
        rows.append((n_tokens, repeats, pair))

    rows.sort(key=lambda row: row[0])
    head = "W frozen (LoRA)" if not args.weight_grad else "W trained"
    print(f"\nforward KL, V={args.vocab:,}, H={args.hidden}, fp32, {head}, chunk_size={args.chunk_size}, "
          f"device={rows[0][2]['chunked'].get('device', '?')}, threads={rows[0][2]['chunked'].get('threads', '?')}, "
          f"total {time.time() - start:.0f} s\n")
    print("| B*T | passes | naive time (s) | chunked time (s) | time ratio | CPU-time ratio | "
          "naive peak extra (GiB) | chunked peak extra (GiB) | memory ratio | loss diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n_tokens, repeats, pair in rows:
        naive, chunked = pair["naive"], pair["chunked"]

        def cell(result, key, fmt, scale=1.0):
            return format(result[key] / scale, fmt) if key in result else "not run*"

        def ratio(key):
            return format(chunked[key] / naive[key], ".3f") if key in naive and key in chunked else "-"

        diff = format(abs(naive["loss"] - chunked["loss"]), ".1e") if "loss" in naive and "loss" in chunked else "-"
        print(f"| {n_tokens} | {repeats} | {cell(naive, 'time_s', '.2f')} | {cell(chunked, 'time_s', '.2f')} | "
              f"{ratio('time_s')} | {ratio('cpu_s')} | {cell(naive, 'peak_extra', '.2f', GiB)} | "
              f"{cell(chunked, 'peak_extra', '.3f', GiB)} | {ratio('peak_extra')} | {diff} |")
    for n_tokens, _, pair in rows:
        for variant, result in pair.items():
            if "error" in result:
                print(f"\n\\* B*T={n_tokens} {variant}: {result['error']}")

if __name__ == "__main__":
    main()
