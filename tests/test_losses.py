"""Tests for sd_lib.losses: hand values, invariants, gradcheck, chunked vs naive, TRL cross-checks."""

import math
import os

import pytest
import torch

from sd_lib.losses import (chunked_sd_loss, forward_kl, generalized_jsd, masked_reduce,
                           per_token_divergence, reverse_kl, sampled_token_loss, support_log_probs)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

F64 = torch.float64


def _logits(*shape, seed=0, dtype=F64, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


# ------------------------------------------------------------------ hand-computed values
def test_hand_computed_two_token_vocab():
    """Checks against values worked out by hand: p_s = (1/2, 1/2), p_t = (3/4, 1/4)."""
    student = torch.tensor([[[0.0, 0.0]]], dtype=F64)
    teacher = torch.tensor([[[math.log(3.0), 0.0]]], dtype=F64)
    fkl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    rkl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    m = (0.625, 0.375)  # (1 - beta) p_s + beta p_t at beta = 1/2
    jsd = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) \
        + 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    assert forward_kl(student, teacher).item() == pytest.approx(fkl, abs=1e-12)
    assert reverse_kl(student, teacher).item() == pytest.approx(rkl, abs=1e-12)
    assert generalized_jsd(student, teacher, beta=0.5).item() == pytest.approx(jsd, abs=1e-12)
    # direction: forward KL weights by the TEACHER, so it is not the reverse value
    assert fkl != pytest.approx(rkl)


