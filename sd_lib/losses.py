"""Self-distillation divergences: pure functions from logits to per-token values.

The paper's objective (PAPER_NOTES, "Objective") is, per completion token t,

    D_t = D( pi_teacher(. | x, c, y<t) , pi_student(. | x, y<t) )

with the teacher under stop-gradient. Every function here takes student and teacher logits of
shape (B, T, V) (log-probabilities work too: log_softmax is idempotent on them) and returns a
(B, T) per-token tensor; masking and reduction are a separate step, `masked_reduce`.

Direction convention (the one that trips people up). With p_s the student and p_t the teacher:

    forward_kl = KL(p_t || p_s) = sum_v p_t (log p_t - log p_s)   teacher is the target (GKD/OPSD/SDFT)
    reverse_kl = KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)   mode-seeking, the on-policy RL form

`generalized_jsd(beta)` interpolates them with TRL's convention: beta=0 -> forward_kl,
beta=1 -> reverse_kl (both special-cased, as TRL does; the mixture formula itself goes to 0
at the end points).

`chunked_sd_loss` is the memory-efficient full-vocabulary path: it starts from hidden states
and the output layer and never builds a (B, T, V) tensor.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "per_token_divergence",
    "support_log_probs",
    "sampled_token_loss",
    "masked_reduce",
    "chunked_sd_loss",
]

_SUPPORTS = ("full", "student", "teacher")
_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
_REDUCTIONS = ("token_mean", "sequence_mean", "sum")
# Tail mass is clamped below by 1 - exp(-1e-7) so log(tail) stays finite when top-k covers
# (numerically) all the mass; the same guard as TRL's sdpo `add_tail_bucket`.
_TAIL_LOG_MAX = -1e-7


# --------------------------------------------------------------------------------------------
# Support: full vocabulary or top-k (optionally with a tail bucket)
# --------------------------------------------------------------------------------------------
def support_log_probs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    support: str = "full",
    top_k: int | None = None,
    tail: bool = False,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher log-probabilities on the chosen support.

    full:            log p(v), v in V                                  -> (B, T, V)
    top-k, tail:     [log p(v_1..v_K), log(1 - sum_k p(v_k))]          -> (B, T, K+1)
    top-k, no tail:  log p(v_k) - log sum_k p(v_k)  (renormalised)     -> (B, T, K)

    with v_1..v_K the top-k tokens of the student (`support="student"`, TRL SDPO) or of the
    teacher (`support="teacher"`, OPSD); both distributions use the same indices.
    Follows TRL's `experimental/sdpo/loss_utils.compute_topk_self_distillation_loss` and
    `add_tail_bucket` (there the support is always the student's).

    Args:
        student_logits: (B, T, V).
        teacher_logits: (B, T, V).
        support: "full" | "student" | "teacher".
        top_k: K, required for a top-k support, must be None for "full".
        tail: add the remaining mass as one extra category (top-k supports only).
        temperature: logits are divided by it first.
    """
    _check_support(support, top_k, tail, student_logits.size(-1))
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got temperature={temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (B, T, V)")
    student_logps = torch.log_softmax(student_logits / temperature, dim=-1)  # (B, T, V)
    teacher_logps = torch.log_softmax(teacher_logits / temperature, dim=-1)  # (B, T, V)
    if support == "full":
        return student_logps, teacher_logps
    chooser = student_logps if support == "student" else teacher_logps
    index = chooser.detach().topk(top_k, dim=-1).indices  # (B, T, K)
    student_logps = student_logps.gather(-1, index)  # (B, T, K)
    teacher_logps = teacher_logps.gather(-1, index)  # (B, T, K)
    if tail:
        return _add_tail(student_logps), _add_tail(teacher_logps)  # (B, T, K+1)
    return (student_logps - student_logps.logsumexp(-1, keepdim=True),
            teacher_logps - teacher_logps.logsumexp(-1, keepdim=True))


def _add_tail(logps: torch.Tensor) -> torch.Tensor:
    """[log p_1..log p_K] -> [log p_1..log p_K, log(1 - sum_k p_k)]; (..., K) -> (..., K+1)."""
    captured = logps.logsumexp(-1, keepdim=True).clamp(max=_TAIL_LOG_MAX)  # (..., 1)
    return torch.cat([logps, torch.log(-torch.expm1(captured))], dim=-1)


def _check_support(support: str, top_k: int | None, tail: bool, vocab: int) -> None:
    if support not in _SUPPORTS:
        raise ValueError(f"unknown support={support!r}; expected one of {_SUPPORTS}")
    if support == "full":
        if top_k is not None:
            raise ValueError(f"top_k={top_k} with support='full' is unsupported; "
                             "use support='student' or 'teacher' for a top-k support")
        if tail:
            raise ValueError("tail=True with support='full' is unsupported: the tail bucket "
                             "only exists for a top-k support")
    elif top_k is None or not 1 <= top_k <= vocab:
        raise ValueError(f"support={support!r} needs 1 <= top_k <= V={vocab}, got top_k={top_k}")


# --------------------------------------------------------------------------------------------
# Divergences on a support
# --------------------------------------------------------------------------------------------
def _kl(p_logps: torch.Tensor, q_logps: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q) over the last axis; (..., V) -> (...)."""
    return (p_logps.exp() * (p_logps - q_logps)).sum(-1)


def _divergence_on_support(student_logps: torch.Tensor, teacher_logps: torch.Tensor,
                           beta: float) -> torch.Tensor:
    """Generalised JSD(beta) with TRL's end points; (B, T, V') -> (B, T)."""
    if beta == 0.0:
        return _kl(teacher_logps, student_logps)  # forward KL(t || s)
    if beta == 1.0:
        return _kl(student_logps, teacher_logps)  # reverse KL(s || t)
    # log m = log((1 - beta) p_s + beta p_t), in log space so no probability underflows to 0
    log_m = torch.logaddexp(student_logps + math.log1p(-beta), teacher_logps + math.log(beta))
    return beta * _kl(teacher_logps, log_m) + (1.0 - beta) * _kl(student_logps, log_m)


def per_token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float,
    support: str = "full",
    top_k: int | None = None,
    tail: bool = False,
    temperature: float = 1.0,
    clip: float | None = None,
) -> torch.Tensor:
    """JSD_beta(p_s, p_t) per token, on the chosen support, optionally clipped.

    JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = (1 - beta) p_s + beta p_t,
    with beta=0 -> KL(p_t || p_s) (forward) and beta=1 -> KL(p_s || p_t) (reverse);
    clipped: min(D_t, clip) (no gradient from tokens above the clip).

    Follows TRL's `GKDTrainer.generalized_jsd_loss` (beta convention, special-cased end points)
    and `experimental/sdpo/loss_utils.compute_divergence`. `forward_kl`, `reverse_kl` and
    `generalized_jsd` are this function with beta fixed or named.

    Args:
        student_logits: (B, T, V), carries the gradient.
        teacher_logits: (B, T, V), detached here (stop-gradient target).
        beta: in [0, 1].
        support, top_k, tail, temperature: see `support_log_probs`.
        clip: None, or a positive bound on the per-token value.

    Returns:
        (B, T) per-token divergence, >= 0.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got beta={beta}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be None or > 0, got clip={clip}")
    student_logps, teacher_logps = support_log_probs(
        student_logits, teacher_logits.detach(), support=support, top_k=top_k, tail=tail,
        temperature=temperature)
    per_token = _divergence_on_support(student_logps, teacher_logps, float(beta))  # (B, T)
    return per_token if clip is None else per_token.clamp(max=clip)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
               support: str = "full", top_k: int | None = None, tail: bool = False,
               temperature: float = 1.0, clip: float | None = None) -> torch.Tensor:
    """KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v)) per token: teacher is the target.

    What the paper, OPSD and SDFT call "forward KL" for distillation (mass-covering in the
    student). Equals `generalized_jsd(beta=0)` and TRL GKD's beta=0 branch,
    `F.kl_div(log p_s, log p_t, log_target=True).sum(-1)`.
    (B, T, V), (B, T, V) -> (B, T). Options: see `per_token_divergence`.
    """
    return per_token_divergence(student_logits, teacher_logits, beta=0.0, support=support,
                                top_k=top_k, tail=tail, temperature=temperature, clip=clip)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
               support: str = "full", top_k: int | None = None, tail: bool = False,
               temperature: float = 1.0, clip: float | None = None) -> torch.Tensor:
    """KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v)) per token: student is the target.

    Mode-seeking; its sampled-token estimator is `sampled_token_loss`. Equals
    `generalized_jsd(beta=1)` and TRL GKD's beta=1 branch.
    (B, T, V), (B, T, V) -> (B, T). Options: see `per_token_divergence`.
    """
    return per_token_divergence(student_logits, teacher_logits, beta=1.0, support=support,
                                top_k=top_k, tail=tail, temperature=temperature, clip=clip)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                    beta: float = 0.5, support: str = "full", top_k: int | None = None,
                    tail: bool = False, temperature: float = 1.0,
                    clip: float | None = None) -> torch.Tensor:
    """JSD_beta = beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = (1 - beta) p_s + beta p_t.

    TRL GKD convention: m puts weight beta on the TEACHER; beta=0 is forward KL(p_t || p_s)
    and beta=1 reverse KL(p_s || p_t) (special-cased, as in TRL). Bounded by log 2.
    Follows TRL's `GKDTrainer.generalized_jsd_loss` (Agarwal et al. 2024, Eq. 1).
    (B, T, V), (B, T, V) -> (B, T). Options: see `per_token_divergence`.
    """
    return per_token_divergence(student_logits, teacher_logits, beta=beta, support=support,
                                top_k=top_k, tail=tail, temperature=temperature, clip=clip)


