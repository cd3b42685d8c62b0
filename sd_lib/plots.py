"""One function per figure; each saves under a fixed name in the config's `figures_dir`.

    fig = plot_training_curves(read_metrics(run_dir), cfg)      # curves_<condition>.png
    fig = plot_avg_vs_step(load_eval_results(cfg), cfg)          # avg_vs_step.png
    fig = plot_token_advantages(df, cfg)                         # token_advantage_rollout.png
    fig = plot_advantage_by_part(df, cfg)                        # advantage_by_part.png
    fig = plot_advantage_ablation(localisation_table(df), cfg)   # advantage_ablation.png
    HTML(token_html(tokens, advantages))                         # inline token view (JupyterLab)

Every figure names the profile and seed in its title. Each function returns the matplotlib
Figure, closed in pyplot (so a notebook shows it once, as the cell's value) and saved as PNG.
Inputs are the files' contents (metric rows, eval tables, token tables), never notebook state.
"""

from __future__ import annotations

import html
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .config import resolve_path
from .report import CONDITION_LABELS

__all__ = [
    "FIGURE_NAMES",
    "figure_path",
    "plot_training_curves",
    "plot_avg_vs_step",
    "plot_token_advantages",
    "plot_advantage_by_part",
    "plot_advantage_ablation",
    "token_html",
]

FIGURE_NAMES = {
    "curves": "curves_{condition}.png",
    "avg_vs_step": "avg_vs_step.png",
    "token_advantage_rollout": "token_advantage_rollout.png",
    "advantage_by_part": "advantage_by_part.png",
    "advantage_ablation": "advantage_ablation.png",
}

CONDITION_COLORS = {"grpo": "#7f7f7f", "refsol": "#1f77b4", "stepalign": "#d62728"}
CURVE_METRICS = (
    ("loss", "loss"),
    ("reward/mean", "reward (share correct)"),
    ("eval/avg@k", "held-out Avg@k"),
    ("adv/mean", "mean A_t"),
    ("critic/unusable_frac", "unusable critiques"),
)
ADVANTAGE_CMAP = "RdBu"  # red: A_t < 0 (teacher penalises), blue: A_t > 0


def _who(cfg) -> str:
    return f"profile {cfg.profile}, seed {cfg.seed}"


def figure_path(cfg, name: str, **fmt) -> Path:
    """Where figure `name` (a key of FIGURE_NAMES) of `cfg` is saved."""
    return resolve_path(cfg.figures_dir) / FIGURE_NAMES[name].format(**fmt)


