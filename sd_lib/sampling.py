"""Batched sampling of k completions per prompt: the rollouts every condition trains on.

    rollouts = generate(model, tokenizer, prompts, k=12, temperature=1.0, max_new_tokens=96, seed=0)

Prompts are already chat-templated strings (or token-id lists); they are tokenized without
adding special tokens, left-padded, and decoded with a KV cache. Within a batch, the prefix all
rows share (the system prompt, or a whole prompt when the batch holds only its k copies) is
computed once. Samples of one prompt are contiguous: sample j of prompt i is row `i * k + j`.
Completions stop at EOS or the chat's end-of-turn token (`<|im_end|>` and the like); the stop
token is kept, nothing after it.

Two things make the loop about twice as fast on CPU as the plain one (`bench/bench_generation.py`):
- grouped-query attention without copies: transformers' `sdpa` path repeats every layer's K/V
  cache to the query-head count at each step whenever an attention mask is passed (always, with
  left padding); while sampling, the model's attention is switched to `sd_lib_sdpa_gqa`, the
  same SDPA call with `enable_gqa=True` (bit-identical outputs, no copy);
- inverse-CDF sampling (one cumsum and one uniform per row) instead of `torch.multinomial`,
  which draws an exponential variate for every vocabulary entry of every row;
- a KV cache whose layers write each new token into preallocated buffers
  (`PreallocatedLayer`) instead of `torch.cat`-ing the whole cache at every step;
- LoRA merged for the duration of `generate` (`merged_lora`): each adapted layer runs one matmul
  with W + s B A, held in a temporary tensor, instead of three (the adapter's two and the base);
  the stored weights are not touched, so nothing drifts (merging in place and back would round).

Departures from the paper:
1. The paper generates with vLLM (paged attention, prefix caching); this is a plain PyTorch
   decoding loop over a Hugging Face model and `DynamicCache`: the same distribution, slower.
"""

from __future__ import annotations

import math
import numbers
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from .alignment import common_prefix_len

__all__ = ["Rollouts", "generate", "gqa_attention", "merged_lora", "preallocated_cache", "stop_token_ids"]

# End-of-turn tokens of common chat templates; used when present in the vocabulary.
_CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


@dataclass
class Rollouts:
    """k samples for each of N prompts, B = N * k rows, sample j of prompt i at row i * k + j.

    prompt_ids: B token lists of the (unpadded) prompt.
    completion_ids: B token lists, the stop token included when generated, nothing after it.
    completion_ids_padded: (B, T) long, right-padded with the pad token, T = longest completion.
    completion_mask: (B, T) float, 1.0 on real completion tokens (the stop token included).
    texts: B decoded completions, special tokens skipped.
    prompt_index: B ints, the prompt each row came from.
    truncated: B bools, True when max_new_tokens was reached without a stop token.
    stats: {"tokens", "seconds", "tokens_per_s", "k", "n_prompts"}.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completion_ids_padded: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    prompt_index: list[int]
    truncated: list[bool]
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def lengths(self) -> list[int]:
        """Completion length in tokens, stop token included."""
        return [len(c) for c in self.completion_ids]


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """EOS of the tokenizer and of the model's generation config, plus chat end-of-turn tokens."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in _CHAT_END_TOKENS if t in vocab and t in tokenizer.all_special_tokens]
    return list(dict.fromkeys(ids))


def _tokenize_prompts(tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]]
                      ) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)):
        raise ValueError("prompts must be a list of strings or token-id lists, got one string")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        else:
            ids = p.tolist() if isinstance(p, torch.Tensor) else list(p)
            if not all(isinstance(t, numbers.Integral) for t in ids):
                raise ValueError(f"prompt {i} is neither a string nor a list of token ids: {p!r:.80}")
            ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        out.append(ids)
    return out


GQA_ATTENTION = "sd_lib_sdpa_gqa"


