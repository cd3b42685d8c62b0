"""Student and teacher prompts of the three conditions; the only thing that differs between runs.

    student, teacher = build_prompts("stepalign", problems, tokenizer, cfg, critiques)

- Student (every condition): the solver instructions and the question alone
  (`stepformat.solver_messages`), rendered with `cfg.student_chat_template_kwargs`.
- Teacher: the same system turn; the user turn is the question plus a context block, rendered
  with `cfg.teacher_chat_template_kwargs` (the paper's teacher thinks, its student does not):
  - ``grpo``: no teacher (None);
  - ``refsol``: a reference solution, OPSD-style (`REFSOL_TEMPLATE`): ``reference_style``
    ``independent`` uses `Problem.reference_solution` (a dataset-style derivation, the paper's),
    ``aligned`` uses ``metadata["aligned_reference"]`` (else the rendered `reference_steps`);
  - ``stepalign``: the critic's critique of this very rollout, in its style (`STEPALIGN_TEMPLATE`).

A teacher prompt longer than `cfg.max_context_tokens` tokens is cut inside the context block,
keeping the question, the start of the context and the closing instruction (`TRUNCATION_MARKER`
marks the cut), with one `warnings.warn` per `build_prompts` call.

Departures / choices where the paper is silent:
1. The template wording is ours (after OPSD's "reference solution, then solve it yourself").
2. A rollout whose critique is unusable gets no teacher prompt (None): the trainer masks it out
   of the loss and counts it in ``critic/unusable_frac``.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

from .stepformat import render_steps, solver_messages

__all__ = [
    "REFSOL_TEMPLATE",
    "STEPALIGN_TEMPLATE",
    "TRUNCATION_MARKER",
    "student_messages",
    "teacher_messages",
    "reference_text",
    "apply_chat",
    "template_variables",
    "build_prompts",
]

CONDITIONS = ("grpo", "refsol", "stepalign")

REFSOL_TEMPLATE = (
    "{question}\n\n"
    "Here is a reference solution to this problem:\n"
    "{context}\n\n"
    "Now solve the problem yourself in the required format."
)
STEPALIGN_TEMPLATE = (
    "{question}\n\n"
    "Here is a critic's correction of an attempt at this problem:\n"
    "{context}\n\n"
    "Now solve the problem yourself in the required format."
)
TRUNCATION_MARKER = "\n[... truncated ...]"


def student_messages(problem) -> list[dict]:
    """The student's chat: solver instructions (system) and the question alone (user)."""
    return solver_messages(problem)


def reference_text(problem, reference_style: str = "independent") -> str:
    """The RefSol context: the independent dataset-style solution, or the solver-aligned one."""
    if reference_style == "independent":
        ref = (problem.reference_solution or "").strip()
    elif reference_style == "aligned":
        meta = problem.metadata or {}
        ref = meta.get("aligned_reference") or (
            render_steps(problem.reference_steps, problem.answer) if problem.reference_steps else "")
    else:
        raise ValueError(f"reference_style must be 'independent' or 'aligned', got {reference_style!r}")
    if not ref:
        raise ValueError(f"problem {problem.id!r} has no {reference_style} reference solution")
    return ref


def _context_block(condition, problem, critique, reference_style) -> str | None:
    if condition == "grpo":
        return None
    if condition == "refsol":
        return reference_text(problem, reference_style)
    if condition == "stepalign":
        if critique is None:
            raise ValueError(f"stepalign needs a critique for problem {problem.id!r}")
        return critique.corrected if critique.usable and critique.corrected else None
    raise ValueError(f"unknown condition {condition!r}; choose from {CONDITIONS}")


def _teacher_chat(problem, condition, context: str) -> list[dict]:
    template = REFSOL_TEMPLATE if condition == "refsol" else STEPALIGN_TEMPLATE
    msgs = solver_messages(problem)
    msgs[-1] = {"role": "user", "content": template.format(question=problem.question, context=context)}
    return msgs


def teacher_messages(condition: str, problem, *, critique=None, reference_style: str = "independent",
                     style: str | None = None) -> list[dict] | None:
    """The teacher's chat for one rollout: None for ``grpo`` and for an unusable critique.

    style: when given, the critique's style must be this one (critiques are rendered in their
    style by the critic, which needs the attempt text; build the critic with ``style=``).
    """
    if style is not None and critique is not None and condition == "stepalign" and critique.style != style:
        raise ValueError(f"critique of problem {problem.id!r} has style {critique.style!r} but {style!r} was "
                         f"asked; build the critic with style={style!r}")
    context = _context_block(condition, problem, critique, reference_style)
    return None if context is None else _teacher_chat(problem, condition, context)