def _save(fig, cfg, name: str, **fmt) -> Path:
    import matplotlib.pyplot as plt

    path = figure_path(cfg, name, **fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _subplots(*args, **kw):
    import matplotlib.pyplot as plt
    import seaborn as sns

    with sns.axes_style("whitegrid"):
        return plt.subplots(*args, **kw)


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _tex_safe(s: str) -> str:
    """Token text for a matplotlib label: visible whitespace, no mathtext."""
    s = s.replace("$", r"\$").replace("\n", r"\n").replace("\t", r"\t")
    return s if s.strip() else "·" * len(s)


# ----------------------------------------------------------------------------- training

def plot_training_curves(rows, cfg):
    """Loss, reward/mean, eval/avg@k, adv/mean and critic/unusable_frac against step for one run
    (`cfg.condition`); a metric the condition does not log gets an empty panel saying so.
    rows: `train.read_metrics(run_dir)` (list of dicts) or a DataFrame. Saves curves_<condition>.png.
    """
    df = pd.DataFrame(list(rows)) if not isinstance(rows, pd.DataFrame) else rows
    fig, axes = _subplots(1, len(CURVE_METRICS), figsize=(3.3 * len(CURVE_METRICS), 3.0), squeeze=False)
    color = CONDITION_COLORS.get(cfg.condition, "k")
    for ax, (key, label) in zip(axes[0], CURVE_METRICS):
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(_integer_ticks())
        if key in df.columns and df[key].notna().any():
            d = df[["step", key]].dropna()
            ax.plot(d["step"], d[key], marker="o" if len(d) < 30 else None, ms=3, color=color)
        else:
            ax.text(0.5, 0.5, "not logged\nfor this condition", ha="center", va="center", transform=ax.transAxes,
                    color="0.5")
    fig.suptitle(f"{CONDITION_LABELS.get(cfg.condition, cfg.condition)} training curves ({_who(cfg)})")
    fig.tight_layout()
    _save(fig, cfg, "curves", condition=cfg.condition)
    return fig


def plot_avg_vs_step(results: pd.DataFrame, cfg, *, metric: str = "avg@k"):
    """Held-out Avg@k (percent, 95% bootstrap CI band) against step for each condition, the base
    solver at step 0. results: `report.load_eval_results(cfg)`. Saves avg_vs_step.png."""
    fig, ax = _subplots(figsize=(6.5, 4.0))
    d = results[(results["metric"] == metric) & (results["condition"] != "base")]
    ks = sorted({int(k) for k in d["k"].dropna()}) if "k" in d else []
    for condition, g in d.groupby("condition", sort=False):
        g = g.sort_values("step")
        color = CONDITION_COLORS.get(condition)
        ax.plot(g["step"], g["mean"], marker="o", ms=4, label=CONDITION_LABELS.get(condition, condition), color=color)
        if g["ci_low"].notna().any():
            ax.fill_between(g["step"], g["ci_low"], g["ci_high"], alpha=0.15, color=color)
    if d.empty:
        ax.text(0.5, 0.5, "no evaluations yet", ha="center", va="center", transform=ax.transAxes, color="0.5")
    else:
        ax.legend()
    label = f"Avg@{ks[0]}" if len(ks) == 1 else "Avg@k"
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("optimizer step (0 = base solver)")
    ax.set_ylabel(f"held-out {label} (%)")
    ax.set_title(f"Held-out {label} vs step ({_who(cfg)})")
    fig.tight_layout()
    _save(fig, cfg, "avg_vs_step")
    return fig


# ----------------------------------------------------------------------------- token advantages

def plot_token_advantages(df: pd.DataFrame, cfg, *, rollout: int | None = None,
                          contexts=("refsol_independent", "stepalign_aligned")):
    """The paper's per-token plot: one rollout's tokens, A_t as coloured bars, one panel per
    context (RefSol above StepAlignFB), the first erroneous step shaded. Colour scale shared
    across panels (red negative, blue positive). df: `analysis.context_advantages`.
    rollout: None picks `analysis.example_rollout(df)`. Saves token_advantage_rollout.png."""
    import matplotlib as mpl

    from .analysis import CONTEXT_LABELS, example_rollout

    contexts = [c for c in contexts if c in set(df["context"])]
    if not contexts:
        raise ValueError(f"none of the contexts is in the table; it has {sorted(set(df['context']))}")
    rollout = example_rollout(df[df["context"].isin(contexts)]) if rollout is None else rollout
    d = df[(df["rollout"] == rollout) & df["context"].isin(contexts)]
    vmax = float(np.nanmax(np.abs(d["advantage"]))) or 1.0
    norm, cmap = mpl.colors.Normalize(-vmax, vmax), mpl.colormaps[ADVANTAGE_CMAP]
    n_tok = int(d["token_index"].max()) + 1
    fig, axes = _subplots(len(contexts), 1, figsize=(max(8.0, 0.24 * n_tok), 2.6 * len(contexts)), sharex=True,
                          squeeze=False)
    for ax, context in zip(axes[:, 0], contexts):
        g = d[d["context"] == context].sort_values("token_index")
        err = g.loc[g["part"] == "first_error", "token_index"]
        if len(err):
            ax.axvspan(err.min() - 0.5, err.max() + 0.5, color="#ffd54f", alpha=0.35, lw=0, label="first erroneous step")
        ax.bar(g["token_index"], g["advantage"], color=cmap(norm(g["advantage"].to_numpy())), edgecolor="0.3", lw=0.3)
        ax.axhline(0, color="0.3", lw=0.6)
        ax.set_ylabel("A_t")
        ax.set_title(CONTEXT_LABELS.get(context, context), fontsize=10, loc="left")
        if len(err):
            ax.legend(loc="lower right", fontsize=8)
        ax.set_ylim(-1.1 * vmax, 1.1 * vmax)
    last = axes[-1, 0]
    tokens = d[d["context"] == contexts[0]].sort_values("token_index")
    last.set_xticks(tokens["token_index"])
    last.set_xticklabels([_tex_safe(t) for t in tokens["token"]], rotation=90, fontsize=7, family="monospace")
    last.set_xlim(-0.6, n_tok - 0.4)
    pid = d["problem_id"].iloc[0] if "problem_id" in d and len(d) else rollout
    fes = d["first_error_step"].iloc[0] if "first_error_step" in d and len(d) else "?"
    fig.suptitle(f"Per-token advantage A_t along one erroneous rollout ({pid}, first error at step {fes}; {_who(cfg)})",
                 fontsize=10)
    fig.tight_layout()
    _save(fig, cfg, "token_advantage_rollout")
    return fig


def plot_advantage_by_part(df: pd.DataFrame, cfg):
    """A_t distributions per part (correct prefix / first error / after the error / other) and
    context, as box plots (whiskers 5-95%, no outlier dots). Saves advantage_by_part.png."""
    import seaborn as sns

    from .analysis import CONTEXT_LABELS, PARTS

    d = df.assign(context_label=df["context"].map(lambda c: CONTEXT_LABELS.get(c, c)))
    order = [p for p in PARTS if p in set(d["part"])]
    hue_order = [CONTEXT_LABELS.get(c, c) for c in dict.fromkeys(df["context"])]
    fig, ax = _subplots(figsize=(9.0, 4.2))
    with warnings.catch_warnings():  # seaborn 0.13.2 passes matplotlib's deprecated `vert`
        warnings.simplefilter("ignore", DeprecationWarning)
        sns.boxplot(data=d, x="part", y="advantage", hue="context_label", order=order, hue_order=hue_order,
                    whis=(5, 95), showfliers=False, ax=ax, palette="Set2")
    ax.axhline(0, color="0.3", lw=0.7)
    ax.set_xlabel("part of the rollout")
    ax.set_ylabel("A_t (teacher - student log-prob)")
    n = d["rollout"].nunique()
    ax.set_title(f"A_t by part of {n} erroneous rollouts ({_who(cfg)})")
    ax.legend(title="context", fontsize=8, title_fontsize=8, loc="best")
    fig.tight_layout()
    _save(fig, cfg, "advantage_by_part")
    return fig


def plot_advantage_ablation(table: pd.DataFrame, cfg):
    """The quoting / alignment ablation: per context, token- and step-level AUROC of -A_t (first
    error vs correct prefix), mean A_t on the correct prefix and the |A_t| share on the first error, with 95%
    bootstrap CIs over rollouts. table: `analysis.localisation_table`. Saves advantage_ablation.png."""
    import matplotlib as mpl

    from .analysis import CONTEXT_LABELS

    panels = (("auroc", "token AUROC (error vs prefix)", 0.5), ("step_auroc", "step AUROC (error vs prefix)", 0.5),
              ("mean_correct_prefix", "mean A_t, correct prefix", 0.0),
              ("error_abs_share", "share of |A_t| on the error", None))
    panels = [p for p in panels if p[0] in table.columns]
    fig, axes = _subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.0, 3.8), squeeze=False)
    labels = [CONTEXT_LABELS.get(c, c) for c in table["context"]]
    y = np.arange(len(table))
    colors = ["#1f77b4" if c.startswith("refsol") else "#d62728" for c in table["context"]]
    for ax, (key, title, ref) in zip(axes[0], panels):
        v = table[key].to_numpy(dtype=float)
        lo = table.get(f"{key}_ci_low", pd.Series([math.nan] * len(v))).to_numpy(dtype=float)
        hi = table.get(f"{key}_ci_high", pd.Series([math.nan] * len(v))).to_numpy(dtype=float)
        err = np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])
        ax.barh(y, np.nan_to_num(v), xerr=np.nan_to_num(err), color=colors, alpha=0.85, capsize=3)
        if ref is not None:
            ax.axvline(ref, color="0.3", lw=0.8, ls="--")
        if key in ("auroc", "step_auroc", "error_abs_share"):
            ax.set_xlim(0, 1)
        else:
            ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(4))
        ax.set_yticks(y)
        ax.set_yticklabels(labels if ax is axes[0, 0] else [""] * len(y))
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
    n = int(table["n_rollouts"].max()) if len(table) else 0
    fig.suptitle(f"Teacher context ablation over {n} erroneous rollouts ({_who(cfg)})", fontsize=11)
    fig.tight_layout()
    _save(fig, cfg, "advantage_ablation")
    return fig


