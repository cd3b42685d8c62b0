"""Advantages: per-token (self-distillation) and per-rollout (GRPO).

Self-distillation gives every sampled token its own advantage,
    A_t = log pi(y_t | x, c, y<t) - log pi(y_t | x, y<t)        (teacher minus student),
while GRPO gives one group-normalised advantage to all tokens of a rollout.
"""

from __future__ import annotations

import torch

__all__ = ["token_advantages", "group_advantages"]


def token_advantages(teacher_per_token_logps: torch.Tensor, per_token_logps: torch.Tensor,
                     completion_mask: torch.Tensor) -> torch.Tensor:
    """A_t = log p_teacher(y_t) - log p_student(y_t) on real completion tokens, 0 elsewhere.

    Detached: an advantage is a target, not a path for gradients. Used as the per-token
    advantage of the paper's analysis and, via `losses.sampled_token_loss`, of its gradient.
    Follows PAPER_NOTES "Objective" (and TRL SDPO's sampled-token log-ratio, with sign flipped).

    Args:
        teacher_per_token_logps: (B, T).
        per_token_logps: (B, T) student.
        completion_mask: (B, T), nonzero on real completion tokens.
    Returns:
        (B, T) advantages; exactly 0 where the mask is 0 (even if the logps there are NaN).
    """
    if not teacher_per_token_logps.shape == per_token_logps.shape == completion_mask.shape:
        raise ValueError(f"shapes differ: teacher {tuple(teacher_per_token_logps.shape)}, student "
                         f"{tuple(per_token_logps.shape)}, mask {tuple(completion_mask.shape)}; "
                         "all must be (B, T)")
    diff = (teacher_per_token_logps - per_token_logps).detach()  # (B, T)
    return torch.where(completion_mask != 0, diff, torch.zeros_like(diff))


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean_group(r)) / (std_group(r) + eps), one value per rollout.

    Rollouts of one prompt are contiguous: rewards.view(n_groups, G). std is the unbiased
    (Bessel) sample std, as TRL's `nanstd`; `scale_std=False` gives Dr. GRPO's r_i - mean.
    Follows TRL 1.15 `GRPOTrainer._generate_and_score_completions` with scale_rewards="group"
    (or "none" when scale_std=False). Departure: no NaN rewards (TRL's unscorable rollouts).

    Args:
        rewards: (B,) with B = n_groups * G.
        group_size: G >= 1 (G = 1 gives zeros: the group mean is the reward itself).
    Returns:
        (B,) advantages.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (B,), got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"B={rewards.numel()} rewards are not divisible into groups of "
                         f"group_size={group_size}")
    grouped = rewards.view(-1, group_size)  # (n_groups, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # (n_groups, G)
    if scale_std:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped)
        centred = centred / (std + eps)
    return centred.reshape(-1)  # (B,)
