"""Format warm-up of the embedded solver: a short supervised fine-tune on the step format.

    from sd_lib.warmup import load_warmed_up
    model, tokenizer = load_warmed_up(exclude=train + test)  # Problems, questions or keys

Zero-shot, SmolLM2-135M-Instruct neither follows the step format nor solves the chains. The
paper's solver (Qwen3-1.7B) already writes step-tagged traces and rarely solves its problems;
this warm-up puts the 135M model in that regime: a full fine-tune (AdamW) on generated
arithmetic chains whose targets are the exact step-format traces
(`problem.metadata["aligned_reference"]` followed by the end-of-turn token), with the loss on
completion tokens only and the student's chat prompt (`stepformat.solver_messages`).

The warm-up problems come from their own seed stream and skip every question in `exclude`
(pass the train and held-out questions), so warm-up, train and test are disjoint. The result
is cached as a safetensors folder under ``<cache>/warmup/<key>``, where key hashes the base
model, the settings and the warm-up questions; it is written atomically and reused.

Departures from the paper:
1. The paper has no warm-up; its solver follows the format from instructions. The 135M model
   needs one. Its length and difficulty (`WarmupSettings`) were chosen so that the solver's
   held-out Avg@12 (cpu profile) lies in 10-35%: rarely right, with errors at single steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from .models import EMBEDDED_SOLVER, cache_root, load_model_and_tokenizer, save_model_atomically
from .problems import Problem, generate_arithmetic, question_key
from .stepformat import SOLVER_INSTRUCTIONS, solver_messages

__all__ = ["WarmupSettings", "warmup_problems", "warmup_batch", "completion_loss", "warmup_key",
           "warmup_solver", "load_warmed_up"]

_DONE = "warmup.json"  # written last into every finished warm-up folder


@dataclass(frozen=True)
class WarmupSettings:
    """Warm-up length, difficulty and optimiser; the defaults are the calibrated cpu setting.

    Calibration (cpu profile held-out set: 30 problems of 4-5 one-digit terms, k=12, T=1.0,
    top_p=1.0, 96 new tokens, sampling seed 0): 8 steps of 16 problems of 3-4 terms gave
    Avg@12 = 26.7% [15.6, 38.1] (config seed 0) and 29.7% [16.9, 43.3] (seed 1), 97% well-formed
    traces, mostly single-step slips such as `3 + 8 = 17`. Along one 40-step run (k=4 estimates):
    step 5 16.7%, step 10 27.5%; the format is learned within ~5 steps, arithmetic keeps improving.
    """

    steps: int = 8
    """Optimizer steps; each sees `batch_size` new problems (one epoch over steps * batch_size)."""
    batch_size: int = 16
    """Problems per step."""
    learning_rate: float = 5e-5
    """AdamW learning rate (constant)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    n_terms: tuple[int, int] = (3, 4)
    """Terms per warm-up chain (inclusive range)."""
    max_value: int = 9
    """Largest term."""
    ops: tuple[str, ...] = ("+", "-")
    """Operations in the chains."""
    seed: int = 90_017
    """Seed of the warm-up problem stream and of the optimisation (apart from data seeds)."""


def warmup_problems(settings: WarmupSettings = WarmupSettings(), *,
                    exclude: Iterable[str | Problem] = ()) -> list[Problem]:
    """The `steps * batch_size` warm-up problems, none equal to a question in `exclude`.

    `exclude` holds Problems, questions or `question_key`s (all compared by `question_key`).
    """
    keys = frozenset(question_key(x.question if isinstance(x, Problem) else x) for x in exclude)
    return generate_arithmetic(settings.steps * settings.batch_size, seed=settings.seed,
                               n_terms=tuple(settings.n_terms), max_value=settings.max_value,
                               ops=tuple(settings.ops), exclude=keys)


def warmup_batch(tokenizer: Any, problems: list[Problem]) -> dict[str, torch.Tensor]:
    """Right-padded SFT batch: chat prompt + aligned trace + end-of-turn, loss on the completion.

    Returns input_ids (B, L), attention_mask (B, L), labels (B, L) with -100 on prompt and pad.
    """
    rows, labels = [], []
    for p in problems:
        target = p.metadata.get("aligned_reference")
        if not target:
            raise ValueError(f"problem {p.id} has no metadata['aligned_reference'] to train on")
        prompt = tokenizer.apply_chat_template(solver_messages(p), tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        completion_ids.append(tokenizer.eos_token_id)  # <|im_end|>: teaches the model to stop
        rows.append(prompt_ids + completion_ids)
        labels.append([-100] * len(prompt_ids) + completion_ids)
    L = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows])  # (B, L)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])  # (B, L)
    label_t = torch.tensor([y + [-100] * (L - len(y)) for y in labels])  # (B, L)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_t}


