"""The on-policy trainer: GRPO, RefSol and StepAlignFB in one loop.

    python -m sd_lib.train --condition stepalign --profile cpu --seed 0
    python -m sd_lib.train --condition grpo --profile smoke --max-steps 2
    accelerate launch --num_processes 2 --cpu -m sd_lib.train --condition refsol --profile smoke

One optimizer step, the same in every condition except for the context:
  1. sample `rollouts_per_step` rollouts from the student (G per problem: 8 for GRPO, 1 for SD);
  2. GRPO: binary final-answer rewards -> group-normalised advantages -> clipped policy loss;
     RefSol / StepAlignFB: build the teacher prompt (reference solution, or the critic's
     step-aligned critique of this very rollout) -> teacher and student distributions on the
     rollout's tokens -> self-distillation loss D(teacher || student);
  3. backward over micro-batches, clip, AdamW step; log; evaluate every `eval_every` steps;
     checkpoint every `save_every` steps.

Runs are durable: re-running the same command resumes from the last checkpoint, and the
metrics file is cut back to that checkpoint, so no line is lost or written twice. Rollout
sampling is seeded by (seed, step), so a resumed run repeats an uninterrupted one.

Departures from the paper (numbered, as the config docs mark "(not stated)"):
  1. Rollouts come from `transformers.generate`, not vLLM; no prefix caching across steps.
  2. Under several processes, gradients are all-reduced by hand after each micro-batch
     accumulation (DDP semantics); FSDP / DeepSpeed configs are refused with a clear error.
  3. A rollout whose critique is unusable gets zero weight in the loss (counted in
     `critic/unusable_frac`); the paper does not say what it did.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .advantages import group_advantages, token_advantages
from .alignment import (
    EmaAdapter,
    completion_logps,
    pack_batch,
    pack_student_teacher,
    student_teacher_hidden,
    teacher_mode,
)
from .config import SDConfig, get_config, resolve_path, save_config
from .fused_mlp import fused_swiglu
from .grpo import grpo_loss
from .losses import chunked_sd_loss, per_token_divergence, sampled_token_loss
from .problems import load_splits
from .stepformat import check_answer, parse_attempt

__all__ = ["train", "run_dir_for", "latest_checkpoint", "check_resumable", "main"]

METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------- paths & state

def run_dir_for(cfg: SDConfig) -> Path:
    """runs/<profile>/<condition>-seed<seed>: one folder per run, resumable."""
    return resolve_path(cfg.runs_dir) / cfg.profile / f"{cfg.condition}-seed{cfg.seed}"


def latest_checkpoint(run_dir) -> Path | None:
    ckpts = sorted(Path(run_dir, "checkpoints").glob("step_*"))
    ckpts = [c for c in ckpts if (c / "trainer_state.pt").exists()]
    return ckpts[-1] if ckpts else None


def _step_seed(seed: int, step: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7919 + salt) % (2**31 - 1)


def problems_for_step(train_problems, *, seed: int, position: int, n: int):
    """The next `n` problems of the data stream, epoch by epoch, each epoch freshly shuffled.

    Returns (problems, new_position). Position counts problems consumed since the start, so a
    resumed run picks up the stream exactly where it stopped.
    """
    out, N = [], len(train_problems)
    for pos in range(position, position + n):
        epoch, i = divmod(pos, N)
        order = list(range(N))
        random.Random(_step_seed(seed, epoch, salt=17)).shuffle(order)
        out.append(train_problems[order[i]])
    return out, position + n


# ----------------------------------------------------------------------------- distributed

class _Dist:
    """World size / rank and a manual gradient all-reduce (any forward path, incl. hidden states)."""

    def __init__(self):
        self.accelerator = None
        self.world, self.rank = 1, 0
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator
            from accelerate.utils import DistributedType

            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
            if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
                raise ValueError(
                    f"accelerate distributed_type={self.accelerator.distributed_type}: sd_lib's trainer "
                    "supports data parallelism (MULTI_CPU / MULTI_GPU) only"
                )
            self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_grads(self, params) -> None:
        if self.world == 1:
            return
        # every process's loss is already divided by the GLOBAL normaliser (tokens or rollouts
        # of the whole step), so the global gradient is the plain sum over processes
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)

    def sum(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


# ----------------------------------------------------------------------------- metric sinks

class MetricLogger:
    """JSONL (always) + TensorBoard / W&B / trackio when asked for and installed.

    On resume the JSONL file is cut back to the checkpoint's step, and TensorBoard is told
    to purge later steps, so a killed-and-resumed run logs every step exactly once.
    """

    def __init__(self, run_dir: Path, cfg: SDConfig, *, resume_step: int, enabled: bool):
        self.path, self.enabled, self.sinks = run_dir / METRICS_FILE, enabled, []
        if not enabled:
            return
        if self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            tmp.replace(self.path)
        if "tensorboard" in cfg.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.sinks.append(("tb", SummaryWriter(str(run_dir / "tb"), purge_step=resume_step + 1)))
            except ImportError:
                pass
        if "wandb" in cfg.report_to:
            import wandb

            self.sinks.append(("wandb", wandb.init(project="sd_lib", name=run_dir.name, config=asdict(cfg), resume="allow")))
        if "trackio" in cfg.report_to:
            import trackio

            self.sinks.append(("trackio", trackio.init(project="sd_lib", name=run_dir.name, config=asdict(cfg))))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        step = row["step"]
        for kind, sink in self.sinks:
            scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            if kind == "tb":
                for k, v in scalars.items():
                    sink.add_scalar(k, v, step)
                sink.flush()
            else:
                sink.log(scalars, step=step)

    def close(self):
        for kind, sink in self.sinks:
            if kind == "tb":
                sink.close()
            else:
                sink.finish()


def read_metrics(run_dir) -> list[dict]:
    """The metric rows of a run, one per optimizer step."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


