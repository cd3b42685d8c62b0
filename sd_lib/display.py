"""Small display helpers for the notebooks: side-by-side text columns and critic examples.

    side_by_side({"student": s, "teacher": t})          # an HTML table of preformatted columns
    rows = case_examples(problems, attempts, critiques, critic)   # one example per case A-D
"""

from __future__ import annotations

import html
from typing import Sequence

from .critic import CASES, STYLES, crafted_attempts, parse_critic_output

__all__ = ["side_by_side", "case_examples", "examples_frame"]


def side_by_side(columns: dict[str, str], *, max_chars: int = 4000):
    """An HTML table with one preformatted column per entry (`IPython.display.HTML`).

    Text is HTML-escaped (model text may hold tags) and cut at `max_chars` per column.
    """
    from IPython.display import HTML

    width = f"{100 / max(1, len(columns)):.0f}%"
    head = "".join(f"<th style='text-align:left;width:{width}'>{html.escape(k)}</th>" for k in columns)
    cells = "".join(
        f"<td style='vertical-align:top;text-align:left'><pre style='white-space:pre-wrap;font-size:11px'>"
        f"{html.escape(v if len(v) <= max_chars else v[:max_chars] + ' [...]')}</pre></td>"
        for v in ((c if isinstance(c, str) else str(c)) for c in columns.values())
    )
    return HTML(f"<table style='table-layout:fixed;width:100%'><tr>{head}</tr><tr>{cells}</tr></table>")


def _example(problem, attempt: str, critique, source: str) -> dict:
    return {
        "case": critique.case,
        "source": source,
        "problem_id": problem.id,
        "question": problem.question,
        "answer": problem.answer,
        "attempt": attempt,
        "first_error_step": critique.first_error_step,
        "raw": critique.raw,
        "styles": {s: parse_critic_output(critique.raw, attempt, style=s).corrected for s in STYLES},
    }


def case_examples(problems: Sequence, attempts: Sequence[str], critiques: Sequence, critic) -> list[dict]:
    """One example per case A-D: the first real attempt critiqued with that case, else a crafted
    attempt (`critic.crafted_attempts` of the first problem) critiqued by `critic`; `source` says
    which ("real" or "crafted"). Each example holds the critique's text in every style.
    """
    out = {}
    for p, a, c in zip(problems, attempts, critiques):
        if c.usable and c.case in CASES and c.case not in out:
            out[c.case] = _example(p, a, c, "real")
    missing = [case for case in CASES if case not in out]
    if missing:
        p = problems[0]
        crafted = crafted_attempts(p)
        for case, c in zip(missing, critic.critique_batch([p] * len(missing), [crafted[k] for k in missing])):
            out[case] = _example(p, crafted[case], c, "crafted")
    return [out[case] for case in CASES]


def examples_frame(examples: list[dict]):
    """The examples as a DataFrame (case, source, question, attempt, aligned critique)."""
    import pandas as pd

    return pd.DataFrame([{"case": e["case"], "source": e["source"], "question": e["question"],
                          "first error": e["first_error_step"], "attempt": e["attempt"],
                          "aligned critique": e["styles"]["aligned"]} for e in examples])