def test_hand_computed_tail_and_masked_reduce():
    """Checks against hand values: the tail bucket and the three reductions."""
    student = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]], dtype=F64))
    teacher = torch.log(torch.tensor([[[0.2, 0.6, 0.2]]], dtype=F64))
    s, t = support_log_probs(student, teacher, support="student", top_k=1, tail=True)
    assert torch.allclose(s.exp(), torch.tensor([[[0.5, 0.5]]], dtype=F64))
    assert torch.allclose(t.exp(), torch.tensor([[[0.2, 0.8]]], dtype=F64))
    s, t = support_log_probs(student, teacher, support="teacher", top_k=1, tail=True)
    assert torch.allclose(s.exp(), torch.tensor([[[0.3, 0.7]]], dtype=F64))
    assert torch.allclose(t.exp(), torch.tensor([[[0.6, 0.4]]], dtype=F64))

    x = torch.tensor([[1.0, 2.0, float("nan")], [3.0, float("inf"), 5.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_reduce(x, m, mode="sum").item() == 6.0
    assert masked_reduce(x, m, mode="token_mean").item() == 2.0
    assert masked_reduce(x, m, mode="sequence_mean").item() == (1.5 + 3.0) / 2
    assert masked_reduce(x, torch.zeros_like(m), mode="token_mean").item() == 0.0


# ------------------------------------------------------------------ invariants
ALL_SUPPORTS = [dict(), dict(support="student", top_k=3), dict(support="teacher", top_k=3),
                dict(support="student", top_k=3, tail=True), dict(support="teacher", top_k=3, tail=True)]


@pytest.mark.parametrize("support", ALL_SUPPORTS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_nonnegative_and_zero_on_equal_inputs(support, beta):
    """Checks the divergence axioms D >= 0 and D(p, p) = 0 for every support and beta."""
    student, teacher = _logits(3, 4, 10, seed=1), _logits(3, 4, 10, seed=2)
    assert (per_token_divergence(student, teacher, beta=beta, **support) >= -1e-12).all()
    same = per_token_divergence(student, student.clone(), beta=beta, **support)
    assert torch.allclose(same, torch.zeros_like(same), atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_bounded_by_log2(beta):
    """Checks JSD_beta <= H(beta) <= log 2, tight for disjoint near-one-hot distributions."""
    student, teacher = torch.zeros(1, 2, 4, dtype=F64), torch.zeros(1, 2, 4, dtype=F64)
    student[..., 0], teacher[..., 1] = 60.0, 60.0
    value = generalized_jsd(student, teacher, beta=beta)
    entropy = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
    assert (value <= math.log(2) + 1e-12).all()
    assert torch.allclose(value, torch.full_like(value, entropy), atol=1e-10)
    random = generalized_jsd(_logits(4, 6, 9, seed=3, scale=5), _logits(4, 6, 9, seed=4, scale=5), beta=beta)
    assert (random <= math.log(2)).all()


def test_clip_caps_values_and_zeroes_their_gradient():
    """Checks clip=c gives min(D, c) and no gradient from clipped tokens (vs the unclipped D)."""
    student = _logits(2, 5, 7, seed=5).requires_grad_()
    teacher = _logits(2, 5, 7, seed=6)
    full = forward_kl(student, teacher)
    clip = full.detach().median().item() + 1e-3
    clipped = forward_kl(student, teacher, clip=clip)
    assert torch.equal(clipped, full.clamp(max=clip))
    (grad,) = torch.autograd.grad(clipped.sum(), student)
    over = full.detach() > clip
    assert over.any() and (grad[over] == 0).all() and (grad[~over] != 0).any()


# ------------------------------------------------------------------ gradcheck (float64)
@pytest.mark.parametrize("options", [dict(beta=0.0), dict(beta=1.0), dict(beta=0.3),
                                     dict(beta=0.0, support="student", top_k=3, tail=True),
                                     dict(beta=0.5, support="teacher", top_k=3, tail=True),
                                     dict(beta=1.0, support="teacher", top_k=4),
                                     dict(beta=0.0, temperature=1.7, clip=0.8)])
def test_gradcheck_divergences(options):
    """Checks analytic gradients w.r.t. student logits against finite differences (gradcheck)."""
    student = _logits(2, 3, 6, seed=7).requires_grad_()
    teacher = _logits(2, 3, 6, seed=8)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=F64)
    assert torch.autograd.gradcheck(
        lambda s: masked_reduce(per_token_divergence(s, teacher, **options), mask), (student,))


def test_sampled_token_loss_gradient_and_its_expectation():
    """Checks sampled_token_loss: grad = -A_t grad log p_s (by hand: gradcheck does not apply to a
    stop-gradient surrogate), and that its expectation under p_s (exact sum over the vocabulary)
    has the gradient of reverse KL, itself gradchecked above."""
    logps = torch.log_softmax(_logits(2, 3, 5, seed=9), -1)[..., 0].requires_grad_()
    teacher = torch.log_softmax(_logits(2, 3, 5, seed=10), -1)[..., 0]
    (grad,) = torch.autograd.grad(sampled_token_loss(logps, teacher).sum(), logps)
    assert torch.allclose(grad, -(teacher - logps.detach()))

    student_logits = _logits(2, 3, 5, seed=11).requires_grad_()
    teacher_logits = _logits(2, 3, 5, seed=12)
    s = torch.log_softmax(student_logits, -1)
    t = torch.log_softmax(teacher_logits, -1)
    expected = (s.exp().detach() * sampled_token_loss(s, t)).sum()  # E_{y ~ p_s}, every y at once
    (g_sampled,) = torch.autograd.grad(expected, student_logits)
    (g_reverse,) = torch.autograd.grad(reverse_kl(student_logits, teacher_logits).sum(), student_logits)
    assert torch.allclose(g_sampled, g_reverse, atol=1e-12)


# ------------------------------------------------------------------ chunked vs naive
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "sum"])
def test_chunked_matches_naive_fp32(divergence, beta, reduction):
    """Checks chunked_sd_loss against the naive (B, T, V) path: value, per-token values and
    gradients w.r.t. student hidden and weight, fp32, atol 1e-5; chunk size not dividing N."""
    torch.manual_seed(0)
    batch, length, hidden, vocab = 3, 7, 16, 50
    h_s = (torch.randn(batch, length, hidden) * 0.5).requires_grad_()
    h_t = torch.randn(batch, length, hidden) * 0.5
    weight = torch.randn(vocab, hidden).requires_grad_()
    mask = (torch.rand(batch, length) > 0.3).float()
    naive_beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": beta}[divergence]
    for temperature, clip in [(1.0, None), (1.3, 1.0)]:
        naive_tok = per_token_divergence(h_s @ weight.T, h_t @ weight.T, beta=naive_beta,
                                         temperature=temperature, clip=clip)
        naive = masked_reduce(naive_tok, mask, mode=reduction)
        grads_naive = torch.autograd.grad(naive, (h_s, weight))
        loss, per_token = chunked_sd_loss(h_s, h_t, weight, mask, divergence=divergence, beta=beta,
                                          chunk_size=4, temperature=temperature, clip=clip,
                                          reduction=reduction, return_per_token=True)
        grads = torch.autograd.grad(loss, (h_s, weight))
        torch.testing.assert_close(loss, naive, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(per_token, naive_tok.detach() * mask, atol=1e-5, rtol=1e-5)
        for got, want in zip(grads, grads_naive):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_gradcheck_float64(divergence):
    """Checks the hand-written backward of chunked_sd_loss against finite differences (gradcheck).
    The teacher gets its own copy of the head: finite differences on a shared head would also
    move the stop-gradient teacher."""
    h_s = _logits(2, 3, 4, seed=13, scale=1.0).requires_grad_()
    h_t = _logits(2, 3, 4, seed=14, scale=1.0)
    weight = _logits(6, 4, seed=15, scale=1.0).requires_grad_()
    teacher_weight = weight.detach().clone()
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=F64)
    assert torch.autograd.gradcheck(
        lambda hs, w: chunked_sd_loss(hs, h_t, w, mask, divergence=divergence, beta=0.4, chunk_size=2,
                                      temperature=0.9, teacher_weight=teacher_weight), (h_s, weight))


def test_chunked_teacher_and_frozen_weight_get_no_gradient():
    """Checks the stop-gradient: teacher hidden gets no grad; a frozen (LoRA) head none either,
    while the student's grad equals the naive one; grad_output scaling; a separate teacher head."""
    h_s = torch.randn(2, 3, 8, requires_grad=True)
    h_t = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(20, 8)
    mask = torch.ones(2, 3)
    chunked_sd_loss(h_s, h_t, weight, mask, chunk_size=2).backward()
    assert h_t.grad is None and h_s.grad is not None
    (want,) = torch.autograd.grad(masked_reduce(forward_kl(h_s @ weight.T, h_t.detach() @ weight.T), mask), h_s)
    torch.testing.assert_close(h_s.grad, want, atol=1e-6, rtol=1e-5)
    # the grad_output scaling path (loss * 3) and an all-masked batch
    h_s.grad = None
    (3.0 * chunked_sd_loss(h_s, h_t, weight, mask, chunk_size=5)).backward()
    torch.testing.assert_close(h_s.grad, 3.0 * want, atol=1e-6, rtol=1e-5)
    assert chunked_sd_loss(h_s, h_t, weight, torch.zeros(2, 3)).item() == 0.0
    # a separate teacher head (not the shared one-GEMM path) gives the same value
    torch.testing.assert_close(chunked_sd_loss(h_s, h_t, weight, mask, teacher_weight=weight.clone()),
                               chunked_sd_loss(h_s, h_t, weight, mask), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_target_logps_match_log_softmax_gather(divergence):
    """Checks the sampled-token log-probs chunked_sd_loss returns with `target_ids` against
    log_softmax(h W^T)[y] of student and teacher (0 where masked), and that asking for them
    changes neither the loss nor the gradient."""
    torch.manual_seed(1)
    batch, length, hidden, vocab = 2, 5, 8, 30
    h_s = torch.randn(batch, length, hidden, requires_grad=True)
    h_t = torch.randn(batch, length, hidden)
    weight = torch.randn(vocab, hidden)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    ids = torch.randint(0, vocab, (batch, length))
    loss, s_lp, t_lp = chunked_sd_loss(h_s, h_t, weight, mask, divergence=divergence, chunk_size=3,
                                       target_ids=ids)
    (grad,) = torch.autograd.grad(loss, h_s)
    want_s = (h_s @ weight.T).log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1) * mask
    want_t = (h_t @ weight.T).log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1) * mask
    torch.testing.assert_close(s_lp, want_s.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t_lp, want_t, atol=1e-5, rtol=1e-5)
    plain = chunked_sd_loss(h_s, h_t, weight, mask, divergence=divergence, chunk_size=3)
    (plain_grad,) = torch.autograd.grad(plain, h_s)
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(grad, plain_grad)
    with pytest.raises(ValueError, match="target_ids"):
        chunked_sd_loss(h_s, h_t, weight, mask, target_ids=ids[:, :2])


# ------------------------------------------------------------------ unsupported combinations
@pytest.mark.parametrize("kwargs,needle", [
    (dict(top_k=3), "top_k=3 with support='full'"),
    (dict(tail=True), "tail=True with support='full'"),
    (dict(support="student"), "top_k"),
    (dict(support="teacher", top_k=99), "top_k"),
    (dict(support="both", top_k=2), "support='both'"),
    (dict(clip=0.0), "clip"),
    (dict(temperature=0.0), "temperature"),
])
def test_unsupported_combinations_raise(kwargs, needle):
    """Checks ValueError names the offending option (house style)."""
    logits = _logits(1, 2, 5)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        forward_kl(logits, logits, **kwargs)


def test_other_value_errors():
    """Checks ValueErrors of beta, reduction modes, and the chunked options."""
    logits, mask = _logits(1, 2, 5), torch.ones(1, 2)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(logits, logits, beta=1.5)
    with pytest.raises(ValueError, match="mode='mean'"):
        masked_reduce(torch.ones(1, 2), mask, mode="mean")
    hidden, weight = torch.randn(1, 2, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="divergence='tvd'"):
        chunked_sd_loss(hidden, hidden, weight, mask, divergence="tvd")
    with pytest.raises(ValueError, match="reduction='mean'"):
        chunked_sd_loss(hidden, hidden, weight, mask, reduction="mean")
    with pytest.raises(ValueError, match="shape mismatch"):
        chunked_sd_loss(hidden, hidden, torch.randn(5, 4), mask)


# ------------------------------------------------------------------ cross-checks against TRL 1.15
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_matches_trl_gkd_generalized_jsd_loss(beta):
    """Checks against TRL 1.15 `trl.experimental.gkd.GKDTrainer.generalized_jsd_loss` (static
    method, called directly): same beta convention (0 forward, 1 reverse), temperature, and
    reduction="batchmean" with labels == -100 masking == our token_mean. Values and gradients."""
    from trl.experimental.gkd import GKDTrainer

    student = _logits(2, 5, 11, seed=16).requires_grad_()
    teacher = _logits(2, 5, 11, seed=17)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    labels = torch.where(mask.bool(), 1, -100)
    want = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=1.5)
    got = masked_reduce(generalized_jsd(student, teacher, beta=beta, temperature=1.5), mask)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    g_want, g_got = (torch.autograd.grad(x, student)[0] for x in (want, got))
    torch.testing.assert_close(g_got, g_want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tail", [False, True])
def test_matches_trl_sdpo_topk(alpha, tail):
    """Checks the student-top-k support (renormalised or with tail bucket) and the full-vocab
    path against TRL 1.15 `trl.experimental.sdpo.loss_utils.compute_topk_self_distillation_loss`
    and `compute_full_logit_self_distillation_loss` (alpha = our beta). Values and gradients."""
    from trl.experimental.sdpo import loss_utils

    student = _logits(2, 4, 12, seed=18).requires_grad_()
    teacher = _logits(2, 4, 12, seed=19)
    want = loss_utils.compute_topk_self_distillation_loss(
        student, teacher, distillation_topk=4, distillation_alpha=alpha, distillation_add_tail=tail)
    got = per_token_divergence(student, teacher, beta=alpha, support="student", top_k=4, tail=tail)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    g_want, g_got = (torch.autograd.grad(x.sum(), student)[0] for x in (want, got))
    torch.testing.assert_close(g_got, g_want, atol=1e-12, rtol=1e-10)
    full = loss_utils.compute_full_logit_self_distillation_loss(student, teacher, distillation_alpha=alpha)
    torch.testing.assert_close(per_token_divergence(student, teacher, beta=alpha), full, atol=1e-12, rtol=1e-10)


def test_teacher_topk_support_matches_trl_building_blocks():
    """Checks support="teacher" (OPSD; no TRL function has it) against TRL's own building blocks:
    `trl.trainer.utils.selective_log_softmax` at the teacher's top-k ids, `sdpo.loss_utils.add_tail_bucket`
    and `sdpo.loss_utils.compute_divergence`."""
    from trl.experimental.sdpo.loss_utils import add_tail_bucket, compute_divergence
    from trl.trainer.utils import selective_log_softmax as trl_selective

    student, teacher = _logits(2, 4, 12, seed=20), _logits(2, 4, 12, seed=21)
    index = teacher.topk(3, dim=-1).indices
    want = compute_divergence(add_tail_bucket(trl_selective(student, index)),
                              add_tail_bucket(trl_selective(teacher, index)), 0.5)
    got = generalized_jsd(student, teacher, beta=0.5, support="teacher", top_k=3, tail=True)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_sampled_token_loss_matches_trl_sdpo():
    """Checks against TRL 1.15 `sdpo.loss_utils.compute_sampled_token_self_distillation_loss`
    (value and gradient w.r.t. student logits)."""
    from trl.experimental.sdpo import loss_utils
    from trl.trainer.utils import selective_log_softmax as trl_selective

    student = _logits(2, 4, 9, seed=22).requires_grad_()
    teacher = _logits(2, 4, 9, seed=23)
    ids = torch.randint(0, 9, (2, 4), generator=torch.Generator().manual_seed(0))
    want = loss_utils.compute_sampled_token_self_distillation_loss(student, teacher, ids, distillation_alpha=1.0)
    got = sampled_token_loss(trl_selective(student, ids), trl_selective(teacher, ids))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    g_want, g_got = (torch.autograd.grad(x.sum(), student)[0] for x in (want, got))
    torch.testing.assert_close(g_got, g_want, atol=1e-12, rtol=1e-10)