# ----------------------------------------------------------------------------- checkpoints

# fields that may change between a run and its resumption: how long it runs, where and how it reports,
# and implementation choices that leave the maths unchanged (chunking, fusion, prefix sharing)
RESUMABLE_FIELDS = frozenset({"max_steps", "epochs", "eval_every", "save_every", "report_to", "runs_dir",
                              "results_dir", "figures_dir", "critic_timeout_s", "critic_max_retries",
                              "critic_concurrency", "gen_batch_size", "chunk_size", "fused_mlp",
                              "share_prefix"})


def check_resumable(run_dir: Path, cfg: SDConfig) -> None:
    """Raise ValueError if `run_dir` holds a checkpoint of a run with another configuration.

    A resumed run must continue the same experiment: every field except those in
    `RESUMABLE_FIELDS` must equal the saved `config.json`. The error names the fields."""
    saved_path = run_dir / "config.json"
    if latest_checkpoint(run_dir) is None or not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text())
    now = json.loads(json.dumps(asdict(cfg)))  # tuples -> lists, as saved
    diff = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_FIELDS and saved.get(k) != now.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise ValueError(
            f"{run_dir} holds checkpoints of a run with another configuration ({detail}); resume it with "
            f"its own config, or start a new run (another --run-dir, or delete that folder)")


def save_checkpoint(run_dir: Path, *, step: int, model, optimizer, scheduler, position: int, ema) -> Path:
    """Adapter (safetensors) + optimizer, scheduler, RNG states, step and data position.

    Written to a temporary folder and renamed, so a kill mid-save leaves the previous one.
    """
    final = run_dir / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
    torch.save(
        {
            "step": step,
            "position": position,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": ema.shadow if ema is not None else None,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
            },
        },
        tmp / "trainer_state.pt",
    )
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def load_checkpoint(ckpt: Path, *, model, optimizer, scheduler, ema) -> tuple[int, int]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter" / "adapter_model.safetensors")))
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None and state["ema"] is not None:
        ema.shadow = state["ema"]
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return state["step"], state["position"]


# ----------------------------------------------------------------------------- model set-up

def build_model(cfg: SDConfig, *, model=None, tokenizer=None):
    """(peft model, tokenizer): the solver with fresh LoRA adapters, seeded by `cfg.seed`."""
    from .models import add_lora, load_for_training
    from .warmup import starting_solver

    torch.manual_seed(cfg.seed)
    if model is None:
        model, tokenizer = load_for_training(starting_solver(cfg), cfg)
    if not hasattr(model, "disable_adapter"):
        model = add_lora(model, cfg)
    model.train()
    return model, tokenizer


