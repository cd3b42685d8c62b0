"""Tests for sd_lib.report: tables from synthetic eval files, the paper's gaps, README sections."""

import json
import math

import pytest

from sd_lib.config import get_config
from sd_lib.report import (
    advantage_markdown,
    base_eval_markdown,
    best_table,
    best_table_md,
    build_report,
    comparison_md,
    comparison_table,
    export_runs,
    gap_table,
    last_table,
    load_eval_results,
    markdown_table,
    missing_evaluations,
    paper_table,
    replace_marked_section,
    update_readme,
)


def _eval(avg, pas, maj, length, k=4):
    """An eval file as `evaluation.evaluate` writes it (fractions; CIs +-0.1)."""
    cell = lambda v: {"mean": v, "ci_low": v - 0.1, "ci_high": v + 0.1}  # noqa: E731
    return {"k": k, "n_problems": 4, "summary": {"avg@k": cell(avg), "pass@k": cell(pas), "maj@k": cell(maj),
                                                 "mean_length": cell(length)}}


@pytest.fixture
def cfg(tmp_path):
    """A smoke config whose runs/results/figures live under tmp_path, with synthetic eval files:
    base avg 0.2; grpo steps 2, 4 (avg 0.3, 0.25); stepalign steps 2, 4, 6 (avg 0.5, 0.6, 0.6)."""
    cfg = get_config("smoke", runs_dir=str(tmp_path / "runs"), results_dir=str(tmp_path / "results"),
                     figures_dir=str(tmp_path / "figures"))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "base_eval.json").write_text(json.dumps(_eval(0.2, 0.5, 0.25, 40.0)))
    files = {"grpo": {2: _eval(0.3, 0.75, 0.25, 41.0), 4: _eval(0.25, 0.5, 0.5, 42.0)},
             "stepalign": {2: _eval(0.5, 0.75, 0.5, 43.0), 4: _eval(0.6, 1.0, 0.5, 44.0), 6: _eval(0.6, 0.75, 0.75, 45.0)}}
    for cond, steps in files.items():
        d = tmp_path / "runs" / "smoke" / f"{cond}-seed0" / "eval"
        d.mkdir(parents=True)
        for step, content in steps.items():
            (d / f"step_{step:06d}.json").write_text(json.dumps(content))
    return cfg


def test_load_eval_results_long_form_percent(cfg):
    """Rates in percent, lengths as is; base once as `base` and as step 0 of each run present."""
    r = load_eval_results(cfg)
    assert set(r["condition"]) == {"base", "grpo", "stepalign"}  # refsol has no run: left out
    row = r[(r["condition"] == "stepalign") & (r["step"] == 4) & (r["metric"] == "avg@k")].iloc[0]
    assert row["mean"] == pytest.approx(60.0) and row["ci_low"] == pytest.approx(50.0)
    assert r[(r["condition"] == "grpo") & (r["step"] == 0) & (r["metric"] == "avg@k")]["mean"].item() == pytest.approx(20.0)
    assert r[(r["metric"] == "mean_length") & (r["step"] == 2) & (r["condition"] == "grpo")]["mean"].item() == 41.0


def test_best_and_last_tables(cfg):
    """Best over checkpoints with its step (step 0 excluded, earliest step on ties), mean length
    at the best-Avg step; last = the last step."""
    r = load_eval_results(cfg)
    best = best_table(r).set_index(["condition", "metric"])
    assert best.loc[("stepalign", "avg@k"), "value"] == pytest.approx(60.0)
    assert best.loc[("stepalign", "avg@k"), "step"] == 4  # tie 4 / 6 -> earliest
    assert best.loc[("stepalign", "maj@k"), "step"] == 6
    assert best.loc[("stepalign", "mean_length"), "value"] == 44.0  # at the best-avg step 4
    assert best.loc[("grpo", "avg@k"), "value"] == pytest.approx(30.0) and best.loc[("grpo", "avg@k"), "step"] == 2
    assert best.loc[("grpo", "pass@k"), "step"] == 2  # base (step 0) pass 50 < 75 anyway; never chosen
    assert best.loc[("base", "avg@k"), "step"] == 0
    last = last_table(r).set_index(["condition", "metric"])
    assert last.loc[("grpo", "avg@k"), "step"] == 4 and last.loc[("grpo", "avg@k"), "value"] == pytest.approx(25.0)
    assert last.loc[("stepalign", "maj@k"), "value"] == pytest.approx(75.0)
    md = best_table_md(best_table(r), cfg=cfg)
    assert "| StepAlignFB |" in md and "60.00 [50.0, 70.0] (4)" in md and "profile `smoke`, seed 0" in md
    assert "Avg@4" in md


