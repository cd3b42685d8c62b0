"""sd_lib.metrics against hand-computed values, the naive binomial formula, and a known coverage."""

from math import comb

import numpy as np
import pytest

from sd_lib.metrics import avg_at_k, bootstrap_ci, maj_at_k, pass_at_k, summarize, vote_key


def test_pass_at_k_hand_values():
    """n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7; edge cases 0, 1 and c/n at k=1."""
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(12, 0, 12) == 0.0
    assert pass_at_k(12, 1, 12) == 1.0
    assert pass_at_k(4, 3, 2) == 1.0  # n - c < k
    assert pass_at_k(12, 5, 1) == pytest.approx(5 / 12)


def test_pass_at_k_matches_naive_binomial():
    """The stable product form equals 1 - C(n-c, k)/C(n, k) (Chen et al. 2021)."""
    for n in range(1, 17):
        for c in range(n + 1):
            for k in range(1, n + 1):
                naive = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(naive, abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


def test_avg_at_k():
    assert avg_at_k([True, False, False, True]) == 0.5
    with pytest.raises(ValueError):
        avg_at_k([])


def test_maj_at_k_majority_and_unparsed():
    """Majority wins; None does not vote, even when it is the most frequent 'answer'."""
    assert maj_at_k(["8", "8", "7"], [True, True, False]) == 1.0
    assert maj_at_k(["7", "8", "7"], [False, True, False]) == 0.0
    assert maj_at_k([None, None, None, "8"], [False, False, False, True]) == 1.0
    assert maj_at_k([None, None], [False, False]) == 0.0


def test_maj_at_k_ties_go_to_earliest_first_vote():
    """Ties are broken by sample order, never by correctness: same votes, reversed order."""
    assert maj_at_k(["7", "8", "8", "7"], [False, True, True, False]) == 0.0
    assert maj_at_k(["8", "7", "7", "8"], [True, False, False, True]) == 1.0


def test_maj_at_k_votes_on_normalised_answers():
    """'8.0', '8' and '$8$' are one vote; they outnumber two '9'."""
    assert vote_key("8.0") == vote_key("8") == vote_key("$8$") == "8"
    assert maj_at_k(["9", "8.0", "9", "8", "$8$"], [False, True, False, True, True]) == 1.0


def test_bootstrap_ci_on_constant_and_mean():
    mean, lo, hi = bootstrap_ci([0.25] * 10)
    assert mean == lo == hi == 0.25
    v = [0, 1, 1, 0, 1]
    mean, lo, hi = bootstrap_ci(v, seed=3)
    assert mean == pytest.approx(0.6) and lo <= mean <= hi
    assert bootstrap_ci(v, seed=3) == (mean, lo, hi)  # deterministic in seed
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_bootstrap_ci_coverage_bernoulli():
    """Over 200 samples of 50 Bernoulli(0.3) draws, the 95% CI holds 0.3 in about 95% of them."""
    rng = np.random.default_rng(1234)
    hits = 0
    for rep in range(200):
        lo, hi = bootstrap_ci(rng.random(50) < 0.3, n_boot=1000, seed=rep)[1:]
        hits += lo <= 0.3 <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_summarize_small_case():
    """Two problems, k=2: hand-computed Avg@2, Pass@2, Maj@2 and lengths."""
    correct = [[True, False], [False, False]]
    answers = [["8", "9"], ["1", None]]
    lengths = [[10, 20], [30, 50]]
    s = summarize(correct, answers, lengths, k=2)
    assert set(s) == {"avg@k", "pass@k", "maj@k", "mean_length"}
    assert s["avg@k"]["mean"] == pytest.approx(0.25)
    assert s["pass@k"]["mean"] == pytest.approx(0.5)
    assert s["maj@k"]["mean"] == pytest.approx(0.5)  # tie 8 vs 9 -> "8" (first) is right
    assert s["mean_length"]["mean"] == pytest.approx(27.5)
    for v in s.values():
        assert v["ci_low"] <= v["mean"] <= v["ci_high"]


def test_summarize_rejects_too_few_samples():
    with pytest.raises(ValueError, match="problem 1"):
        summarize([[True, True], [True]], [["1", "1"], ["1"]], [[1, 1], [1]], k=2)
