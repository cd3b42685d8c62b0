"""The frozen critic: a step-aligned correction of each solver rollout (the paper's four cases).

One interface, three backends::

    critic = make_critic(cfg)                       # cfg.critic: "programmatic" | "hf:<model>" | URL
    c = critic.critique(problem, attempt_text)      # -> Critique
    cs = critic.critique_batch(problems, attempts)  # -> list[Critique]

- `ProgrammaticCritic`: exact, for generated arithmetic (`Problem.metadata` terms/ops/intermediates).
- `HFCritic`: an in-process transformers model (frozen, eval mode, greedy, batched, left padding).
- `OpenAICritic`: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, llama.cpp server).

Every backend produces critic *text* in one format (`CRITIC_OUTPUT_FORMAT`), which goes through
the one parser `parse_critic_output`; the programmatic critic writes that text too, so the
backends are interchangeable. Model output that is empty, unparseable or far too long becomes a
critique with ``usable=False`` (masked out of the loss, counted as ``critic/unusable_frac``);
a *request* that fails (endpoint down, HTTP errors, malformed responses after retries) raises
`CriticUnavailableError` and is never scored as a critique.

The four cases (paper): A fully correct -> reproduce the attempt exactly; B right answer, a step
or justification missing -> insert the missing step; C incomplete / out of tokens -> condense and
finish; D incorrect -> copy the correct steps verbatim, fix the earliest error, continue correctly.

Critique styles (the paper's quoting ablation), applied to the parsed critique so every backend
supports them; ``p`` is the number of leading solver steps the critic copied verbatim, ``e`` the
solver's wrong step. For a D critique of ``3 + 7 - 2 + 5`` whose attempt wrote ``10 - 2 = 9``:

``aligned`` (the paper's; default) -- the corrected trace itself::

    <step_1>3 + 7 = 10</step_1>
    <step_2>10 - 2 = 8</step_2>
    <step_3>8 + 5 = 13</step_3>
    <answer>13</answer>

``quote_error`` -- the same, with the wrong step quoted verbatim before its fix::

    <step_1>3 + 7 = 10</step_1>
    The attempt's step 2 is wrong:
    <step_2>10 - 2 = 9</step_2>
    Corrected:
    <step_2>10 - 2 = 8</step_2>
    <step_3>8 + 5 = 13</step_3>
    <answer>13</answer>

``no_trace`` -- the correction alone, without the solver's correct prefix::

    Corrected from step 2 on:
    <step_2>10 - 2 = 8</step_2>
    <step_3>8 + 5 = 13</step_3>
    <answer>13</answer>

Details: B quotes with "skips a step" instead of "is wrong"; a wrong final answer with correct
steps ("First error: answer") quotes ``<answer>..</answer>``; A and C have nothing to quote, so
``quote_error`` equals ``aligned`` for them. ``no_trace`` with nothing after the prefix writes
"The attempt is correct. Final answer:" (A) or "Corrected final answer:" before the answer.

Departures / choices where the paper is silent:
1. The exact critic prompt and output format are ours (the paper's were not found).
2. The quoting-ablation texts above are ours; `quote_error` keeps the prefix so that it differs
   from `aligned` only by the quoted wrong step.
3. The critic sees the dataset-style `reference_solution` plus the final answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from .safe_arith import parse_step
from .stepformat import check_answer, parse_attempt, render_steps

__all__ = [
    "CASES",
    "STYLES",
    "CRITIC_PROMPT",
    "CRITIC_OUTPUT_FORMAT",
    "Critique",
    "CriticUnavailableError",
    "build_critic_messages",
    "strip_thinking",
    "parse_critic_output",
    "format_critic_output",
    "apply_style",
    "Critic",
    "ProgrammaticCritic",
    "HFCritic",
    "OpenAICritic",
    "CritiqueCache",
    "make_critic",
    "crafted_attempts",
]

log = logging.getLogger(__name__)

CASES = ("A", "B", "C", "D")
STYLES = ("aligned", "quote_error", "no_trace")

MAX_RAW_CHARS = 1_000_000
"""Critic text longer than this is not even scanned (unusable, ``too_long``)."""
MAX_CRITIQUE_CHARS = 20_000
"""Critic output after removing its thinking longer than this is unusable (``too_long``)."""
MAX_CORRECTED_STEPS = 200
"""A corrected trace with more steps is unusable (``too_many_steps``)."""
MAX_ATTEMPT_CHARS_IN_PROMPT = 20_000
"""The attempt shown to a model critic is cut to this many characters (marked as cut)."""
MAX_ATTEMPT_STEPS = 2 * MAX_CORRECTED_STEPS
"""The programmatic critic reads at most this many solver steps; a longer attempt counts as cut off."""
PROGRAMMATIC_VERSION = 1
"""Bump when the programmatic critic's output changes, so that caches are not reused."""

