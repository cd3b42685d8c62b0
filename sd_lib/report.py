"""Evaluation tables from results files: ours, the paper's, the gaps, and the README sections.

    from sd_lib.report import load_eval_results, best_table, last_table, comparison_table
    results = load_eval_results(cfg)               # every eval/step_NNNNNN.json of every run
    best, last = best_table(results), last_table(results)
    print(best_table_md(best, cfg=cfg))
    update_readme({"eval_table": best_table_md(best, cfg=cfg)})   # or update_readme("eval_table", md)

Sources: `runs/<profile>/<condition>-seed<seed>/eval/step_NNNNNN.json` written by the trainer
(or by `evaluate_missing` for a checkpoint that lacks one), and `<results_dir>/base_eval.json`
for the warmed-up solver before training, which enters every condition as step 0. Every
number in a README table comes from these files through `update_readme`; none is typed.

Conventions:
- The paper's table reports, per method and metric, the best value over checkpoints with the
  step in brackets; `best_table` does the same (checkpoints only, step 0 excluded; the
  earliest step wins a tie) and `last_table` gives the last checkpoint as a less optimistic
  companion. Pass@k, Maj@k and Avg@k are shown in percent.
- CIs are the 95% bootstrap CIs over held-out problems stored in each eval file.

Departures from the paper:
1. The paper does not say at which checkpoint its mean answer length is measured; here it is
   the length at the checkpoint with the best Avg@k.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pandas as pd

from .config import CONDITIONS, ROOT, load_config, repo_relative, resolve_path

__all__ = [
    "METRICS",
    "METRIC_LABELS",
    "CONDITION_LABELS",
    "PAPER_RESULTS",
    "eval_files",
    "read_eval",
    "load_eval_results",
    "best_table",
    "last_table",
    "paper_table",
    "gap_table",
    "comparison_table",
    "markdown_table",
    "best_table_md",
    "last_table_md",
    "comparison_md",
    "base_eval_markdown",
    "describe_gaps",
    "eval_markdown",
    "build_report",
    "replace_marked_section",
    "update_readme",
    "missing_evaluations",
    "evaluate_missing",
    "export_runs",
]

METRICS = ("pass@k", "maj@k", "avg@k", "mean_length")
PERCENT_METRICS = ("pass@k", "maj@k", "avg@k")
METRIC_LABELS = {"pass@k": "Pass@{k}", "maj@k": "Maj@{k}", "avg@k": "Avg@{k}", "mean_length": "mean length"}
CONDITION_LABELS = {"base": "base solver", "grpo": "GRPO", "refsol": "RefSol", "stepalign": "StepAlignFB"}
GAPS = (("stepalign", "grpo"), ("stepalign", "refsol"))

# PAPER_NOTES "Results": best value over checkpoints (step), k = 12; lengths have no step.
PAPER_RESULTS = {
    "grpo": {"pass@k": (76.67, 40), "maj@k": (26.67, 50), "avg@k": (19.72, 30), "mean_length": (1681.49, None)},
    "refsol": {"pass@k": (86.67, 60), "maj@k": (43.33, 60), "avg@k": (30.56, 40), "mean_length": (1935.83, None)},
    "stepalign": {"pass@k": (90.00, 60), "maj@k": (56.67, 50), "avg@k": (35.83, 50), "mean_length": (1996.07, None)},
}
PAPER_K = 12


# ----------------------------------------------------------------------------- reading

def eval_files(run_dir) -> dict[int, Path]:
    """step -> eval file of one run (`eval/step_NNNNNN.json`)."""
    out = {}
    for p in sorted(Path(run_dir, "eval").glob("step_*.json")):
        m = re.fullmatch(r"step_(\d+)\.json", p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def read_eval(path) -> list[dict]:
    """One eval file -> rows (metric, mean, ci_low, ci_high, k, n_problems); rates in percent."""
    return _eval_rows(json.loads(Path(path).read_text()), str(path))


def _eval_rows(d: dict, where: str) -> list[dict]:
    summary = d.get("summary")
    if not isinstance(summary, dict):
        raise ValueError(f"{where}: no 'summary' in this eval file; keys are {sorted(d)}")
    rows = []
    for metric, v in summary.items():
        if not isinstance(v, dict) or "mean" not in v:
            v = {"mean": v}
        scale = 100.0 if metric in PERCENT_METRICS else 1.0
        get = lambda key: float(v[key]) * scale if v.get(key) is not None else math.nan  # noqa: E731
        rows.append({"metric": metric, "mean": get("mean"), "ci_low": get("ci_low"), "ci_high": get("ci_high"),
                     "k": d.get("k"), "n_problems": d.get("n_problems")})
    return rows


def load_eval_results(cfg, *, conditions=CONDITIONS, seed: int | None = None, base_eval=None) -> pd.DataFrame:
    """Every eval of every run of `cfg`'s profile and seed, in long form.

    Columns: condition, step, metric, mean, ci_low, ci_high, k, n_problems, path (relative to the
    repository when inside it). The base
    solver's `<results_dir>/base_eval.json` (or `base_eval`) appears once per condition as
    step 0 and once as condition ``base``. Conditions without a run folder are left out.
    """
    from .train import run_dir_for

    seed = cfg.seed if seed is None else seed
    base_path = Path(base_eval) if base_eval is not None else resolve_path(cfg.results_dir) / "base_eval.json"
    base_rows = read_eval(base_path) if base_path.exists() else []
    rows = [{"condition": "base", "step": 0, **r, "path": repo_relative(base_path)} for r in base_rows]
    for condition in conditions:
        run_dir = run_dir_for(replace(cfg, condition=condition, seed=seed))
        files = eval_files(run_dir)
        if not files:
            continue
        rows += [{"condition": condition, "step": 0, **r, "path": repo_relative(base_path)} for r in base_rows]
        for step, path in files.items():
            rows += [{"condition": condition, "step": step, **r, "path": repo_relative(path)} for r in read_eval(path)]
    cols = ["condition", "step", "metric", "mean", "ci_low", "ci_high", "k", "n_problems", "path"]
    return pd.DataFrame(rows, columns=cols)


# ----------------------------------------------------------------------------- tables

def _cell(df: pd.DataFrame, condition: str, step: int, metric: str) -> dict:
    r = df[(df["condition"] == condition) & (df["step"] == step) & (df["metric"] == metric)]
    if r.empty:
        return {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    r = r.iloc[0]
    return {"value": float(r["mean"]), "ci_low": float(r["ci_low"]), "ci_high": float(r["ci_high"])}


def best_table(results: pd.DataFrame, *, metrics=METRICS, length_at: str = "avg@k") -> pd.DataFrame:
    """The paper's convention: per condition and metric, the best value over checkpoints and its
    step (step 0, the base solver, is not a checkpoint; ties go to the earliest step). Mean
    length is taken at the step of the best `length_at` metric. The base solver is one row
    (condition ``base``, step 0). Columns: condition, metric, value, ci_low, ci_high, step, k.
    """
    rows = []
    for condition, g in results.groupby("condition", sort=False):
        ckpt = g if condition == "base" else g[g["step"] > 0]
        if ckpt.empty:
            continue
        best_step = {}
        for metric in metrics:
            m = ckpt[(ckpt["metric"] == metric) & ckpt["mean"].notna()].sort_values("step")
            if metric == "mean_length" or m.empty:
                continue
            best_step[metric] = int(m.loc[m["mean"].idxmax(), "step"])
        for metric in metrics:
            step = best_step.get(length_at if metric == "mean_length" else metric)
            if step is None:
                continue
            rows.append({"condition": condition, "metric": metric, **_cell(g, condition, step, metric),
                         "step": step, "k": _k(g)})
    return pd.DataFrame(rows, columns=["condition", "metric", "value", "ci_low", "ci_high", "step", "k"])


def last_table(results: pd.DataFrame, *, metrics=METRICS) -> pd.DataFrame:
    """Per condition and metric, the value at the last evaluated step (same columns as `best_table`)."""
    rows = []
    for condition, g in results.groupby("condition", sort=False):
        step = int(g["step"].max())
        for metric in metrics:
            cell = _cell(g, condition, step, metric)
            if not math.isnan(cell["value"]):
                rows.append({"condition": condition, "metric": metric, **cell, "step": step, "k": _k(g)})
    return pd.DataFrame(rows, columns=["condition", "metric", "value", "ci_low", "ci_high", "step", "k"])


def _k(g: pd.DataFrame):
    ks = g["k"].dropna().unique()
    return int(ks[0]) if len(ks) == 1 else None


def paper_table() -> pd.DataFrame:
    """The paper's best-over-checkpoints table (PAPER_NOTES "Results") in `best_table`'s columns."""
    rows = [{"condition": c, "metric": m, "value": v, "ci_low": math.nan, "ci_high": math.nan, "step": s, "k": PAPER_K}
            for c, metrics in PAPER_RESULTS.items() for m, (v, s) in metrics.items()]
    return pd.DataFrame(rows)


def gap_table(table: pd.DataFrame, *, pairs=GAPS, metrics=METRICS) -> pd.DataFrame:
    """value(a) - value(b) for each (a, b) in `pairs` and each metric, rounded to 2 decimals.

    Columns: gap (e.g. ``StepAlignFB - GRPO``), a, b, metric, value (NaN when a side is missing).
    """
    v = table.set_index(["condition", "metric"])["value"]
    rows = []
    for a, b in pairs:
        for metric in metrics:
            x, y = v.get((a, metric), math.nan), v.get((b, metric), math.nan)
            rows.append({"gap": f"{CONDITION_LABELS[a]} - {CONDITION_LABELS[b]}", "a": a, "b": b, "metric": metric,
                         "value": round(float(x) - float(y), 2)})
    return pd.DataFrame(rows)


def comparison_table(best: pd.DataFrame, *, metrics=METRICS) -> pd.DataFrame:
    """The paper's numbers beside ours, per condition and metric, then the gaps of both.

    Columns: row (a condition or a gap), metric, paper, paper_step, ours, ours_step.
    """
    paper = paper_table().set_index(["condition", "metric"])
    ours = best.set_index(["condition", "metric"])
    rows = []
    for c in PAPER_RESULTS:
        for m in metrics:
            p = paper.loc[(c, m)]
            o = ours.loc[(c, m)] if (c, m) in ours.index else None
            rows.append({"row": CONDITION_LABELS[c], "metric": m, "paper": float(p["value"]), "paper_step": p["step"],
                         "ours": float(o["value"]) if o is not None else math.nan,
                         "ours_step": o["step"] if o is not None else None})
    pg, og = gap_table(paper_table()), gap_table(best)
    for (_, p), (_, o) in zip(pg.iterrows(), og.iterrows()):
        rows.append({"row": p["gap"], "metric": p["metric"], "paper": p["value"], "paper_step": None,
                     "ours": o["value"], "ours_step": None})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- markdown

def markdown_table(rows: list[list], header: list[str], *, align: list[str] | None = None) -> str:
    """A GitHub markdown table from string cells (`align`: 'l' or 'r' per column)."""
    align = align or ["l"] + ["r"] * (len(header) - 1)
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _num(v, metric: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.2f}"


def _result_cell(r, *, ci: bool = True) -> str:
    if r is None or math.isnan(r["value"]):
        return "-"
    s = _num(r["value"], r["metric"])
    if ci and not math.isnan(r["ci_low"]):
        s += f" [{r['ci_low']:.1f}, {r['ci_high']:.1f}]"
    if r.get("step") is not None and not (isinstance(r["step"], float) and math.isnan(r["step"])):
        s += f" ({int(r['step'])})"
    return s


def _header(metrics, k) -> list[str]:
    return [METRIC_LABELS[m].format(k=k if k is not None else "k") for m in metrics]


def _results_md(table: pd.DataFrame, *, metrics, caption: str, ci: bool) -> str:
    k = next((int(x) for x in table["k"].dropna()), None) if len(table) else None
    idx = table.set_index(["condition", "metric"])
    rows = []
    for c in dict.fromkeys(table["condition"]):
        rows.append([CONDITION_LABELS.get(c, c)] + [
            _result_cell({**idx.loc[(c, m)].to_dict(), "metric": m}, ci=ci) if (c, m) in idx.index else "-"
            for m in metrics])
    return markdown_table(rows, ["method"] + _header(metrics, k)) + "\n\n" + caption


def _who(cfg) -> str:
    return f"profile `{cfg.profile}`, seed {cfg.seed}" if cfg is not None else "profile ?, seed ?"


def best_table_md(best: pd.DataFrame, *, cfg=None, metrics=METRICS) -> str:
    """Markdown of `best_table`: value [95% CI] (step) per cell, a caption naming profile and seed."""
    return _results_md(best, metrics=metrics, ci=True, caption=(
        f"*Best over checkpoints (step in brackets), {_who(cfg)}; 95% bootstrap CIs over held-out problems; "
        "mean length at the best-Avg checkpoint; the base solver is step 0.*"))


def last_table_md(last: pd.DataFrame, *, cfg=None, metrics=METRICS) -> str:
    """Markdown of `last_table`: value [95% CI] (step) at each run's last checkpoint."""
    return _results_md(last, metrics=metrics, ci=True, caption=(
        f"*Last checkpoint (step in brackets), {_who(cfg)}; 95% bootstrap CIs over held-out problems.*"))