def sampled_token_loss(per_token_logps: torch.Tensor, teacher_per_token_logps: torch.Tensor, *,
                       clip: float | None = None) -> torch.Tensor:
    """L_t = sg(log p_s(y_t) - log p_t(y_t)) * log p_s(y_t), on the sampled token y_t.

    Its gradient, (log p_s - log p_t) grad log p_s = -A_t grad log p_s with the per-token
    advantage A_t = log p_t(y_t) - log p_s(y_t) (`advantages.token_advantages`), is the
    single-sample estimate of grad KL(p_s || p_t): the paper's policy-gradient form. The VALUE
    is a surrogate, not a divergence. `clip` clamps the detached log-ratio to [-clip, clip].
    Follows TRL's `experimental/sdpo/loss_utils.compute_sampled_token_self_distillation_loss`.

    Args:
        per_token_logps: (B, T) student log-probs of the sampled tokens (with gradient).
        teacher_per_token_logps: (B, T) teacher log-probs of the same tokens.
    Returns:
        (B, T).
    """
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be None or > 0, got clip={clip}")
    log_ratio = (per_token_logps - teacher_per_token_logps).detach()  # (B, T)
    if clip is not None:
        log_ratio = log_ratio.clamp(-clip, clip)
    return log_ratio * per_token_logps


