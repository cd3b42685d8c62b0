"""sd_lib.sampling: shapes, masks, stop handling, grouping, determinism; greedy vs HF generate.

Most tests use a tiny random Llama with a word-level tokenizer (milliseconds); one slow test
samples from the embedded SmolLM2 solver.
"""

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sd_lib.sampling import (GQA_ATTENTION, Rollouts, _next_tokens, generate, gqa_attention, merged_lora,
                             preallocated_cache, stop_token_ids)

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
EOS = 2


def _tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIALS + [f"w{i}" for i in range(61)])}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>", padding_side="left")


def _model(*, eos_bias: float, seed: int = 0):
    """Tiny random Llama whose lm_head has a bias on EOS, so rows stop at varied lengths."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float64)
    head = torch.nn.Linear(32, 64, bias=True, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight * 50)  # sharper logits: fewer near-ties
        head.bias.zero_()
        head.bias[EOS] = eos_bias
    model.lm_head = head
    return model.eval()


@pytest.fixture(scope="module")
def tok():
    return _tokenizer()


# Prompts share "<|im_start|> w1" and then differ in content and length (sorting reorders them).
PROMPTS = ["<|im_start|> w1 w5 w6 w7 w8 w9", "<|im_start|> w1 w3", "<|im_start|> w1 w4 w4 w4",
           "<|im_start|> w2"]


def _check_invariants(r: Rollouts, tok, *, n_prompts, k, max_new_tokens):
    B = n_prompts * k
    assert len(r) == B and len(r.texts) == B and len(r.truncated) == B
    assert r.completion_ids_padded.shape == r.completion_mask.shape
    assert r.completion_ids_padded.shape == (B, max(r.lengths))
    assert r.completion_mask.sum(1).tolist() == r.lengths
    for row, ids in enumerate(r.completion_ids):
        assert r.completion_ids_padded[row, :len(ids)].tolist() == ids
        assert (r.completion_ids_padded[row, len(ids):] == tok.pad_token_id).all()
        assert EOS not in ids[:-1], "nothing may follow the stop token"
        if r.truncated[row]:
            assert len(ids) == max_new_tokens and ids[-1] != EOS
        else:
            assert ids[-1] == EOS
    assert r.stats["tokens"] == sum(r.lengths)


def test_shapes_mask_stop_and_groups(tok):
    """k samples per prompt, contiguous; masks match lengths; EOS kept, nothing after it."""
    model = _model(eos_bias=3.0)
    r = generate(model, tok, PROMPTS, k=3, max_new_tokens=12, batch_size=5, seed=0, progress=False)
    _check_invariants(r, tok, n_prompts=4, k=3, max_new_tokens=12)
    assert r.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for row, i in enumerate(r.prompt_index):
        assert r.prompt_ids[row] == tok(PROMPTS[i], add_special_tokens=False)["input_ids"]
    assert any(r.truncated) and not all(r.truncated), "the EOS bias should give both outcomes"
    assert r.completion_mask.dtype == torch.float32


def test_token_id_prompts_and_text_decoding(tok):
    model = _model(eos_bias=3.0)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    a = generate(model, tok, PROMPTS, k=2, max_new_tokens=8, seed=1, progress=False)
    b = generate(model, tok, ids, k=2, max_new_tokens=8, seed=1, progress=False)
    assert a.completion_ids == b.completion_ids
    assert all("<|im_end|>" not in t for t in a.texts)  # special tokens skipped


def test_deterministic_given_seed_and_global_rng_untouched(tok):
    model = _model(eos_bias=3.0)
    state = torch.random.get_rng_state()
    a = generate(model, tok, PROMPTS, k=4, max_new_tokens=10, seed=7, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = generate(model, tok, PROMPTS, k=4, max_new_tokens=10, seed=7, progress=False)
    c = generate(model, tok, PROMPTS, k=4, max_new_tokens=10, seed=8, progress=False)
    assert a.completion_ids == b.completion_ids
    assert a.completion_ids != c.completion_ids
    # the k samples of one prompt are not copies of each other
    assert len({tuple(x) for x in a.completion_ids[:4]}) > 1


def test_greedy_matches_hf_generate_and_is_batch_invariant(tok):
    """Greedy rows equal `model.generate` run on each prompt alone (no padding), at any batch size.

    This checks left padding, the shared-prefix cache and position ids against transformers.
    """
    model = _model(eos_bias=0.6, seed=3)
    stops = stop_token_ids(tok, model)
    ref = []
    for p in PROMPTS:
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=10, eos_token_id=stops, pad_token_id=0)
        new = out[0, ids.shape[1]:].tolist()
        ref.append(new[:new.index(EOS) + 1] if EOS in new else new)
    assert any(EOS in x for x in ref) and any(EOS not in x for x in ref)
    for bs in (1, 3, 8):
        r = generate(model, tok, PROMPTS, k=1, temperature=0.0, max_new_tokens=10, batch_size=bs,
                     progress=False)
        assert r.completion_ids == ref, f"batch_size={bs}"


def test_train_mode_restored_and_bad_options(tok):
    model = _model(eos_bias=3.0).train()
    generate(model, tok, PROMPTS[:1], k=1, max_new_tokens=2, progress=False)
    assert model.training
    for bad in (dict(k=0), dict(temperature=-1.0), dict(top_p=0.0), dict(max_new_tokens=0)):
        with pytest.raises(ValueError):
            generate(model, tok, PROMPTS, progress=False, **bad)
    with pytest.raises(ValueError, match="one string"):
        generate(model, tok, PROMPTS[0], progress=False)


def test_top_p_small_is_greedy(tok):
    """Nucleus with a tiny top_p keeps only the most likely token: sampling equals greedy."""
    model = _model(eos_bias=0.6, seed=3)
    g = generate(model, tok, PROMPTS, temperature=0.0, max_new_tokens=6, progress=False)
    s = generate(model, tok, PROMPTS, temperature=1.0, top_p=1e-6, max_new_tokens=6, seed=0,
                 progress=False)
    assert g.completion_ids == s.completion_ids


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_next_tokens_frequencies_match_the_distribution(temperature, top_p):
    """The inverse-CDF sampler against the naive distribution softmax(l / T) cut to the nucleus:
    empirical frequencies of 200k draws within 5 standard errors of each probability, and
    tokens of probability 0 (logit -inf, outside the nucleus) never drawn."""
    logits = torch.tensor([2.0, 1.0, 0.5, -float("inf"), 0.0, -1.0, 3.0])
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p * keep)
        probs = probs / probs.sum()
    n = 200_000
    g = torch.Generator().manual_seed(0)
    draws = _next_tokens(logits.expand(n, -1).clone(), temperature=temperature, top_p=top_p, generator=g)
    freq = torch.bincount(draws, minlength=logits.numel()).double() / n
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert (freq[probs == 0] == 0).all()
    assert ((freq - probs.double()).abs() <= 5 * se + 1e-12).all(), (freq, probs)


def test_gqa_attention_is_exact_and_restores_the_config(tok):
    """Under `gqa_attention` a padded batch's logits equal those of transformers' sdpa path, and
    the model's attention setting comes back afterwards, also after an exception."""
    model = _model(eos_bias=0.0, seed=5)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.tensor([[0, 0, 7, 8, 9], [4, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    want = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    with gqa_attention(model):
        assert model.config._attn_implementation == GQA_ATTENTION
        got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="boom"):
        with gqa_attention(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]))


