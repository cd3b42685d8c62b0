"""Rollout throughput: sd_lib's batched sampler vs generating one prompt at a time.

Generated tokens per second, counting only real tokens (each completion up to and including its
stop token; no padding, nothing after the stop), for the same model, prompts and sampling:

    sd_lib batched (bs=B):   sampling.generate(model, tok, prompts, batch_size=B)  (B = 64 by default)
    HF batched (bs=B):       model.generate on left-padded batches of B prompts (TRL's non-vLLM
                             path; only with --hf-batched)
    sd_lib one at a time:    sampling.generate(model, tok, prompts, batch_size=1)
    HF one at a time:        model.generate(prompt) for each prompt in turn

Model: the embedded SmolLM2-135M-Instruct (`sd_lib.models.EMBEDDED_SOLVER`, fp32, not warmed
up). Prompts: `problems.generate_arithmetic` questions (the `cpu` profile's 4-5 terms),
chat-templated with `contexts.apply_chat(tokenizer, stepformat.solver_messages(p))`. Sampling:
temperature `--temperature`, top_p 1, no top-k, `--max-new-tokens`, stop at EOS / <|im_end|>
(`sampling.stop_token_ids`) for every variant.

The one-at-a-time variants run on `--seq-prompts` of the prompts per repeat (a different slice
each repeat, so the full run sees 3 x 6 of them): tokens/s is a rate, and decoding one sequence
costs the same per token whichever prompt it is. Each repeat runs every variant once, in an
order that alternates between repeats, all with seed = repeat; the table quotes the median
over repeats. The ratio is batched tokens/s over the faster one-at-a-time baseline
(target >= 5x). Rows stop independently: rows differ in length, and a finished row costs
nothing in sd_lib's sampler (it is dropped from the cache), while HF's batched generate keeps
decoding it as padding until the whole batch is done.

    .venv/bin/python bench/bench_generation.py            # full run, about 2-3 min on 2 cores
    .venv/bin/python bench/bench_generation.py --quick    # smoke test, < 30 s
    .venv/bin/python bench/bench_generation.py --batch-sizes 64 32 --hf-batched   # more rows, longer

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



def _real_length(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """The completion up to and including its first stop token."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1]
    return tokens