# ----------------------------------------------------------------------------- one step

def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def sd_micro_step(model, cfg: SDConfig, *, student_ids, teacher_ids, completion_ids, weights, pad_id, norm: float, ema=None):
    """Self-distillation loss on one micro-batch, backward included; returns metric sums.

    The loss is sum_bt w_b m_bt D_bt / norm, with `norm` the number of weighted completion
    tokens of the whole optimizer step (all micro-batches, all processes): the token mean of
    the paper's objective, assembled across gradient accumulation.
    """
    device = next(model.parameters()).device
    student, teacher = pack_student_teacher(student_ids, teacher_ids, completion_ids, pad_token_id=pad_id, device=device)
    mask = student.completion_mask * torch.as_tensor(weights, dtype=torch.float32, device=device)[:, None]  # (B, T)
    with fused_swiglu(model, enabled=cfg.fused_mlp):
        s_h, t_h, weight, _ = student_teacher_hidden(model, student, teacher, teacher_kind=cfg.teacher_kind, ema=ema,
                                                     share_prefix=cfg.share_prefix)
    ids = student.completion_ids  # (B, T)
    if cfg.divergence == "sampled_token" or cfg.support != "full":
        student_logits = s_h @ weight.T  # (B, T, V): the naive path, for options the chunked one lacks
        teacher_logits = (t_h @ weight.T).detach()
        s_lp = student_logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)  # (B, T)
        t_lp = teacher_logits.log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)  # (B, T)
        if cfg.divergence == "sampled_token":
            per_token = sampled_token_loss(s_lp, t_lp, clip=cfg.token_clip)
        else:
            beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": cfg.jsd_beta}[cfg.divergence]
            per_token = per_token_divergence(
                student_logits, teacher_logits, beta=beta, support=cfg.support, top_k=cfg.top_k,
                tail=cfg.topk_tail, clip=cfg.token_clip,
            )
        loss = (per_token * mask).sum() / norm
        per_token, s_lp = per_token.detach(), s_lp.detach()
    else:  # s_lp, t_lp come out of the loss's own log-softmax: no second pass over the head
        loss_sum, per_token, s_lp, t_lp = chunked_sd_loss(
            s_h, t_h, weight, mask, divergence=cfg.divergence, beta=cfg.jsd_beta, chunk_size=cfg.chunk_size,
            reduction="sum", clip=cfg.token_clip, return_per_token=True, target_ids=ids,
        )
        loss = loss_sum / norm
    loss.backward()
    adv = token_advantages(t_lp, s_lp, mask)  # (B, T)
    return {"loss": float(loss.item()) * norm, "div": float((per_token * mask).sum()), "adv": float(adv.sum()), "tokens": float(mask.sum())}


def grpo_micro_step(model, cfg: SDConfig, *, prompt_ids, completion_ids, advantages, pad_id, n_global: int, tok_global: float):
    """GRPO loss on one micro-batch (on-policy: one update, so pi_old = pi detached)."""
    device = next(model.parameters()).device
    batch = pack_batch(prompt_ids, completion_ids, pad_token_id=pad_id, device=device)
    with fused_swiglu(model, enabled=cfg.fused_mlp):
        logps = completion_logps(model, batch, share_prefix=cfg.share_prefix)  # (B, T)
    ref = None
    if cfg.kl_beta > 0:
        with teacher_mode(model, "base"):
            ref = completion_logps(model, batch, share_prefix=cfg.share_prefix)
    adv = torch.as_tensor(advantages, dtype=torch.float32, device=device)
    loss, stats = grpo_loss(
        logps, logps.detach(), adv, batch.completion_mask, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
        ref_per_token_logps=ref, kl_beta=cfg.kl_beta, loss_type=cfg.grpo_loss_type,
        max_completion_length=cfg.max_new_tokens, num_items_in_batch=tok_global,
    )
    if cfg.grpo_loss_type != "dapo":  # per-sequence normalisers: re-weight this micro-batch's share
        loss = loss * len(prompt_ids) / n_global
    loss.backward()
    return {"loss": float(loss.item()), "tokens": float(batch.completion_mask.sum())}


