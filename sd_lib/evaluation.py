"""Held-out evaluation: k samples per problem -> Avg@k, Pass@k, Maj@k, mean length, with CIs.

    from sd_lib.evaluation import evaluate
    result = evaluate(model, tokenizer, test_problems, k=12, temperature=1.0, max_new_tokens=96)
    result["summary"]["avg@k"]  # {"mean": ..., "ci_low": ..., "ci_high": ...}
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .metrics import summarize
from .sampling import generate
from .stepformat import check_answer, parse_attempt, solver_messages

__all__ = ["evaluate", "evaluate_config", "write_json"]


def evaluate(
    model,
    tokenizer,
    problems,
    *,
    k: int,
    temperature: float,
    max_new_tokens: int,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    chat_template_kwargs: dict | None = None,
    progress: bool = True,
) -> dict:
    """Sample `k` answers per problem from the student prompt and score them.

    Returns a JSON-ready dict: `summary` (metrics with bootstrap CIs over problems), `per_problem`
    (correctness, parsed answers, lengths) and `format_rate` (share of well-formed traces).
    """
    from .contexts import apply_chat

    if not problems:
        raise ValueError("evaluate: the problem list is empty")
    prompts = [apply_chat(tokenizer, solver_messages(p), template_kwargs=chat_template_kwargs) for p in problems]
    t0 = time.time()
    rollouts = generate(
        model, tokenizer, prompts, k=k, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, progress=progress,
    )
    correct = [[] for _ in problems]
    answers = [[] for _ in problems]
    lengths = [[] for _ in problems]
    well_formed = 0
    for i, text, ids in zip(rollouts.prompt_index, rollouts.texts, rollouts.completion_ids):
        parsed = parse_attempt(text)
        well_formed += parsed.well_formed
        answers[i].append(parsed.answer)
        correct[i].append(check_answer(parsed.answer, problems[i].answer))
        lengths[i].append(len(ids))
    summary = summarize(correct, answers, lengths, k=k)
    return {
        "k": k,
        "n_problems": len(problems),
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "summary": summary,
        "format_rate": well_formed / max(1, len(rollouts.texts)),
        "seconds": round(time.time() - t0, 1),
        "per_problem": [
            {"id": p.id, "answer": p.answer, "correct": c, "answers": a, "lengths": n}
            for p, c, a, n in zip(problems, correct, answers, lengths)
        ],
        "examples": [
            {"id": problems[i].id, "question": problems[i].question, "completion": text}
            for i, text in list(zip(rollouts.prompt_index, rollouts.texts))[: 3 * k : k]
        ],
    }


def evaluate_config(model, tokenizer, problems, cfg, *, seed: int | None = None, progress: bool = True) -> dict:
    """`evaluate` with the evaluation settings of a config."""
    return evaluate(
        model, tokenizer, problems,
        k=cfg.eval_k,
        temperature=cfg.eval_temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
        batch_size=cfg.gen_batch_size,
        seed=cfg.seed if seed is None else seed,
        chat_template_kwargs=cfg.student_chat_template_kwargs,
        progress=progress,
    )


def write_json(obj, path) -> Path:
    """Write JSON atomically (a killed run never leaves half a results file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
