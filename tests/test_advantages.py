"""Tests for sd_lib.advantages: per-token SD advantages and GRPO group advantages."""

import math

import pytest
import torch

from sd_lib.advantages import group_advantages, token_advantages


def test_token_advantages_hand_values_and_mask():
    """Checks A_t = teacher - student by hand, exact zeros where masked (even over NaN), detached."""
    student = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, -0.25, -3.0]], requires_grad=True)
    teacher = torch.tensor([[-0.5, -3.0, -1.0], [-0.5, -1.25, float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    adv = token_advantages(teacher, student, mask)
    assert torch.equal(adv, torch.tensor([[0.5, -1.0, 0.0], [0.0, -1.0, 0.0]]))
    assert not adv.requires_grad
    with pytest.raises(ValueError, match="shapes differ"):
        token_advantages(teacher, student, mask[:, :2])


def test_group_advantages_hand_values():
    """Checks against hand values: group (1, 0, 0, 1) has mean 1/2 and Bessel std 1/sqrt(3)."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    std = math.sqrt(1.0 / 3.0)
    torch.testing.assert_close(group_advantages(rewards[:4], 4, eps=0.0),
                               torch.tensor([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std]))
    adv = group_advantages(rewards, 4)  # a uniform group: 0 / (0 + eps) = 0
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]) / (std + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, 4, scale_std=False),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    assert torch.equal(group_advantages(rewards, 1), torch.zeros(8))


def test_group_advantages_match_trl():
    """Checks against TRL 1.15 GRPOTrainer's group normalisation (scale_rewards="group"/"none"),
    rebuilt from its smallest importable unit `trl.trainer.utils.nanstd` and the trainer's
    mean/repeat_interleave/(std + 1e-4) lines (the trainer method itself needs reward functions)."""
    from trl.trainer.utils import nanstd

    rewards = torch.rand(12, generator=torch.Generator().manual_seed(0))
    grouped = rewards.view(-1, 4)
    mean = grouped.mean(dim=1).repeat_interleave(4)
    std = nanstd(grouped, dim=1).repeat_interleave(4)
    torch.testing.assert_close(group_advantages(rewards, 4), (rewards - mean) / (std + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, 4, scale_std=False), rewards - mean)


def test_group_advantages_errors():
    """Checks ValueError when B is not a multiple of G, or rewards are not (B,)."""
    with pytest.raises(ValueError, match="group_size=3"):
        group_advantages(torch.zeros(8), 3)
    with pytest.raises(ValueError, match="rewards must be"):
        group_advantages(torch.zeros(2, 4), 4)
