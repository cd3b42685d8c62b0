# %% [markdown]
# # 01 · The frozen critic and the teacher contexts of the three conditions
#
# StepAlignFB's self-teacher sees the question plus a frozen critic's correction of this very
# rollout: the solver's steps verbatim up to the first error, then the corrected step, then a
# correct continuation (the paper's four-case schema: A correct, B missing step, C cut off,
# D wrong). This notebook shows the critic prompt, runs the critic on real attempts of the
# warmed-up solver, shows one example of each case and each critique style of the quoting
# ablation, and puts the three conditions' prompts for one attempt side by side.
#
# - **Reads**: the warmed-up solver (notebook 00's cache; trained here on first use), the config profile.
# - **Writes**: `<results_dir>/critic_examples.json`.
# - **Prerequisites**: notebook 00 (format warm-up); for `CRITIC` = an endpoint URL, a running
#   OpenAI-compatible server (API key in `$SD_LIB_CRITIC_API_KEY`).

# %% tags=["parameters"]
PROFILE = "cpu"  # config profile: smoke | cpu | paper
SEED = 0  # seeds the problems and the solver's samples
CRITIC = "programmatic"  # programmatic | hf:<model> | http(s)://<host>:<port>/v1 (OpenAI-compatible)
CRITIC_MODEL = None  # model name served at a CRITIC URL (None: the profile's critic_model)
N_PROBLEMS = 16  # training problems to sample attempts on (4 samples each)

# %%
import pandas as pd
from IPython.display import display

from sd_lib.config import get_config, resolve_path
from sd_lib.contexts import build_prompts
from sd_lib.critic import build_critic_messages, make_critic
from sd_lib.display import case_examples, examples_frame, side_by_side
from sd_lib.evaluation import write_json
from sd_lib.problems import load_splits
from sd_lib.sampling import generate
from sd_lib.warmup import load_starting_solver

# %%
overrides = {"critic": CRITIC} | ({"critic_model": CRITIC_MODEL} if CRITIC_MODEL else {})
cfg = get_config(PROFILE, seed=SEED, **overrides)
train, test = load_splits(cfg)
problems = train[:N_PROBLEMS]
critic = make_critic(cfg)
print(f"profile {cfg.profile}, critic {critic.identity}, style {critic.style}, {len(problems)} problems")

# %% [markdown]
# ## Attempts of the warmed-up solver
# The student prompt is the question alone; 4 samples per problem at the training temperature.

# %%
model, tokenizer = load_starting_solver(cfg)
student_prompts, _ = build_prompts("grpo", problems, tokenizer, cfg)
rollouts = generate(model, tokenizer, student_prompts, k=4, temperature=cfg.temperature, top_p=cfg.top_p,
                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size, seed=SEED)
attempted = [problems[i] for i in rollouts.prompt_index]
print(rollouts.stats)
print(rollouts.texts[0])

# %% [markdown]
# ## The critic prompt
# What a model critic (`hf:` or an endpoint) receives for the first rollout: the question, the
# solver's step-tagged attempt and the reference solution, the four cases, and the output format.
# The programmatic critic writes its answer in that same format, through the same parser.

# %%
print(build_critic_messages(attempted[0], rollouts.texts[0])[0]["content"])

# %% [markdown]
# ## Critiques of every rollout
# `unusable` counts critic output that could not be parsed (masked out of the loss,
# `critic/unusable_frac` in training).

# %%
critiques = critic.critique_batch(attempted, rollouts.texts)
counts = pd.Series([c.case if c.usable else "unusable" for c in critiques]).value_counts().rename("rollouts")
counts.to_frame()

# %% [markdown]
# ## One example of each case
# Real attempts where the solver produced that case, else a crafted attempt (`source` says which).

# %%
examples = case_examples(attempted, rollouts.texts, critiques, critic)
examples_frame(examples)

# %%
for e in examples:
    print(f"case {e['case']} ({e['source']} attempt), first error: {e['first_error_step']}")
    display(side_by_side({"solver attempt": e["attempt"], "critic output": e["raw"],
                          "teacher sees (aligned)": e["styles"]["aligned"]}))

# %% [markdown]
# ## The three critique styles (the quoting ablation)
# `aligned` (the paper's): verbatim up to the error, then the fix. `quote_error`: the wrong step
# quoted verbatim before its fix. `no_trace`: the fix alone, without the solver's correct prefix.

# %%
d = next(e for e in examples if e["case"] == "D")
side_by_side(d["styles"])

# %% [markdown]
# ## The three conditions' prompts for that attempt
# GRPO has no teacher (the student prompt alone); RefSol's teacher sees the dataset-style
# reference; StepAlignFB's teacher sees the critique. Chat-templated exactly as trained.

# %%
prob = {p.id: p for p in attempted}[d["problem_id"]]
student, _ = build_prompts("grpo", [prob], tokenizer, cfg)
_, refsol = build_prompts("refsol", [prob], tokenizer, cfg)
_, stepalign = build_prompts("stepalign", [prob], tokenizer, cfg, [critic.critique(prob, d["attempt"])])
prompts = {"GRPO: student prompt (no teacher)": student[0], "RefSol: teacher prompt": refsol[0],
           "StepAlignFB: teacher prompt": stepalign[0]}
side_by_side(prompts)

# %% [markdown]
# ## Write the examples

# %%
out = write_json({"profile": cfg.profile, "seed": cfg.seed, "critic": critic.identity, "style": critic.style,
                  "n_rollouts": len(critiques), "case_counts": counts.to_dict(),
                  "unusable_frac": sum(not c.usable for c in critiques) / len(critiques),
                  "examples": examples, "prompts_for_one_attempt": prompts},
                 resolve_path(cfg.results_dir) / "critic_examples.json")
print(f"wrote {out}")