def masked_reduce(per_token: torch.Tensor, completion_mask: torch.Tensor, *,
                  mode: str = "token_mean") -> torch.Tensor:
    """Reduce a (B, T) per-token loss over real completion tokens m_bt.

    token_mean:    sum_bt m x / sum_bt m                    (TRL "bnpo"/GKD "batchmean" with labels)
    sequence_mean: 1/B sum_b (sum_t m x / sum_t m)           (TRL "grpo")
    sum:           sum_bt m x
    Denominators are clamped to >= 1 so an all-masked row or batch gives 0, not NaN; masked
    entries are zeroed with `where`, so NaN/inf at padding never leaks in.
    """
    if mode not in _REDUCTIONS:
        raise ValueError(f"unknown mode={mode!r}; expected one of {_REDUCTIONS}")
    if per_token.shape != completion_mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and completion_mask "
                         f"{tuple(completion_mask.shape)} must both be (B, T)")
    mask = completion_mask.to(per_token.dtype)
    masked = torch.where(mask != 0, per_token, 0.0) * mask  # (B, T)
    if mode == "sum":
        return masked.sum()
    if mode == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1.0)
    return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


# --------------------------------------------------------------------------------------------
# Chunked full-vocabulary loss from hidden states
# --------------------------------------------------------------------------------------------
def _token_weights(mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """w_bt with masked_reduce(x, mask, mode=reduction) == sum_bt w_bt x_bt; (B, T) -> (B, T)."""
    mask = mask.to(torch.float32) if not mask.is_floating_point() else mask
    if reduction == "sum":
        return mask
    if reduction == "token_mean":
        return mask / mask.sum().clamp(min=1.0)
    return mask / (mask.sum(-1, keepdim=True).clamp(min=1.0) * mask.size(0))


def _log_softmax_and_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """logits -> log p in place, returns p: one max, one exp and one sum pass; (R, V)."""
    logits.sub_(logits.amax(-1, keepdim=True))
    probs = logits.exp()
    total = probs.sum(-1, keepdim=True)  # (R, 1)
    logits.sub_(total.log())
    return probs.div_(total)


def _chunk_divergence_and_grad(logits: torch.Tensor, beta: float, targets: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row D and dD/dz_s for one chunk; `logits` (2C, V) = [student rows; teacher rows],
    consumed in place (the returned gradient (C, V) views one of its buffers). With `targets`
    (C,) token ids, also returns their log-probs (2, C): [student; teacher], else None.

    With s = log p_s = log_softmax(z_s), g = dD/dp_s and dD/dz_s = p_s (g - sum_v p_s g):
      forward KL:  D = sum p_t (t - s),                 dD/dz_s = p_s - p_t
      reverse KL:  D = sum p_s (s - t),                 dD/dz_s = p_s (s - t - D)
      JSD_beta:    D = b KL(t||m) + (1-b) KL(s||m),     dD/dz_s = (1-b) p_s (s - log m - KL(s||m))
    Row sums are plain (pairwise) sums of an in-place product: a bmm-style dot loses ~1e-4
    over 150k entries in float32.
    """
    rows = logits.size(0) // 2
    probs = _log_softmax_and_softmax_(logits)
    picked = None
    if targets is not None:  # before the in-place updates below overwrite the log-probs
        picked = logits.view(2, rows, -1).gather(-1, targets.view(1, rows, 1).expand(2, rows, 1)).squeeze(-1)
    student_logps, teacher_logps = logits[:rows], logits[rows:]
    student_probs, teacher_probs = probs[:rows], probs[rows:]
    if beta == 0.0:
        value = teacher_logps.sub_(student_logps).mul_(teacher_probs).sum(-1)
        return value, student_probs.sub_(teacher_probs), picked
    if beta == 1.0:
        log_ratio = student_logps.sub_(teacher_logps)  # s - t
        value = torch.mul(student_probs, log_ratio, out=teacher_logps).sum(-1)
        return value, log_ratio.sub_(value.unsqueeze(-1)).mul_(student_probs), picked
    log_m = torch.logaddexp(student_logps + math.log1p(-beta), teacher_logps + math.log(beta))
    kl_teacher = teacher_logps.sub_(log_m).mul_(teacher_probs).sum(-1)
    log_ratio = student_logps.sub_(log_m)  # s - log m
    kl_student = torch.mul(student_probs, log_ratio, out=log_m).sum(-1)
    del log_m
    value = beta * kl_teacher + (1.0 - beta) * kl_student
    return value, log_ratio.sub_(kl_student.unsqueeze(-1)).mul_(student_probs).mul_(1.0 - beta), picked


class _ChunkedSDFunction(torch.autograd.Function):
    """Forward computes loss AND its gradients chunk by chunk; backward only rescales them."""

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, weight, teacher_weight, token_weight,
                beta, chunk_size, temperature, clip, targets):
        # student_hidden, teacher_hidden (N, H); weight, teacher_weight (V, H); token_weight (N,);
        # targets (N,) long or None
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        n_rows = student_hidden.size(0)
        compute_dtype = torch.promote_types(student_hidden.dtype, torch.float32)
        per_token = torch.zeros(n_rows, dtype=compute_dtype, device=student_hidden.device)
        target_logps = None if targets is None else per_token.new_zeros((2, n_rows))  # (2, N)
        grad_hidden = torch.zeros_like(student_hidden) if want_h else None
        grad_weight = torch.zeros_like(weight) if want_w else None
        inv_temp = 1.0 / temperature
        # one GEMM for both sides when they share the head: W is streamed from memory once per chunk
        shared_head = teacher_weight is weight or (
            teacher_weight.data_ptr() == weight.data_ptr() and teacher_weight.shape == weight.shape
            and teacher_weight.stride() == weight.stride() and teacher_hidden.dtype == student_hidden.dtype)
        for start in range(0, n_rows, chunk_size):
            rows = slice(start, min(start + chunk_size, n_rows))
            h_s = student_hidden[rows]  # (C, H)
            if shared_head:
                logits = (torch.cat([h_s, teacher_hidden[rows]]) @ weight.T).to(compute_dtype)  # (2C, V)
            else:
                logits = h_s.new_empty((2 * h_s.size(0), weight.size(0)), dtype=compute_dtype)  # (2C, V)
                logits[:h_s.size(0)] = h_s @ weight.T
                logits[h_s.size(0):] = teacher_hidden[rows] @ teacher_weight.T
            if temperature != 1.0:
                logits.mul_(inv_temp)
            value, grad_z, picked = _chunk_divergence_and_grad(
                logits, beta, None if targets is None else targets[rows])  # (C,), (C, V), (2, C)
            if picked is not None:
                target_logps[:, rows] = picked
            del logits  # grad_z may still view part of its buffers
            scale = token_weight[rows].to(compute_dtype) * inv_temp  # d z / d(h W^T) = 1/temp
            if clip is not None:
                scale = scale * (value <= clip)  # clamp(max=clip): no gradient above the clip
                value = value.clamp(max=clip)
            per_token[rows] = value
            if want_h or want_w:
                grad_z = grad_z.mul_(scale.unsqueeze(-1)).to(weight.dtype)  # (C, V)
                if want_h:
                    grad_hidden[rows] = grad_z @ weight  # (C, H)
                if want_w:
                    grad_weight.addmm_(grad_z.T, h_s)  # (V, H)
            del grad_z
        loss = (per_token * token_weight.to(compute_dtype)).sum()  # float32 even for bf16 inputs
        ctx.save_for_backward(grad_hidden, grad_weight)
        if target_logps is None:
            target_logps = per_token.new_zeros((2, 0))
        ctx.mark_non_differentiable(per_token, target_logps)
        return loss, per_token, target_logps

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token, _grad_target_logps):
        grad_hidden, grad_weight = ctx.saved_tensors
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):  # avoid a (V, H) copy at 1
            grad_hidden = None if grad_hidden is None else grad_hidden * grad_loss
            grad_weight = None if grad_weight is None else grad_weight * grad_loss
        return grad_hidden, None, grad_weight, None, None, None, None, None, None, None


def chunked_sd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    chunk_size: int = 128,
    temperature: float = 1.0,
    reduction: str = "token_mean",
    clip: float | None = None,
    teacher_weight: torch.Tensor | None = None,
    return_per_token: bool = False,
    target_ids: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """L = reduce_bt D(p_t(.|h^t_bt) , p_s(.|h^s_bt)), p = softmax(h W^T / temperature), full vocab.

    Naive equivalent (same value and gradients, but builds (B, T, V) logits):
        masked_reduce(per_token_divergence(student_hidden @ weight.T, teacher_hidden @ weight.T,
                      beta=b, temperature=temperature, clip=clip), completion_mask, mode=reduction)
    with b = 0 for "forward_kl", 1 for "reverse_kl", `beta` for "jsd".

    Only real completion tokens (completion_mask != 0) are projected, `chunk_size` rows at a
    time: per chunk the (C, V) student and teacher logits are built (one (2C, H) x (H, V) GEMM
    when both use the same head), the divergence and its gradient w.r.t. the student logits
    are computed in closed form, and that gradient is pushed at once into
    grad(student_hidden) (N, H) and grad(weight) (V, H, only if `weight` requires grad).
    Backward just scales these by the incoming gradient. Peak extra memory is ~4 (C, V)
    buffers instead of ~7 (N, V) ones. The teacher side gets no gradient.
    Follows Liger-Kernel's chunked distillation losses (gradient computed in the forward) and
    TRL's `_chunked_divergence_loss` (only valid rows projected); written for plain PyTorch.

    Departures from the naive path:
      1. No double backward (the gradient is computed, not traced).
      2. Logits are computed in float32 (float64 for float64 inputs) whatever the input dtype.
      3. No logit softcapping / scaling / bias: valid for Llama/Qwen-style heads only.

    Args:
        student_hidden: (B, T, H) final hidden states at the positions predicting y_t.
        teacher_hidden: (B, T, H) same for the teacher (detached here).
        weight: (V, H) output layer (`model.get_output_embeddings().weight`).
        completion_mask: (B, T), 1 on real completion tokens (float weights allowed).
        divergence: "forward_kl" | "reverse_kl" | "jsd".
        beta: JSD interpolation, used only (and required in (0, 1) or endpoint) for "jsd".
        chunk_size: rows (tokens) per chunk.
        temperature: logits are divided by it for both models.
        reduction: "token_mean" | "sequence_mean" | "sum", as in `masked_reduce`.
        clip: None or a positive per-token clamp (no gradient from clipped tokens).
        teacher_weight: (V, H) teacher output layer if it differs (default: `weight`).
        return_per_token: also return the detached (B, T) per-token values (0 where masked).
        target_ids: (B, T) long, the sampled tokens y_bt: also return their detached log-probs
            log p_s(y_bt) and log p_t(y_bt) (B, T) each (0 where masked), read off the chunk's
            log-softmax for free: A_t = teacher - student, with no second pass over the head.

    Returns:
        loss (scalar); then per_token (B, T) if `return_per_token`; then
        (student_logps, teacher_logps) if `target_ids` is given.
    """
    if divergence not in _DIVERGENCES:
        raise ValueError(f"unknown divergence={divergence!r}; expected one of {_DIVERGENCES}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unknown reduction={reduction!r}; expected one of {_REDUCTIONS}")
    if divergence == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"divergence='jsd' needs beta in [0, 1], got beta={beta}")
    if chunk_size < 1 or temperature <= 0 or (clip is not None and clip <= 0):
        raise ValueError(f"need chunk_size >= 1, temperature > 0, clip None or > 0; got "
                         f"chunk_size={chunk_size}, temperature={temperature}, clip={clip}")
    teacher_weight = weight if teacher_weight is None else teacher_weight
    batch, length, hidden = student_hidden.shape
    if (teacher_hidden.shape[:2] != (batch, length) or completion_mask.shape != (batch, length)
            or weight.size(1) != hidden or teacher_weight.size(1) != teacher_hidden.size(-1)
            or weight.size(0) != teacher_weight.size(0)):
        raise ValueError(
            f"shape mismatch: student_hidden {tuple(student_hidden.shape)}, teacher_hidden "
            f"{tuple(teacher_hidden.shape)}, weight {tuple(weight.shape)}, teacher_weight "
            f"{tuple(teacher_weight.shape)}, completion_mask {tuple(completion_mask.shape)}")
    beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": float(beta)}[divergence]

    valid = completion_mask.reshape(-1) != 0  # (B*T,)
    token_weight = _token_weights(completion_mask, reduction).reshape(-1)[valid]  # (N,)
    h_s = student_hidden.reshape(-1, hidden)[valid]  # (N, H)
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.size(-1))[valid]  # (N, H)
    targets = None
    if target_ids is not None:
        if target_ids.shape != (batch, length):
            raise ValueError(f"target_ids {tuple(target_ids.shape)} must match completion_mask "
                             f"{tuple(completion_mask.shape)}")
        targets = target_ids.reshape(-1)[valid]  # (N,)
    loss, values, picked = _ChunkedSDFunction.apply(h_s, h_t, weight, teacher_weight.detach(),
                                                    token_weight.detach(), beta, chunk_size,
                                                    float(temperature), clip, targets)
    out = [loss]
    if return_per_token:
        per_token = values.new_zeros(batch * length)
        per_token[valid] = values
        out.append(per_token.view(batch, length))  # (B, T)
    if target_ids is not None:
        full = picked.new_zeros((2, batch * length))
        full[:, valid] = picked
        out += [full[0].view(batch, length), full[1].view(batch, length)]  # (B, T) each
    return out[0] if len(out) == 1 else tuple(out)