# ----------------------------------------------------------------------------- the loop

def train(
    cfg: SDConfig,
    *,
    run_dir=None,
    model=None,
    tokenizer=None,
    critic=None,
    problems=None,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train one condition; returns the run folder (config, metrics.jsonl, checkpoints, eval/).

    Resumes from the run folder's last checkpoint. `model`/`tokenizer`/`critic`/`problems`
    override what the config would load (tests, notebooks). `stop_after` ends this call after
    that many steps (the run stays resumable).
    """
    from tqdm.auto import tqdm

    from .contexts import apply_chat, build_prompts
    from .evaluation import evaluate_config, write_json
    from .stepformat import solver_messages

    dist = _Dist()
    run_dir = Path(run_dir) if run_dir is not None else run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_resumable(run_dir, cfg)
    if dist.main:
        save_config(cfg, run_dir / "config.json")
    train_problems, test_problems = problems if problems is not None else load_splits(cfg)
    if not train_problems:
        raise ValueError("no training problems")
    model, tokenizer = build_model(cfg, model=model, tokenizer=tokenizer)
    if cfg.condition == "stepalign" and critic is None:
        from .critic import make_critic

        critic = make_critic(cfg, cache=resolve_path(cfg.runs_dir) / "critic_cache.jsonl")
    pad_id = tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    ema = EmaAdapter(model) if cfg.teacher_kind == "ema" else None

    step, position = 0, 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        step, position = load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema)
        if dist.main:
            print(f"[sd_lib.train] resuming {run_dir} from {ckpt.name} (step {step})", file=sys.stderr, flush=True)
    logger = MetricLogger(run_dir, cfg, resume_step=step, enabled=dist.main)
    steps_per_epoch = math.ceil(len(train_problems) / cfg.problems_per_step)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    bar = tqdm(total=total, initial=step, desc=f"{cfg.condition}", disable=not (progress and dist.main))
    G = cfg.group_size
    stopped = 0
    while step < total:
        t_step = time.time()
        batch_problems, position = problems_for_step(train_problems, seed=cfg.seed, position=position, n=cfg.problems_per_step)
        mine = batch_problems[dist.rank :: dist.world]  # this process's share of the global batch
        # 1. rollouts ------------------------------------------------------------------
        from .sampling import generate

        s_text = [apply_chat(tokenizer, solver_messages(p), template_kwargs=cfg.student_chat_template_kwargs) for p in mine]
        t0 = time.time()
        roll = generate(
            model, tokenizer, s_text, k=G, temperature=cfg.temperature, top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.gen_batch_size,
            seed=_step_seed(cfg.seed, step, salt=1 + dist.rank), progress=False,
        )
        t_roll = time.time() - t0
        rep = [mine[i] for i in roll.prompt_index]  # (B,) problem of each rollout
        parsed = [parse_attempt(t) for t in roll.texts]
        rewards = [float(check_answer(pa.answer, p.answer)) for pa, p in zip(parsed, rep)]
        student_ids = [roll.prompt_ids[i] for i in range(len(rep))]
        row = {}
        t0 = time.time()
        # 2. condition-specific signal ---------------------------------------------------
        n_global = int(dist.sum(len(rep)))
        if cfg.condition == "grpo":
            adv = group_advantages(torch.tensor(rewards), G, scale_std=cfg.scale_rewards).tolist()
            tok_global = dist.sum(float(sum(len(c) for c in roll.completion_ids)))
            sums = {"loss": 0.0, "tokens": 0.0}
            for s in range(0, len(rep), cfg.micro_batch_size):
                sl = slice(s, s + cfg.micro_batch_size)
                out = grpo_micro_step(
                    model, cfg, prompt_ids=student_ids[sl], completion_ids=roll.completion_ids[sl],
                    advantages=adv[sl], pad_id=pad_id, n_global=n_global, tok_global=tok_global,
                )
                for k in sums:
                    sums[k] += out[k]
            row["loss"] = dist.sum(sums["loss"])
            row["adv/abs_mean"] = dist.sum(sum(abs(a) for a in adv)) / n_global
        else:
            critiques = None
            if cfg.condition == "stepalign":
                critiques = critic.critique_batch(rep, roll.texts)
                for case in "ABCD":
                    row[f"critic/case_{case}_frac"] = dist.sum(sum(c.case == case for c in critiques)) / n_global
            _, t_text = build_prompts(cfg.condition, rep, tokenizer, cfg, critiques)
            # an unusable critique gives no teacher: that rollout gets zero weight
            usable = [0.0 if t is None else 1.0 for t in t_text]
            if critiques is not None:
                row["critic/unusable_frac"] = dist.sum(len(usable) - sum(usable)) / n_global
            teacher_ids = _tokenize(tokenizer, [t if t is not None else s_text[j] for t, j in zip(t_text, roll.prompt_index)])
            norm = dist.sum(float(sum(len(c) * w for c, w in zip(roll.completion_ids, usable))))
            sums = {"loss": 0.0, "div": 0.0, "adv": 0.0, "tokens": 0.0}
            for s in range(0, len(rep), cfg.micro_batch_size):
                sl = slice(s, s + cfg.micro_batch_size)
                if not any(usable[sl]):
                    continue
                out = sd_micro_step(
                    model, cfg, student_ids=student_ids[sl], teacher_ids=teacher_ids[sl],
                    completion_ids=roll.completion_ids[sl], weights=usable[sl], pad_id=pad_id,
                    norm=max(norm, 1.0), ema=ema,
                )
                for k in sums:
                    sums[k] += out[k]
            tokens = max(dist.sum(sums["tokens"]), 1.0)
            row["loss"] = dist.sum(sums["loss"]) / tokens
            row["sd/divergence"] = dist.sum(sums["div"]) / tokens
            row["adv/mean"] = dist.sum(sums["adv"]) / tokens
        # 3. update ----------------------------------------------------------------------
        dist.all_reduce_grads(params)
        if os.environ.get("SD_LIB_DUMP_GRADS") and dist.main and stopped == 0:
            # test hook: the first step's global gradient, to compare process layouts
            torch.save({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, os.environ["SD_LIB_DUMP_GRADS"])
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model, cfg.ema_decay)
        step += 1
        lengths = [len(c) for c in roll.completion_ids]
        row.update(
            {
                "step": step,
                "epoch": position / len(train_problems),
                "reward/mean": dist.sum(sum(rewards)) / n_global,
                "format/well_formed_frac": dist.sum(sum(pa.well_formed for pa in parsed)) / n_global,
                "completion/mean_length": dist.sum(sum(lengths)) / n_global,
                "completion/truncated_frac": dist.sum(sum(roll.truncated)) / n_global,
                "grad_norm": float(grad_norm),
                "lr": scheduler.get_last_lr()[0],
                "time/rollout_s": t_roll,
                "time/update_s": time.time() - t0,
                "time/step_s": time.time() - t_step,
            }
        )
        # 4. evaluate / checkpoint ---------------------------------------------------------
        if test_problems and step % cfg.eval_every == 0:
            res = evaluate_config(model, tokenizer, test_problems, cfg, progress=False)
            for name, v in res["summary"].items():
                row[f"eval/{name}"] = v["mean"]
            if dist.main:
                write_json(res, run_dir / "eval" / f"step_{step:06d}.json")
        logger.log(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", reward=f"{row['reward/mean']:.2f}")
        if step % cfg.save_every == 0 or step == total:
            if dist.main:
                save_checkpoint(run_dir, step=step, model=model, optimizer=optimizer, scheduler=scheduler, position=position, ema=ema)
            dist.barrier()
        stopped += 1
        if stop_after is not None and stopped >= stop_after:
            break
    bar.close()
    logger.close()
    return run_dir


# ----------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--condition", required=True, choices=["grpo", "refsol", "stepalign"])
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--run-dir", default=None, help="default: runs/<profile>/<condition>-seed<seed>")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=JSON", help="config overrides, e.g. learning_rate=1e-5")
    args = ap.parse_args(argv)
    overrides = {}
    for kv in args.set:
        if "=" not in kv:
            raise SystemExit(f"--set expects FIELD=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    if args.max_steps is not None:
        overrides["max_steps"] = args.max_steps
    cfg = get_config(args.profile, condition=args.condition, seed=args.seed, **overrides)
    run_dir = train(cfg, run_dir=args.run_dir)
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