def comparison_md(comparison: pd.DataFrame, *, cfg=None, k: int | None = None, metrics=METRICS) -> str:
    """Markdown of `comparison_table`: paper | ours per metric, conditions then gaps."""
    rows = []
    for row in dict.fromkeys(comparison["row"]):
        g = comparison[comparison["row"] == row].set_index("metric")
        cells = [row]
        for m in metrics:
            for who in ("paper", "ours"):
                v, s = g.loc[m, who], g.loc[m, f"{who}_step"]
                step = f" ({int(s)})" if s is not None and not (isinstance(s, float) and math.isnan(s)) else ""
                cells.append(f"{v:+.2f}" if " - " in row and not math.isnan(v) else _num(v, m) + step)
        rows.append(cells)
    header = ["method"]
    for label in _header(metrics, "k"):
        header += [f"{label} paper", f"{label} ours"]
    return markdown_table(rows, header) + (
        f"\n\n*Paper: Qwen3-1.7B, OpenMathReasoning, k = {PAPER_K} (PAPER_NOTES). Ours: {_who(cfg)}"
        f"{f', k = {k}' if k else ''}. Best over checkpoints (step in brackets); gap rows are differences of "
        "those best values.*")


def base_eval_markdown(base_eval: dict) -> str:
    """Markdown of one eval file (the base solver's `base_eval.json`): one row, Pass@k / Maj@k /
    Avg@k in percent and mean length, each with its 95% CI, captioned with the profile, seed,
    k, number of problems and well-formed share when the file records them."""
    rows = {r["metric"]: r for r in _eval_rows(base_eval, "base_eval")}
    k = base_eval.get("k")
    cells = [_result_cell({**rows[m], "value": rows[m]["mean"], "step": None}) if m in rows else "-" for m in METRICS]
    solver = str(base_eval.get("solver", "warmed-up solver"))
    if "/warmup/" in solver:  # a cache path: name it by what it is
        solver = "format-warmed-up embedded solver"
    table = markdown_table([[solver] + cells],
                           ["solver"] + _header(METRICS, k))
    who = f"profile `{base_eval['profile']}`, seed {base_eval['seed']}" if "profile" in base_eval else "profile ?, seed ?"
    extra = f"; well-formed traces {100 * base_eval['format_rate']:.1f}%" if "format_rate" in base_eval else ""
    return table + (f"\n\n*Held-out evaluation before training, {who}; k = {k} samples on "
                    f"{base_eval.get('n_problems', '?')} problems; 95% bootstrap CIs over problems{extra}.*")