def test_paper_gaps():
    """The paper's gaps from PAPER_NOTES: StepAlignFB beats GRPO by 16.11 and RefSol by 5.27 Avg@12."""
    g = gap_table(paper_table()).set_index(["gap", "metric"])["value"]
    assert g[("StepAlignFB - GRPO", "avg@k")] == pytest.approx(16.11)
    assert g[("StepAlignFB - RefSol", "avg@k")] == pytest.approx(5.27)
    assert g[("StepAlignFB - GRPO", "pass@k")] == pytest.approx(13.33)
    assert g[("StepAlignFB - RefSol", "maj@k")] == pytest.approx(13.34)


def test_comparison_table_and_markdown(cfg):
    """Paper beside ours; ours missing for refsol (NaN, '-'), gaps for both."""
    best = best_table(load_eval_results(cfg))
    comp = comparison_table(best)
    row = comp[(comp["row"] == "StepAlignFB - GRPO") & (comp["metric"] == "avg@k")].iloc[0]
    assert row["paper"] == pytest.approx(16.11) and row["ours"] == pytest.approx(30.0)
    assert math.isnan(comp[(comp["row"] == "RefSol") & (comp["metric"] == "avg@k")]["ours"].item())
    md = comparison_md(comp, cfg=cfg, k=4)
    assert "| StepAlignFB - GRPO | +13.33 | +25.00 | +30.00 | +25.00 | +16.11 | +30.00 |" in md
    assert "| GRPO | 76.67 (40) | 75.00 (2) |" in md
    report = build_report(load_eval_results(cfg), cfg)
    json.dumps(report)  # JSON-ready (NaN -> null)
    assert report["profile"] == "smoke" and {"results", "best", "last", "paper", "comparison", "gaps"} <= set(report)


def test_base_eval_markdown():
    """One row in percent with CIs, captioned with profile, seed, k and problem count."""
    d = {**_eval(0.25, 0.5, 0.75, 40.0), "profile": "cpu", "seed": 0, "solver": "warm", "format_rate": 0.9}
    md = base_eval_markdown(d)
    assert "| warm | 50.00 [40.0, 60.0] | 75.00 [65.0, 85.0] | 25.00 [15.0, 35.0] | 40.00 [39.9, 40.1] |" in md
    assert "Pass@4" in md and "profile `cpu`, seed 0" in md and "90.0%" in md


def test_markdown_table_escapes_pipes():
    """Cells with '|' are escaped; alignment row follows the header."""
    md = markdown_table([["a|b", "1"]], ["x", "y"])
    assert md.splitlines() == ["| x | y |", "|:---|---:|", "| a\\|b | 1 |"]