def test_merged_lora_is_exact_and_leaves_the_weights_untouched(tok):
    """Checks `merged_lora` against peft's unmerged forward (logits to 1e-10, float64, B != 0),
    that every base weight is the same tensor with the same values afterwards (no merge-unmerge
    rounding), adapters enabled and trainable again; greedy rollouts equal those of the unmerged
    model decoded token by token with `model.generate`."""
    model = _lora(_model(eos_bias=0.6, seed=3))
    ids = torch.tensor([[4, 5, 6, 7]])
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    before = [(m.base_layer.weight, m.base_layer.weight.data.clone()) for m in layers]
    want = model(input_ids=ids).logits
    with torch.no_grad(), merged_lora(model) as merged:
        assert merged and all(m.disable_adapters for m in layers)
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    with torch.no_grad(), model.disable_adapter():
        assert (model(input_ids=ids).logits - want).abs().max() > 1e-3  # the adapter matters here
    for m, (param, values) in zip(layers, before):
        assert m.base_layer.weight is param and torch.equal(param, values) and not m.disable_adapters
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    with model.disable_adapter(), merged_lora(model) as merged:  # nothing to merge: runs as it is
        assert not merged
    layers[0].forward = layers[0].forward  # a forward that is not peft's class method (as unsloth patches)
    with merged_lora(model) as merged:
        assert not merged
    del layers[0].forward
    import sys
    sys.modules["unsloth"] = object()  # unsloth loaded: never merge
    try:
        with merged_lora(model) as merged:
            assert not merged
    finally:
        del sys.modules["unsloth"]
    stops = stop_token_ids(tok, model)
    for p in PROMPTS:
        prompt = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8,
                             eos_token_id=stops, pad_token_id=0)[0, prompt.shape[1]:].tolist()
        ref = out[:out.index(EOS) + 1] if EOS in out else out
        assert generate(model, tok, [p], temperature=0.0, max_new_tokens=8, progress=False).completion_ids == [ref]