def describe_gaps(best: pd.DataFrame, *, metric: str = "avg@k") -> str:
    """One sentence per gap (StepAlignFB - GRPO, StepAlignFB - RefSol) on `metric`, ours beside
    the paper's, generated from the numbers (a missing run is said to be missing)."""
    ours = gap_table(best, metrics=(metric,)).set_index("gap")["value"]
    paper = gap_table(paper_table(), metrics=(metric,)).set_index("gap")["value"]
    label = METRIC_LABELS[metric].format(k="k")
    out = []
    for gap in paper.index:
        o = ours.get(gap, math.nan)
        if math.isnan(o):
            out.append(f"{gap}: not available here (a run is missing); the paper reports {paper[gap]:+.2f} {label} points.")
            continue
        a, b = gap.split(" - ")
        verdict = f"{a} is ahead" if o > 0 else f"{a} is behind" if o < 0 else "they tie"
        same = "the same sign as" if (o > 0) == (paper[gap] > 0) and o != 0 else "unlike"
        out.append(f"{gap}: {o:+.2f} {label} points ({verdict}; {same} the paper's {paper[gap]:+.2f}).")
    return " ".join(out)


def eval_markdown(results: pd.DataFrame, cfg) -> str:
    """`results/eval_table.md`: best and last tables, the paper beside ours, the gap sentence."""
    best, last = best_table(results), last_table(results)
    k = next((int(x) for x in best["k"].dropna()), None) if len(best) else None
    return "\n\n".join([
        f"# Held-out evaluation ({_who(cfg)})",
        "## Best over checkpoints", best_table_md(best, cfg=cfg),
        "## Last checkpoint", last_table_md(last, cfg=cfg),
        "## The paper beside ours", comparison_md(comparison_table(best), cfg=cfg, k=k),
        describe_gaps(best),
    ]) + "\n"


