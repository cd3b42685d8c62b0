"""Teacher/student alignment: one sampled completion, two contexts, the same token positions.

The student sees x, the teacher sees x + c; both score the SAME completion y. Each side is
packed as [pad..., prompt, completion, pad...]: prompts LEFT-padded to a common width P, so
that every completion starts at column P in both batches, completions RIGHT-padded to T.
Position ids count real tokens only, so left padding never shifts a position. Column P-1+t
then predicts y_t for every row, and student and teacher per-token tensors line up as (B, T)
with one shared `completion_mask`.

    student, teacher = pack_student_teacher(student_prompt_ids, teacher_prompt_ids,
                                            completion_ids, pad_token_id=tok.pad_token_id)
    per_token_logps, teacher_per_token_logps, completion_mask = student_teacher_logps(
        model, student, teacher, teacher_kind="base")

Teacher kinds (`teacher_mode`): "base" disables the LoRA adapter (the paper's choice), "ema"
swaps in an EMA copy of the adapter (`EmaAdapter`, SDPO/OPSD), "live" uses the current
weights. Every teacher forward runs in eval mode (dropout off) under torch.no_grad().
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "PackedBatch",
    "pack_batch",
    "pack_student_teacher",
    "common_prefix_len",
    "selective_log_softmax",
    "completion_logps",
    "completion_hidden",
    "output_weight",
    "EmaAdapter",
    "teacher_mode",
    "student_teacher_logps",
    "student_teacher_hidden",
]

TEACHER_KINDS = ("base", "ema", "live")


@dataclass
class PackedBatch:
    """[pad..., prompt, completion, pad...] rows; `prompt_width` = P, completion width = T."""

    input_ids: torch.Tensor  # (B, P+T) long
    attention_mask: torch.Tensor  # (B, P+T) long, 1 on real tokens
    position_ids: torch.Tensor  # (B, P+T) long, 0.. over real tokens
    completion_ids: torch.Tensor  # (B, T) long, pad where masked
    completion_mask: torch.Tensor  # (B, T) float, 1 on real completion tokens
    prompt_width: int  # P: every completion starts at this column
    shared_prefix: int = 0  # L: the first L prompt tokens of every row are the same (L < every prompt)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "position_ids": self.position_ids}


def pack_batch(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], *,
               pad_token_id: int, device: torch.device | str | None = None) -> PackedBatch:
    """Left-pad prompts to P, right-pad completions to T, concatenate: (B, P+T).

    position_ids = cumsum(attention_mask) - 1 (clamped at 0 on pads): row b's first real token
    is at position 0 whatever its padding, exactly as when run alone.
    Follows TRL GRPOTrainer's prompt/completion layout (left/right padding).
    """
    if len(prompt_ids) != len(completion_ids) or not prompt_ids:
        raise ValueError(f"need as many prompts as completions (>= 1), got {len(prompt_ids)} "
                         f"and {len(completion_ids)}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs >= 1 token: the last prompt token predicts y_1")
    batch = len(prompt_ids)
    width_p = max(len(p) for p in prompt_ids)
    width_t = max(len(c) for c in completion_ids)
    input_ids = torch.full((batch, width_p + width_t), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width_p + width_t), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        start, stop = width_p - len(prompt), width_p + len(completion)
        input_ids[row, start:width_p] = torch.as_tensor(prompt, dtype=torch.long)
        input_ids[row, width_p:stop] = torch.as_tensor(completion, dtype=torch.long)
        attention_mask[row, start:stop] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, P+T)
    packed = PackedBatch(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        completion_ids=input_ids[:, width_p:].clone(),  # (B, T)
        completion_mask=attention_mask[:, width_p:].float(),  # (B, T)
        prompt_width=width_p, shared_prefix=common_prefix_len(prompt_ids))
    if device is not None:
        for name in ("input_ids", "attention_mask", "position_ids", "completion_ids", "completion_mask"):
            setattr(packed, name, getattr(packed, name).to(device))
    return packed


def common_prefix_len(prompt_ids: Sequence[Sequence[int]]) -> int:
    """Length of the prefix every prompt shares, kept shorter than the shortest prompt (so that
    every row's last prompt token, which predicts y_1, is its own). The sampler's prefill and
    `completion_hidden` both run this prefix once."""
    first, limit = prompt_ids[0], min(len(p) for p in prompt_ids) - 1
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompt_ids):
        n += 1
    return n


def pack_student_teacher(student_prompt_ids: Sequence[Sequence[int]],
                         teacher_prompt_ids: Sequence[Sequence[int]],
                         completion_ids: Sequence[Sequence[int]], *, pad_token_id: int,
                         device: torch.device | str | None = None) -> tuple[PackedBatch, PackedBatch]:
    """Two `PackedBatch`es sharing completion_ids (B, T) and completion_mask (B, T).

    Widths P_student and P_teacher may differ; T is the same, so per-token outputs align.
    """
    if len(student_prompt_ids) != len(teacher_prompt_ids):
        raise ValueError(f"{len(student_prompt_ids)} student prompts but "
                         f"{len(teacher_prompt_ids)} teacher prompts")
    return (pack_batch(student_prompt_ids, completion_ids, pad_token_id=pad_token_id, device=device),
            pack_batch(teacher_prompt_ids, completion_ids, pad_token_id=pad_token_id, device=device))


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[index] without a second (..., V) tensor.

    Naive equivalent: logits.log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    float32/64: logits[index] - logsumexp(logits), one leading row at a time;
    half precision: log_softmax row by row (logsumexp in bf16 is too lossy).
    Follows TRL's `trainer.utils.selective_log_softmax` (its non-kernel path).

    Args:
        logits: (..., V), e.g. (B, T, V).
        index: (...), e.g. (B, T) token ids.
    Returns:
        (...) log-probs.
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # (...)
        normaliser = torch.stack([row.logsumexp(-1) for row in logits])  # (...), one row's (T, V) at a time
        return picked - normaliser
    return torch.stack([row.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
                        for row, ids in zip(logits, index)])


def _zero_masked(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # padded query rows may hold garbage (even NaN); keep it out of every downstream sum
    return torch.where(mask != 0, values, torch.zeros_like(values))


def completion_logps(model: torch.nn.Module, batch: PackedBatch, *,
                     temperature: float = 1.0, share_prefix: bool = True) -> torch.Tensor:
    """log pi(y_t | prompt, y<t) for t = 1..T -> (B, T), 0 where completion_mask is 0.

    Naive equivalent: model(**batch).logits[:, P-1:P+T-1].log_softmax(-1).gather(y).
    Keeps only the last T+1 logit rows (`logits_to_keep`), like TRL's `_get_per_token_logps`.
    `share_prefix`: the decoder runs the rows' common prompt prefix once (`completion_hidden`)
    and the output layer maps its hidden states; models whose logits are more than the output
    layer of the last hidden state (softcapping, logit scaling) always take the plain path.
    """
    width_t = batch.completion_ids.size(1)
    config = getattr(model, "config", None)
    plain_head = not any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale"))
    if share_prefix and plain_head and batch.shared_prefix > 0 and batch.input_ids.size(0) > 1:
        logits = model.get_output_embeddings()(completion_hidden(model, batch))  # (B, T, V)
    else:
        logits = model(**batch.model_inputs(), logits_to_keep=width_t + 1, use_cache=False).logits
        logits = logits[:, :-1]  # (B, T, V): column P-1+t predicts y_t
    if temperature != 1.0:
        logits = logits / temperature
    return _zero_masked(selective_log_softmax(logits, batch.completion_ids), batch.completion_mask)


def _base_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def completion_hidden(model: torch.nn.Module, batch: PackedBatch, *, share_prefix: bool = True) -> torch.Tensor:
    """Final (post-norm) hidden states h_{P-1+t} that predict y_t, t = 1..T -> (B, T, H).

    logits = h @ output_weight(model).T; feed to `losses.chunked_sd_loss`. Runs the decoder
    only (no logits). Works through a peft wrapper: LoRA layers live inside the decoder.

    share_prefix: when the rows' prompts start with the same `batch.shared_prefix` = L tokens
    (the system prompt and instructions: 73 of ~90 tokens of the embedded solver's prompt), the
    decoder runs those L tokens once, as a batch of one, and the B row suffixes on top of its
    K/V cache, broadcast to B rows. Same values (positions and attention are unchanged); with
    gradient, the prefix's gradient is the sum over rows (autograd through the broadcast).
    Naive equivalent: `share_prefix=False`, every row in full.

    Departures: models whose head adds softcapping/scaling (Gemma, Cohere) need their own
    logits transform; Llama/Qwen heads are a plain matmul. With LoRA dropout > 0, the prefix
    shares one dropout mask across rows.
    """
    decoder = _base_causal_lm(model).get_decoder()
    width_p, width_t = batch.prompt_width, batch.completion_ids.size(1)
    if share_prefix and batch.shared_prefix > 0 and batch.input_ids.size(0) > 1:
        hidden = _prefix_shared_forward(decoder, batch)  # (B, P-L+T, H)
        width_p -= batch.shared_prefix
    else:
        hidden = decoder(**batch.model_inputs(), use_cache=False).last_hidden_state  # (B, P+T, H)
    hidden = hidden[:, width_p - 1: width_p - 1 + width_t]  # (B, T, H)
    return _zero_masked(hidden, batch.completion_mask.unsqueeze(-1))


def _prefix_shared_forward(decoder: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """The decoder's last hidden states of every row's columns after its shared prefix:
    (B, P-L+T, H), rows laid out as [pad..., prompt[L:], completion, pad...]."""
    from transformers import DynamicCache

    n_prefix, width_p = batch.shared_prefix, batch.prompt_width
    rows = batch.input_ids.size(0)
    device = batch.input_ids.device
    starts = width_p - batch.attention_mask[:, :width_p].sum(-1)  # (B,) first prompt column of each row
    prefix = batch.input_ids[:1, starts[0]: starts[0] + n_prefix]  # (1, L)
    cache = DynamicCache(config=decoder.config)
    decoder(input_ids=prefix, position_ids=torch.arange(n_prefix, device=device)[None], past_key_values=cache,
            use_cache=True)
    for layer in cache.layers:  # (1, H_kv, L, D) -> (B, H_kv, L, D), a broadcast view
        layer.keys = layer.keys.expand(rows, -1, -1, -1)
        layer.values = layer.values.expand(rows, -1, -1, -1)
    # drop columns [start, start + L) of each row: [pad..., prompt[L:], completion, pad...]
    columns = torch.arange(batch.input_ids.size(1) - n_prefix, device=device)[None]  # (1, P-L+T)
    columns = columns + n_prefix * (columns >= (starts[:, None]))  # (B, P-L+T)
    suffix_mask = batch.attention_mask.gather(1, columns)  # (B, P-L+T)
    hidden = decoder(
        input_ids=batch.input_ids.gather(1, columns),
        attention_mask=torch.cat([batch.attention_mask.new_ones(rows, n_prefix), suffix_mask], 1),  # (B, P+T)
        position_ids=batch.position_ids.gather(1, columns),
        past_key_values=cache, use_cache=True,
    ).last_hidden_state
    return hidden  # (B, P-L+T, H)


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The output layer's (V, H) weight (tied or not, through a peft wrapper)."""
    head = model.get_output_embeddings()
    if hasattr(head, "base_layer"):
        raise ValueError("an adapter on the output layer is unsupported by the hidden-state path: "
                         "its weight is not the logit map; keep lm_head out of LoRA target_modules")
    return head.weight


# --------------------------------------------------------------------------------------------
# Teacher modes
# --------------------------------------------------------------------------------------------
class EmaAdapter:
    """EMA shadow of a model's trainable (adapter) parameters: theta_ema <- d theta_ema + (1-d) theta.

    Tracks the parameters with requires_grad=True at construction (the LoRA weights under
    peft). `swapped_in(model)` copies the EMA values in and restores the live ones on exit.
    Follows SDPO's PEFT adapter EMA teacher (TRL `experimental/sdpo/teacher_sync`).
    """

    def __init__(self, model: torch.nn.Module):
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters()
                       if p.requires_grad}
        if not self.shadow:
            raise ValueError("EmaAdapter: the model has no trainable parameters to track")

    def _params(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        params = dict(model.named_parameters())
        missing = [name for name in self.shadow if name not in params]
        if missing:
            raise ValueError(f"EmaAdapter: model lacks tracked parameters {missing[:3]}...")
        return {name: params[name] for name in self.shadow}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got decay={decay}")
        for name, param in self._params(model).items():
            self.shadow[name].lerp_(param.detach(), 1.0 - decay)

    @contextlib.contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        params = self._params(model)
        live = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(live[name])


@contextlib.contextmanager
def teacher_mode(model: torch.nn.Module, kind: str, *, ema: EmaAdapter | None = None) -> Iterator[None]:
    """Run the self-teacher: eval mode (dropout off), torch.no_grad(), weights chosen by `kind`.

    base: adapter disabled (`model.disable_adapter()`), the initial policy; the paper's teacher.
    ema:  `ema.swapped_in(model)`; needs `ema`.
    live: the current weights, stop-gradient only.
    Every module's train/eval flag is restored on exit, as are the weights.
    """
    if kind not in TEACHER_KINDS:
        raise ValueError(f"unknown teacher kind={kind!r}; expected one of {TEACHER_KINDS}")
    if kind == "base" and not hasattr(model, "disable_adapter"):
        raise ValueError("teacher kind='base' needs a peft model (with disable_adapter())")
    if kind == "ema" and ema is None:
        raise ValueError("teacher kind='ema' needs ema=EmaAdapter(model)")
    if kind != "ema" and ema is not None:
        raise ValueError(f"ema= is only used by kind='ema', not kind={kind!r}")
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if kind == "base":
                stack.enter_context(model.disable_adapter())
            elif kind == "ema":
                stack.enter_context(ema.swapped_in(model))
            yield
    finally:
        for module, training in flags:
            module.training = training


def student_teacher_logps(model: torch.nn.Module, student: PackedBatch, teacher: PackedBatch, *,
                          teacher_kind: str = "base", ema: EmaAdapter | None = None,
                          temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per_token_logps, teacher_per_token_logps, completion_mask), each (B, T), aligned.

    The student forward keeps the model's mode and gradient; the teacher's runs in
    `teacher_mode(model, teacher_kind)`.
    """
    _check_aligned(student, teacher)
    per_token_logps = completion_logps(model, student, temperature=temperature)
    with teacher_mode(model, teacher_kind, ema=ema):
        teacher_per_token_logps = completion_logps(model, teacher, temperature=temperature)
    return per_token_logps, teacher_per_token_logps, student.completion_mask


def student_teacher_hidden(model: torch.nn.Module, student: PackedBatch, teacher: PackedBatch, *,
                           teacher_kind: str = "base", ema: EmaAdapter | None = None, share_prefix: bool = True,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student_hidden (B, T, H), teacher_hidden (B, T, H), weight (V, H), completion_mask (B, T)).

    The inputs of `losses.chunked_sd_loss`; teacher side as in `student_teacher_logps`;
    `share_prefix` as in `completion_hidden`, for both sides.
    """
    _check_aligned(student, teacher)
    student_hidden = completion_hidden(model, student, share_prefix=share_prefix)
    with teacher_mode(model, teacher_kind, ema=ema):
        teacher_hidden = completion_hidden(model, teacher, share_prefix=share_prefix)
    return student_hidden, teacher_hidden, output_weight(model), student.completion_mask


def _check_aligned(student: PackedBatch, teacher: PackedBatch) -> None:
    if not torch.equal(student.completion_ids, teacher.completion_ids):
        raise ValueError("student and teacher batches must hold the same completion_ids (B, T)")
