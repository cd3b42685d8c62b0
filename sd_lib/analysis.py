"""Per-token advantage analysis: where along a wrong rollout does each teacher context put A_t?

The paper's mechanism (PAPER_NOTES "Per-token advantage analysis"): with the step-aligned
critique the self-teacher puts large negative A_t on the first erroneous step and non-negative
A_t on the correct prefix before it (a process reward model for free), while a reference
solution spreads negative A_t over the whole rollout. The paper shows one rollout; this module
turns that into numbers over many rollouts.

    A_t = log pi(y_t | x, c, y<t) - log pi(y_t | x, y<t)          (teacher minus student)

Every completion token gets a *part*: `correct_prefix` (inside a step before the first error),
`first_error` (inside the first erroneous step), `after_error` (inside a later step) or `other`
(step/answer tags, the answer, the stop token, text outside steps). Per rollout and context:

- mean A_t per part;
- AUROC of -A_t for telling first-error tokens (positives) from correct-prefix tokens
  (negatives): P(A_err < A_prefix) + 1/2 P(A_err = A_prefix) (Mann-Whitney U / (n_pos n_neg));
  1 = the error step is always more penalised than the prefix, 0.5 = no localisation;
- the same AUROC over whole steps (`step_auroc`), each step scored by -sum of its A_t: is
  the erroneous step ranked below the correct steps before it?
- the share of sum_t |A_t| that falls on the first erroneous step.

    rollouts = sample_erroneous_rollouts(model, tok, problems, critic=critic, k=4, ...)
    df = context_advantages(model, tok, rollouts, critics={"aligned": c1, ...})
    table = localisation_table(df)
    print(describe_localisation(table))

The statistics (`auroc`, `localisation_stats`, `rollout_stats`, `localisation_table`,
`describe_localisation`) are pure functions of arrays/DataFrames; only
`sample_erroneous_rollouts` and `context_advantages` run a model.

Departures from the paper:
1. The paper plots A_t along one rollout and reports no statistics; the part means, AUROCs and
   |A_t| share are this library's summaries of that plot.
2. The solver scored is the warmed-up solver without adapter (or any model passed in); the
   paper's plot is along a rollout of its solver during training.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "PARTS",
    "CONTEXTS",
    "CONTEXT_LABELS",
    "auroc",
    "part_means",
    "error_abs_share",
    "localisation_stats",
    "rollout_stats",
    "localisation_table",
    "describe_localisation",
    "example_rollout",
    "advantage_summary",
    "step_char_spans",
    "token_char_spans",
    "label_tokens",
    "ErroneousRollout",
    "sample_erroneous_rollouts",
    "context_advantages",
]

PARTS = ("correct_prefix", "first_error", "after_error", "other")

# name -> teacher context: the condition and the options of `contexts.teacher_messages`.
CONTEXTS: dict[str, dict] = {
    "refsol_independent": {"condition": "refsol", "reference_style": "independent", "style": None},
    "refsol_aligned": {"condition": "refsol", "reference_style": "aligned", "style": None},
    "stepalign_aligned": {"condition": "stepalign", "reference_style": "independent", "style": "aligned"},
    "stepalign_quote_error": {"condition": "stepalign", "reference_style": "independent", "style": "quote_error"},
    "stepalign_no_trace": {"condition": "stepalign", "reference_style": "independent", "style": "no_trace"},
}

CONTEXT_LABELS = {
    "refsol_independent": "RefSol (independent reference)",
    "refsol_aligned": "RefSol (aligned reference)",
    "stepalign_aligned": "StepAlignFB (aligned)",
    "stepalign_quote_error": "StepAlignFB (quote error)",
    "stepalign_no_trace": "StepAlignFB (no trace)",
}


# ----------------------------------------------------------------------------- statistics

def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`, tied values sharing the mean of their ranks (scipy's 'average')."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    # boundaries of runs of equal values in the sorted array
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + 1 + e) / 2.0  # mean of ranks s+1 .. e
    return ranks


def auroc(positive_scores, negative_scores) -> float:
    """P(s_pos > s_neg) + 1/2 P(s_pos = s_neg): the Mann-Whitney U statistic / (n_pos n_neg).

    Naive equivalent: mean over all pairs (i, j) of [p_i > n_j] + 0.5 [p_i == n_j].
    Computed from average ranks in O(n log n). NaN when either side is empty (or holds NaN).
    """
    pos = np.asarray(positive_scores, dtype=np.float64).ravel()
    neg = np.asarray(negative_scores, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0 or np.isnan(pos).any() or np.isnan(neg).any():
        return math.nan
    ranks = _average_ranks(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def _as_arrays(advantages, parts) -> tuple[np.ndarray, np.ndarray]:
    adv = np.asarray(advantages, dtype=np.float64).ravel()
    lab = np.asarray(parts, dtype=object).ravel()
    if adv.shape != lab.shape:
        raise ValueError(f"advantages ({adv.size}) and parts ({lab.size}) must have one entry per token")
    unknown = set(lab.tolist()) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown part label(s) {sorted(map(str, unknown))}; expected {PARTS}")
    return adv, lab


def part_means(advantages, parts) -> dict[str, float]:
    """Mean A_t over the tokens of each part (NaN for a part with no tokens).

    advantages: (T,) A_t of one rollout; parts: (T,) labels from `PARTS`.
    """
    adv, lab = _as_arrays(advantages, parts)
    return {p: float(adv[lab == p].mean()) if (lab == p).any() else math.nan for p in PARTS}


def error_abs_share(advantages, parts) -> float:
    """sum_{t in first error} |A_t| / sum_t |A_t| over all tokens (NaN when every A_t is 0)."""
    adv, lab = _as_arrays(advantages, parts)
    total = np.abs(adv).sum()
    return float(np.abs(adv[lab == "first_error"]).sum() / total) if total > 0 else math.nan


def localisation_stats(advantages, parts, steps=None) -> dict[str, float]:
    """One rollout under one context: `mean_<part>`, `sum_<part>`, `n_<part>` for every part,
    `auroc` (of -A_t, first-error tokens vs correct-prefix tokens), `error_abs_share`, and,
    when `steps` (each token's 1-based step, 0 outside steps) is given, `step_auroc`: the same
    AUROC over whole steps scored by -sum_{t in step} A_t (the step's teacher/student
    log-likelihood ratio), the first erroneous step against the correct-prefix steps (NaN when
    the error is at step 1 or `steps` is None).

    Token-level AUROC weighs every token of the erroneous step equally, though usually one or
    two of its tokens carry the error and the rest are ordinary copying; the step-level AUROC
    asks the process-reward question directly: is the wrong step scored below the right ones?
    """
    adv, lab = _as_arrays(advantages, parts)
    out: dict[str, float] = {}
    for p in PARTS:
        sel = adv[lab == p]
        out[f"n_{p}"] = int(sel.size)
        out[f"sum_{p}"] = float(sel.sum())
        out[f"mean_{p}"] = float(sel.mean()) if sel.size else math.nan
    out["auroc"] = auroc(-adv[lab == "first_error"], -adv[lab == "correct_prefix"])
    out["error_abs_share"] = error_abs_share(adv, lab)
    out["step_auroc"] = math.nan
    if steps is not None:
        st = np.asarray(steps, dtype=np.int64).ravel()
        if st.shape != adv.shape:
            raise ValueError(f"steps ({st.size}) must have one entry per token ({adv.size})")
        score = {part: [-adv[(st == k) & (lab == part)].sum() for k in np.unique(st[(lab == part) & (st > 0)])]
                 for part in ("first_error", "correct_prefix")}
        out["step_auroc"] = auroc(score["first_error"], score["correct_prefix"])
    return out


def rollout_stats(df: pd.DataFrame) -> pd.DataFrame:
    """`localisation_stats` of every (context, rollout) of a tidy token table.

    df: one row per token with columns `context`, `rollout`, `part`, `advantage`
    (as returned by `context_advantages`). Returns one row per (context, rollout).
    """
    _require_columns(df, ("context", "rollout", "part", "advantage"))
    rows = []
    for (context, rollout), g in df.groupby(["context", "rollout"], sort=False):
        steps = g["step"] if "step" in g.columns else None
        rows.append({"context": context, "rollout": rollout, **localisation_stats(g["advantage"], g["part"], steps)})
    return pd.DataFrame(rows)


def _require_columns(df: pd.DataFrame, cols) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"token table lacks column(s) {missing}; has {list(df.columns)}")


def _context_summary(stats: pd.DataFrame, idx: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Token-weighted part means, rollout-mean AUROC and |A_t| share of a set of rollouts.

    idx: (n_boot, R) bootstrap draws of rollout rows; None summarises all rows once. Returns
    arrays of shape (n_boot,) (or () without idx); NaN where no rollout has the quantity.
    """
    idx = np.arange(len(stats))[None] if idx is None else idx  # (n_boot, R)
    out = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for p in PARTS:
            n = stats[f"n_{p}"].to_numpy(dtype=np.float64)[idx].sum(axis=1)  # (n_boot,)
            out[f"mean_{p}"] = np.where(n > 0, stats[f"sum_{p}"].to_numpy(dtype=np.float64)[idx].sum(axis=1) / n, np.nan)
        for name in ("auroc", "step_auroc", "error_abs_share"):
            v = stats[name].to_numpy(dtype=np.float64)[idx]  # (n_boot, R)
            ok = ~np.isnan(v)
            out[name] = np.where(ok.any(axis=1), np.where(ok, v, 0.0).sum(axis=1) / ok.sum(axis=1), np.nan)
    return out


def localisation_table(df: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0,
                       contexts: Sequence[str] | None = None) -> pd.DataFrame:
    """Per context: mean A_t per part (token-weighted over rollouts), token- and step-level
    AUROC and |A_t| share on the first error (means over rollouts), each with a 95% percentile-bootstrap CI over rollouts
    (`<stat>_ci_low`, `<stat>_ci_high`), plus `auroc_pooled` (all tokens of all rollouts),
    `n_rollouts` and `n_tokens`.

    Rollouts are the resampling unit: tokens of one rollout are not independent. (Not
    `metrics.bootstrap_ci`: the token-weighted means are ratios of sums over rollouts, so all
    statistics are recomputed from the same resampled rollouts, vectorised.)
    """
    stats = rollout_stats(df)
    names = list(contexts) if contexts is not None else list(dict.fromkeys(df["context"]))
    rng = np.random.default_rng(seed)
    rows = []
    for context in names:
        s = stats[stats["context"] == context].reset_index(drop=True)
        if s.empty:
            continue
        tok = df[df["context"] == context]
        point = {k: float(v[0]) for k, v in _context_summary(s).items()}
        row = {"context": context, "label": CONTEXT_LABELS.get(context, context),
               "n_rollouts": int(len(s)), "n_tokens": int(len(tok)), **point}
        row["auroc_pooled"] = auroc(-tok.loc[tok["part"] == "first_error", "advantage"],
                                    -tok.loc[tok["part"] == "correct_prefix", "advantage"])
        boots = _context_summary(s, rng.integers(0, len(s), size=(n_boot, len(s))))
        for key, vals in boots.items():
            vals = vals[~np.isnan(vals)]
            lo, hi = np.percentile(vals, [2.5, 97.5]) if vals.size else (math.nan, math.nan)
            row[f"{key}_ci_low"], row[f"{key}_ci_high"] = float(lo), float(hi)
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(table: pd.DataFrame, context: str, key: str, *, signed: bool = False, pct: bool = False) -> str:
    r = table.set_index("context").loc[context]
    v, lo, hi = r[key], r.get(f"{key}_ci_low", math.nan), r.get(f"{key}_ci_high", math.nan)
    if pct:
        return f"{100 * v:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"
    f = "+.3f" if signed else ".2f"
    return f"{v:{f}} [{lo:{f}}, {hi:{f}}]"


def describe_localisation(table: pd.DataFrame) -> str:
    """Plain-English report of a `localisation_table`, generated from its numbers.

    States each context's AUROC, prefix mean and |A_t| share, then checks the paper's
    expectation point by point (StepAlignFB localised: AUROC > 0.5 and above RefSol's, prefix
    mean >= 0; RefSol diffuse: prefix mean < 0; quote_error: positive A_t on the error; no_trace:
    negative on the prefix), saying for each whether it holds and whether the 95% CI excludes
    the threshold. Nothing here is written in advance of the numbers.
    """
    if table.empty:
        return "No erroneous rollouts: nothing to report."
    have = set(table["context"])
    t = table.set_index("context")
    n = int(t["n_rollouts"].max())
    lines = [f"Over {n} erroneous rollouts (95% bootstrap CIs over rollouts in brackets):"]
    for c in table["context"]:
        lines.append(
            f"- {CONTEXT_LABELS.get(c, c)}: token AUROC {_fmt(table, c, 'auroc')}, step AUROC "
            f"{_fmt(table, c, 'step_auroc')}; mean A_t on the correct prefix "
            f"{_fmt(table, c, 'mean_correct_prefix', signed=True)}, on the first erroneous step "
            f"{_fmt(table, c, 'mean_first_error', signed=True)}; share of |A_t| on the first erroneous step "
            f"{_fmt(table, c, 'error_abs_share', pct=True)}."
        )

    def check(context, key, op, threshold, claim):
        if context not in have or not np.isfinite(t.loc[context, key]):
            return None
        v, lo, hi = t.loc[context, key], t.loc[context].get(f"{key}_ci_low"), t.loc[context].get(f"{key}_ci_high")
        holds = v > threshold if op == ">" else v >= threshold if op == ">=" else v < threshold
        if lo is not None and np.isfinite(lo) and np.isfinite(hi):
            clear = lo > threshold if op in (">", ">=") else hi < threshold
            against = hi < threshold if op in (">", ">=") else lo > threshold
            sure = (f" (the 95% CI [{lo:.3g}, {hi:.3g}] excludes {threshold:g})" if clear or against
                    else f" (but the 95% CI [{lo:.3g}, {hi:.3g}] includes {threshold:g})")
        else:
            sure = ""
        return f"{claim}: {'holds' if holds else 'does not hold'}, {key} = {v:+.3f}{sure}."

    checks = [
        check("stepalign_aligned", "auroc", ">", 0.5, "StepAlignFB localises the error token by token (AUROC > 0.5)"),
        check("stepalign_aligned", "step_auroc", ">", 0.5,
              "StepAlignFB scores the erroneous step below the correct ones (step AUROC > 0.5)"),
        check("stepalign_aligned", "mean_correct_prefix", ">=", 0.0, "StepAlignFB is non-negative on the correct prefix"),
        check("refsol_independent", "mean_correct_prefix", "<", 0.0, "RefSol is negative on the correct prefix (diffuse)"),
        check("stepalign_quote_error", "mean_first_error", ">", 0.0,
              "Quoting the wrong step makes the teacher endorse the error (A_t > 0 on it)"),
        check("stepalign_no_trace", "mean_correct_prefix", "<", 0.0,
              "Without the solver's trace, A_t is negative on the correct prefix"),
    ]
    for key, what, at in (("auroc", "token AUROC", 1), ("step_auroc", "step AUROC", 3)):
        if {"stepalign_aligned", "refsol_independent"} <= have:
            a, r = t.loc["stepalign_aligned", key], t.loc["refsol_independent", key]
            if np.isfinite(a) and np.isfinite(r):
                overlap = not (t.loc["stepalign_aligned", f"{key}_ci_low"] > t.loc["refsol_independent", f"{key}_ci_high"]
                               or t.loc["stepalign_aligned", f"{key}_ci_high"] < t.loc["refsol_independent", f"{key}_ci_low"])
                checks.insert(at, f"StepAlignFB localises better than RefSol (higher {what}): "
                                  f"{'holds' if a > r else 'does not hold'}, {a:.3f} vs {r:.3f}"
                                  f"{' (the CIs overlap)' if overlap else ' (the CIs do not overlap)'}.")
    checks = [c for c in checks if c]
    if checks:
        lines.append("The paper's expectations, checked against these numbers:")
        lines += [f"- {c}" for c in checks]
        held = sum(" holds" in c for c in checks)
        lines.append(f"{held} of {len(checks)} expectations hold on this data.")
    return "\n".join(lines)


def advantage_summary(tokens: pd.DataFrame, table: pd.DataFrame, **meta) -> dict:
    """JSON-ready record of an analysis: `meta` (profile, seed, counts ...), the generated
    `summary` sentence, per-context `contexts` (`localisation_table` rows) and per-rollout
    `rollouts` (`rollout_stats` rows); NaN becomes null."""
    import json

    records = lambda df: json.loads(df.to_json(orient="records"))  # noqa: E731 -- NaN -> null
    return {**meta, "summary": describe_localisation(table), "contexts": records(table),
            "rollouts": records(rollout_stats(tokens))}


def example_rollout(df: pd.DataFrame) -> int:
    """A representative rollout for the per-token plot, chosen by a fixed rule (not by its A_t):
    among rollouts with tokens in the correct prefix, the first error and after it (else any
    with a prefix, else all), the one of median length; ties to the lowest index."""
    _require_columns(df, ("rollout", "part", "token_index"))
    one = df.drop_duplicates(["rollout", "token_index"])
    parts = one.groupby("rollout")["part"].agg(set)
    length = one.groupby("rollout").size()
    for need in ({"correct_prefix", "first_error", "after_error"}, {"correct_prefix", "first_error"}, set()):
        ids = [r for r, p in parts.items() if need <= p]
        if ids:
            break
    order = sorted(ids, key=lambda r: (length[r], r))
    return int(order[(len(order) - 1) // 2])


# ----------------------------------------------------------------------------- token labels

_OPEN_RE = re.compile(r"<step_(\d{1,4})>")


def step_char_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of each step body, in order of appearance.

    Mirrors `stepformat.parse_attempt`: steps live before the first `<answer>`; a body runs from
    `<step_k>` to `</step_k>`, or to the next `<step_` tag / the answer / the end when unclosed.
    So the i-th span is the body of `parse_attempt(text).steps[i]` (before stripping).
    """
    answer_start = text.find("<answer>")
    region_end = len(text) if answer_start < 0 else answer_start
    opens = list(_OPEN_RE.finditer(text, 0, region_end))
    spans = []
    for j, m in enumerate(opens):
        limit = opens[j + 1].start() if j + 1 < len(opens) else region_end
        end = text.find(f"</step_{m.group(1)}>", m.end(), limit)
        spans.append((m.end(), limit if end < 0 else end))
    return spans


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def token_char_spans(tokenizer, completion_ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """(text, spans): the decoded completion and each token's character span [start, end) in it.

    Decoding is `tokenizer.decode(ids, skip_special_tokens=True,
    clean_up_tokenization_spaces=False)`, as `sampling.generate` does, so special tokens (the
    stop token) get an empty span. Fast path: when re-encoding the text gives back the same
    tokens, the fast tokenizer's offset mapping is used. Otherwise (a sampled, non-canonical
    tokenization; a slow tokenizer) spans come from incremental decoding, token t ending where
    decode(ids[:t+1]) stops agreeing with the full text, so a character split over several
    byte-level tokens goes to the token that completes it. Spans are contiguous and monotone.
    """
    ids = [int(i) for i in completion_ids]
    text = _decode(tokenizer, ids)
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    plain = [i for i in ids if i not in special]
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == plain:
            offsets, spans, pos = iter(enc["offset_mapping"]), [], 0
            for i in ids:
                if i in special:
                    spans.append((pos, pos))
                else:
                    s, e = next(offsets)
                    s, e = max(int(s), pos), max(int(e), pos)
                    spans.append((s, e))
                    pos = e
            return text, spans
    except (NotImplementedError, ValueError, TypeError, KeyError):  # slow tokenizers: no offsets
        pass
    spans, prev = [], 0
    for t in range(len(ids)):
        end = max(prev, _common_prefix(_decode(tokenizer, ids[: t + 1]), text))
        spans.append((prev, end))
        prev = end
    if spans and prev < len(text):  # whatever the prefixes never reached belongs to the last token
        spans[-1] = (spans[-1][0], len(text))
    return text, spans


def _step_part(step: int, first_error_step: int | None) -> str:
    if step == 0:
        return "other"
    if first_error_step is None or step < first_error_step:
        return "correct_prefix"
    return "first_error" if step == first_error_step else "after_error"


def label_tokens(tokenizer, completion_ids: Sequence[int], completion_text: str | None, steps,
                 first_error_step: int | None, *, return_steps: bool = False):
    """The part of every completion token: `correct_prefix` / `first_error` / `after_error` /
    `other` (tags, answer, stop token, text outside steps).

    tokenizer: the one that produced `completion_ids`.
    completion_ids: (T,) token ids of the completion, stop token included.
    completion_text: the decoded completion (as `Rollouts.texts`); used to check the decoding.
    steps: the parsed steps (`ParsedAttempt.steps`, or the `ParsedAttempt` itself).
    first_error_step: 1-based index of the first erroneous step (None: every step is correct).
    return_steps: also return each token's 1-based step number (0 outside steps).

    A token takes the label most of its characters carry (a token straddling a tag and a step
    body counts as the step on a tie); a token without characters (special tokens) is `other`.
    """
    if hasattr(steps, "steps"):
        steps = steps.steps
    text, spans = token_char_spans(tokenizer, completion_ids)
    if completion_text is not None and completion_text != text:
        warnings.warn("label_tokens: completion_text differs from the decoded completion_ids; "
                      "labelling the decoded text", stacklevel=2)
    bodies = step_char_spans(text)
    if steps is not None and len(bodies) != len(steps):
        warnings.warn(f"label_tokens: found {len(bodies)} steps in the text but {len(steps)} were given",
                      stacklevel=2)
    char_step = np.zeros(len(text) + 1, dtype=np.int64)  # 0 = outside every step body
    for k, (s, e) in enumerate(bodies, start=1):
        char_step[s:e] = k
    token_steps = []
    for s, e in spans:
        if e <= s:
            token_steps.append(0)
            continue
        counts = np.bincount(char_step[s:e])
        inside = counts[1:]
        if inside.size and inside.max() > 0 and inside.max() >= counts[0]:
            token_steps.append(int(np.argmax(inside)) + 1)
        else:
            token_steps.append(0)
    parts = [_step_part(k, first_error_step) for k in token_steps]
    return (parts, token_steps) if return_steps else parts


# ----------------------------------------------------------------------------- model runs

@dataclass(frozen=True)
class ErroneousRollout:
    """A sampled solver rollout the critic found wrong (case D) at a known step.

    prompt_ids: (P,) student prompt; completion_ids: (T,) sampled tokens (stop token included);
    text: decoded completion; steps: parsed steps; first_error_step: 1-based.
    """

    problem: object
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    text: str
    steps: tuple[str, ...]
    first_error_step: int


def sample_erroneous_rollouts(model, tokenizer, problems, *, critic, k: int, temperature: float,
                              max_new_tokens: int, seed: int, max_rollouts: int | None = None,
                              batch_size: int = 32, chat_template_kwargs: dict | None = None,
                              progress: bool = False) -> list[ErroneousRollout]:
    """Sample `k` rollouts per problem from the solver and keep those the critic marks case D
    (incorrect) with a known first erroneous step inside the parsed steps; at most
    `max_rollouts`, in sampling order.
    """
    from .contexts import apply_chat
    from .sampling import generate
    from .stepformat import parse_attempt, solver_messages

    if not problems:
        raise ValueError("sample_erroneous_rollouts: the problem list is empty")
    prompts = [apply_chat(tokenizer, solver_messages(p), template_kwargs=chat_template_kwargs) for p in problems]
    roll = generate(model, tokenizer, prompts, k=k, temperature=temperature, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, seed=seed, progress=progress)
    rep = [problems[i] for i in roll.prompt_index]
    critiques = critic.critique_batch(rep, roll.texts)
    out = []
    for p, c, text, p_ids, c_ids in zip(rep, critiques, roll.texts, roll.prompt_ids, roll.completion_ids):
        if getattr(c, "case", None) != "D" or c.first_error_step is None:
            continue
        steps = parse_attempt(text).steps
        if not 1 <= c.first_error_step <= len(steps):
            continue
        out.append(ErroneousRollout(p, tuple(p_ids), tuple(c_ids), text, tuple(steps), int(c.first_error_step)))
        if max_rollouts is not None and len(out) >= max_rollouts:
            break
    return out


def _logps(model, tokenizer, prompt_ids, completion_ids, *, batch_size: int, kind: str | None) -> list[list[float]]:
    """log pi(y_t | prompt, y<t) per row, unpadded; no gradient, eval mode (dropout off).

    kind None: the model's current weights (a model without adapter); else `teacher_mode(kind)`.
    """
    import torch

    from .alignment import completion_logps, pack_batch, teacher_mode

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[float]] = []
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(prompt_ids), batch_size):
            batch = pack_batch(prompt_ids[s:s + batch_size], completion_ids[s:s + batch_size],
                               pad_token_id=pad, device=device)
            mode = teacher_mode(model, kind) if kind is not None else torch.no_grad()
            with mode:
                lp = completion_logps(model, batch).float().cpu()  # (B, T)
            out += [lp[b, : len(c)].tolist() for b, c in enumerate(completion_ids[s:s + batch_size])]
    finally:
        model.train(was_training)
    return out


def context_advantages(model, tokenizer, rollouts: Sequence[ErroneousRollout], *,
                       critics: Mapping[str, object] | Callable[[str], object] | None = None,
                       cfg=None, contexts: Sequence[str] = tuple(CONTEXTS),
                       teacher_kind: str | None = None, batch_size: int = 8) -> pd.DataFrame:
    """A_t of every token of every rollout under every teacher context, as a tidy table.

    The student (question only: the rollout's own prompt) and each teacher (question + context)
    score the same sampled tokens; A_t = teacher - student (`advantages.token_advantages`).
    Contexts (`CONTEXTS`): RefSol with the independent or the aligned reference, StepAlignFB
    with the critique in style `aligned`, `quote_error` or `no_trace` (a critique of this very
    rollout). Teacher prompts come from `contexts.build_prompts`, exactly as in training
    (`cfg`'s chat-template kwargs and `max_context_tokens`; None: `SDConfig` defaults).

    critics: style -> critic (or a callable style -> critic) for the StepAlignFB contexts.
    teacher_kind: None scores with the current weights under no_grad in eval mode (the
        warmed-up solver without adapter); `base`/`live`/`ema` use `alignment.teacher_mode`
        (a peft model; the student side then runs as `live`).
    Returns one row per (context, rollout, token) with columns: rollout, problem_id, context,
    token_index, token_id, token, step, part, first_error_step, student_logp, teacher_logp,
    advantage. A rollout whose critique is unusable in a context is left out of that context
    (with a warning).
    """
    from dataclasses import replace

    import torch

    from .advantages import token_advantages
    from .contexts import build_prompts

    if cfg is None:
        from .config import SDConfig

        cfg = SDConfig()
    unknown = [c for c in contexts if c not in CONTEXTS]
    if unknown:
        raise ValueError(f"unknown context(s) {unknown}; choose from {list(CONTEXTS)}")
    if not rollouts:
        raise ValueError("context_advantages: no rollouts")
    problems = [r.problem for r in rollouts]
    comp = [list(r.completion_ids) for r in rollouts]
    student = _logps(model, tokenizer, [list(r.prompt_ids) for r in rollouts], comp,
                     batch_size=batch_size, kind=None if teacher_kind is None else "live")
    labels = [label_tokens(tokenizer, r.completion_ids, r.text, r.steps, r.first_error_step, return_steps=True)
              for r in rollouts]
    token_text = [[tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False) for t in c]
                  for c in comp]
    critiques: dict[str, list] = {}
    frames = []
    for name in contexts:
        spec = CONTEXTS[name]
        crit = None
        if spec["condition"] == "stepalign":
            style = spec["style"]
            if style not in critiques:
                if critics is None:
                    raise ValueError(f"context {name!r} needs a critic for style {style!r}: pass critics=")
                critic = critics[style] if isinstance(critics, Mapping) else critics(style)
                critiques[style] = critic.critique_batch(problems, [r.text for r in rollouts])
            crit = critiques[style]
        ctx_cfg = replace(cfg, reference_style=spec["reference_style"])
        _, teachers = build_prompts(spec["condition"], problems, tokenizer, ctx_cfg, crit)
        keep = [i for i, t in enumerate(teachers) if t is not None]
        if len(keep) < len(rollouts):
            warnings.warn(f"context {name!r}: {len(rollouts) - len(keep)} rollout(s) with an unusable critique left out",
                          stacklevel=2)
        if not keep:
            continue
        t_ids = [tokenizer(teachers[i], add_special_tokens=False)["input_ids"] for i in keep]
        teacher = _logps(model, tokenizer, t_ids, [comp[i] for i in keep], batch_size=batch_size, kind=teacher_kind)
        for j, i in enumerate(keep):
            s, t = torch.tensor(student[i]), torch.tensor(teacher[j])
            adv = token_advantages(t[None], s[None], torch.ones(1, len(comp[i])))[0].tolist()  # (T,)
            parts, steps = labels[i]
            frames.append(pd.DataFrame({
                "rollout": i,
                "problem_id": getattr(rollouts[i].problem, "id", str(i)),
                "context": name,
                "token_index": np.arange(len(comp[i])),
                "token_id": comp[i],
                "token": token_text[i],
                "step": steps,
                "part": parts,
                "first_error_step": rollouts[i].first_error_step,
                "student_logp": student[i],
                "teacher_logp": teacher[j],
                "advantage": adv,
            }))
    if not frames:
        raise ValueError("context_advantages: every context lost every rollout (unusable critiques)")
    return pd.concat(frames, ignore_index=True)