def token_html(tokens, advantages, *, parts=None, vmax: float | None = None, title: str | None = None) -> str:
    """HTML for an inline token view: each token on a diverging background (red A_t < 0, blue
    A_t > 0, white 0; scale +-vmax, default max |A_t|) with a tooltip giving A_t (and its part).
    Render in JupyterLab with `IPython.display.HTML(token_html(...))`."""
    import matplotlib as mpl

    tokens, adv = list(tokens), np.asarray(advantages, dtype=float)
    if len(tokens) != len(adv):
        raise ValueError(f"{len(tokens)} tokens but {len(adv)} advantages")
    parts = list(parts) if parts is not None else [None] * len(tokens)
    vmax = vmax or (float(np.nanmax(np.abs(adv))) if len(adv) else 1.0) or 1.0
    cmap, norm = mpl.colormaps[ADVANTAGE_CMAP], mpl.colors.Normalize(-vmax, vmax)
    spans = []
    for tok, a, part in zip(tokens, adv, parts):
        r, g, b, _ = cmap(norm(a)) if np.isfinite(a) else (0.9, 0.9, 0.9, 1)
        fg = "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "#fff"
        tip = f"A_t = {a:+.3f}" + (f" ({part})" if part else "")
        text = html.escape(tok).replace("\n", "⏎<br>")
        border = "border-bottom:2px solid #000;" if part == "first_error" else ""
        spans.append(f'<span title="{html.escape(tip)}" style="background:{mpl.colors.to_hex((r, g, b))};'
                     f'color:{fg};{border}padding:1px 0;">{text or "&#8203;"}</span>')
    head = f"<div style='font-weight:bold;margin-bottom:4px'>{html.escape(title)}</div>" if title else ""
    legend = (f"<div style='font-size:smaller;color:#555;margin-top:4px'>red: A_t &lt; 0, blue: A_t &gt; 0 "
              f"(scale &plusmn;{vmax:.2f}); underlined: first erroneous step; hover for A_t</div>")
    return (f"<div style='font-family:monospace;white-space:pre-wrap;line-height:1.7'>{head}"
            + "".join(spans) + f"{legend}</div>")
