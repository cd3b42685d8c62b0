"""Tests for sd_lib.plots: every plot function writes its fixed file from synthetic data."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from sd_lib.analysis import localisation_table  # noqa: E402
from sd_lib.config import get_config  # noqa: E402
from sd_lib.plots import (  # noqa: E402
    figure_path,
    plot_advantage_ablation,
    plot_advantage_by_part,
    plot_avg_vs_step,
    plot_token_advantages,
    plot_training_curves,
    token_html,
)


@pytest.fixture
def cfg(tmp_path):
    return get_config("smoke", seed=3, condition="stepalign", figures_dir=str(tmp_path / "figs"))


@pytest.fixture
def tokens():
    """A token table as `analysis.context_advantages` returns: 3 rollouts x 2 contexts."""
    rng = np.random.default_rng(0)
    rows = []
    parts = ["other"] * 2 + ["correct_prefix"] * 5 + ["other"] * 2 + ["first_error"] * 4 + ["after_error"] * 3 + ["other"]
    for context in ("refsol_independent", "stepalign_aligned"):
        for r in range(3):
            for t, part in enumerate(parts):
                rows.append({"rollout": r, "problem_id": f"arith-{r}", "context": context, "token_index": t,
                             "token": ["<", "step", "3", " +", "$", "\n", " "][t % 7], "part": part,
                             "first_error_step": 2, "advantage": float(rng.normal())})
    return pd.DataFrame(rows)


def _title_text(fig):
    texts = [fig._suptitle.get_text()] if fig._suptitle is not None else []
    return " ".join(texts + [ax.get_title() for ax in fig.axes])


def test_training_curves(cfg):
    """curves_<condition>.png from metric rows; profile and seed in the title; absent metrics ok."""
    rows = [{"step": s, "loss": 1.0 / s, "reward/mean": 0.1 * s, "adv/mean": -0.1, "eval/avg@k": 0.2} for s in (1, 2, 3)]
    fig = plot_training_curves(rows, cfg)
    assert figure_path(cfg, "curves", condition="stepalign").name == "curves_stepalign.png"
    assert figure_path(cfg, "curves", condition="stepalign").stat().st_size > 0
    assert "profile smoke, seed 3" in _title_text(fig)


def test_avg_vs_step(cfg):
    """avg_vs_step.png from `report.load_eval_results`-shaped rows."""
    rows = [{"condition": c, "step": s, "metric": "avg@k", "mean": 10.0 + s, "ci_low": 5.0 + s, "ci_high": 15.0 + s,
             "k": 4} for c in ("grpo", "refsol", "stepalign") for s in (0, 2, 4)]
    fig = plot_avg_vs_step(pd.DataFrame(rows), cfg)
    assert (cfg_path := figure_path(cfg, "avg_vs_step")).exists() and cfg_path.name == "avg_vs_step.png"
    assert "profile smoke, seed 3" in _title_text(fig) and "Avg@4" in _title_text(fig)


def test_token_advantage_figures(cfg, tokens):
    """The per-token rollout plot, the by-part plot and the ablation plot each write their file."""
    for fig, name in ((plot_token_advantages(tokens, cfg), "token_advantage_rollout"),
                      (plot_advantage_by_part(tokens, cfg), "advantage_by_part"),
                      (plot_advantage_ablation(localisation_table(tokens, n_boot=20), cfg), "advantage_ablation")):
        assert figure_path(cfg, name).exists(), name
        assert "profile smoke, seed 3" in _title_text(fig), name
    with pytest.raises(ValueError, match="none of the contexts"):
        plot_token_advantages(tokens, cfg, contexts=("refsol_aligned",))


def test_token_html():
    """Diverging colours (negative red, positive blue), tooltips with A_t, escaped text."""
    out = token_html(["<a>", " b", "\n"], [-2.0, 2.0, 0.0], parts=["first_error", "other", "other"])
    assert 'title="A_t = -2.000 (first_error)"' in out and 'title="A_t = +2.000 (other)"' in out
    assert "&lt;a&gt;" in out and "<a>" not in out
    assert "background:#67001f" in out  # RdBu's red end at -vmax
    assert "background:#053061" in out  # RdBu's blue end at +vmax
    with pytest.raises(ValueError):
        token_html(["a"], [1.0, 2.0])
