# %% [markdown]
# # 06 · Per-token advantage: where does each teacher context put A_t?
#
# The paper's mechanism: along a wrong rollout, the step-aligned critique makes the self-teacher
# put large negative A_t = log π(y_t | x, c, y<t) − log π(y_t | x, y<t) on the first erroneous
# step and non-negative A_t on the correct prefix (a process reward for free), while a reference
# solution spreads negative A_t over the whole rollout. We sample rollouts from the warmed-up
# solver, keep those the programmatic critic marks wrong (case D, first error known) and score
# every token under five teacher contexts: RefSol with the independent or the aligned
# reference, StepAlignFB with the critique aligned / quoting the error / without the trace.
#
# - **Reads**: the warmed-up solver (`sd_lib.warmup` cache; trained on first use), the config's
#   generated arithmetic training problems.
# - **Writes**: `<results_dir>/advantage.json` (per-context and per-rollout statistics, the
#   generated summary), `<results_dir>/advantage_tokens.parquet` (every token's A_t),
#   `<figures_dir>/token_advantage_rollout.png`, `advantage_by_part.png`, `advantage_ablation.png`,
#   and (not for the smoke profile) the README section `advantage_table`.
# - **Prerequisites**: none beyond the installed package (the warm-up is cached on first use).

# %%
from IPython.display import HTML, Markdown, display

from sd_lib.analysis import (advantage_summary, context_advantages, describe_localisation, example_rollout,
                             localisation_table, sample_erroneous_rollouts)
from sd_lib.config import get_config, resolve_path
from sd_lib.critic import STYLES, make_critic
from sd_lib.evaluation import write_json
from sd_lib.plots import plot_advantage_ablation, plot_advantage_by_part, plot_token_advantages, token_html
from sd_lib.problems import load_splits
from sd_lib.report import advantage_markdown, update_readme
from sd_lib.warmup import load_starting_solver

# %% tags=["parameters"]
PROFILE = "cpu"  # config profile: smoke | cpu | paper
SEED = 0  # seed of the problems and of the sampled rollouts
N_PROBLEMS = 64  # training problems to sample rollouts on (at most the profile's n_train)
K = 4  # rollouts sampled per problem
N_ROLLOUTS = 48  # erroneous rollouts kept (at most)
N_BOOT = 1000  # bootstrap resamples (over rollouts) for the CIs
UPDATE_README = True  # write the table into README.md's marked section (never for the smoke profile)

# %%
cfg = get_config(PROFILE, seed=SEED)
results_dir = resolve_path(cfg.results_dir)
results_dir.mkdir(parents=True, exist_ok=True)
problems = load_splits(cfg)[0][:N_PROBLEMS]
print(f"profile {cfg.profile}, seed {cfg.seed}: {len(problems)} problems x {K} rollouts, "
      f"temperature {cfg.temperature}, max_new_tokens {cfg.max_new_tokens}")

# %% [markdown]
# ## Erroneous rollouts of the warmed-up solver (no adapter)

# %%
model, tokenizer = load_starting_solver(cfg)
critics = {style: make_critic("programmatic", cfg, style=style) for style in STYLES}
rollouts = sample_erroneous_rollouts(
    model, tokenizer, problems, critic=critics["aligned"], k=K, temperature=cfg.temperature,
    max_new_tokens=cfg.max_new_tokens, seed=SEED, max_rollouts=N_ROLLOUTS, batch_size=cfg.gen_batch_size,
    chat_template_kwargs=cfg.student_chat_template_kwargs)
print(f"{len(rollouts)} erroneous rollouts (case D) kept of {len(problems) * K} sampled")
for r in rollouts[:1]:  # one example
    print(r.problem.question, "\n" + r.text, f"\nfirst error: step {r.first_error_step}")

# %% [markdown]
# ## A_t of every token under the five teacher contexts
# The student and each teacher score the same tokens with the warmed-up weights, under no_grad
# in eval mode (`teacher_kind=None`: there is no adapter to disable).

# %%
tokens = context_advantages(model, tokenizer, rollouts, critics=critics, cfg=cfg, teacher_kind=None)
table = localisation_table(tokens, n_boot=N_BOOT, seed=SEED)
table[["label", "n_rollouts", "mean_correct_prefix", "mean_first_error", "mean_after_error", "mean_other",
       "auroc", "auroc_ci_low", "auroc_ci_high", "auroc_pooled", "step_auroc", "error_abs_share"]].round(3)

# %% [markdown]
# ## What the numbers say
# Generated from the table above (`describe_localisation`); nothing here is written in advance.

# %%
print(describe_localisation(table))

# %% [markdown]
# ## Figures
# One rollout chosen by a fixed rule (`example_rollout`: median length among rollouts with a
# correct prefix, an error and steps after it), RefSol above StepAlignFB.

# %%
rollout = example_rollout(tokens)
plot_token_advantages(tokens, cfg, rollout=rollout)

# %%
plot_advantage_by_part(tokens, cfg)

# %%
plot_advantage_ablation(table, cfg)

# %% [markdown]
# ## The same rollout as text
# Hover a token for its A_t; red < 0 < blue; the first erroneous step is underlined.

# %%
for context in ("refsol_independent", "stepalign_aligned"):
    one = tokens[(tokens["rollout"] == rollout) & (tokens["context"] == context)]
    display(HTML(token_html(one["token"], one["advantage"], parts=one["part"],
                            title=f"{context}: rollout {rollout} (profile {cfg.profile}, seed {cfg.seed})")))

# %% [markdown]
# ## Write the results

# %%
tokens.to_parquet(results_dir / "advantage_tokens.parquet", index=False)
summary = advantage_summary(tokens, table, profile=cfg.profile, seed=cfg.seed, n_problems=len(problems), k=K,
                            n_sampled=len(problems) * K, n_erroneous=len(rollouts), example_rollout=rollout)
write_json(summary, results_dir / "advantage.json")
display(Markdown(f"Wrote `{results_dir / 'advantage.json'}` and `advantage_tokens.parquet`."))
display(Markdown(advantage_markdown(summary)))
if UPDATE_README and PROFILE != "smoke":
    print("README.md updated" if update_readme("advantage_table", advantage_markdown(summary))
          else "README.md already up to date")