def _preallocated_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A `DynamicLayer` whose keys/values (B, H, S, D) are views of buffers with room for
        `capacity` positions (doubled if outgrown): appending a token writes one slot, where
        `DynamicLayer` copies the whole layer cache with `torch.cat` at every decoding step."""

        def __init__(self, capacity: int = 0, **kwargs):
            super().__init__(**kwargs)
            self.capacity, self.length = capacity, 0
            self.key_buffer = self.value_buffer = None

        def _views(self) -> tuple[torch.Tensor, torch.Tensor]:
            self.keys = self.key_buffer[:, :, :self.length]
            self.values = self.value_buffer[:, :, :self.length]
            return self.keys, self.values

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if self.key_buffer is None or end > self.key_buffer.shape[-2]:
                room = max(end, self.capacity, 2 * (0 if self.key_buffer is None else self.key_buffer.shape[-2]))
                grown = []
                for old, new in ((self.key_buffer, key_states), (self.value_buffer, value_states)):
                    buf = new.new_empty((*new.shape[:2], room, new.shape[-1]))  # (B, H, room, D)
                    if old is not None:
                        buf[:, :, :self.length] = old[:, :, :self.length]
                    grown.append(buf)
                self.key_buffer, self.value_buffer = grown
            self.key_buffer[:, :, self.length:end] = key_states
            self.value_buffer[:, :, self.length:end] = value_states
            self.length = end
            return self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.length > 0:
                self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
                self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
                self._views()

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.length > 0:
                self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
                self._views()

        def crop(self, tokens_to_remove: int) -> None:
            """Drop the last `-tokens_to_remove` positions (transformers' convention: a negative
            count); a positive value is the legacy form, the length to keep."""
            keep = tokens_to_remove if tokens_to_remove > 0 else self.length + tokens_to_remove
            if 0 <= keep < self.length:
                self.length = keep
                self._views()

    return PreallocatedLayer


def preallocated_cache(model: Any, capacity: int):
    """A `DynamicCache` for `model` whose full-attention layers are `PreallocatedLayer`s with room
    for `capacity` positions (prompt + new tokens); sliding-window or other layer kinds keep
    transformers' own classes."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    layer_class = _preallocated_layer_class()
    cache.layers = [layer_class(capacity=capacity) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache


def _sdpa_gqa_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0,
                        scaling: float | None = None, is_causal: bool | None = None,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: query (B, Hq, Q, D), key/value (B, Hkv, K, D)
    -> (B, Q, Hq, D). `scaled_dot_product_attention` with `enable_gqa` (Hq a multiple of Hkv),
    so the K/V heads are broadcast, not copied. Only for models without position bias."""
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=causal, enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _register_gqa_attention() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # an older transformers: keep its own attention
        return False
    AttentionInterface.register(GQA_ATTENTION, _sdpa_gqa_attention)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
    return True


@contextmanager
def gqa_attention(model: Any) -> Iterator[None]:
    """Within the block, a model on transformers' `sdpa` attention uses `sd_lib_sdpa_gqa`
    (same maths, K/V heads broadcast instead of repeated); any other attention is left alone."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current != "sdpa" or not _register_gqa_attention():
        yield
        return
    config._attn_implementation = GQA_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = current


def _lora_layers(model: Any) -> list[Any] | None:
    """The peft LoRA layers `merged_lora` can merge, or None when any layer cannot be (several
    active adapters, DoRA & co., a non-Linear base, a forward that is not peft's own, or unsloth
    loaded, whose kernels may read the adapter whatever its enabled flag): the model runs as it is."""
    if "unsloth" in sys.modules:  # its fused kernels read the adapter weights directly: leave them alone
        return None
    layers = [m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")
              and hasattr(m, "get_delta_weight")]
    if not layers or not hasattr(model, "disable_adapter"):
        return None
    for layer in layers:
        active = [a for a in layer.active_adapters if a in layer.lora_A.keys()]
        if (layer.disable_adapters or layer.merged or len(active) != 1 or active[0] in getattr(layer, "lora_variant", {})
                or type(layer.base_layer) is not torch.nn.Linear):
            return None
        if "forward" in vars(layer) or not getattr(type(layer).forward, "__module__", "").startswith("peft."):
            return None
    return layers


@contextmanager
def merged_lora(model: Any) -> Iterator[bool]:
    """Within the block (no gradient), a peft LoRA model runs with each adapted layer's weight
    replaced by W + s B A (a new tensor) and the adapter layers disabled: one matmul per layer.
    On exit every base weight is the very tensor it was before (no merge-unmerge rounding).
    Yields whether it merged; models without a mergeable adapter run unchanged. Costs one copy of
    the adapted weights while it lasts."""
    layers = _lora_layers(model)
    if layers is None:
        yield False
        return
    originals = [layer.base_layer.weight.data for layer in layers]
    try:
        with torch.no_grad():
            for layer, weight in zip(layers, originals):
                name = next(a for a in layer.active_adapters if a in layer.lora_A.keys())
                layer.base_layer.weight.data = weight + layer.get_delta_weight(name).to(weight.dtype)
        with model.disable_adapter():
            yield True
    finally:
        for layer, weight in zip(layers, originals):
            layer.base_layer.weight.data = weight


def _next_tokens(logits: torch.Tensor, *, temperature: float, top_p: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Sample one token per row from softmax(logits / temperature), nucleus `top_p`.

    logits: (B, V). Returns (B,) long. Naive equivalent: `Categorical(logits=l / T).sample()`
    after zeroing the tokens outside the smallest set whose probability reaches `top_p`.
    Sampled by inverse CDF: the first token whose cumulative probability exceeds u * total,
    u ~ U[0, 1) (tokens of probability 0 are never chosen).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        sorted_p, sorted_i = probs.sort(dim=-1, descending=True)  # (B, V)
        outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # mass before the token >= top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, sorted_i, sorted_p)
    cdf = probs.cumsum_(dim=-1)  # (B, V), in place: probs is not needed again
    u = torch.rand((cdf.size(0), 1), generator=generator, device=cdf.device, dtype=cdf.dtype)  # (B, 1)
    tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)  # (B,)
    over = tokens >= cdf.size(-1)  # u * total rounded up to total: take the last token with mass
    if over.any():
        last = (cdf[over] < cdf[over, -1:]).sum(-1)  # index of the last increase of the CDF
        tokens[over] = last.clamp(max=cdf.size(-1) - 1)
    return tokens


@torch.inference_mode()
def _sample_batch(model: Any, seqs: list[list[int]], *, temperature: float, top_p: float,
                  max_new_tokens: int, stop_ids: set[int], pad_id: int,
                  generator: torch.Generator | None, device: torch.device) -> list[list[int]]:
    """One batch of rows: shared-prefix prefill, per-row suffix prefill, KV-cached decoding.

    The prefix common to all rows (system prompt, or the whole prompt for k copies) is run
    once and its cache repeated; the rest is left-padded *after* that prefix, with position ids
    that skip the padding, so every row sees exactly its own prompt. Finished rows are dropped
    from the cache as they accumulate.
    """
    with gqa_attention(model):
        return _decode(model, seqs, temperature=temperature, top_p=top_p,
                       max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                       generator=generator, device=device)


def _decode(model: Any, seqs: list[list[int]], *, temperature: float, top_p: float,
            max_new_tokens: int, stop_ids: set[int], pad_id: int,
            generator: torch.Generator | None, device: torch.device) -> list[list[int]]:
    B = len(seqs)
    L = common_prefix_len(seqs)
    cache = preallocated_cache(model, max(len(q) for q in seqs) + max_new_tokens)
    if L > 0:
        model(input_ids=torch.tensor([seqs[0][:L]], device=device), past_key_values=cache,
              use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(B)
    S = max(len(q) for q in seqs) - L
    suffix = torch.full((B, S), pad_id, dtype=torch.long)  # (B, S)
    # the attention mask of the whole decode, allocated once; step n uses its first L + S + n columns
    full_mask = torch.ones((B, L + S + max_new_tokens), dtype=torch.long)  # (B, L + S + N)
    mask = full_mask[:, :L + S]  # (B, L + S)
    pos = torch.zeros((B, S), dtype=torch.long)  # (B, S)
    for j, q in enumerate(seqs):
        n = len(q) - L
        suffix[j, S - n:] = torch.tensor(q[L:])
        mask[j, L:L + S - n] = 0
        pos[j, S - n:] = torch.arange(L, len(q))
    suffix, full_mask, pos = suffix.to(device), full_mask.to(device), pos.to(device)
    mask = full_mask[:, :L + S]
    logits = model(input_ids=suffix, attention_mask=mask, position_ids=pos, past_key_values=cache,
                   use_cache=True, logits_to_keep=1).logits[:, -1]  # (B, V)
    next_pos = pos[:, -1] + 1  # (B,)
    out: list[list[int]] = [[] for _ in seqs]
    active = list(range(B))  # batch row -> original row
    finished_in_batch = 0
    for step in range(max_new_tokens):
        tokens = _next_tokens(logits, temperature=temperature, top_p=top_p, generator=generator)
        for j, t in enumerate(tokens.tolist()):
            if active[j] < 0:
                continue
            out[active[j]].append(t)
            if t in stop_ids:
                active[j] = -1
                finished_in_batch += 1
        if all(a < 0 for a in active) or step == max_new_tokens - 1:
            break
        # Drop finished rows once they are a quarter of the batch: copying the cache costs a step.
        if finished_in_batch * 4 >= len(active):
            keep = [j for j, a in enumerate(active) if a >= 0]
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            tokens, full_mask, next_pos = tokens[idx], full_mask[idx], next_pos[idx]
            active = [active[j] for j in keep]
            finished_in_batch = 0
        mask = full_mask[:, :L + S + step + 1]  # (B', L + S + step + 1): the new token is real
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                       past_key_values=cache, use_cache=True).logits[:, -1]  # (B', V)
        next_pos = next_pos + 1
    return out


def generate(model: Any, tokenizer: Any, prompts: Sequence[str] | Sequence[Sequence[int]], *,
             k: int = 1, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 256,
             batch_size: int = 32, seed: int | None = None, progress: bool = True) -> Rollouts:
    """Sample `k` completions for each prompt: y ~ pi(. | x) at `temperature`, nucleus `top_p`.

    temperature == 0 is greedy. Rows are generated in batches of `batch_size` sorted by prompt
    length (less padding, a longer shared prefix) and returned in the original order. With
    `seed`, batch b draws from its own `torch.Generator` seeded by (seed, b): the result is
    deterministic and the global RNG is untouched; without it the global RNG is used. The model
    runs in eval mode under `torch.inference_mode`; its train/eval mode is restored afterwards.
    Naive equivalent, per row: `model.generate(prompt, do_sample=True, temperature=temperature,
    top_p=top_p, top_k=0, eos_token_id=stop_token_ids(tokenizer, model))` (tested for greedy).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if temperature < 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be >= 0 and finite, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, "
                         f"{batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    stop_ids = stop_token_ids(tokenizer, model)
    if not stop_ids:
        raise ValueError("tokenizer defines no EOS or end-of-turn token to stop at")
    prompt_ids = _tokenize_prompts(tokenizer, prompts)
    rows = [i for i in range(len(prompt_ids)) for _ in range(k)]  # row r -> prompt rows[r]
    order = sorted(range(len(rows)), key=lambda r: (len(prompt_ids[rows[r]]), r))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    completions: list[list[int]] = [[] for _ in rows]
    truncated = [False] * len(rows)
    stop_set = set(stop_ids)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    n_tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(batches), desc="generate", unit="batch", disable=not progress)
    try:
        with merged_lora(model):
            for b, batch in enumerate(batches):
                generator = None
                if seed is not None and temperature > 0:
                    generator = torch.Generator(device=device)
                    generator.manual_seed((seed * 1_000_003 + b) % (2**63))
                new = _sample_batch(model, [prompt_ids[rows[r]] for r in batch],
                                    temperature=temperature, top_p=top_p,
                                    max_new_tokens=max_new_tokens, stop_ids=stop_set, pad_id=pad_id,
                                    generator=generator, device=device)
                for r, toks in zip(batch, new):
                    completions[r] = toks
                    truncated[r] = len(toks) >= max_new_tokens and toks[-1] not in stop_set
                    n_tokens += len(toks)
                elapsed = time.perf_counter() - t0
                bar.set_postfix(tok_s=f"{n_tokens / max(elapsed, 1e-9):.1f}")
                bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - t0

    T = max((len(c) for c in completions), default=0)
    padded = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.float32)  # (B, T)
    for r, c in enumerate(completions):
        if c:
            padded[r, :len(c)] = torch.tensor(c)
            mask[r, :len(c)] = 1.0
    return Rollouts(
        prompt_ids=[list(prompt_ids[i]) for i in rows],
        completion_ids=completions,
        completion_ids_padded=padded,
        completion_mask=mask,
        texts=tokenizer.batch_decode(completions, skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False),
        prompt_index=rows,
        truncated=truncated,
        stats={"tokens": n_tokens, "seconds": seconds,
               "tokens_per_s": n_tokens / max(seconds, 1e-9), "k": k, "n_prompts": len(prompt_ids)},
    )
