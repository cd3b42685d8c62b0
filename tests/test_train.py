"""The trainer: the three conditions in one loop, durability, data parallelism, the paper profile.

Runs on tiny random solvers (conftest) so that each test takes seconds; the embedded 135M
solver runs the same code in the notebooks and in `make reproduce PROFILE=smoke`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sd_lib.config import get_config
from sd_lib.critic import make_critic
from sd_lib.problems import generate_arithmetic, save_local
from sd_lib.train import build_model, grpo_micro_step, latest_checkpoint, read_metrics, sd_micro_step, train

ROOT = Path(__file__).resolve().parents[1]


def _cfg(solver, condition, tmp_path, **kw):
    base = dict(solver=solver, warmup_format=False, condition=condition, runs_dir=str(tmp_path / "runs"),
                n_train=8, n_test=2, eval_k=2, max_new_tokens=12, eval_max_new_tokens=12, rollouts_per_step=8,
                micro_batch_size=4, grpo_group_size=4, max_steps=2, eval_every=2, save_every=1,
                report_to=("jsonl",), learning_rate=1e-3)
    return get_config("smoke", **{**base, **kw})


@pytest.mark.parametrize("condition", ["grpo", "refsol", "stepalign"])
def test_each_condition_trains_and_logs(tiny_solver, tmp_path, condition):
    """A few steps of each condition run end to end: metrics per step, eval rows, checkpoints."""
    cfg = _cfg(tiny_solver, condition, tmp_path)
    run = train(cfg, progress=False)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert "eval/avg@k" in rows[-1]
    assert (run / "eval" / "step_000002.json").exists()
    assert latest_checkpoint(run).name == "step_000002"
    assert json.loads((run / "config.json").read_text())["condition"] == condition
    if condition == "stepalign":
        assert 0.0 <= rows[-1]["critic/unusable_frac"] <= 1.0
    if condition != "grpo":
        assert "adv/mean" in rows[-1] and "sd/divergence" in rows[-1]


def test_resuming_with_another_config_is_refused_by_name(tiny_solver, tmp_path):
    """A run folder with checkpoints resumes only under the same experiment: a changed learning rate
    is refused with both values named; more steps or another eval cadence are allowed."""
    from dataclasses import replace

    cfg = _cfg(tiny_solver, "refsol", tmp_path, max_steps=1)
    run = train(cfg, progress=False)
    with pytest.raises(ValueError, match=r"learning_rate: 0.001 -> 0.0005"):
        train(replace(cfg, learning_rate=5e-4), progress=False)
    train(replace(cfg, max_steps=2, eval_every=1), progress=False)
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def _fixed_sd_batch(tokenizer, cfg, problems, *, condition):
    """Completions with an error at step 2 (fixed, not sampled) and their teacher prompts."""
    from sd_lib.contexts import build_prompts

    critic = make_critic("programmatic", cfg)
    texts = []
    for p in problems:
        steps = list(p.reference_steps)
        a, rest = steps[1].rsplit("= ", 1)
        steps[1] = f"{a}= {int(rest) + 1}"  # a wrong second step
        texts.append("".join(f"<step_{i}>{s}</step_{i}>" for i, s in enumerate(steps, 1)) + f"<answer>{p.answer}</answer>")
    critiques = critic.critique_batch(problems, texts) if condition == "stepalign" else None
    students, teachers = build_prompts(condition, problems, tokenizer, cfg, critiques)
    ids = lambda xs: [tokenizer(x, add_special_tokens=False)["input_ids"] for x in xs]  # noqa: E731
    return ids(students), ids(teachers), ids(texts)


@pytest.mark.slow
@pytest.mark.parametrize("condition", ["refsol", "stepalign"])
def test_sd_divergence_goes_down_on_a_fixed_batch(condition, tmp_path):
    """Self-distillation on the embedded 135M solver: D(teacher || student) on a fixed batch of
    rollouts falls after a few optimizer steps on that batch (the loss optimises what it says)."""
    from sd_lib.models import EMBEDDED_SOLVER

    cfg = get_config("smoke", solver=EMBEDDED_SOLVER, warmup_format=False, condition=condition,
                     learning_rate=1e-3, lora_r=8, lora_alpha=16)
    model, tok = build_model(cfg)
    problems = generate_arithmetic(4, seed=3, n_terms=(4, 4))
    s_ids, t_ids, c_ids = _fixed_sd_batch(tok, cfg, problems, condition=condition)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate)
    norm = float(sum(map(len, c_ids)))
    divs = []
    for _ in range(4):
        out = sd_micro_step(model, cfg, student_ids=s_ids, teacher_ids=t_ids, completion_ids=c_ids,
                            weights=[1.0] * len(c_ids), pad_id=tok.pad_token_id, norm=norm)
        divs.append(out["div"] / out["tokens"])
        opt.step()
        opt.zero_grad()
    assert divs[-1] < 0.7 * divs[0], divs


def test_grpo_equal_rewards_zero_gradient_and_base_frozen(tiny_solver, tmp_path):
    """GRPO with equal rewards in every group: advantages 0, so every LoRA gradient is exactly 0;
    and a training step changes LoRA weights only, never a base weight."""
    cfg = _cfg(tiny_solver, "grpo", tmp_path)
    model, tok = build_model(cfg)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    prompts = [tok("Compute 1 + 2.", add_special_tokens=False)["input_ids"]] * 4
    completions = [tok(t, add_special_tokens=False)["input_ids"] for t in ["<answer>3</answer>", "3", "<step_1>1 + 2 = 3", "4"]]
    grpo_micro_step(model, cfg, prompt_ids=prompts, completion_ids=completions, advantages=[0.0] * 4,
                    pad_id=tok.pad_token_id, n_global=4, tok_global=float(sum(map(len, completions))))
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)
    run = train(cfg, model=model, tokenizer=tok, progress=False)
    assert read_metrics(run)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p.detach(), base_before[n]), n


def _cli(run_dir, solver, *extra, condition="refsol", steps=4):
    sets = [f"solver={solver}", "warmup_format=false", "n_train=8", "n_test=2", "eval_k=2", "max_new_tokens=10",
            "eval_max_new_tokens=10", "rollouts_per_step=4", "micro_batch_size=2", "eval_every=2", "save_every=1",
            'report_to=["jsonl"]', "learning_rate=0.001", *extra]
    return [sys.executable, "-m", "sd_lib.train", "--condition", condition, "--profile", "smoke", "--max-steps", str(steps),
            "--run-dir", str(run_dir), "--set", *sets]


def _strip_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _adapter(run_dir):
    return load_file(str(latest_checkpoint(run_dir) / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tiny_solver, tmp_path):
    """SIGKILL after the 2nd checkpoint, re-run the same command: same metrics (time fields aside)
    and the same adapter as an uninterrupted run; no metric line lost or written twice."""
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cli(full, tiny_solver), check=True, env=env, cwd=ROOT, capture_output=True)
    proc = subprocess.Popen(_cli(killed, tiny_solver), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_000002" / "trainer_state.pt").exists():
        assert proc.poll() is None, "the run ended before its 2nd checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(killed).name in ("step_000002", "step_000003")
    resumed = latest_checkpoint(killed).name
    res = subprocess.run(_cli(killed, tiny_solver), check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    assert f"from {resumed}" in res.stderr  # it resumed, rather than starting over
    a, b = read_metrics(full), read_metrics(killed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert _strip_time(a) == _strip_time(b)
    wa, wb = _adapter(full), _adapter(killed)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_two_processes_give_the_same_gradients_as_one(tiny_solver, tmp_path):
    """`accelerate launch --num_processes 2 --cpu` vs one process on the same global batch
    (greedy rollouts, so the batch does not depend on how it is split): equal gradients."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    extra = ("temperature=0", "gen_batch_size=1")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run(_cli(tmp_path / "r1", tiny_solver, *extra, steps=1), check=True, cwd=ROOT,
                   env={**env, "SD_LIB_DUMP_GRADS": str(one)}, capture_output=True)
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    cmd = _cli(tmp_path / "r2", tiny_solver, *extra, steps=1)
    res = subprocess.run(accelerate + cmd[2:], cwd=ROOT, env={**env, "SD_LIB_DUMP_GRADS": str(two)}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    g1, g2 = torch.load(one), torch.load(two)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=k)