def test_replace_marked_section_idempotent(tmp_path):
    """Replacing a section twice gives the same text; text outside the markers is untouched;
    missing sections raise or are appended; update_readme reports whether the file changed."""
    text = "# T\n\nintro\n<!-- BEGIN:eval_table -->\nold\n<!-- END:eval_table -->\ntail\n"
    once = replace_marked_section(text, "eval_table", "| a |\n|---|\n")
    assert once == replace_marked_section(once, "eval_table", "| a |\n|---|\n")
    assert once.startswith("# T\n\nintro\n") and once.endswith("tail\n") and "old" not in once
    with pytest.raises(KeyError):
        replace_marked_section("no markers", "eval_table", "x")
    appended = replace_marked_section("# T\n", "x", "body", append_missing=True)
    assert appended == "# T\n\n<!-- BEGIN:x -->\nbody\n<!-- END:x -->\n"
    with pytest.raises(ValueError):
        replace_marked_section("<!-- END:x --> <!-- BEGIN:x -->", "x", "y")
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert update_readme({"eval_table": "new"}, path=readme) is True
    assert update_readme("eval_table", "new", path=readme) is False
    assert "<!-- BEGIN:eval_table -->\nnew\n<!-- END:eval_table -->" in readme.read_text()
    assert update_readme("base_eval", "| b |", path=readme) is True  # appended with its markers
    assert readme.read_text().endswith("<!-- BEGIN:base_eval -->\n| b |\n<!-- END:base_eval -->\n")


def test_missing_evaluations_lists_checkpoints_without_eval(cfg, tmp_path):
    """A checkpoint with an adapter but no eval file is listed (with the run's path layout);
    one with an eval file is not; the base is listed only when base_eval.json is absent."""
    run = tmp_path / "runs" / "smoke" / "grpo-seed0"
    for step in (2, 3):
        (run / "checkpoints" / f"step_{step:06d}" / "adapter").mkdir(parents=True)
    todo = missing_evaluations(cfg)
    assert [(t["condition"], t["step"]) for t in todo] == [("grpo", 3)]
    assert todo[0]["out"] == run / "eval" / "step_000003.json"
    (tmp_path / "results" / "base_eval.json").unlink()
    assert [t["condition"] for t in missing_evaluations(cfg)] == ["base", "grpo"]


def test_export_runs_copies_config_metrics_and_evals_not_checkpoints(cfg, tmp_path):
    """Each existing run's config, metrics and eval files land in results/runs/<condition>/;
    checkpoints stay behind, a stale export is replaced, a missing run is skipped."""
    run = tmp_path / "runs" / "smoke" / "grpo-seed0"
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "checkpoints" / "step_000002" / "adapter").mkdir(parents=True)
    stale = tmp_path / "results" / "runs" / "grpo"
    stale.mkdir(parents=True)
    (stale / "step_000099.json").write_text("{}")
    written = export_runs(cfg)
    assert [p.name for p in written] == ["grpo", "stepalign"]  # refsol has no run
    assert sorted(f.name for f in stale.iterdir()) == ["config.json", "metrics.jsonl", "step_000002.json",
                                                        "step_000004.json"]
    assert sorted(f.name for f in (tmp_path / "results" / "runs" / "stepalign").iterdir()) == [
        "step_000002.json", "step_000004.json", "step_000006.json"]


def test_advantage_markdown_rows_cis_and_caption():
    """One row per context with the json's values and CIs; a missing CI shows the value alone."""
    row = {"context": "stepalign_aligned", "label": "StepAlignFB (aligned)", "mean_correct_prefix": 0.01,
           "mean_correct_prefix_ci_low": -0.02, "mean_correct_prefix_ci_high": 0.03, "mean_first_error": -0.9,
           "mean_after_error": -0.2, "auroc": 0.47, "auroc_ci_low": 0.44, "auroc_ci_high": 0.5,
           "step_auroc": 0.91, "error_abs_share": 0.56}
    md = advantage_markdown({"contexts": [row], "n_erroneous": 48, "n_sampled": 256, "profile": "cpu", "seed": 0,
                             "summary": "Summary sentence."})
    lines = md.splitlines()
    assert lines[0].startswith("| teacher context |") and "step AUROC" in lines[0]
    assert lines[2] == ("| StepAlignFB (aligned) | +0.010 [-0.020, +0.030] | -0.900 | -0.200 | 0.47 [0.44, 0.50] "
                        "| 0.91 | 0.56 |")
    assert "48 erroneous rollouts" in md and "(of 256 sampled)" in md and md.endswith("Summary sentence.")