CRITIC_OUTPUT_FORMAT = """Case: <A, B, C or D>
First error: <step k, answer, or none>
Corrected solution:
<step_1>...</step_1>
<step_2>...</step_2>
...
<answer>...</answer>"""

CRITIC_PROMPT = """You are checking a student's step-by-step solution to a math problem. You are given the problem, the student's attempt (each step inside numbered <step_k> tags, then the final answer inside <answer> tags) and a reference solution.

Write the student's solution corrected as little as possible. First decide which case applies:
A. The attempt is fully correct: reproduce it exactly.
B. The final answer is right but a step or its justification is missing: insert the missing step(s) and keep everything else as written.
C. The attempt is incomplete or was cut off before its final answer, with correct steps so far: keep the correct steps, condense, and finish the solution.
D. The attempt is incorrect: copy the correct steps before the first error verbatim, fix the earliest error, and continue correctly to the right answer.

Copy correct steps character for character. Use one calculation per step. Reply in exactly this format and nothing else:
{output_format}

Problem:
{question}

Student's attempt:
{attempt}

Reference solution:
{reference}
Final answer: {answer}"""


class CriticUnavailableError(RuntimeError):
    """The critic could not be asked (endpoint down or failing); never a critique result."""


@dataclass(frozen=True)
class Critique:
    """One critique of one attempt.

    corrected: the text the teacher sees: the corrected step-tagged trace rendered in `style`;
        None when unusable.
    case: "A" | "B" | "C" | "D", or None when the critic gave none (or the critique is unusable).
    first_error_step: 1-based index of the solver's first wrong (D) or unjustified (B) step;
        None for A, C, a wrong final answer after correct steps, or when not given.
    raw: the critic's raw text (thinking included; cut at `MAX_RAW_CHARS`).
    usable: False when the critic's output could not be used (masked out of the loss).
    style: "aligned" | "quote_error" | "no_trace".
    error: why it is unusable (``empty``, ``too_long``, ``unclosed_think``, ``no_trace``,
        ``no_answer``, ``empty_answer``, ``too_many_steps``, ``not_text``), else None.
    """

    corrected: str | None
    case: str | None
    first_error_step: int | None
    raw: str
    usable: bool
    style: str = "aligned"
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Critique":
        return cls(**{k: d.get(k) for k in ("corrected", "case", "first_error_step", "raw", "usable", "style", "error")})


# ----------------------------------------------------------------------------- prompt


def _reference_text(problem) -> str:
    ref = (getattr(problem, "reference_solution", "") or "").strip()
    if not ref:
        meta = getattr(problem, "metadata", None) or {}
        ref = meta.get("aligned_reference") or render_steps(getattr(problem, "reference_steps", ()), None)
    return ref or "(none given)"


def build_critic_messages(problem, attempt_text: str) -> list[dict]:
    """The critic's chat: one user turn, `CRITIC_PROMPT` filled with question, attempt, reference.

    The attempt is shown as written (cut to `MAX_ATTEMPT_CHARS_IN_PROMPT` characters, marked).
    No system turn: QwQ-style reasoning critics are meant to be prompted without one.
    """
    attempt = attempt_text if isinstance(attempt_text, str) else ""
    if len(attempt) > MAX_ATTEMPT_CHARS_IN_PROMPT:
        attempt = attempt[:MAX_ATTEMPT_CHARS_IN_PROMPT] + "\n[... the attempt was cut here ...]"
    content = CRITIC_PROMPT.format(
        output_format=CRITIC_OUTPUT_FORMAT,
        question=problem.question,
        attempt=attempt.strip() or "(empty)",
        reference=_reference_text(problem),
        answer=problem.answer,
    )
    return [{"role": "user", "content": content}]