def build_report(results: pd.DataFrame, cfg) -> dict:
    """Everything `results/eval.json` holds: the long table, best, last, paper, comparison, gaps."""
    best, last = best_table(results), last_table(results)
    records = lambda df: json.loads(df.to_json(orient="records"))  # noqa: E731 -- NaN -> null
    return {
        "profile": cfg.profile,
        "seed": cfg.seed,
        "conventions": {"best": "best value over checkpoints (step > 0), earliest step on ties; mean length "
                                "at the best-avg@k step", "rates": "percent", "ci": "95% bootstrap over problems"},
        "results": records(results),
        "best": records(best),
        "last": records(last),
        "paper": records(paper_table()),
        "comparison": records(comparison_table(best)),
        "gaps": {"ours": records(gap_table(best)), "paper": records(gap_table(paper_table()))},
    }


# ----------------------------------------------------------------------------- README

def _markers(name: str) -> tuple[str, str]:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"section name {name!r} must be letters, digits, '_', '.', '-'")
    return f"<!-- BEGIN:{name} -->", f"<!-- END:{name} -->"


def replace_marked_section(text: str, name: str, content: str, *, append_missing: bool = False) -> str:
    """Replace what lies between `<!-- BEGIN:name -->` and `<!-- END:name -->` with `content`.

    Idempotent: applying it twice gives the same text. A missing section raises KeyError unless
    `append_missing`, which appends the markers and content at the end. Markers out of order or
    repeated raise ValueError.
    """
    begin, end = _markers(name)
    nb, ne = text.count(begin), text.count(end)
    block = f"{begin}\n{content.strip()}\n{end}"
    if nb == 0 and ne == 0:
        if not append_missing:
            raise KeyError(f"no {begin} ... {end} section in the text")
        return text.rstrip("\n") + "\n\n" + block + "\n"
    if nb != 1 or ne != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"section {name!r}: expected one {begin} before one {end}, found {nb} and {ne}")
    i, j = text.index(begin), text.index(end) + len(end)
    return text[:i] + block + text[j:]