def warmup_key(base: str, settings: WarmupSettings, problems: list[Problem]) -> str:
    """Hash of what determines the warmed-up weights: base, settings, prompt, questions."""
    payload = json.dumps({"base": base, "settings": asdict(settings),
                          "instructions": SOLVER_INSTRUCTIONS,
                          "questions": [p.id for p in problems]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def completion_loss(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy -1/N sum_t log p(y_t | y_<t) over the N labelled tokens.

    input_ids, attention_mask, labels: (B, L), labels -100 where there is no loss.
    Naive equivalent: `model(input_ids, attention_mask=attention_mask, labels=labels).loss`.
    The output head runs only on the positions that predict a labelled token (about a third of
    the sequence here): the [B, L, V] logits of the prompt are never built.
    """
    hidden = model.get_decoder()(input_ids=input_ids,
                                 attention_mask=attention_mask).last_hidden_state  # (B, L, H)
    targets = labels[:, 1:]  # (B, L-1): position t predicts token t+1
    keep = targets != -100  # (B, L-1)
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V)
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def _train(model: Any, tokenizer: Any, problems: list[Problem], settings: WarmupSettings, *,
           progress: bool, on_step: Callable[[int, Any], None] | None = None) -> list[float]:
    """Full fine-tune, token-mean cross-entropy on completion tokens. Returns per-step losses.

    `on_step(step, model)` is called after each optimizer step (1-based), e.g. to evaluate.
    """
    torch.manual_seed(settings.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate,
                            weight_decay=settings.weight_decay)
    losses = []
    bar = tqdm(range(settings.steps), desc="warm-up", unit="step", disable=not progress)
    for step in bar:
        batch = warmup_batch(tokenizer, problems[step * settings.batch_size:
                                                 (step + 1) * settings.batch_size])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        loss = completion_loss(model, **batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None:
            on_step(step + 1, model)
            model.train()
    model.eval()
    return losses


def warmup_solver(base: str = EMBEDDED_SOLVER, *, settings: WarmupSettings = WarmupSettings(),
                  exclude: Iterable[str | Problem] = (),
                  cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Path of the warmed-up solver folder, training and caching it on first use.

    `exclude`: the train and held-out problems (or their questions), kept out of the warm-up.
    """
    problems = warmup_problems(settings, exclude=exclude)
    out = cache_root(cache_dir) / "warmup" / warmup_key(base, settings, problems)
    if (out / _DONE).is_file():
        return out
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(base, dtype=torch.float32, cache_dir=cache_dir)
    losses = _train(model, tokenizer, problems, settings, progress=progress)
    seconds = time.perf_counter() - t0

    return save_model_atomically(model, tokenizer, out, marker=_DONE, marker_content={
        "base": base, "settings": asdict(settings), "n_problems": len(problems), "losses": losses,
        "seconds": seconds})


def load_warmed_up(base: str = EMBEDDED_SOLVER, *, settings: WarmupSettings = WarmupSettings(),
                   exclude: Iterable[str | Problem] = (), cache_dir: str | os.PathLike | None = None,
                   dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                   progress: bool = True) -> tuple[Any, Any]:
    """`(model, tokenizer)` of the warmed-up solver (see `warmup_solver`)."""
    path = warmup_solver(base, settings=settings, exclude=exclude, cache_dir=cache_dir,
                         progress=progress)
    return load_model_and_tokenizer(str(path), dtype=dtype, device=device, cache_dir=cache_dir)


def starting_solver(cfg, *, progress: bool = True) -> str:
    """The solver every run of `cfg` starts from (no adapter): the format-warmed-up model when
    `cfg.warmup_format`, with the config's train and held-out questions kept out of the warm-up;
    else `cfg.solver` as is. Every notebook and the trainer call this, so they share one cache.
    """
    if not cfg.warmup_format:
        return cfg.solver
    from .problems import load_splits, question_key

    train, test = load_splits(cfg)
    return str(warmup_solver(cfg.solver, exclude={question_key(p.question) for p in train + test}, progress=progress))


def warmup_report(path) -> dict:
    """What a warmed-up folder records (settings, per-step losses, seconds); {} for other solvers."""
    done = Path(path) / _DONE
    return json.loads(done.read_text()) if done.is_file() else {}


def load_starting_solver(cfg, *, progress: bool = True):
    """(model, tokenizer) of `starting_solver(cfg)`, no adapter: in `cfg.dtype` on CUDA when
    available, else float32 on the CPU."""
    gpu = torch.cuda.is_available()
    return load_model_and_tokenizer(starting_solver(cfg, progress=progress), dtype=cfg.dtype if gpu else torch.float32,
                                    device="cuda" if gpu else None)
