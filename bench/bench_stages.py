"""Where the `cpu` profile's time goes: its stages measured on a slice, extrapolated to the run.

`make reproduce PROFILE=cpu` spends its time in three kinds of work. This script times each on
a slice of the real thing, with the `cpu` profile's settings and the warmed-up solver:

    eval          one held-out evaluation (`evaluation.evaluate_config`: k = 12 samples per
                  problem) on `--eval-problems` problems, as seconds per problem
    <condition>   `--steps` optimizer steps of `train.train` for grpo, refsol and stepalign in a
                  scratch run folder (no evaluation, no checkpoint), split by the trainer's own
                  timers into rollout and update (critic, teacher and student passes, backward,
                  AdamW); the first step is dropped (one-time costs), the median of the rest kept

and extrapolates the profile's training and evaluation time:
    3 x max_steps x step(condition) + (1 + 3 x checkpoints) x n_test x eval(problem),
with the base solver evaluated once and each condition at every step that the trainer
evaluates (`eval_every`) or checkpoints (`save_every`, the last step; notebook 05 evaluates
checkpoints the trainer did not).
Warm-up, notebooks 01/06 and kernel start-up are not in the estimate (minutes; see the README's
per-notebook wall times). Run it with `PYTHONPATH=<another checkout>` to time another revision
of sd_lib on the same machine (the speed pass's "before" column):

    .venv/bin/python bench/bench_stages.py                     # about 5-8 min on 2 cores
    PYTHONPATH=/tmp/sd_lib_before .venv/bin/python bench/bench_stages.py --label before
    .venv/bin/python bench/bench_stages.py --quick             # smoke test, ~1 min

Run it on an otherwise idle machine (2 OpenMP threads next to another job slow down many-fold).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import header  # noqa: E402


def time_eval(cfg, n_problems: int) -> dict:
    from sd_lib.evaluation import evaluate_config
    from sd_lib.problems import load_splits
    from sd_lib.warmup import load_starting_solver

    model, tokenizer = load_starting_solver(cfg, progress=False)
    problems = load_splits(cfg)[1][:n_problems]
    t0 = time.perf_counter()
    res = evaluate_config(model, tokenizer, problems, cfg, progress=False)
    seconds = time.perf_counter() - t0
    tokens = sum(sum(p["lengths"]) for p in res["per_problem"])
    return {"seconds": seconds, "per_problem_s": seconds / len(problems), "rows": len(problems) * cfg.eval_k,
            "tokens": tokens, "tokens_per_s": tokens / seconds}


def time_training(cfg, steps: int) -> dict:
    from sd_lib.train import read_metrics, train

    cfg = replace(cfg, max_steps=steps, eval_every=10**9, save_every=10**9, report_to=("jsonl",))
    with tempfile.TemporaryDirectory(prefix=f"bench_stages_{cfg.condition}_") as tmp:
        t0 = time.perf_counter()
        train(cfg, run_dir=tmp, progress=False)
        wall = time.perf_counter() - t0
        rows = read_metrics(tmp)
    kept = rows[1:] or rows  # the first step pays one-time costs (allocator, thread pools)
    med = {k: statistics.median(r[f"time/{k}_s"] for r in kept) for k in ("rollout", "update", "step")}
    return {"wall_s": wall, "steps": len(rows), **{f"{k}_s": v for k, v in med.items()},
            "tokens_per_rollout": statistics.median(r["completion/mean_length"] for r in kept)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--eval-problems", type=int, default=8, help="held-out problems in the timed evaluation")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per condition (the first is dropped)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--label", default="", help="a name for this column (e.g. before / after)")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    ap.add_argument("--quick", action="store_true", help="2 problems, 2 steps: a smoke test")
    args = ap.parse_args(argv)
    import torch

    import sd_lib
    from sd_lib.config import CONDITIONS, get_config

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.eval_problems, args.steps = 2, 2
    print(header(sys.argv))
    print(f"sd_lib from {os.path.dirname(sd_lib.__file__)}" + (f" ({args.label})" if args.label else ""))
    cfg = get_config(args.profile)
    t0 = time.perf_counter()
    out = {"label": args.label, "profile": args.profile, "eval": time_eval(cfg, args.eval_problems)}
    for condition in CONDITIONS:
        out[condition] = time_training(replace(cfg, condition=condition), args.steps)
    # the trainer evaluates every eval_every steps, notebook 05 every other saved checkpoint
    evaluated = {s for s in range(1, cfg.max_steps + 1)
                 if s % cfg.eval_every == 0 or s % cfg.save_every == 0 or s == cfg.max_steps}
    n_evals = 1 + len(CONDITIONS) * len(evaluated)
    train_s = sum(cfg.max_steps * out[c]["step_s"] for c in CONDITIONS)
    eval_s = n_evals * cfg.n_test * out["eval"]["per_problem_s"]
    out["estimate"] = {"train_s": train_s, "eval_s": eval_s, "n_evals": n_evals, "total_s": train_s + eval_s}

    e = out["eval"]
    print(f"\nprofile {args.profile}: max_steps {cfg.max_steps}, rollouts/step {cfg.rollouts_per_step}, "
          f"eval every {cfg.eval_every} steps on {cfg.n_test} problems x k={cfg.eval_k}; measured in "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| stage | measured | seconds | tokens/s |")
    print("|:---|:---|---:|---:|")
    print(f"| eval | {e['rows']} rollouts ({args.eval_problems} problems x {cfg.eval_k}) | "
          f"{e['seconds']:.1f} ({e['per_problem_s']:.2f} / problem) | {e['tokens_per_s']:.0f} |")
    for c in CONDITIONS:
        r = out[c]
        print(f"| {c} step | median of {max(r['steps'] - 1, 1)} | rollout {r['rollout_s']:.1f} + update "
              f"{r['update_s']:.1f} = {r['step_s']:.1f} | - |")
    est = out["estimate"]
    print(f"\nestimate for the profile: training {est['train_s'] / 60:.1f} min (3 x {cfg.max_steps} steps) + "
          f"{est['n_evals']} evaluations {est['eval_s'] / 60:.1f} min = {est['total_s'] / 60:.1f} min")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