def update_readme(section, content: str | None = None, *, path=None, append_missing: bool = True) -> bool:
    """Write generated markdown into the README's marked sections; returns True if it changed.

    section: a marker name with its `content` (``update_readme("base_eval", md)``), or a dict
        name -> markdown (``update_readme({"eval_table": md1, "paper_comparison": md2})``).
    path: the README (default: the repository's README.md). Sections missing from it are
        appended at the end (with their markers) unless `append_missing=False`.
    """
    if isinstance(section, str):
        if content is None:
            raise ValueError(f"update_readme({section!r}) needs the section's content")
        sections = {section: content}
    else:
        if content is not None:
            raise ValueError("pass either a dict of sections or one name and its content, not both")
        sections = dict(section)
    path = Path(path) if path is not None else ROOT / "README.md"
    old = path.read_text() if path.exists() else ""
    new = old
    for name, md in sections.items():
        new = replace_marked_section(new, name, md, append_missing=append_missing)
    if new != old:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(new)
        tmp.replace(path)
    return new != old


# ----------------------------------------------------------------------------- evaluation

def _run_config(cfg, condition: str):
    from .train import run_dir_for

    run_dir = run_dir_for(replace(cfg, condition=condition))
    saved = run_dir / "config.json"
    return (load_config(saved) if saved.exists() else replace(cfg, condition=condition)), run_dir


