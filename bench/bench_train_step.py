"""One self-distillation training step, sd_lib vs TRL's SDPOTrainer: throughput and peak memory.

A step = rollouts -> reward/critic -> teacher prompts -> teacher forward -> student
forward/backward with the SD loss -> clip + AdamW update, run by each library's own trainer:

    sd_lib: `sd_lib.train.train(cfg, ...)` (condition `refsol`, the `cpu` profile's settings
            below, its defaults `share_prefix`, `fused_mlp`, `chunk_size=128`); step time = its
            logged `time/step_s` (rollout through update, no eval or checkpoint); tokens =
            `completion/mean_length` x rollouts.
    TRL:    `trl.experimental.sdpo.SDPOTrainer(...).train()` (TRL 1.15, CPU, no vLLM); step time
            = `on_step_begin` -> `on_step_end` (generation, reward, teacher context, forwards,
            backward, clip, AdamW); tokens = the completion mask of the step's rollouts
            (`on_teacher_context_built`).

Each variant runs in a fresh subprocess (a worker mode of this script) that loads the same
embedded SmolLM2-135M-Instruct (fp32, not warmed up) and adds the same LoRA adapter (r=16,
alpha=32, dropout 0, the 7 projections). It runs --warmup-steps + --steps optimizer steps; the
table quotes medians over the --steps measured ones of completion tokens / step seconds. Peak
memory: the process's peak RSS (VmHWM) over setup-free training, after resetting the high-water
mark (`echo 5 > /proc/self/clear_refs`) once the model, adapter and trainer exist; the RSS at
that moment is the baseline (libraries + model). A 5 ms RSS sampler cross-checks it.
Targets: sd_lib >= 1.25x TRL's tokens/s at <= 0.75x its peak RSS.

Matching (what the TRL run is told, so that both do the same work):
  - same prompts: `solver_messages(p)` of `generate_arithmetic` problems (4-5 terms), chat
    template of the model, no template kwargs that SmolLM2's template reads;
  - same teacher context, the RefSol prompt of `sd_lib.contexts` (REFSOL_TEMPLATE): TRL gets the
    reference solution as the dataset column `privileged_context`, with
    `include_environment_feedback=True`, `use_successful_as_teacher=False`,
    `reprompt_template="{prompt}{solution}{feedback}"` and a `feedback_template` holding
    REFSOL_TEMPLATE's text around the context; the worker checks token for token that every
    TRL teacher prompt equals sd_lib's `build_prompts("refsol", ...)` (printed);
  - teacher = the LoRA-disabled base model (sd_lib `teacher_kind="base"`, TRL
    `teacher_model_kind="base"` with a `peft_config`, which disables the adapter);
  - loss: full-vocabulary forward KL(teacher || student) (sd_lib `divergence="forward_kl"`,
    `support="full"`; TRL `distillation_mode="full_logits"`, `distillation_alpha=0.0`,
    `distillation_weight=1.0`, `distillation_is_clip=None`);
  - group size G (default 1, the paper's SD setting) = TRL `num_generations`; rollouts per step
    = TRL generation batch; micro-batch = `per_device_train_batch_size`; gradient
    accumulation = rollouts / micro-batch;
  - sampling: temperature, top_p=1, top_k=0, max_new_tokens = `max_completion_length`;
  - optimisation: AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0, constant LR,
    grad-norm clip 1.0; fp32 (`bf16=False`: TRL's default is bf16), `gradient_checkpointing=False`
    (TRL's default is True; sd_lib does not checkpoint on CPU), dropout off, `report_to="none"`.
Mismatches left (printed with the table): see MISMATCHES below.

    .venv/bin/python bench/bench_train_step.py            # full run, about 4-5 min on 2 idle cores
    .venv/bin/python bench/bench_train_step.py --quick    # smoke test, < 60 s
    .venv/bin/python bench/bench_train_step.py --rollouts 16 --max-new-tokens 96   # the cpu profile's step, longer

Run it on an otherwise idle machine: next to another CPU-heavy process, torch's default 2
OpenMP threads slow down many-fold (a 70-token prefill took 14.5 s at 2 threads and 0.64 s at 1
thread beside a running notebook); pass --threads 1 there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from _common import header  # noqa: E402
GiB = 1024**3

MISMATCHES = [
    "loss normalisation: sd_lib averages over all completion tokens of the step; TRL averages per-sequence "
    "token means over sequences (same work, different weights)",
    "rollout engine: sd_lib's KV-cached sampler drops finished rows; TRL calls HF model.generate, which decodes "
    "every row until the longest finishes (this is part of what is compared, not removable)",
    "loss path: sd_lib's chunked_sd_loss from hidden states; TRL builds (B, T, V) student and teacher logits "
    "(compared, not removable)",
    "forward passes: sd_lib runs the prompt prefix all rows of a micro-batch share once (share_prefix: the solver's "
    "73-token system prompt of ~90 student / ~160 teacher prompt tokens), each MLP as one autograd node "
    "(fused_mlp) and samples with LoRA merged into temporary weights; TRL runs every row in full through peft's "
    "layers (compared, not removable; the prefix share shrinks as prompts and completions grow)",
    "problems per step: each trainer draws its own (TRL's RepeatSampler shuffle vs sd_lib's seeded stream) from "
    "the same pool, and sampling RNG streams differ, so completion lengths differ: compare tokens/s, not seconds",
    "per-step extras: sd_lib also logs per-token advantages (read off the loss's own log-softmax) and parses "
    "every rollout; TRL computes reward diagnostics and gathers; both score rewards with the same check_answer",
]



# ----------------------------------------------------------------------------- memory

def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak RSS from here on: VmHWM after resetting it (exact), and a 5 ms sampler (a cross-check)."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.baseline = _rss_bytes()
        self.sampled, self._stop = self.baseline, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.sampled = max(self.sampled, _rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.hwm = _status_kib("VmHWM") * 1024 if self.reset else None
        self.peak = max(self.hwm or 0, self.sampled)


# ----------------------------------------------------------------------------- shared set-up

def _setup(args):
    import torch
    from transformers.utils import logging as hf_logging

    from sd_lib.config import get_config
    from sd_lib.models import EMBEDDED_SOLVER, load_model_and_tokenizer
    from sd_lib.problems import generate_arithmetic

    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    total_steps = args.warmup_steps + args.steps
    cfg = get_config(
        "cpu", condition="refsol", solver=EMBEDDED_SOLVER, warmup_format=False, seed=0,
        rollouts_per_step=args.rollouts, micro_batch_size=args.micro_batch, sd_group_size=args.group_size,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=1.0, gen_batch_size=64,
        teacher_kind="base", divergence="forward_kl", support="full", lora_r=16, lora_alpha=32, lora_dropout=0.0,
        learning_rate=1e-4, weight_decay=0.0, max_grad_norm=1.0, max_steps=total_steps, eval_every=10**9,
        save_every=10**9, report_to=("jsonl",),
    )
    n_problems = max(cfg.problems_per_step * total_steps, 8)
    problems = generate_arithmetic(n_problems, seed=0, n_terms=cfg.arith_n_terms, ops=cfg.arith_ops,
                                   max_value=cfg.arith_max_value)
    model, tokenizer = load_model_and_tokenizer(EMBEDDED_SOLVER, dtype=torch.float32)
    with torch.no_grad():  # fault in mmap-backed weights now, so that the RSS baseline holds the model
        for p in model.parameters():
            p.sum()
    return cfg, problems, model, tokenizer


def worker_sd_lib(args) -> dict:
    import torch

    from sd_lib.train import read_metrics, train

    cfg, problems, model, tokenizer = _setup(args)
    with tempfile.TemporaryDirectory() as tmp:
        with PeakRSS() as mem:
            run_dir = train(cfg, run_dir=os.path.join(tmp, "run"), model=model, tokenizer=tokenizer,
                            problems=(problems, []), progress=False)
        rows = read_metrics(run_dir)
    times = [r["time/step_s"] for r in rows]
    tokens = [r["completion/mean_length"] * cfg.rollouts_per_step for r in rows]
    return {"variant": "sd_lib", "times": times, "tokens": tokens, "rollout_s": [r["time/rollout_s"] for r in rows],
            "baseline_rss": mem.baseline, "peak_rss": mem.peak, "hwm_rss": mem.hwm, "sampled_rss": mem.sampled,
            "threads": torch.get_num_threads(), "loss": [r["loss"] for r in rows]}


def worker_trl(args) -> dict:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from sd_lib.config import LORA_TARGETS
    from sd_lib.contexts import REFSOL_TEMPLATE, build_prompts, reference_text
    from sd_lib.stepformat import check_answer, parse_attempt, solver_messages
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    cfg, problems, model, tokenizer = _setup(args)
    by_question = {p.question: p for p in problems}
    data = Dataset.from_list([{"prompt": solver_messages(p), "answer": p.answer,
                               "privileged_context": reference_text(p, cfg.reference_style)} for p in problems])
    # REFSOL_TEMPLATE = "{question}" + middle(context) ; TRL's reprompt = "{prompt}{solution}{feedback}"
    head, tail = REFSOL_TEMPLATE.split("{context}")
    if not head.startswith("{question}"):
        raise ValueError("REFSOL_TEMPLATE no longer starts with {question}; update the TRL template mapping")
    feedback_template = head.removeprefix("{question}") + "{feedback_raw}" + tail

    def correct(prompts, completions, answer, **_):
        return [float(check_answer(parse_attempt(c[0]["content"]).answer, a)) for c, a in zip(completions, answer)]

    class Probe(TrainerCallback):
        def __init__(self):
            self.t0, self.times, self.tokens, self.prompts = None, [], [], []
            self.same_teacher, self.n_teacher, self.same_student, self.n_student = 0, 0, 0, 0

        def on_step_begin(self, args_, state, control, **_):
            self.t0 = time.perf_counter()

        def on_step_end(self, args_, state, control, **_):
            self.times.append(time.perf_counter() - self.t0)

        def on_generation_prompts_selected(self, generation_prompts=None, **_):
            self.prompts = list(generation_prompts)

        def on_teacher_context_built(self, teacher_input_ids=None, teacher_attention_mask=None,
                                     completion_mask=None, **_):
            self.tokens.append(float(completion_mask.sum()))
            width = teacher_input_ids.size(1) - completion_mask.size(1)  # teacher prompt width
            for row, mask, msgs in zip(teacher_input_ids[:, :width], teacher_attention_mask[:, :width], self.prompts):
                _, teacher = build_prompts("refsol", [by_question[msgs[-1]["content"]]], tokenizer, cfg)
                ours = tokenizer(teacher[0], add_special_tokens=False)["input_ids"]
                self.same_teacher += row[mask.bool()].tolist() == ours
                self.n_teacher += 1

        def on_self_distillation_batch_prepared(self, prompt_ids=None, **_):
            for row, msgs in zip(prompt_ids.tolist(), self.prompts):
                while row and row[0] == tokenizer.pad_token_id:  # left padding (prompts start with <|im_start|>)
                    row = row[1:]
                student, _ = build_prompts("grpo", [by_question[msgs[-1]["content"]]], tokenizer, cfg)
                self.same_student += row == tokenizer(student[0], add_special_tokens=False)["input_ids"]
                self.n_student += 1

    probe = Probe()
    with tempfile.TemporaryDirectory() as tmp:
        config = SDPOConfig(
            output_dir=tmp, report_to="none", use_vllm=False, bf16=False, fp16=False, use_cpu=True,
            gradient_checkpointing=False, max_steps=cfg.max_steps, seed=cfg.seed,
            per_device_train_batch_size=cfg.micro_batch_size,
            gradient_accumulation_steps=cfg.rollouts_per_step // cfg.micro_batch_size,
            num_generations=cfg.group_size, max_completion_length=cfg.max_new_tokens, max_prompt_length=None,
            temperature=cfg.temperature, top_p=1.0, top_k=0,
            learning_rate=cfg.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, optim="adamw_torch",
            distillation_mode="full_logits", distillation_alpha=0.0, distillation_weight=1.0,
            distillation_is_clip=None, teacher_model_kind="base", beta=0.0,
            use_successful_as_teacher=False, include_environment_feedback=True,
            reprompt_template="{prompt}{solution}{feedback}", feedback_template=feedback_template,
            save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
            diagnostics_warning_interval=0, remove_unused_columns=False,
        )
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=list(LORA_TARGETS), bias="none", task_type="CAUSAL_LM")
        trainer = SDPOTrainer(model=model, reward_funcs=[correct], args=config, train_dataset=data,
                              processing_class=tokenizer, peft_config=peft_config, callbacks=[probe])
        with PeakRSS() as mem:
            trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"variant": "trl", "times": probe.times, "tokens": probe.tokens, "baseline_rss": mem.baseline,
            "peak_rss": mem.peak, "hwm_rss": mem.hwm, "sampled_rss": mem.sampled, "threads": torch.get_num_threads(),
            "loss": losses, "same_teacher": probe.same_teacher, "n_teacher": probe.n_teacher,
            "same_student": probe.same_student, "n_student": probe.n_student,
            "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}


# ----------------------------------------------------------------------------- driver

def _run_worker(args, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--rollouts", str(args.rollouts),
           "--micro-batch", str(args.micro_batch), "--group-size", str(args.group_size),
           "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature),
           "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
    if out.returncode != 0:
        return {"variant": variant, "error": (out.stderr or "").strip()[-1500:] or f"rc={out.returncode}"}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.time() - t0
    return result


def _summary(r: dict, warmup: int) -> dict:
    times, tokens = r["times"][warmup:], r["tokens"][warmup:]
    if not times or len(times) != len(tokens):
        raise RuntimeError(f"{r['variant']}: {len(r['times'])} step times and {len(r['tokens'])} token counts "
                           f"for {warmup} warm-up steps")
    return {"tok_s": statistics.median(n / t for n, t in zip(tokens, times)), "step_s": statistics.median(times),
            "tokens": statistics.median(tokens), "n": len(times)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=8, help="rollouts per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=8, help="rollouts per forward/backward")
    parser.add_argument("--group-size", type=int, default=1, help="rollouts per problem (G; TRL num_generations)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps per variant")
    parser.add_argument("--warmup-steps", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, < 60 s")
    parser.add_argument("--worker", choices=["sd_lib", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rollouts, args.micro_batch, args.max_new_tokens, args.steps, args.warmup_steps = 2, 2, 4, 1, 0
    if args.rollouts % args.micro_batch or args.rollouts % args.group_size:
        raise SystemExit("--rollouts must be a multiple of --micro-batch and of --group-size")
    if args.worker:
        result = worker_sd_lib(args) if args.worker == "sd_lib" else worker_trl(args)
        print(json.dumps(result))
        return

    start = time.time()
    results = {}
    for variant in ("sd_lib", "trl"):
        results[variant] = _run_worker(args, variant)
        print(f"# {variant}: {json.dumps(results[variant])[:1500]}", file=sys.stderr, flush=True)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"\n{header([os.path.relpath(__file__)] + (sys.argv[1:] if argv is None else list(argv)))}")
    print(f"embedded SmolLM2-135M-Instruct fp32 + LoRA r=16 | condition refsol, teacher = base (adapter off), "
          f"full-vocab forward KL | {args.rollouts} rollouts/step, G={args.group_size}, micro-batch "
          f"{args.micro_batch}, max_new_tokens={args.max_new_tokens}, temperature={args.temperature} | "
          f"{args.warmup_steps} warm-up + median of {args.steps} steps | total {time.time() - start:.0f} s\n")
    errors = {v: r["error"] for v, r in results.items() if "error" in r}
    if errors:
        for v, e in errors.items():
            print(f"{v} worker failed:\n{e}\n")
    if "trl" in errors:
        print("TRL's SDPOTrainer did not run offline on CPU here (its error is above); no ratio printed.")
    if errors:
        sys.exit(1)
    s = {v: _summary(r, args.warmup_steps) for v, r in results.items()}
    print("| variant | completion tokens/step (median) | step time s (median) | tokens/s (median) | "
          "baseline RSS GiB | peak RSS GiB | peak - baseline GiB | subprocess wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for v, name in (("sd_lib", "sd_lib `train`"), ("trl", "TRL `SDPOTrainer`")):
        r = results[v]
        print(f"| {name} | {s[v]['tokens']:.0f} | {s[v]['step_s']:.2f} | {s[v]['tok_s']:.1f} | "
              f"{r['baseline_rss'] / GiB:.2f} | {r['peak_rss'] / GiB:.2f} | "
              f"{(r['peak_rss'] - r['baseline_rss']) / GiB:.2f} | {r['wall_s']:.0f} |")
    speed = s["sd_lib"]["tok_s"] / s["trl"]["tok_s"]
    mem = results["sd_lib"]["peak_rss"] / results["trl"]["peak_rss"]
    mem_extra = ((results["sd_lib"]["peak_rss"] - results["sd_lib"]["baseline_rss"])
                 / max(results["trl"]["peak_rss"] - results["trl"]["baseline_rss"], 1))
    print(f"\nthroughput sd_lib / TRL: {speed:.2f}x (target >= 1.25x: {'met' if speed >= 1.25 else 'NOT met'}) | "
          f"peak RSS sd_lib / TRL: {mem:.2f}x (target <= 0.75x: {'met' if mem <= 0.75 else 'NOT met'}) | "
          f"peak-above-baseline ratio: {mem_extra:.2f}x")
    trl = results["trl"]
    print(f"\nchecks: TRL teacher prompts identical to sd_lib's RefSol prompts, token for token: "
          f"{trl['same_teacher']}/{trl['n_teacher']}; student prompts: {trl['same_student']}/{trl['n_student']}; "
          f"trainable params TRL {trl['trainable'] / 1e6:.2f}M; "
          f"losses sd_lib {[round(x, 4) for x in results['sd_lib']['loss']]}, TRL {[round(x, 4) for x in trl['loss']]}")
    print("mismatches not removed:")
    for i, m in enumerate(MISMATCHES, 1):
        print(f"  {i}. {m}")
    if args.temperature != 1.0:
        print(f"  {len(MISMATCHES) + 1}. TRL divides the loss logits by temperature={args.temperature}; "
              "sd_lib does not")


if __name__ == "__main__":
    main()
