# %% [markdown]
# # 05 · Held-out evaluation of the three conditions, beside the paper's table
#
# Every saved checkpoint of GRPO, RefSol and StepAlignFB is scored on the held-out problems
# (k samples each: Avg@k, Pass@k, Maj@k, mean length, 95% bootstrap CIs over problems), with the
# warmed-up solver as step 0. The trainer already evaluated every `eval_every` steps; any
# checkpoint without an eval file is evaluated here. Tables follow the paper's convention (best
# value over checkpoints, step in brackets), with the last checkpoint beside it, and the
# paper's numbers (Qwen3-1.7B, OpenMathReasoning, k = 12) beside ours with the gaps.
#
# - **Reads**: `runs/<profile>/<condition>-seed<seed>/` (`eval/step_*.json`, `metrics.jsonl`,
#   `checkpoints/step_*/adapter`), `<results_dir>/base_eval.json`.
# - **Writes**: missing `eval/step_*.json` and `base_eval.json`, `<results_dir>/eval.json`,
#   `<results_dir>/eval_table.md`, `<results_dir>/runs/<condition>/` (config, metrics and
#   evaluations of each run), `<figures_dir>/avg_vs_step.png`, `curves_<condition>.png`,
#   and (not for the smoke profile) the README sections `eval_table` and `paper_comparison`.
# - **Prerequisites**: the training notebooks (runs that do not exist yet are left out of the tables).

# %%
from dataclasses import replace

from IPython.display import Markdown, display

from sd_lib.config import CONDITIONS, get_config, resolve_path
from sd_lib.evaluation import write_json
from sd_lib.plots import plot_avg_vs_step, plot_training_curves
from sd_lib.report import (best_table, best_table_md, build_report, comparison_md, comparison_table, describe_gaps,
                           eval_markdown, evaluate_missing, export_runs, last_table, last_table_md,
                           load_eval_results, missing_evaluations, update_readme)
from sd_lib.train import read_metrics, run_dir_for

# %% tags=["parameters"]
PROFILE = "cpu"  # config profile: smoke | cpu | paper
SEED = 0  # seed of the runs to report
EVALUATE_MISSING = True  # evaluate checkpoints (and the base solver) that lack an eval file
UPDATE_README = True  # write the tables into README.md's marked sections (never for the smoke profile)

# %%
cfg = get_config(PROFILE, seed=SEED)
results_dir = resolve_path(cfg.results_dir)
write_readme = UPDATE_README and PROFILE != "smoke"
print(f"profile {cfg.profile}, seed {cfg.seed}; results in {results_dir}")

# %% [markdown]
# ## Evaluate what the trainer did not

# %%
todo = missing_evaluations(cfg)
print(f"{len(todo)} evaluation(s) missing:", [(t["condition"], t["step"]) for t in todo])
written = evaluate_missing(cfg) if EVALUATE_MISSING and todo else []
print(f"wrote {len(written)} eval file(s)")

# %% [markdown]
# ## Every evaluation, in percent (step 0 = the warmed-up solver)

# %%
results = load_eval_results(cfg)
results.pivot_table(index=["condition", "step"], columns="metric", values="mean").round(2)

# %% [markdown]
# ## Best over checkpoints (the paper's convention) and last checkpoint

# %%
best, last = best_table(results), last_table(results)
display(Markdown(best_table_md(best, cfg=cfg)))
display(Markdown(last_table_md(last, cfg=cfg)))

# %%
plot_avg_vs_step(results, cfg)

# %%
for condition in CONDITIONS:
    rows = read_metrics(run_dir_for(replace(cfg, condition=condition)))
    if rows:
        display(plot_training_curves(rows, replace(cfg, condition=condition)))

# %% [markdown]
# ## The paper's table beside ours, with the gaps
# Different scale (Qwen3-1.7B on OpenMathReasoning vs the profile's solver and problems): the
# comparison is about the ordering and the gaps, not the absolute numbers.

# %%
k = next((int(x) for x in best["k"].dropna()), None)
display(Markdown(comparison_md(comparison_table(best), cfg=cfg, k=k)))
print(describe_gaps(best))

# %% [markdown]
# ## Write the results (and the README's generated sections)

# %%
write_json(build_report(results, cfg), results_dir / "eval.json")
(results_dir / "eval_table.md").write_text(eval_markdown(results, cfg))
exported = export_runs(cfg)  # config, per-step metrics and evaluations of each run, no checkpoints
print("exported", [str(p.relative_to(results_dir)) for p in exported])
if write_readme:
    changed = update_readme({"eval_table": best_table_md(best, cfg=cfg) + "\n\n" + last_table_md(last, cfg=cfg),
                             "paper_comparison": comparison_md(comparison_table(best), cfg=cfg, k=k)})
    print("README.md updated" if changed else "README.md already up to date")
print(f"wrote {results_dir / 'eval.json'} and {results_dir / 'eval_table.md'}")
