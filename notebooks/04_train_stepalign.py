# %% [markdown]
# # 04 · Train StepAlignFB (step-aligned critique self-teacher)
#
# The self-teacher sees the question plus the frozen critic's step-aligned critique of this very rollout (verbatim up to the first error, then the fix).
# Everything but the context is shared with the other two conditions: the same loop
# (`sd_lib.train.train`), the same rollouts per optimizer step, the same evaluation.
#
# **Reads:** the warmed-up solver (notebook 00's cache), the config profile.
# **Writes:** `runs/<profile>/stepalign-seed<seed>/` (config, `metrics.jsonl`, checkpoints, held-out
# evaluations), `figures/curves_stepalign.png`.
# **Prerequisites:** notebook 00 (warm-up). Re-running resumes from the last checkpoint.

# %% tags=["parameters"]
PROFILE = "cpu"  # smoke | cpu | paper
SEED = 0  # seeds data order, rollouts and LoRA init
STEPS = None  # optimizer steps; None keeps the profile's max_steps

# %%
import pandas as pd

from sd_lib.config import get_config
from sd_lib.plots import plot_training_curves
from sd_lib.train import read_metrics, train

overrides = {} if STEPS is None else {"max_steps": int(STEPS)}
cfg = get_config(PROFILE, seed=SEED, condition="stepalign", **overrides)
cfg

# %% [markdown]
# ## Train
# One optimizer step = `rollouts_per_step` rollouts. The bar shows loss and mean reward; the
# metric definitions are in `docs/METRICS.md`.

# %%
run_dir = train(cfg)
metrics = read_metrics(run_dir)
len(metrics), run_dir

# %% [markdown]
# ## Curves

# %%
plot_training_curves(metrics, cfg)

# %%
pd.DataFrame(metrics).set_index("step").filter(regex="^(loss|reward|eval|adv|sd|critic/unusable)").round(4).tail(10)
