"""Tests for sd_lib.grpo: hand values, and equality with TRL 1.15 GRPOTrainer._compute_loss."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from sd_lib.grpo import grpo_loss


def test_hand_computed_clipping_and_normalisations():
    """Checks against hand values: ratios (e^0.5, 1, e^-0.5) with A = (+1, -1), eps 0.2."""
    logps = torch.tensor([[0.5, 0.0, -0.5], [0.5, 0.0, -0.5]], requires_grad=True)
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    r_hi, r_lo = math.exp(0.5), math.exp(-0.5)
    # A>0: -min(r, clip(r)) = -(1.2, 1, r_lo); A<0: -min(-r, -clip(r)) = max(r, clip(r)) = (r_hi, 1, 0.8)
    row0, row1 = [-1.2, -1.0, -r_lo], [r_hi, 1.0, 0.8]
    loss, metrics = grpo_loss(logps, old, adv, mask, loss_type="grpo")
    assert loss.item() == pytest.approx((sum(row0) / 3 + (row1[0] + row1[1]) / 2) / 2)
    loss, _ = grpo_loss(logps, old, adv, mask, loss_type="dapo")
    assert loss.item() == pytest.approx((sum(row0) + row1[0] + row1[1]) / 5)
    loss, _ = grpo_loss(logps, old, adv, mask, loss_type="dr_grpo", max_completion_length=10)
    assert loss.item() == pytest.approx((sum(row0) + row1[0] + row1[1]) / 20)
    # clipped: row0 token0 (r > 1.2, A > 0) high; row1 token2 is masked -> no low clip counted
    assert metrics["clip_ratio/high_mean"] == pytest.approx(1 / 5)
    assert metrics["clip_ratio/low_mean"] == 0.0
    assert metrics["clip_ratio/region_mean"] == pytest.approx(1 / 5)


def test_k3_kl_hand_value_and_errors():
    """Checks the k3 KL term by hand (ref - logp = log 2: 2 - log 2 - 1) and the ValueErrors."""
    logps = torch.zeros(1, 2, requires_grad=True)
    ref = torch.full((1, 2), math.log(2.0))
    mask = torch.ones(1, 2)
    loss, metrics = grpo_loss(logps, logps.detach(), torch.zeros(1), mask, ref_per_token_logps=ref, kl_beta=0.1)
    assert metrics["kl"] == pytest.approx(1 - math.log(2.0))
    assert loss.item() == pytest.approx(0.1 * (1 - math.log(2.0)))
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        grpo_loss(logps, logps, torch.zeros(1), mask, kl_beta=0.1)
    with pytest.raises(ValueError, match="loss_type='ppo'"):
        grpo_loss(logps, logps, torch.zeros(1), mask, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length=0"):
        grpo_loss(logps, logps, torch.zeros(1), mask, loss_type="dr_grpo", max_completion_length=0)
    # trainer-wide settings that a loss type does not read are ignored, as in TRL
    plain, _ = grpo_loss(logps, logps.detach(), torch.ones(1), mask)
    ignored, _ = grpo_loss(logps, logps.detach(), torch.ones(1), mask, max_completion_length=4, num_items_in_batch=9)
    assert torch.equal(plain, ignored)


def _trl_grpo_loss(per_token_logps, old, adv, mask, ref, *, beta, loss_type, eps_low, eps_high, max_len):
    """TRL 1.15 `GRPOTrainer._compute_loss`, called unbound on a stub trainer.

    The stub's `_get_per_token_logps_and_entropies` returns our per_token_logps (so no model
    forward runs); one process, no gradient accumulation, no vLLM, no entropy mask or bonus.
    """
    from trl.trainer.grpo_trainer import GRPOTrainer

    accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                  reduce=lambda x, reduction="sum": x)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, torch.zeros_like(per_token_logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_len, accelerator=accelerator, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)})
    batch, length = mask.shape
    inputs = {"prompt_ids": torch.zeros(batch, 2, dtype=torch.long), "prompt_mask": torch.ones(batch, 2),
              "completion_ids": torch.zeros(batch, length, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_matches_trl_grpo_compute_loss(loss_type, beta):
    """Checks loss, gradient and clip-fraction metrics against TRL 1.15
    `trl.trainer.grpo_trainer.GRPOTrainer._compute_loss` run on a stub trainer (see helper)."""
    gen = torch.Generator().manual_seed(0)
    batch, length = 4, 6
    old = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    logps = (old + 0.4 * torch.randn(batch, length, generator=gen, dtype=torch.float64)).requires_grad_()
    ref = old + 0.1 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    adv = torch.randn(batch, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 1 + [0] * 5, [1] * 5 + [0]], dtype=torch.float64)
    max_len = 8
    want, want_metrics = _trl_grpo_loss(logps, old, adv, mask, ref, beta=beta, loss_type=loss_type,
                                        eps_low=0.2, eps_high=0.28, max_len=8)
    got, metrics = grpo_loss(logps, old, adv, mask, eps_low=0.2, eps_high=0.28, kl_beta=beta,
                             ref_per_token_logps=ref, loss_type=loss_type, max_completion_length=max_len)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    g_want, g_got = (torch.autograd.grad(x, logps)[0] for x in (want, got))
    torch.testing.assert_close(g_got, g_want, atol=1e-12, rtol=1e-10)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if beta else ()):
        assert metrics[key] == pytest.approx(want_metrics[key], abs=1e-9), key
    assert metrics["clip_ratio/region_mean"] > 0  # the case actually exercises clipping