def missing_evaluations(cfg, *, conditions=CONDITIONS) -> list[dict]:
    """What `evaluate_missing` would evaluate: the base solver when `<results_dir>/base_eval.json`
    is absent, and every saved checkpoint (`checkpoints/step_NNNNNN/adapter`) of each run of
    `cfg`'s profile and seed without `eval/step_NNNNNN.json`.

    Each item: {"condition", "step", "adapter" (None for the base), "out", "cfg"}.
    """
    todo = []
    base_out = resolve_path(cfg.results_dir) / "base_eval.json"
    if not base_out.exists():
        todo.append({"condition": "base", "step": 0, "adapter": None, "out": base_out, "cfg": cfg})
    for condition in conditions:
        run_cfg, run_dir = _run_config(cfg, condition)
        done = eval_files(run_dir)
        for ckpt in sorted(Path(run_dir, "checkpoints").glob("step_*")):
            m = re.fullmatch(r"step_(\d+)", ckpt.name)
            if m and (ckpt / "adapter").is_dir() and int(m.group(1)) not in done:
                step = int(m.group(1))
                todo.append({"condition": condition, "step": step, "adapter": ckpt / "adapter",
                             "out": run_dir / "eval" / f"step_{step:06d}.json", "cfg": run_cfg})
    return todo


