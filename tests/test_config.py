"""The run configuration: the paper's values as defaults, named profiles, save/load, validation."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json

import pytest

from sd_lib import config as config_module
from sd_lib.config import CONDITIONS, PROFILES, SDConfig, get_config, load_config, save_config

# The paper's values, as the field docs quote them ("paper: ...").
PAPER = dict(
    lora_r=64,
    lora_alpha=128,
    lora_target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    learning_rate=5e-6,
    temperature=1.1,
    max_new_tokens=2048,
    rollouts_per_step=32,
    epochs=7,
    eval_every=10,
    eval_k=12,
    teacher_kind="base",
    teacher_chat_template_kwargs={"enable_thinking": True},
    student_chat_template_kwargs={"enable_thinking": False},
    grpo_group_size=8,
    sd_group_size=1,
    divergence="forward_kl",
    n_train=282,
    n_test=30,
    solver="Qwen/Qwen3-1.7B",
    critic="hf:Qwen/QwQ-32B",
    problems="openmathreasoning",
)


@pytest.mark.parametrize("cfg", [SDConfig(), get_config("paper"), get_config()], ids=["class", "paper", "default"])
def test_paper_defaults(cfg):
    """Checked against the paper's stated hyperparameters (table PAPER above)."""
    assert {k: getattr(cfg, k) for k in PAPER} == PAPER
    assert cfg.profile == "paper"


def test_group_sizes_per_condition():
    """Checked against hand division: 32 rollouts / G=8 -> 4 problems (GRPO); / G=1 -> 32 (SD)."""
    grpo = get_config("paper", condition="grpo")
    assert (grpo.group_size, grpo.problems_per_step) == (8, 4)
    for condition in ("refsol", "stepalign"):
        sd = get_config("paper", condition=condition)
        assert (sd.group_size, sd.problems_per_step) == (1, 32)


def test_profiles_exist_and_build_in_every_condition():
    """Checked against the profile names the module docstring promises and the three conditions."""
    assert {"smoke", "cpu", "paper"} <= set(PROFILES)
    names = {f.name for f in dataclasses.fields(SDConfig)}
    for profile, overrides in PROFILES.items():
        assert set(overrides) <= names, f"profile {profile} overrides unknown fields {set(overrides) - names}"
        for condition in CONDITIONS:
            cfg = get_config(profile, condition=condition)
            assert (cfg.profile, cfg.condition) == (profile, condition)
            assert cfg.rollouts_per_step % cfg.group_size == 0


def test_profiles_are_small_overrides():
    """Checked against the profile tables: cpu and smoke keep the paper's method (sampling
    temperature, teacher, divergence, SD group size) and only shrink the run."""
    for profile in ("cpu", "smoke"):
        cfg = get_config(profile)
        assert (cfg.temperature, cfg.teacher_kind, cfg.divergence, cfg.sd_group_size) == (1.1, "base", "forward_kl", 1)
        assert cfg.critic == "programmatic" and cfg.problems == "arithmetic"
    smoke, cpu = get_config("smoke"), get_config("cpu")
    assert smoke.n_train < cpu.n_train and smoke.max_steps < cpu.max_steps


def test_overrides_apply():
    """Checked against the values passed in."""
    cfg = get_config("cpu", seed=3, condition="grpo", lora_target_modules=["q_proj", "v_proj"])
    assert (cfg.seed, cfg.condition, cfg.lora_target_modules) == (3, "grpo", ("q_proj", "v_proj"))


def test_unknown_profile_raises_naming_it():
    """Checked against the unknown name in the ValueError message."""
    with pytest.raises(ValueError, match="'fast'"):
        get_config("fast")


def test_unknown_field_raises_naming_it():
    """Checked against the unknown field name in the ValueError message."""
    with pytest.raises(ValueError, match="learning_rat"):
        get_config("cpu", learning_rat=1e-3)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(condition="sft"), "condition"),
        (dict(condition="GRPO"), "condition"),
        (dict(teacher_kind="frozen"), "teacher_kind"),
        (dict(critique_style="verbose"), "critique_style"),
        (dict(reference_style="gold"), "reference_style"),
        (dict(condition="grpo", rollouts_per_step=12), "rollouts_per_step"),  # 12 is not a multiple of G=8
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, name):
    """Checked against the field's name in the ValueError message, from both entry points."""
    with pytest.raises(ValueError, match=name):
        get_config("paper", **kwargs)
    with pytest.raises(ValueError, match=name):
        SDConfig(**kwargs)


@pytest.mark.parametrize("profile", ["paper", "cpu", "smoke"])
@pytest.mark.parametrize("condition", CONDITIONS)
def test_save_load_round_trip(tmp_path, profile, condition):
    """Checked against the config saved: load_config(save_config(cfg)) == cfg, file is plain JSON."""
    cfg = get_config(profile, condition=condition, seed=5, token_clip=2.5)
    path = save_config(cfg, tmp_path / "run" / "config.json")
    assert json.loads(path.read_text())["lora_target_modules"] == list(cfg.lora_target_modules)
    back = load_config(path)
    assert back == cfg
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)


def test_load_rejects_unknown_field(tmp_path):
    """Checked against the stray field's name in the ValueError message."""
    path = save_config(get_config("smoke"), tmp_path / "c.json")
    d = json.loads(path.read_text())
    d["not_a_field"] = 1
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="not_a_field"):
        load_config(path)


def test_config_is_frozen():
    """Checked against dataclass(frozen=True): a run's config cannot drift after it is saved."""
    cfg = get_config("smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.learning_rate = 1.0


def test_every_field_has_a_docstring():
    """Checked against the house style: a docstring string right under each field of SDConfig."""
    tree = ast.parse(inspect.getsource(config_module))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SDConfig")
    undocumented = []
    for a, b in zip(cls.body, cls.body[1:] + [None]):
        if isinstance(a, ast.AnnAssign):
            if not (isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)):
                undocumented.append(a.target.id)
    assert undocumented == []