def template_variables(tokenizer) -> frozenset[str]:
    """Names a tokenizer's chat template reads (Jinja's undeclared variables)."""
    import jinja2
    import jinja2.meta

    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    if not template:
        return frozenset()
    return frozenset(jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template)))


def apply_chat(tokenizer, messages: list[dict], *, template_kwargs: dict | None = None,
               add_generation_prompt: bool = True) -> str:
    """Render `messages` with the tokenizer's chat template (text, not ids).

    `template_kwargs` (e.g. ``enable_thinking``) are passed only when the template reads them.
    transformers 5.17 hands every extra keyword to the Jinja template, where unknown names are
    silently unused (SmolLM2's output is identical with ``enable_thinking=True``); filtering them
    keeps the behaviour explicit and keeps a stray name from reaching the tokenizer call.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} "
                         "has no chat template")
    known = template_variables(tokenizer)
    kwargs = {k: v for k, v in (template_kwargs or {}).items() if k in known}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **kwargs)


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _fit(tokenizer, problem, condition, context, template_kwargs, max_tokens) -> tuple[str, bool]:
    """The teacher prompt, with the context cut so that the prompt has <= max_tokens tokens."""
    render = lambda ctx: apply_chat(tokenizer, _teacher_chat(problem, condition, ctx), template_kwargs=template_kwargs)  # noqa: E731
    prompt = render(context)
    if _n_tokens(tokenizer, prompt) <= max_tokens:
        return prompt, False
    budget = max_tokens - _n_tokens(tokenizer, render(TRUNCATION_MARKER))
    ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    while budget > 0:
        prompt = render(tokenizer.decode(ids[:budget]) + TRUNCATION_MARKER)
        over = _n_tokens(tokenizer, prompt) - max_tokens
        if over <= 0:
            return prompt, True
        budget -= over  # token merges at the cut can add a token or two
    return render(TRUNCATION_MARKER.lstrip("\n")), True  # the question alone does not fit


def build_prompts(condition: str, problems: Sequence, tokenizer, cfg: Any = None, critiques: Sequence | None = None,
                  ) -> tuple[list[str], list[str | None] | None]:
    """Chat-templated `(student_prompts, teacher_prompts)` for one batch of rollouts.

    condition: ``grpo`` (teacher_prompts is None), ``refsol`` or ``stepalign``.
    problems: one `Problem` per rollout. critiques: one `Critique` per rollout (``stepalign``).
    cfg: reads `student_chat_template_kwargs`, `teacher_chat_template_kwargs`, `max_context_tokens`
        and `reference_style` (None: `SDConfig` defaults).
    teacher_prompts[i] is None where critiques[i] is unusable (mask that rollout).
    """
    if cfg is None:
        from .config import SDConfig

        cfg = SDConfig()
    if condition not in CONDITIONS:
        raise ValueError(f"unknown condition {condition!r}; choose from {CONDITIONS}")
    students = [apply_chat(tokenizer, student_messages(p), template_kwargs=cfg.student_chat_template_kwargs)
                for p in problems]
    if condition == "grpo":
        return students, None
    if condition == "stepalign":
        if critiques is None or len(critiques) != len(problems):
            raise ValueError(f"stepalign needs one critique per problem; got "
                             f"{None if critiques is None else len(critiques)} for {len(problems)} problems")
    teachers: list[str | None] = []
    n_cut = 0
    for i, p in enumerate(problems):
        context = _context_block(condition, p, critiques[i] if critiques is not None else None, cfg.reference_style)
        if context is None:
            teachers.append(None)
            continue
        prompt, cut = _fit(tokenizer, p, condition, context, cfg.teacher_chat_template_kwargs, cfg.max_context_tokens)
        teachers.append(prompt)
        n_cut += cut
    if n_cut:
        warnings.warn(f"{n_cut} of {len(problems)} {condition} teacher prompts were longer than "
                      f"max_context_tokens={cfg.max_context_tokens} and were truncated inside the context block",
                      stacklevel=2)
    return students, teachers
