"""The solver's step format, its parser, and answer checking.

The paper's solver writes step-tagged traces::

    <step_1>3 + 7 = 10</step_1>
    <step_2>10 - 2 = 8</step_2>
    <answer>8</answer>

`render_steps` writes that format, `parse_attempt` reads it back from whatever a sampled model
really wrote (missing or unclosed tags, text outside tags, truncation, several answers) and
never raises on model text, and `check_answer` decides correctness: exact for numbers,
HF `math-verify` for LaTeX.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction

__all__ = [
    "SOLVER_INSTRUCTIONS",
    "ParsedAttempt",
    "render_steps",
    "parse_attempt",
    "normalize_answer",
    "check_answer",
    "solver_messages",
]

SOLVER_INSTRUCTIONS = (
    "Solve the problem step by step. Write each step inside its own numbered tag, "
    "<step_1>...</step_1>, <step_2>...</step_2> and so on, with one calculation per step. "
    "Then write only the final answer inside <answer>...</answer>."
)

# Model text can be arbitrarily long; parsing work is bounded by scanning at most this much.
MAX_PARSE_CHARS = 200_000

_OPEN_RE = re.compile(r"<step_(\d{1,4})>")
# An answer body ends at its close tag, at the next `<answer>` (an unclosed answer followed by
# another one), or at the end of the text; group 2 is empty when the answer was not closed.
_ANSWER_RE = re.compile(r"<answer>(.*?)(</answer>|(?=<answer>)|$)", re.S)


@dataclass(frozen=True)
class ParsedAttempt:
    """What `parse_attempt` found in a completion.

    steps: step bodies in order of appearance (stripped).
    answer: the last `<answer>` body, or None.
    well_formed: steps numbered 1..N, each closed, exactly one closed answer, nothing else
        but whitespace outside the tags.
    truncated: text ends inside an open tag, or no answer was written.
    issues: short machine-readable notes on what was off (`unclosed_step`, `no_answer`, ...).
    """

    steps: tuple[str, ...]
    answer: str | None
    well_formed: bool
    truncated: bool
    issues: tuple[str, ...] = field(default=())
    step_numbers: tuple[int, ...] = field(default=())


def render_steps(steps, answer) -> str:
    """Inverse of `parse_attempt` for well-formed traces."""
    lines = [f"<step_{i}>{s}</step_{i}>" for i, s in enumerate(steps, start=1)]
    if answer is not None:
        lines.append(f"<answer>{answer}</answer>")
    return "\n".join(lines)


def parse_attempt(text) -> ParsedAttempt:
    """Parse a step-tagged completion; tolerant, total, linear-time.

    A step runs from `<step_k>` to the matching `</step_k>`; when the close tag is missing it
    runs to the next `<step_`/`<answer>` tag or the end of the text.
    """
    if not isinstance(text, str):
        return ParsedAttempt((), None, False, True, ("not_text",))
    issues: list[str] = []
    if len(text) > MAX_PARSE_CHARS:
        text = text[:MAX_PARSE_CHARS]
        issues.append("too_long")

    answer_start = text.find("<answer>")
    step_region = text if answer_start < 0 else text[:answer_start]
    steps: list[str] = []
    numbers: list[int] = []
    outside = []
    opens = list(_OPEN_RE.finditer(step_region))
    cursor = 0
    for j, m in enumerate(opens):
        outside.append(step_region[cursor : m.start()])
        k = int(m.group(1))
        close = f"</step_{k}>"
        limit = opens[j + 1].start() if j + 1 < len(opens) else len(step_region)
        end = step_region.find(close, m.end(), limit)
        if end < 0:
            body, cursor = step_region[m.end() : limit], limit
            issues.append("unclosed_step")
        else:
            body, cursor = step_region[m.end() : end], end + len(close)
        steps.append(body.strip())
        numbers.append(k)
    outside.append(step_region[cursor:])

    found = _ANSWER_RE.findall(text) if answer_start >= 0 else []
    answers = [a.strip() for a, _ in found]
    closed_answers = text.count("</answer>")
    answer = answers[-1] if answers else None
    truncated = False
    if answer is None:
        issues.append("no_answer")
        truncated = True
    elif not all(close for _, close in found):
        issues.append("unclosed_answer")
        truncated = not found[-1][1]
    if len(answers) > 1:
        issues.append("multiple_answers")
    if not steps:
        issues.append("no_steps")
    if numbers != list(range(1, len(numbers) + 1)):
        issues.append("misnumbered_steps")
    tail = text[text.rfind("</answer>") + len("</answer>") :] if closed_answers else ""
    if "".join(outside).strip() or tail.strip():
        issues.append("text_outside_tags")
    if answer is not None and answer == "":
        issues.append("empty_answer")
    well_formed = not issues
    return ParsedAttempt(tuple(steps), answer, well_formed, truncated, tuple(dict.fromkeys(issues)), tuple(numbers))


_NUM_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


def normalize_answer(ans) -> str | None:
    """Strip the wrapping a model or dataset puts around a final answer."""
    if ans is None:
        return None
    s = str(ans).strip()
    # From the first `\boxed{` to the last `}`; str.find/rfind rather than a greedy regex, which
    # is quadratic on text with many `\boxed{` and no `}`.
    i, j = s.find("\\boxed{"), s.rfind("}")
    if i >= 0 and j >= i + len("\\boxed{"):
        s = s[i + len("\\boxed{") : j]
    s = s.strip().strip("$").strip()
    s = s.rstrip(".").strip()
    if re.fullmatch(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s or None


def _as_number(s: str) -> Fraction | None:
    if s is None or len(s) > 64 or not _NUM_RE.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def check_answer(pred, gold) -> bool:
    """True when `pred` equals `gold`: exact for plain numbers, math-verify for LaTeX.

    Never raises on model text: anything math-verify cannot parse counts as wrong.
    """
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p is None or g is None:
        return False
    gn, pn = _as_number(g), _as_number(p)
    if gn is not None:
        if pn is not None:
            return gn == pn
        if not any(c in p for c in "\\{}^/"):  # prose such as "13 apples": not a number answer
            return False
    if p == g:
        return True
    if len(p) > 2000:
        return False
    try:
        import threading

        from math_verify import parse, verify

        # math-verify's timeout is signal.alarm, which raises outside the main thread (and every
        # answer would then count as wrong); there the 2000-character cap is the only bound.
        t = 5 if threading.current_thread() is threading.main_thread() else None
        return bool(verify(parse(f"${g}$", parsing_timeout=t), parse(f"${p}$", parsing_timeout=t), timeout_seconds=t))
    except Exception:  # math-verify raises on hostile input; a failed parse is a wrong answer
        return False


def solver_messages(problem) -> list[dict]:
    """The student's chat: the step-format instructions and the question alone."""
    question = problem.question if hasattr(problem, "question") else str(problem)
    return [
        {"role": "system", "content": SOLVER_INSTRUCTIONS},
        {"role": "user", "content": question},
    ]
