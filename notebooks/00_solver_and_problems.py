# %% [markdown]
# # 00 · The solver, the problems and the step format
#
# The paper's solver writes step-tagged traces, `<step_1>…</step_1> … <answer>…</answer>`, and
# rarely solves its problems. This notebook sets up the same regime at the profile's scale: it
# shows the problems and the step format, runs the short format warm-up (the embedded
# SmolLM2-135M does not follow the format from instructions alone), and measures where the
# warmed-up solver starts on the held-out problems.
#
# **Reads:** the profile's problems (generated arithmetic for `cpu`/`smoke`).
# **Writes:** the warmed-up solver (cached under `~/.cache/sd_lib/warmup/`),
# `results/base_eval.json` (the profile's results folder), the README's base-evaluation table.
# **Prerequisites:** none.

# %% tags=["parameters"]
PROFILE = "cpu"  # smoke | cpu | paper
SEED = 0  # seeds problem generation, splits and sampling

# %%
import pandas as pd

from sd_lib.config import get_config, resolve_path
from sd_lib.contexts import apply_chat
from sd_lib.evaluation import evaluate_config, write_json
from sd_lib.models import load_model_and_tokenizer
from sd_lib.problems import load_splits
from sd_lib.report import base_eval_markdown, update_readme
from sd_lib.stepformat import SOLVER_INSTRUCTIONS, parse_attempt, solver_messages
from sd_lib.warmup import starting_solver, warmup_report

cfg = get_config(PROFILE, seed=SEED)
train_problems, test_problems = load_splits(cfg)
len(train_problems), len(test_problems)

# %% [markdown]
# ## Problems
# Each generated problem keeps its exact step labels (for the critic and the token analysis),
# a dataset-style reference solution (an alternative derivation, as in the paper) and a second
# reference in the solver's own step format (for the alignment ablation).

# %%
pd.DataFrame(
    [{"question": p.question, "answer": p.answer, "reference_solution": p.reference_solution,
      "aligned_reference": p.metadata.get("aligned_reference", "")} for p in train_problems[:5]]
)

# %% [markdown]
# ## The step format
# The student sees the instructions and the question; its chat prompt is below. `parse_attempt`
# reads back what a model writes, tolerating missing tags and truncation.

# %%
print(SOLVER_INSTRUCTIONS, end="\n\n")
_, tokenizer = load_model_and_tokenizer(cfg.solver)
print(apply_chat(tokenizer, solver_messages(test_problems[0]), template_kwargs=cfg.student_chat_template_kwargs))

# %%
parse_attempt("<step_1>3 + 4 = 7</step_1>\n<step_2>7 - 2 = 6</step_2>\n<answer>6")

# %% [markdown]
# ## Format warm-up
# A short full fine-tune on generated chains (disjoint from the train and held-out problems),
# cached and reused by every later notebook. Profiles without a warm-up use the solver as is.

# %%
solver = starting_solver(cfg)
warmup_report(solver)

# %% [markdown]
# ## Where the warmed-up solver starts
# `eval_k` samples per held-out problem at the evaluation temperature: Avg@k, Pass@k
# (unbiased estimator), Maj@k and mean answer length, each with a bootstrap 95% CI over problems.

# %%
model, tokenizer = load_model_and_tokenizer(solver)
base_eval = evaluate_config(model, tokenizer, test_problems, cfg)
base_eval["profile"], base_eval["seed"], base_eval["solver"] = cfg.profile, cfg.seed, solver
write_json(base_eval, resolve_path(cfg.results_dir) / "base_eval.json")
pd.DataFrame(base_eval["summary"]).T.round(4)

# %%
print(f"well-formed traces: {base_eval['format_rate']:.1%}")
for ex in base_eval["examples"][:3]:
    print("—", ex["question"], "\n", ex["completion"], "\n")

# %% [markdown]
# The paper chose problems its solver rarely solves (Avg@16 < 5/16). The README quotes the
# `cpu` profile's number below, generated from `results/base_eval.json`.

# %%
if cfg.profile == "cpu":
    update_readme("base_eval", base_eval_markdown(base_eval))
print(base_eval_markdown(base_eval))
