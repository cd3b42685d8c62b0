"""GRPO's clipped surrogate with an optional k3 KL to a reference, as a pure function."""

from __future__ import annotations

import torch

__all__ = ["grpo_loss"]

_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def grpo_loss(
    per_token_logps: torch.Tensor,
    old_per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    ref_per_token_logps: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """l_it = -min(r_it A_i, clip(r_it, 1 - eps_low, 1 + eps_high) A_i) + kl_beta k3_it,

    r_it = exp(log pi(y_it) - log pi_old(y_it)),
    k3_it = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1,
    reduced over real tokens m_it by `loss_type`:
      grpo:    1/B sum_i (sum_t m l / sum_t m)                       (per-sequence mean)
      dapo:    sum_it m l / num_items_in_batch  (default sum_it m)    (token mean)
      dr_grpo: sum_it m l / (B * max_completion_length)              (default L = T)

    Follows TRL 1.15 `GRPOTrainer._compute_loss` for importance_sampling_level="token",
    `loss_type` in {grpo, dapo, dr_grpo}, delta=None, no entropy mask, no vLLM IS correction,
    one process and no gradient accumulation (TRL's normalisers divide by the accumulation
    steps; here the caller scales the loss). `num_items_in_batch` is TRL's global token count
    for "dapo" when the batch is split over steps. As in TRL, where both are trainer-wide
    settings, `max_completion_length` is read only by "dr_grpo" and `num_items_in_batch` only
    by "dapo"; other loss types ignore them.

    Args:
        per_token_logps: (B, T) current policy, with gradient.
        old_per_token_logps: (B, T) sampling-time policy (per_token_logps.detach() on-policy).
        advantages: (B,) per rollout, or (B, T) per token.
        completion_mask: (B, T).
        ref_per_token_logps: (B, T), required when kl_beta != 0.
    Returns:
        (loss, metrics): metrics are floats: `clip_ratio/low_mean`, `clip_ratio/high_mean`,
        `clip_ratio/region_mean` (token means over m of ratio clipped below with A<0, above
        with A>0, either), and `kl` (token mean of k3) when kl_beta != 0.
    """
    if loss_type not in _LOSS_TYPES:
        raise ValueError(f"unknown loss_type={loss_type!r}; expected one of {_LOSS_TYPES}")
    if kl_beta != 0.0 and ref_per_token_logps is None:
        raise ValueError(f"kl_beta={kl_beta} needs ref_per_token_logps")
    if max_completion_length is not None and max_completion_length < 1:
        raise ValueError(f"max_completion_length must be >= 1, got max_completion_length={max_completion_length}")
    if per_token_logps.shape != old_per_token_logps.shape or per_token_logps.shape != completion_mask.shape:
        raise ValueError("per_token_logps, old_per_token_logps and completion_mask must all be (B, T)")
    mask = completion_mask.to(per_token_logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)  # (B, 1), broadcast over T

    ratio = torch.exp(per_token_logps - old_per_token_logps)  # (B, T)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(ratio * advantages, clipped * advantages)  # (B, T)
    if kl_beta != 0.0:
        delta = ref_per_token_logps - per_token_logps
        per_token_kl = torch.exp(delta) - delta - 1  # (B, T), k3 estimator of KL(pi || pi_ref)
        per_token_loss = per_token_loss + kl_beta * per_token_kl

    masked = torch.where(mask != 0, per_token_loss, 0.0) * mask  # (B, T)
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dapo":
        denom = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        loss = masked.sum() / denom.to(masked).clamp(min=1.0)
    else:
        length = per_token_logps.size(1) if max_completion_length is None else max_completion_length
        loss = masked.sum() / (per_token_logps.size(0) * length)

    def token_mean(x: torch.Tensor) -> float:
        return ((x.to(mask) * mask).sum() / mask.sum().clamp(min=1.0)).item()

    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (advantages < 0)
        high = (ratio > 1 + eps_high) & (advantages > 0)
        metrics = {"clip_ratio/low_mean": token_mean(low), "clip_ratio/high_mean": token_mean(high),
                   "clip_ratio/region_mean": token_mean(low | high)}
        if kl_beta != 0.0:
            metrics["kl"] = token_mean(per_token_kl)
    return loss, metrics