def evaluate_missing(cfg, *, conditions=CONDITIONS, progress: bool = True, model=None, tokenizer=None) -> list[Path]:
    """Evaluate the base solver and every checkpoint lacking an eval file (`missing_evaluations`).

    Loads the warmed-up base solver once (`warmup.load_starting_solver`; or `model`/`tokenizer`), puts each
    checkpoint's LoRA adapter onto it (`peft.PeftModel.from_pretrained`), runs
    `evaluation.evaluate_config` with the run's saved config (its held-out problems, k,
    temperature, seed) and writes the trainer's file layout; the adapter is unloaded again
    before the next one. Returns the files written.
    """
    from .evaluation import evaluate_config, write_json
    from .problems import load_splits

    todo = missing_evaluations(cfg, conditions=conditions)
    if not todo:
        return []
    if model is None:
        from .warmup import load_starting_solver

        model, tokenizer = load_starting_solver(cfg)
    written = []
    for item in todo:
        run_cfg = item["cfg"]
        test = load_splits(run_cfg)[1]
        if item["adapter"] is None:
            res = evaluate_config(model, tokenizer, test, run_cfg, progress=progress)
        else:
            from peft import PeftModel

            wrapped = PeftModel.from_pretrained(model, str(item["adapter"]))
            wrapped.eval()
            try:
                res = evaluate_config(wrapped, tokenizer, test, run_cfg, progress=progress)
            finally:
                model = wrapped.unload()
        res["source"] = {"condition": item["condition"], "step": item["step"],
                         "adapter": str(item["adapter"]) if item["adapter"] else None, "written_by": "report.evaluate_missing"}
        written.append(write_json(res, item["out"]))
    return written


def advantage_markdown(advantage: dict) -> str:
    """README table of a `results/advantage.json` (notebook 06): per teacher context, the mean A_t
    per part, the token AUROC of -A_t (first erroneous step vs correct prefix) and the share of
    |A_t| on the first erroneous step, with 95% bootstrap CIs over rollouts, then the generated
    summary sentence."""

    def ci(row, key, fmt):
        v, lo, hi = row.get(key), row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
        if v is None:
            return "–"
        return f"{v:{fmt}}" + (f" [{lo:{fmt}}, {hi:{fmt}}]" if lo is not None and hi is not None else "")

    rows = [
        [r.get("label", r["context"]), ci(r, "mean_correct_prefix", "+.3f"), ci(r, "mean_first_error", "+.3f"),
         ci(r, "mean_after_error", "+.3f"), ci(r, "auroc", ".2f"), ci(r, "step_auroc", ".2f"),
         ci(r, "error_abs_share", ".2f")]
        for r in advantage["contexts"]
    ]
    header = ["teacher context", "mean A_t, correct prefix", "mean A_t, first error", "mean A_t, after error",
              "token AUROC (-A_t: error vs prefix)", "step AUROC (-sum A_t)", "share of |A_t| on the error"]
    caption = (f"*Per-token advantages on {advantage.get('n_erroneous', '?')} erroneous rollouts of the warmed-up solver "
               f"(of {advantage.get('n_sampled', '?')} sampled), profile `{advantage.get('profile')}`, seed "
               f"{advantage.get('seed')}; 95% bootstrap CIs over rollouts. Generated from `advantage.json`.*")
    return "\n".join([markdown_table(rows, header, align=["l"] + ["r"] * 6), "", caption, "", advantage.get("summary", "")])


def export_runs(cfg, *, conditions=CONDITIONS, dest=None) -> list[Path]:
    """Copy what a reader needs of each run (config.json, metrics.jsonl, eval/step_*.json; no
    checkpoints) from `runs/<profile>/<condition>-seed<seed>/` to `dest/<condition>/` (default
    `<results_dir>/runs`), replacing what was there, so the committed results carry the
    per-step metrics and every evaluation behind the tables. Runs that do not exist are skipped;
    returns the folders written."""
    import shutil

    dest = Path(dest) if dest is not None else resolve_path(cfg.results_dir) / "runs"
    written = []
    for condition in conditions:
        _, run_dir = _run_config(cfg, condition)
        files = [run_dir / "config.json", run_dir / "metrics.jsonl", *sorted((run_dir / "eval").glob("step_*.json"))]
        files = [f for f in files if f.exists()]
        if not files:
            continue
        out = dest / condition
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in files:
            shutil.copy2(f, tmp / f.name)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        written.append(out)
    return written