def _prompt_hash() -> str:
    return hashlib.sha256((CRITIC_PROMPT + CRITIC_OUTPUT_FORMAT).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- parsing

_CASE_RE = re.compile(r"^[ \t>*_#-]*case[*_ \t]*[:=\-][ \t*_]*\(?([ABCD])\b", re.I | re.M)
_FIRST_ERROR_RE = re.compile(
    r"^[ \t>*_#-]*first[ \t]+error[*_ \t]*[:=\-][ \t*_]*(?:(?:step[ \t_]*)?(\d{1,5})\b|(answer)|(none|n/?a|no error))",
    re.I | re.M,
)
_MARKER_RE = re.compile(r"corrected solution[*_ \t]*:", re.I)


def strip_thinking(text: str) -> tuple[str, str | None]:
    """Remove the critic's thinking: everything up to the last ``</think>`` (closed blocks and an
    unopened leading think, as QwQ's template opens it in the prompt). Returns (text, error):
    error is ``unclosed_think`` when a ``<think>`` is never closed (the critic ran out thinking).
    """
    idx = text.rfind("</think>")
    if idx >= 0:
        text = text[idx + len("</think>") :]
    if "<think>" in text:
        return "", "unclosed_think"
    return text, None


def _unusable(raw: str, style: str, error: str, case: str | None = None) -> Critique:
    return Critique(None, case, None, raw, False, style, error)


def parse_critic_output(text, attempt_text: str | None = None, *, style: str = "aligned",
                        max_chars: int = MAX_CRITIQUE_CHARS) -> Critique:
    """Critic text -> `Critique`, never raising on the text.

    Steps: cut at `MAX_RAW_CHARS`; strip thinking (`strip_thinking`); the corrected trace runs from
    the first ``<step_`` tag after the first "Corrected solution:" line (or anywhere, when that
    line is missing) to the last ``</answer>``; the ``Case:`` / ``First error:`` lines are read
    before the trace (after it, if absent there). The trace must have at least one step and a
    non-empty closed answer; it is re-rendered canonically (steps renumbered 1..N). Then `style`
    is applied (`apply_style`, which needs `attempt_text` for styles other than ``aligned``).
    Raises ValueError only for a bad `style` argument (a caller's mistake, not critic text).
    """
    if style not in STYLES:
        raise ValueError(f"unknown critique style {style!r}; choose from {STYLES}")
    if not isinstance(text, str):
        return _unusable("", style, "not_text")
    raw = text[:MAX_RAW_CHARS]
    if len(text) > MAX_RAW_CHARS:
        return _unusable(raw, style, "too_long")
    body, err = strip_thinking(text)
    if err:
        return _unusable(raw, style, err)
    if not body.strip():
        return _unusable(raw, style, "empty")
    if len(body) > max_chars:
        return _unusable(raw, style, "too_long")

    marker = _MARKER_RE.search(body)
    start = body.find("<step_", marker.end() if marker else 0)
    if start < 0:
        start = body.find("<answer>", marker.end() if marker else 0)
    end = body.rfind("</answer>")
    header = body[: marker.start() if marker else max(start, 0)]
    cases = _CASE_RE.findall(header) or _CASE_RE.findall(body[end:] if end >= 0 else "")
    case = cases[-1].upper() if cases else None
    if start < 0 or end < start:
        return _unusable(raw, style, "no_trace" if start < 0 else "no_answer", case)
    parsed = parse_attempt(body[start : end + len("</answer>")])
    if not parsed.steps:
        return _unusable(raw, style, "no_steps", case)
    if not parsed.answer:
        return _unusable(raw, style, "empty_answer", case)
    if len(parsed.steps) > MAX_CORRECTED_STEPS:
        return _unusable(raw, style, "too_many_steps", case)

    errors = _FIRST_ERROR_RE.findall(header)
    first_error = int(errors[-1][0]) or None if errors and errors[-1][0] and case in ("B", "D") else None
    base = Critique(render_steps(parsed.steps, parsed.answer), case, first_error, raw, True, "aligned")
    return base if style == "aligned" else apply_style(base, attempt_text, style)


def format_critic_output(case: str, first_error: int | str | None, steps: Sequence[str], answer: str) -> str:
    """Write a critique in `CRITIC_OUTPUT_FORMAT` (what the programmatic critic emits)."""
    if case not in CASES:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    where = "none" if first_error is None else "answer" if first_error == "answer" else f"step {int(first_error)}"
    return f"Case: {case}\nFirst error: {where}\nCorrected solution:\n{render_steps(steps, answer)}"


def _norm(s: str) -> str:
    return " ".join(s.split())


def apply_style(critique: Critique, attempt_text: str | None, style: str) -> Critique:
    """Render an ``aligned`` critique in `style` (see the module docstring for the exact texts).

    `attempt_text` is the solver's attempt the critique is about (needed for `quote_error` and
    `no_trace`: the copied prefix and the quoted step come from it). The quoted item of a B/D
    critique: its first-error step if given, else the first step the critic did not copy, else
    (all steps copied) the attempt's final answer when it is wrong.
    """
    if style not in STYLES:
        raise ValueError(f"unknown critique style {style!r}; choose from {STYLES}")
    if critique.style != "aligned":
        raise ValueError(f"apply_style needs an 'aligned' critique, got style {critique.style!r}")
    if style == "aligned" or not critique.usable:
        return replace(critique, style=style)
    if attempt_text is None:
        raise ValueError(f"critique style {style!r} needs the attempt text")
    fixed = parse_attempt(critique.corrected)
    steps, answer = list(fixed.steps), fixed.answer
    attempt = parse_attempt(attempt_text)
    p = 0  # leading solver steps the critic copied verbatim (up to whitespace)
    while p < min(len(steps), len(attempt.steps)) and _norm(steps[p]) == _norm(attempt.steps[p]):
        p += 1
    tag = lambda i, s: f"<step_{i}>{s}</step_{i}>"  # noqa: E731
    rest = [tag(i, s) for i, s in enumerate(steps[p:], start=p + 1)] + [f"<answer>{answer}</answer>"]
    if style == "no_trace":
        if p < len(steps):
            head = f"Corrected from step {p + 1} on:"
        else:
            head = "The attempt is correct. Final answer:" if critique.case == "A" else "Corrected final answer:"
        return replace(critique, corrected="\n".join([head, *rest]), style=style)
    # quote_error
    if critique.case not in ("B", "D"):
        return replace(critique, style=style)  # A and C: nothing to quote
    e = critique.first_error_step
    if e is None or not 1 <= e <= len(attempt.steps):
        e = p + 1 if p < len(attempt.steps) else None
    if e is not None:
        what = "skips a step" if critique.case == "B" else "is wrong"
        quote = [f"The attempt's step {e} {what}:", tag(e, attempt.steps[e - 1])]
    elif attempt.answer is not None and not check_answer(attempt.answer, answer):
        quote = ["The attempt's answer is wrong:", f"<answer>{attempt.answer}</answer>"]
    else:
        return replace(critique, style=style)
    prefix = [tag(i, s) for i, s in enumerate(steps[:p], start=1)]
    return replace(critique, corrected="\n".join([*prefix, *quote, "Corrected:", *rest]), style=style)


# ----------------------------------------------------------------------------- critics


class Critic(ABC):
    """Base class: `critique_batch` is the one method a backend implements."""

    style: str = "aligned"
    identity: str = "critic"

    def critique(self, problem, attempt_text: str) -> Critique:
        return self.critique_batch([problem], [attempt_text])[0]

    @abstractmethod
    def critique_batch(self, problems: Sequence, attempts: Sequence[str]) -> list[Critique]:
        """One critique per (problem, attempt), in order."""

    @staticmethod
    def _check_batch(problems, attempts) -> list[str]:
        """Equal lengths, and attempts as text (a non-text attempt is treated as empty)."""
        if len(problems) != len(attempts):
            raise ValueError(f"critique_batch got {len(problems)} problems but {len(attempts)} attempts")
        return [a if isinstance(a, str) else "" for a in attempts]

    def _check_style(self, style):
        if style not in STYLES:
            raise ValueError(f"unknown critique style {style!r}; choose from {STYLES}")
        self.style = style


def _canonical_chain(problem) -> tuple[list, list, list, list[str]]:
    meta = getattr(problem, "metadata", None) or {}
    terms, ops, inter = meta.get("terms"), meta.get("ops"), meta.get("intermediates")
    if not (isinstance(terms, list) and isinstance(ops, list) and isinstance(inter, list)) \
            or len(terms) < 2 or len(ops) != len(terms) - 1 or len(inter) != len(ops):
        raise ValueError(
            f"ProgrammaticCritic needs an arithmetic problem with metadata terms/ops/intermediates "
            f"(len(ops) == len(terms) - 1 == len(intermediates)); problem {getattr(problem, 'id', '?')!r} "
            f"(source {meta.get('source')!r}) has terms={terms!r}, ops={ops!r}, intermediates={inter!r}")
    accs = [terms[0], *inter]
    steps = list(problem.reference_steps) if len(problem.reference_steps) == len(ops) else \
        [f"{accs[i]} {ops[i]} {terms[i + 1]} = {accs[i + 1]}" for i in range(len(ops))]
    return terms, ops, accs, steps


class ProgrammaticCritic(Critic):
    """Exact critic for generated arithmetic chains; writes `CRITIC_OUTPUT_FORMAT` text.

    Each solver step is checked with `safe_arith.parse_step` and matched against the chain
    ``acc_k op_k term_k = acc_{k+1}`` (left to right), tracking how far the solver has got:
    - ``ok``: the next operation, right value (``7 + 3`` accepted for ``3 + 7``);
    - ``unjustified``: a true step that merges several operations or skips ahead;
    - ``redundant``: a true step redoing an operation already done;
    - ``wrong``: anything else (false, wrong operand, unparseable). Walking stops at the first.
    Case: D if a step is wrong or the closed final answer is wrong (a wrong, unclosed last step of
    a cut-off attempt counts as cut, not wrong); else C if there is no closed answer (or more than
    `MAX_ATTEMPT_STEPS` steps, of which only the first are read); else B if a
    step was unjustified or operations are missing; else A. Corrected trace: A the attempt; B the
    solver's steps with merged/skipped steps expanded and missing ones added, its answer; C the
    same with redundant steps dropped (condensed), finished to the answer; D the solver's steps
    before the error verbatim, then the exact chain from there on.
    """

    def __init__(self, *, style: str = "aligned"):
        self._check_style(style)
        self.identity = f"programmatic/v{PROGRAMMATIC_VERSION}"

    def __repr__(self):
        return f"ProgrammaticCritic(style={self.style!r})"

    def critique_batch(self, problems, attempts) -> list[Critique]:
        attempts = self._check_batch(problems, attempts)
        return [parse_critic_output(self.raw_critique(p, a), a, style=self.style) for p, a in zip(problems, attempts)]

    @staticmethod
    def _classify(body: str, j: int, terms, ops, accs):
        """(kind, s, e): the step computes chain positions s -> e; kind as in the class docstring."""
        chk = parse_step(body)
        flat = chk.lhs_flat
        if not chk.ok or flat is None or len(flat) < 3:
            return "wrong", None, None
        pairs = list(zip(flat[1::2], flat[2::2]))
        n, m = len(ops), len(pairs)
        found = []
        for s in range(n - m + 1):
            if accs[s] == flat[0] and chk.rhs_value == accs[s + m] and \
                    all(pairs[k] == (ops[s + k], terms[s + k + 1]) for k in range(m)):
                found.append(s)
        if m == 1 and not found:  # commutative single step: "7 + 3" for "3 + 7"
            op, b = pairs[0]
            found = [s for s in range(n) if op == ops[s] and op in "+*" and flat[0] == terms[s + 1]
                     and b == accs[s] and chk.rhs_value == accs[s + 1]]
        if j in found:
            return ("ok" if m == 1 else "unjustified"), j, j + m
        ahead = [s for s in found if s > j]
        if ahead:
            return "unjustified", ahead[0], ahead[0] + m
        if found:
            return "redundant", found[-1], found[-1] + m
        return "wrong", None, None

    def raw_critique(self, problem, attempt_text) -> str:
        """The critic text for one attempt (`CRITIC_OUTPUT_FORMAT`)."""
        terms, ops, accs, chain = _canonical_chain(problem)
        text = attempt_text if isinstance(attempt_text, str) else ""
        att = parse_attempt(text)
        steps = list(att.steps)
        closed = att.answer is not None and not att.truncated
        if len(steps) > MAX_ATTEMPT_STEPS:  # a runaway attempt: read as cut off, condensed in case C
            steps, closed = steps[:MAX_ATTEMPT_STEPS], False
        walk, j = [], 0
        for body in steps:
            kind, s, e = self._classify(body, j, terms, ops, accs)
            walk.append((kind, s, e, j))
            if kind == "wrong":
                break
            if kind in ("ok", "unjustified"):
                j = e
        if walk and walk[-1][0] == "wrong" and len(walk) == len(att.steps) and not closed \
                and self._last_unclosed(text, att):
            walk.pop()  # the cut-off last step of a truncated attempt
            steps.pop()
            j = max([w[2] for w in walk if w[0] in ("ok", "unjustified")], default=0)
        gold = problem.answer

        if walk and walk[-1][0] == "wrong":
            w = len(walk)
            return format_critic_output("D", w, steps[: w - 1] + chain[walk[-1][3]:], gold)
        if closed and not check_answer(att.answer, gold):
            return format_critic_output("D", "answer", steps + chain[j:], gold)

        def expanded(drop_redundant: bool) -> list[str]:
            out = []
            for body, (kind, s, e, jp) in zip(steps, walk):
                if kind == "unjustified":
                    out += chain[jp:s] + [body] if e - s == 1 else chain[jp:e]
                elif kind == "ok" or not drop_redundant:
                    out.append(body)
            return out + chain[j:]

        if not closed:
            return format_critic_output("C", None, expanded(drop_redundant=True), gold)
        unjust = [i for i, w in enumerate(walk, start=1) if w[0] == "unjustified"]
        if unjust or j < len(ops):
            return format_critic_output("B", unjust[0] if unjust else None, expanded(drop_redundant=False), att.answer)
        return format_critic_output("A", None, steps, att.answer)

    @staticmethod
    def _last_unclosed(text: str, att) -> bool:
        if not att.step_numbers:
            return False
        k = att.step_numbers[-1]
        return text.rfind(f"</step_{k}>") < text.rfind(f"<step_{k}>")


class HFCritic(Critic):
    """An in-process transformers critic: frozen, eval mode, greedy, batched, left-padded.

    Pass `(model, tokenizer)` or a `name` for `sd_lib.models.load_model_and_tokenizer`. The model's
    train/eval mode is restored after each batch (the critic may share weights with the solver).
    `template_kwargs` go to the chat template (only those it uses; see `contexts.apply_chat`).
    """

    def __init__(self, model=None, tokenizer=None, *, name: str | None = None, style: str = "aligned",
                 max_new_tokens: int = 8192, batch_size: int = 8, template_kwargs: dict | None = None,
                 device=None):
        self._check_style(style)
        if model is None or tokenizer is None:
            if name is None:
                raise ValueError("HFCritic needs (model, tokenizer) or name=")
            from .models import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(name, device=device)
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = int(max_new_tokens), max(1, int(batch_size))
        self.template_kwargs = dict(template_kwargs or {})
        name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        self.identity = (f"hf:{name}|max_new_tokens={self.max_new_tokens}|prompt={_prompt_hash()}"
                         f"|tpl={json.dumps(self.template_kwargs, sort_keys=True)}")

    def __repr__(self):
        return f"HFCritic({self.identity!r}, style={self.style!r})"

    def generate(self, prompts: list[str]) -> list[str]:
        """Greedy completions of already chat-templated prompts (raw text, special tokens removed)."""
        import torch

        tok, model = self.tokenizer, self.model
        was_training, side = model.training, tok.padding_side
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        model.eval()
        out: list[str] = []
        try:
            with torch.inference_mode():
                for i in range(0, len(prompts), self.batch_size):
                    enc = tok(prompts[i : i + self.batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(model.device)
                    gen = model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens,
                                         pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
                    out += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        finally:
            tok.padding_side = side
            model.train(was_training)
        return out

    def critique_batch(self, problems, attempts) -> list[Critique]:
        from .contexts import apply_chat

        attempts = self._check_batch(problems, attempts)
        prompts = [apply_chat(self.tokenizer, build_critic_messages(p, a), template_kwargs=self.template_kwargs)
                   for p, a in zip(problems, attempts)]
        texts = self.generate(prompts) if prompts else []
        return [parse_critic_output(t, a, style=self.style) for t, a in zip(texts, attempts)]


def _normalise_base_url(url: str) -> str:
    from urllib.parse import urlsplit

    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"critic endpoint must be an http(s):// URL, got {url!r}")
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ValueError("put the critic's API key in the environment variable, not in the URL")
    url = url.rstrip("/")
    return url + "/v1" if parts.path.strip("/") == "" else url


class OpenAICritic(Critic):
    """A critic behind an OpenAI-compatible chat-completions endpoint, via the `openai` client.

    `base_url` like ``http://127.0.0.1:8000/v1`` (``/v1`` is added to a bare host). The API key
    is read from the environment variable `api_key_env` ("EMPTY" when unset) and never logged,
    printed or put in errors. Requests run `concurrency` at a time (a thread pool), each with
    `timeout_s`. Retries: the client's own retries are off (``max_retries=0``) so that one loop
    owns the budget: up to `max_retries` retries on connection errors, timeouts, HTTP 408/409/429
    and 5xx, and malformed responses (which the client does not retry), with exponential backoff
    ``retry_backoff_s * 2**i`` (jittered, capped at `max_backoff_s`; a server's Retry-After is
    honoured up to that cap). When they are spent, or on any other HTTP error (400, 401, 404 ...),
    `CriticUnavailableError` names the endpoint; a failed request is never scored as a critique.
    Only the model's output can make a critique unusable (empty, unparseable, too long).
    """

    _RETRY_STATUS = frozenset({408, 409, 429})

    def __init__(self, base_url: str, model: str, *, style: str = "aligned",
                 api_key_env: str = "SD_LIB_CRITIC_API_KEY", timeout_s: float = 600.0, max_retries: int = 5,
                 concurrency: int = 8, max_new_tokens: int = 8192, retry_backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, extra_body: dict | None = None):
        from openai import OpenAI

        self._check_style(style)
        self.base_url, self.model = _normalise_base_url(base_url), str(model)
        if max_retries < 0 or concurrency < 1 or timeout_s <= 0:
            raise ValueError(f"need max_retries >= 0, concurrency >= 1, timeout_s > 0; got "
                             f"{max_retries}, {concurrency}, {timeout_s}")
        self.api_key_env = api_key_env
        self.timeout_s, self.max_retries, self.concurrency = float(timeout_s), int(max_retries), int(concurrency)
        self.max_new_tokens = int(max_new_tokens)
        self.retry_backoff_s, self.max_backoff_s = float(retry_backoff_s), float(max_backoff_s)
        self.extra_body = dict(extra_body or {})
        self._key = os.environ.get(api_key_env) or "EMPTY"
        self._client = OpenAI(base_url=self.base_url, api_key=self._key, timeout=self.timeout_s, max_retries=0)
        self.identity = f"openai:{self.base_url}|{self.model}|max_new_tokens={self.max_new_tokens}|prompt={_prompt_hash()}"

    def __repr__(self):
        return f"OpenAICritic(base_url={self.base_url!r}, model={self.model!r}, style={self.style!r})"

    def _scrub(self, s: str) -> str:
        return s.replace(self._key, "***") if self._key and self._key != "EMPTY" else s

    def _retry_delay(self, attempt: int, err) -> float:
        delay = min(self.retry_backoff_s * 2**attempt, self.max_backoff_s) * (1 - 0.25 * random.random())
        headers = getattr(getattr(err, "response", None), "headers", None) or {}
        try:
            after = float(headers.get("retry-after", ""))
            delay = max(delay, min(after, self.max_backoff_s))
        except (TypeError, ValueError):
            pass
        return delay

    def complete(self, messages: list[dict]) -> str:
        """One chat completion's text ("" when the model returned no content); raises
        `CriticUnavailableError` when the endpoint fails beyond the retry budget."""
        import openai

        last, last_err = "", None
        for attempt in range(self.max_retries + 1):
            try:
                resp = self._client.chat.completions.create(
                    model=self.model, messages=messages, temperature=0.0, max_tokens=self.max_new_tokens,
                    extra_body=self.extra_body or None)
                choices = getattr(resp, "choices", None)
                if not isinstance(choices, list) or not choices or getattr(choices[0], "message", None) is None:
                    raise _MalformedResponse("response has no choices[0].message")
                content = choices[0].message.content
                if content is not None and not isinstance(content, str):
                    raise _MalformedResponse(f"message content is {type(content).__name__}, not text")
                return content or ""
            except openai.APIStatusError as err:
                status, last_err = err.status_code, err
                last = f"HTTP {status}"
                if status not in self._RETRY_STATUS and status < 500:
                    hint = f" (check the API key in ${self.api_key_env})" if status in (401, 403) else ""
                    raise CriticUnavailableError(
                        f"critic endpoint {self.base_url} rejected the request for model {self.model!r}: "
                        f"HTTP {status}{hint}: {self._scrub(str(err))[:300]}") from None
            except (openai.APIConnectionError, openai.APIResponseValidationError, _MalformedResponse,
                    json.JSONDecodeError) as err:  # timeouts are APIConnectionErrors
                last, last_err = f"{type(err).__name__}: {self._scrub(str(err))[:200]}", err
            if attempt < self.max_retries:
                delay = self._retry_delay(attempt, last_err)
                log.warning("critic endpoint %s: request failed (%s); retry %d/%d in %.2fs",
                            self.base_url, last, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise CriticUnavailableError(
            f"critic endpoint {self.base_url} (model {self.model!r}) failed {self.max_retries + 1} times; "
            f"last error: {last}. Is the server up and serving this model?")

    def critique_batch(self, problems, attempts) -> list[Critique]:
        attempts = self._check_batch(problems, attempts)
        if not problems:
            return []
        messages = [build_critic_messages(p, a) for p, a in zip(problems, attempts)]
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(messages)), thread_name_prefix="critic")
        try:
            texts = list(pool.map(self.complete, messages))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # fail now; requests in flight finish alone
            raise
        pool.shutdown()
        return [parse_critic_output(t, a, style=self.style) for t, a in zip(texts, attempts)]


class _MalformedResponse(Exception):
    """The endpoint answered 2xx with something that is not a chat completion."""


# ----------------------------------------------------------------------------- cache


class CritiqueCache(Critic):
    """`critic` with an on-disk JSONL cache in front: ``CritiqueCache(critic, path)``.

    Keyed by (problem id, attempt text hash, critic identity, style); only misses reach the
    critic (one batch, duplicates asked once); `hits`/`misses` count lookups. Failures
    (`CriticUnavailableError`) are raised and never cached. Each record is one line written
    with a single `os.write` on an ``O_APPEND`` descriptor under an exclusive `flock`, so
    concurrent writers (threads or processes) never interleave lines; a torn last line (a crash
    mid-write) is skipped on load and terminated before the next append, so the file is safe to
    reuse across reruns. Later records win over earlier ones.
    """

    def __init__(self, critic: Critic, path):
        if not hasattr(critic, "critique_batch"):
            raise TypeError(f"CritiqueCache(critic, path): {critic!r} is not a critic")
        self.critic, self.path = critic, Path(path)
        self.style, self.identity = critic.style, critic.identity
        self.hits = self.misses = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._data: dict[str, dict] = {}
        if self.path.exists():
            with open(self.path, "rb") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        self._data[rec["key"]] = rec["critique"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a torn or foreign line

    def __repr__(self):
        return f"CritiqueCache({self.critic!r}, {str(self.path)!r})"

    def __len__(self) -> int:
        return len(self._data)

    @staticmethod
    def key(problem_id: str, attempt_text: str, critic_identity: str, style: str) -> str:
        attempt_hash = hashlib.sha256(str(attempt_text).encode("utf-8", "surrogatepass")).hexdigest()
        return hashlib.sha256(json.dumps([str(problem_id), attempt_hash, critic_identity, style]).encode()).hexdigest()

    def get(self, key: str) -> Critique | None:
        d = self._data.get(key)
        return Critique.from_dict(d) if d is not None else None

    def put(self, key: str, critique: Critique) -> None:
        import fcntl

        d = critique.to_dict()
        line = (json.dumps({"key": key, "critique": d}, ensure_ascii=True) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn last line: end it first
                    line = b"\n" + line
                os.write(fd, line)
            finally:
                os.close(fd)  # closing releases the flock
            self._data[key] = d

    def critique_batch(self, problems, attempts) -> list[Critique]:
        attempts = self._check_batch(problems, attempts)
        keys = [self.key(getattr(p, "id", ""), a, self.identity, self.style) for p, a in zip(problems, attempts)]
        out: dict[str, Critique] = {}
        todo: dict[str, int] = {}
        for i, k in enumerate(keys):
            hit = self.get(k)
            if hit is not None:
                out[k] = hit
            else:
                todo.setdefault(k, i)
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            idx = list(todo.values())
            fresh = self.critic.critique_batch([problems[i] for i in idx], [attempts[i] for i in idx])
            for i, c in zip(idx, fresh):
                self.put(keys[i], c)
                out[keys[i]] = c
        return [out[k] for k in keys]


# ----------------------------------------------------------------------------- factory


def make_critic(spec: Any = None, cfg: Any = None, *, style: str | None = None, cache=None, **kwargs) -> Critic:
    """Build the critic named by `spec` (or by `cfg.critic` when `spec` is a config or None).

    spec: ``"programmatic"``, ``"hf:<model>"`` (any name `load_model_and_tokenizer` takes), or an
        ``http(s)://`` base URL of an OpenAI-compatible endpoint (model: `cfg.critic_model`).
    cfg: an `SDConfig` for the critic settings (`critique_style`, `critic_model`, `critic_*`);
        None uses `SDConfig`'s defaults.
    style: overrides `cfg.critique_style`. cache: a JSONL path: the critic is wrapped in `CritiqueCache`.
    kwargs: passed to the backend's constructor (e.g. `retry_backoff_s`, `model`/`tokenizer`).
    """
    if spec is not None and not isinstance(spec, str) and hasattr(spec, "critic"):
        cfg, spec = spec, spec.critic
    if cfg is None:
        from .config import SDConfig

        cfg = SDConfig()
    spec = cfg.critic if spec is None else spec
    style = style or cfg.critique_style
    if not isinstance(spec, str):
        raise ValueError(f"critic spec must be a string, got {spec!r}")
    if spec == "programmatic":
        critic: Critic = ProgrammaticCritic(style=style, **kwargs)
    elif spec.startswith("hf:") and len(spec) > 3:
        kwargs.setdefault("max_new_tokens", cfg.critic_max_new_tokens)
        critic = HFCritic(name=spec[3:] if "model" not in kwargs else None, style=style, **kwargs)
    elif spec.startswith(("http://", "https://")):
        params = dict(style=style, api_key_env=cfg.critic_api_key_env, timeout_s=cfg.critic_timeout_s,
                      max_retries=cfg.critic_max_retries, concurrency=cfg.critic_concurrency,
                      max_new_tokens=cfg.critic_max_new_tokens)
        critic = OpenAICritic(spec, kwargs.pop("model", cfg.critic_model), **{**params, **kwargs})
    else:
        raise ValueError(f"unknown critic {spec!r}: use 'programmatic', 'hf:<model>' or an http(s):// URL")
    return critic if cache is None else CritiqueCache(critic, cache)


def crafted_attempts(problem) -> dict[str, str]:
    """Hand-made attempts of an arithmetic problem, one per case (for demos and tests).

    A: the exact step trace. B: the first two operations merged into one step (a chain of one
    operation: the answer alone, no steps). C: the first half of the steps, cut off before the
    answer. D: the middle step's result off by one, the rest continued from the wrong value.
    """
    terms, ops, accs, chain = _canonical_chain(problem)
    merged = [f"{terms[0]} {ops[0]} {terms[1]} {ops[1]} {terms[2]} = {accs[2]}"] + chain[2:] if len(ops) > 1 else []
    e = len(ops) // 2 if len(ops) > 1 else 0
    wrong, acc = chain[:e], accs[e + 1] + 1
    wrong.append(f"{accs[e]} {ops[e]} {terms[e + 1]} = {acc}")
    for op, t in zip(ops[e + 1 :], terms[e + 2 :]):
        new = acc + t if op == "+" else acc - t if op == "-" else acc * t
        wrong.append(f"{acc} {op} {t} = {new}")
        acc = new
    return {
        "A": render_steps(chain, problem.answer),
        "B": render_steps(merged, problem.answer),
        "C": render_steps(chain[: max(1, len(chain) // 2)], None),
        "D": render_steps(wrong, str(acc)),
    }