def test_preallocated_cache_matches_dynamic_cache():
    """The sampler's cache against transformers' DynamicCache under the decode loop's operations
    (prefix of one row, repeat to the batch, appends, dropping finished rows, outgrowing the
    preallocated room) and a crop: the same keys and values after every operation."""
    from transformers import DynamicCache

    model = _model(eos_bias=0.0)
    ours, ref = preallocated_cache(model, capacity=6), DynamicCache(config=model.config)
    assert type(ours.layers[0]).__name__ == "PreallocatedLayer"
    g = torch.Generator().manual_seed(0)
    kv = lambda b, n: (torch.randn(b, 2, n, 8, generator=g), torch.randn(b, 2, n, 8, generator=g))  # noqa: E731

    def same():
        for a, b in zip(ours.layers, ref.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert ours.get_seq_length() == ref.get_seq_length()

    ops = [("update", kv(1, 3)), ("repeat", 4), ("update", kv(4, 2)), ("select", torch.tensor([0, 2, 3])),
           ("update", kv(3, 1)), ("update", kv(3, 4)), ("select", torch.tensor([1])), ("update", kv(1, 1)),
           ("crop", -2), ("update", kv(1, 1))]
    for op, arg in ops:
        for cache in (ours, ref):
            for layer in range(2):
                if op == "update":
                    cache.update(*arg, layer)
            if op == "repeat":
                cache.batch_repeat_interleave(arg)
            elif op == "select":
                cache.batch_select_indices(arg)
            elif op == "crop":
                cache.crop(arg)
        same()
    assert ours.layers[0].key_buffer.shape[-2] >= 11  # grew past the 6 positions it started with


@pytest.mark.slow
def test_embedded_solver_generates_and_stops():
    """The embedded model: chat-templated prompts, <|im_end|> is a stop token, k groups."""
    from sd_lib.models import EMBEDDED_SOLVER, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(EMBEDDED_SOLVER)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in stop_token_ids(tokenizer, model)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True)
               for q in ("Reply with one word: hello.", "What is 2 + 2?")]
    r = generate(model, tokenizer, prompts, k=2, temperature=1.0, max_new_tokens=24, seed=0,
                 progress=False)
    assert r.completion_ids_padded.shape[0] == 4 and r.prompt_index == [0, 0, 1, 1]
    for ids, trunc in zip(r.completion_ids, r.truncated):
        assert trunc or ids[-1] == im_end
        assert im_end not in ids[:-1]
    assert r.stats["tokens_per_s"] > 0