def hf_generate(model, tokenizer, prompt_ids: list[list[int]], *, batch_size: int, temperature: float,
                max_new_tokens: int, stop_ids: list[int], seed: int) -> int:
    """`model.generate` on left-padded batches; returns the number of real generated tokens."""
    import torch

    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id
    stop = set(stop_ids)
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 \
        else dict(do_sample=False)
    n_tokens = 0
    with torch.inference_mode():
        for s in range(0, len(prompt_ids), batch_size):
            chunk = prompt_ids[s: s + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)  # (B, P)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)  # (B, P)
            for j, p in enumerate(chunk):
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 eos_token_id=stop_ids, pad_token_id=pad, **sampling)
            for row in out[:, width:].tolist():  # (B, <= max_new_tokens)
                n_tokens += len(_real_length(row, stop))
    return n_tokens


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-prompts", type=int, default=64, help="prompts of the batched variants")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64], help="sd_lib batched variants")
    parser.add_argument("--seq-prompts", type=int, default=6, help="prompts per repeat of the one-at-a-time variants")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf-batched", action="store_true", help="also time HF generate on batches (TRL's path)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, < 30 s")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_prompts, args.batch_sizes, args.seq_prompts = 4, [4], 1
        args.max_new_tokens, args.repeats = 4, 1

    import torch
    from transformers.utils import logging as hf_logging

    from sd_lib.config import get_config
    from sd_lib.contexts import apply_chat
    from sd_lib.models import EMBEDDED_SOLVER, load_model_and_tokenizer
    from sd_lib.problems import generate_arithmetic
    from sd_lib.sampling import generate, stop_token_ids
    from sd_lib.stepformat import solver_messages

    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    start = time.time()
    cfg = get_config("cpu")
    model, tokenizer = load_model_and_tokenizer(EMBEDDED_SOLVER)
    problems = generate_arithmetic(args.n_prompts, seed=0, n_terms=cfg.arith_n_terms, ops=cfg.arith_ops,
                                   max_value=cfg.arith_max_value)
    prompts = [apply_chat(tokenizer, solver_messages(p), template_kwargs=cfg.student_chat_template_kwargs)
               for p in problems]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    stop_ids = stop_token_ids(tokenizer, model)
    gen = dict(temperature=args.temperature, top_p=1.0, max_new_tokens=args.max_new_tokens, progress=False)

    def seq_slice(rep: int) -> list[list[int]]:
        n = args.seq_prompts
        s = (rep * n) % max(len(prompt_ids) - n + 1, 1)
        return prompt_ids[s: s + n]

    variants = {}
    for bs in args.batch_sizes:
        variants[f"sd_lib batched (bs={bs})"] = (
            True, lambda rep, bs=bs: generate(model, tokenizer, prompt_ids, k=1, batch_size=bs, seed=rep,
                                              **gen).stats["tokens"])
    if args.hf_batched:
        bs = max(args.batch_sizes)
        variants[f"HF generate batched (bs={bs})"] = (
            True, lambda rep, bs=bs: hf_generate(model, tokenizer, prompt_ids, batch_size=bs,
                                                 temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                                 stop_ids=stop_ids, seed=rep))
    variants["sd_lib one at a time (bs=1)"] = (
        False, lambda rep: generate(model, tokenizer, seq_slice(rep), k=1, batch_size=1, seed=rep,
                                    **gen).stats["tokens"])
    variants["HF generate one at a time"] = (
        False, lambda rep: hf_generate(model, tokenizer, seq_slice(rep), batch_size=1,
                                       temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                       stop_ids=stop_ids, seed=rep))

    # warm-up: first-call costs (allocator, kernel selection) out of the timings
    generate(model, tokenizer, prompt_ids[:2], k=1, batch_size=2, seed=0, temperature=args.temperature,
             max_new_tokens=4, progress=False)
    hf_generate(model, tokenizer, prompt_ids[:1], batch_size=1, temperature=args.temperature,
                max_new_tokens=4, stop_ids=stop_ids, seed=0)

    runs: dict[str, list[tuple[int, float]]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(args.repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            n_tokens = variants[name][1](rep)
            seconds = time.perf_counter() - t0
            runs[name].append((n_tokens, seconds))
            print(f"# repeat {rep} {name}: {n_tokens} tokens in {seconds:.1f} s = {n_tokens / seconds:.1f} tok/s",
                  file=sys.stderr, flush=True)

    rates = {name: statistics.median(n / s for n, s in r) for name, r in runs.items()}
    baseline = max(rates[n] for n in names if not variants[n][0])
    baseline_name = next(n for n in names if not variants[n][0] and rates[n] == baseline)
    n_seq = min(args.seq_prompts, len(prompt_ids))
    print(f"\n{header([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv)))}")
    print(f"embedded SmolLM2-135M-Instruct fp32 | {len(prompt_ids)} arithmetic prompts "
          f"({min(map(len, prompt_ids))}-{max(map(len, prompt_ids))} tokens) | max_new_tokens={args.max_new_tokens} "
          f"| temperature={args.temperature} | median of {args.repeats} repeats | total {time.time() - start:.0f} s\n")
    print("| variant | prompts per repeat | generated tokens (median) | seconds (median) | tokens/s (median) "
          "| vs fastest one-at-a-time |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in names:
        toks = statistics.median(n for n, _ in runs[name])
        secs = statistics.median(s for _, s in runs[name])
        n_p = len(prompt_ids) if variants[name][0] else n_seq
        print(f"| {name} | {n_p} | {toks:.0f} | {secs:.1f} | {rates[name]:.1f} | {rates[name] / baseline:.2f}x |")
    best = max(rates[n] for n in names if n.startswith("sd_lib batched"))
    verdict = "met" if best / baseline >= 5 else "NOT met"
    print(f"\nsd_lib batched / {baseline_name}: {best / baseline:.2f}x (target >= 5x: {verdict})")


if __name__ == "__main__":
    main()
