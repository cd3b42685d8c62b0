"""Held-out metrics of the paper's tables: Avg@k, Pass@k, Maj@k, mean answer length, with CIs.

All scores are fractions in [0, 1] (the paper prints percentages). Each is computed per problem
and then averaged over problems; `bootstrap_ci` resamples problems, the unit the paper's
30-problem test set is small in.

| metric | per problem, from n >= k samples |
|---|---|
| `avg@k` | fraction of the samples that are correct |
| `pass@k` | 1 - C(n-c, k) / C(n, k), c correct: P(k of the n samples hold a correct one) |
| `maj@k` | the most frequent parsed answer among the first k samples is correct |
| `mean_length` | mean completion length in tokens |
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction
from typing import Sequence

import numpy as np

from .stepformat import normalize_answer

__all__ = ["pass_at_k", "avg_at_k", "maj_at_k", "vote_key", "bootstrap_ci", "summarize"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    Stable product form (Chen et al. 2021, "Evaluating Large Language Models Trained on Code",
    Fig. 3): 1 - prod_{i=n-c+1}^{n} (1 - k / i). Naive: `1 - comb(n - c, k) / comb(n, k)`.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def avg_at_k(correct: Sequence[bool]) -> float:
    """Fraction of one problem's samples that are correct (Avg@k with k = len(correct))."""
    if len(correct) == 0:
        raise ValueError("avg_at_k of no samples")
    return float(np.mean(np.asarray(correct, dtype=float)))


def vote_key(answer: str | None) -> str | None:
    """The string answers vote with: `normalize_answer`, numbers canonicalised ("8.0" -> "8")."""
    s = normalize_answer(answer)
    if s is None:
        return None
    try:
        if len(s) <= 64:
            return str(Fraction(s))
    except (ValueError, ZeroDivisionError):
        pass
    return s


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool]) -> float:
    """1.0 when the majority answer is correct, else 0.0.

    Votes are `vote_key(answer)`; unparsed answers (None) do not vote, and a problem with no
    vote scores 0. Ties go to the answer whose first vote came earliest in sample order, a rule
    that does not look at correctness. The majority answer's correctness is that of its first
    sample.
    """
    if len(answers) != len(correct):
        raise ValueError(f"maj_at_k: {len(answers)} answers but {len(correct)} correctness flags")
    keys = [vote_key(a) for a in answers]
    counts = Counter(key for key in keys if key is not None)
    if not counts:
        return 0.0
    first = {}
    for i, key in enumerate(keys):
        if key is not None:
            first.setdefault(key, i)
    winner = min(counts, key=lambda key: (-counts[key], first[key]))
    return float(bool(correct[first[winner]]))


def bootstrap_ci(values_per_problem: Sequence[float], *, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean over problems and its percentile-bootstrap (1 - alpha) interval.

    Problems are resampled with replacement `n_boot` times; lo and hi are the alpha/2 and
    1 - alpha/2 quantiles of the resampled means (Efron & Tibshirani 1993, percentile method).
    """
    v = np.asarray(values_per_problem, dtype=float)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D list of values, got shape {v.shape}")
    if not 0 < alpha < 1 or n_boot < 1:
        raise ValueError(f"bootstrap_ci needs 0 < alpha < 1 and n_boot >= 1, got {alpha}, {n_boot}")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)  # (n_boot,)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(lo), float(hi)


def summarize(correct: Sequence[Sequence[bool]], answers: Sequence[Sequence[str | None]],
              lengths: Sequence[Sequence[int]], *, k: int, n_boot: int = 1000, seed: int = 0
              ) -> dict[str, dict[str, float]]:
    """`avg@k`, `pass@k`, `maj@k`, `mean_length`, each {"mean", "ci_low", "ci_high"}.

    Inputs are per problem, per sample. Every problem needs n >= k samples: Pass@k uses all n
    (unbiased estimator), Avg@k and mean length average all n, Maj@k votes over the first k.
    """
    if not (len(correct) == len(answers) == len(lengths)) or not correct:
        raise ValueError(f"summarize needs equally many (> 0) problems in correct, answers and "
                         f"lengths; got {len(correct)}, {len(answers)}, {len(lengths)}")
    per: dict[str, list[float]] = {"avg@k": [], "pass@k": [], "maj@k": [], "mean_length": []}
    for i, (c, a, n_tok) in enumerate(zip(correct, answers, lengths)):
        if not (len(c) == len(a) == len(n_tok)) or len(c) < k:
            raise ValueError(f"problem {i}: needs >= k={k} samples with as many answers and "
                             f"lengths; got {len(c)}, {len(a)}, {len(n_tok)}")
        per["avg@k"].append(avg_at_k(c))
        per["pass@k"].append(pass_at_k(len(c), int(sum(map(bool, c))), k))
        per["maj@k"].append(maj_at_k(a[:k], c[:k]))
        per["mean_length"].append(float(np.mean(n_tok)))
    out = {}
    for name, values in per.items():
        mean, lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed)
        out[name] = {"mean": mean, "ci_low": lo, "ci_high": hi}
    return out