def test_paper_profile_one_step_with_tiny_qwen3_and_endpoint_critic(tiny_qwen3, tmp_path, monkeypatch):
    """The `paper` profile, one step: a tiny random Qwen3-architecture model in place of
    Qwen3-1.7B, a local problem file in place of OpenMathReasoning, and the critic wired to a
    local OpenAI-compatible endpoint. Everything else (LoRA r=64 on the 7 projections, forward
    KL, base teacher, thinking template kwargs, batch 32, G=1) is the profile's own."""
    from test_critic import FakeEndpoint

    monkeypatch.setenv("SD_LIB_CRITIC_API_KEY", "test-key")
    ep = FakeEndpoint()
    try:
        problems = generate_arithmetic(40, seed=5)
        path = save_local(problems, tmp_path / "problems.jsonl")
        cfg = get_config("paper", solver=tiny_qwen3, problems=str(path), critic=ep.url, critic_model="critic",
                         n_train=32, n_test=2, max_new_tokens=8, max_steps=1, eval_every=10, save_every=1,
                         runs_dir=str(tmp_path / "runs"), report_to=("jsonl",), critic_timeout_s=5.0)
        assert (cfg.lora_r, cfg.lora_alpha, cfg.rollouts_per_step, cfg.group_size) == (64, 128, 32, 1)
        run = train(cfg, progress=False)
        row = read_metrics(run)[0]
        assert ep.requests >= 1  # the critic was asked over HTTP
        assert row["step"] == 1 and "critic/unusable_frac" in row
        lora = [n for n in _adapter(run)]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            assert any(proj in n for n in lora), proj
    finally:
        ep.close()
