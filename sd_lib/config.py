"""One configuration for every run: the paper's values as defaults, named profiles as overrides.

    from sd_lib.config import get_config
    cfg = get_config("cpu", seed=1, condition="stepalign")

Profiles
- `paper`: the paper's setting (Qwen3-1.7B solver, QwQ-32B critic, OpenMathReasoning, GPU).
- `cpu`: the embedded SmolLM2-135M solver on generated arithmetic, sized for 2 CPU cores.
- `smoke`: `cpu` shrunk until the whole pipeline runs in minutes (CI).

Departures from the paper that the defaults make where the paper is silent are marked
"(not stated)" in the field docs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

__all__ = ["SDConfig", "PROFILES", "get_config", "save_config", "load_config", "resolve_path", "repo_relative",
           "CONDITIONS"]

CONDITIONS = ("grpo", "refsol", "stepalign")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class SDConfig:
    profile: str = "paper"
    """Name of the profile these values came from."""
    seed: int = 0
    """Seed for data generation, sampling and initialisation."""

    # --- solver -----------------------------------------------------------------------
    solver: str = "Qwen/Qwen3-1.7B"
    """Solver model: `embedded:SmolLM2-135M-Instruct`, a local folder, or a hub id."""
    warmup_format: bool = False
    """Start from the format-warmed-up solver (needed by the 135M model, not by Qwen3)."""
    dtype: str = "bfloat16"
    """Training dtype on GPU; CPU runs use float32 whatever this says."""

    # --- LoRA -------------------------------------------------------------------------
    lora_r: int = 64
    """LoRA rank (paper: 64)."""
    lora_alpha: int = 128
    """LoRA alpha (paper: 128)."""
    lora_dropout: float = 0.0
    """LoRA dropout (not stated; 0 keeps teacher and student forwards deterministic)."""
    lora_target_modules: tuple[str, ...] = LORA_TARGETS
    """Modules that get adapters (paper: q,k,v,o,gate,up,down)."""

    # --- optimisation -----------------------------------------------------------------
    learning_rate: float = 5e-6
    """AdamW learning rate (paper: 5e-6)."""
    weight_decay: float = 0.0
    """AdamW weight decay (not stated)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (not stated; TRL's default)."""
    rollouts_per_step: int = 32
    """Rollouts per optimizer step, the same in every condition (paper: effective batch 32)."""
    micro_batch_size: int = 4
    """Rollouts per forward/backward; gradient accumulation makes up `rollouts_per_step`."""
    epochs: int = 7
    """Passes over the training problems (paper: up to 7)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: run all epochs)."""

    # --- condition --------------------------------------------------------------------
    condition: str = "stepalign"
    """`grpo`, `refsol` or `stepalign`: the only thing that differs between the three runs."""
    grpo_group_size: int = 8
    """Rollouts per problem for GRPO (paper: G=8)."""
    sd_group_size: int = 1
    """Rollouts per problem for the self-distillation conditions (paper: G=1)."""

    # --- sampling ---------------------------------------------------------------------
    temperature: float = 1.1
    """Rollout sampling temperature (paper: 1.1)."""
    top_p: float = 1.0
    """Rollout nucleus sampling (not stated)."""
    max_new_tokens: int = 2048
    """Rollout length limit (paper: 2048)."""
    gen_batch_size: int = 32
    """Sequences generated together."""

    # --- self-distillation loss --------------------------------------------------------
    divergence: str = "forward_kl"
    """`forward_kl` = KL(teacher || student) (the paper's), `reverse_kl`, `jsd`, `sampled_token`."""
    jsd_beta: float = 0.5
    """Interpolation of the generalised JSD (TRL/GKD convention); used by `jsd` only."""
    support: str = "full"
    """`full` vocabulary or `topk` (not stated in the paper)."""
    top_k: int = 100
    """Size of the top-k support when `support == "topk"`."""
    topk_from: str = "teacher"
    """Whose top-k indices define the support: `teacher` or `student`."""
    topk_tail: bool = True
    """Add the remaining probability mass as one tail category."""
    token_clip: float | None = None
    """Clamp each token's divergence at this value (None: no clip)."""
    reduction: str = "token_mean"
    """`token_mean` over all completion tokens of the batch, or `sequence_mean`."""
    chunk_size: int = 1024
    """Tokens per chunk in the memory-efficient full-vocabulary loss (memory/speed only, not the maths)."""
    share_prefix: bool = True
    """Student, teacher and GRPO forwards run the prompt prefix all rows of a micro-batch share
    once (`alignment.completion_hidden`; memory/speed only, not the maths)."""
    fused_mlp: bool = True
    """Student forward: each SwiGLU MLP as one autograd node that keeps 2 of its 4 intermediate
    tensors (`fused_mlp.LoRASwiGLU`; memory only, not the maths). Inactive when unsloth is loaded."""

    # --- teacher ----------------------------------------------------------------------
    teacher_kind: str = "base"
    """`base` (adapter disabled: the paper's), `ema` (SDPO), or `live` (stop-gradient)."""
    ema_decay: float = 0.99
    """EMA decay for `teacher_kind == "ema"`."""
    teacher_chat_template_kwargs: dict = field(default_factory=lambda: {"enable_thinking": True})
    """Extra chat-template arguments for the teacher (paper: teacher in thinking mode)."""
    student_chat_template_kwargs: dict = field(default_factory=lambda: {"enable_thinking": False})
    """Extra chat-template arguments for the student (paper: non-thinking mode)."""
    max_context_tokens: int = 4096
    """Longest teacher context (question + critique); longer ones are truncated with a warning."""
    reference_style: str = "independent"
    """RefSol reference: `independent` (dataset-style) or `aligned` (the solver's own format)."""

    # --- GRPO -------------------------------------------------------------------------
    eps_low: float = 0.2
    """Lower clip of the importance ratio (not stated; TRL's default)."""
    eps_high: float = 0.2
    """Upper clip of the importance ratio (not stated; TRL's default)."""
    kl_beta: float = 0.0
    """k3 KL penalty to the base policy (not stated; 0 as in TRL's default)."""
    grpo_loss_type: str = "dapo"
    """`grpo`, `dapo` or `dr_grpo` normalisation (not stated; TRL's default)."""
    scale_rewards: bool = True
    """Divide group-centred rewards by the group std."""

    # --- critic -----------------------------------------------------------------------
    critic: str = "hf:Qwen/QwQ-32B"
    """`programmatic`, `hf:<model>` (in-process) or an OpenAI-compatible base URL."""
    critic_model: str = "Qwen/QwQ-32B"
    """Model name sent to an OpenAI-compatible endpoint."""
    critic_api_key_env: str = "SD_LIB_CRITIC_API_KEY"
    """Environment variable holding the endpoint's API key (never logged)."""
    critic_timeout_s: float = 600.0
    """Per-request timeout for the endpoint critic."""
    critic_max_retries: int = 5
    """Retries on 429/5xx/timeouts before the endpoint is declared down."""
    critic_concurrency: int = 8
    """Concurrent requests to the endpoint."""
    critic_max_new_tokens: int = 8192
    """Critic generation limit (thinking included)."""
    critique_style: str = "aligned"
    """`aligned` (the paper's), `quote_error` or `no_trace` (the quoting ablation)."""

    # --- data -------------------------------------------------------------------------
    problems: str = "openmathreasoning"
    """`arithmetic`, `gsm_symbolic`, `openmathreasoning`, or a JSONL/Parquet path."""
    n_train: int = 282
    """Training problems (paper: 282)."""
    n_test: int = 30
    """Held-out problems (paper: 30)."""
    arith_n_terms: tuple[int, int] = (4, 5)
    """Arithmetic difficulty: number of terms (inclusive)."""
    arith_max_value: int = 9
    """Arithmetic difficulty: largest term."""
    arith_ops: tuple[str, ...] = ("+", "-")
    """Arithmetic difficulty: operations."""

    # --- evaluation -------------------------------------------------------------------
    eval_every: int = 10
    """Evaluate (and checkpoint) every this many optimizer steps (paper: 10)."""
    eval_k: int = 12
    """Samples per held-out problem (paper: 12)."""
    eval_temperature: float = 1.0
    """Evaluation temperature (not stated)."""
    eval_max_new_tokens: int | None = None
    """Evaluation length limit (None: `max_new_tokens`)."""

    # --- bookkeeping ------------------------------------------------------------------
    save_every: int = 10
    """Checkpoint every this many optimizer steps."""
    runs_dir: str = "runs"
    """Where runs (checkpoints, metrics, config) are written."""
    results_dir: str = "results"
    """Where notebook results are written (relative paths are under the repository root)."""
    figures_dir: str = "figures"
    """Where figures are written (relative paths are under the repository root)."""
    report_to: tuple[str, ...] = ("jsonl", "tensorboard")
    """Metric sinks: `jsonl`, `tensorboard`, `wandb`, `trackio`."""

    def __post_init__(self):
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {self.condition!r}")
        if self.teacher_kind not in ("base", "ema", "live"):
            raise ValueError(f"teacher_kind must be base|ema|live, got {self.teacher_kind!r}")
        if self.critique_style not in ("aligned", "quote_error", "no_trace"):
            raise ValueError(f"critique_style must be aligned|quote_error|no_trace, got {self.critique_style!r}")
        if self.reference_style not in ("independent", "aligned"):
            raise ValueError(f"reference_style must be independent|aligned, got {self.reference_style!r}")
        if self.rollouts_per_step % self.group_size:
            raise ValueError(
                f"rollouts_per_step={self.rollouts_per_step} is not a multiple of the group size "
                f"{self.group_size} of condition {self.condition!r}"
            )

    @property
    def group_size(self) -> int:
        """Rollouts per problem in this run's condition."""
        return self.grpo_group_size if self.condition == "grpo" else self.sd_group_size

    @property
    def problems_per_step(self) -> int:
        return self.rollouts_per_step // self.group_size


_CPU = dict(
    solver="embedded:SmolLM2-135M-Instruct",
    warmup_format=True,
    dtype="float32",
    lora_r=16,
    lora_alpha=32,
    learning_rate=1e-4,
    rollouts_per_step=16,
    micro_batch_size=8,
    max_new_tokens=96,
    eval_max_new_tokens=96,
    gen_batch_size=64,
    critic="programmatic",
    critic_model="programmatic",
    problems="arithmetic",
    n_train=128,
    n_test=30,
    max_steps=20,
    eval_every=10,
    save_every=10,
    max_context_tokens=512,
    grpo_group_size=8,
    chunk_size=128,
)

PROFILES: dict[str, dict] = {
    "paper": dict(
        problems="openmathreasoning",
        critic="hf:Qwen/QwQ-32B",
        results_dir="results/paper",
        figures_dir="figures/paper",
    ),
    "cpu": dict(_CPU),
    "smoke": dict(
        _CPU,
        n_train=16,
        n_test=4,
        eval_k=4,
        rollouts_per_step=8,
        micro_batch_size=8,
        max_new_tokens=48,
        eval_max_new_tokens=48,
        max_steps=2,
        eval_every=2,
        save_every=1,
        grpo_group_size=4,
        results_dir="results/smoke",
        figures_dir="figures/smoke",
    ),
}


ROOT = Path(__file__).resolve().parents[1]


def repo_relative(path) -> str:
    """How results and logs show a path: relative to the repository when inside it, else absolute."""
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def resolve_path(path) -> Path:
    """A config path: relative ones are taken under the repository root, so notebooks (run
    from notebooks/) and the CLI (run from anywhere) agree on where files go."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else ROOT / p


def get_config(profile: str = "paper", **overrides) -> SDConfig:
    """The named profile with `overrides` applied; unknown names raise ValueError."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {sorted(PROFILES)}")
    names = {f.name for f in fields(SDConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}")
    values = {**PROFILES[profile], **overrides, "profile": profile}
    for k in ("lora_target_modules", "arith_n_terms", "arith_ops", "report_to"):
        if k in values and isinstance(values[k], list):
            values[k] = tuple(values[k])
    return SDConfig(**values)


def save_config(cfg: SDConfig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")
    return path


def load_config(path) -> SDConfig:
    d = json.loads(Path(path).read_text())
    profile = d.pop("profile", "paper")
    return get_config(profile, **d)


def with_overrides(cfg: SDConfig, **kw) -> SDConfig:
    return replace(cfg, **kw)
