"""Tests for sd_lib.fused_mlp: the one-node LoRA SwiGLU against plain autograd and peft."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model

from sd_lib.fused_mlp import LoRASwiGLU, Projection, fused_swiglu, lora_swiglu, swiglu_mlps

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _naive(x, gate, up, down):
    def proj(h, p):
        y = F.linear(h, p.weight)
        return y if p.lora_A is None else y + F.linear(F.linear(h, p.lora_A), p.lora_B) * p.scaling
    return proj(F.silu(proj(x, gate)) * proj(x, up), down)


def _projection(out, inp, *, lora, weight_grad=False, r=3, scaling=0.7):
    w = torch.randn(out, inp, dtype=torch.float64, requires_grad=weight_grad)
    if not lora:
        return Projection(w)
    return Projection(w, torch.randn(r, inp, dtype=torch.float64, requires_grad=True),
                      torch.randn(out, r, dtype=torch.float64, requires_grad=True), scaling)


@pytest.mark.parametrize("case", ["all_lora", "no_lora_on_up", "weights_trainable", "x_frozen"])
def test_function_matches_autograd(case):
    """Checks LoRASwiGLU's output and every gradient (x, W, A, B of the three projections)
    against plain autograd through F.linear / F.silu, in float64 (to 1e-10)."""
    torch.manual_seed(0)
    hidden, inter = 6, 10
    gate = _projection(inter, hidden, lora=True, weight_grad=case == "weights_trainable")
    up = _projection(inter, hidden, lora=case != "no_lora_on_up", weight_grad=case == "weights_trainable")
    down = _projection(hidden, inter, lora=True, weight_grad=case == "weights_trainable", scaling=2.0)
    x = torch.randn(2, 5, hidden, dtype=torch.float64, requires_grad=case != "x_frozen")
    dy = torch.randn(2, 5, hidden, dtype=torch.float64)
    leaves = [t for t in (x, *(getattr(p, f) for p in (gate, up, down) for f in ("weight", "lora_A", "lora_B")))
              if t is not None and t.requires_grad]
    got = lora_swiglu(x, gate, up, down)
    want = _naive(x, gate, up, down)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    got_grads = torch.autograd.grad(got, leaves, dy)
    want_grads = torch.autograd.grad(want, leaves, dy)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_gradcheck():
    """Checks the hand-written backward with torch.autograd.gradcheck (finite differences)."""
    torch.manual_seed(1)
    gate, up, down = (_projection(5, 4, lora=True), _projection(5, 4, lora=True), _projection(4, 5, lora=True))
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    args = (x, gate.weight, gate.lora_A, gate.lora_B, up.weight, up.lora_A, up.lora_B, down.weight, down.lora_A,
            down.lora_B, (gate.scaling, up.scaling, down.scaling))
    assert torch.autograd.gradcheck(LoRASwiGLU.apply, args)


def _tiny_peft(arch, *, dropout=0.0, dtype=torch.float32):
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    model = (transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **common)) if arch == "qwen3"
             else transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))).to(dtype)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS,
                                            init_lora_weights=False))  # B != 0: the adapter matters


def _logits_and_grads(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    (logits.float() ** 2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_patched_model_matches_peft(arch):
    """Checks a peft LoRA model's logits and every LoRA gradient with the MLPs patched against
    the same model unpatched (fp32, 1e-5), and that leaving the block restores the class forward."""
    model = _tiny_peft(arch)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    want_logits, want = _logits_and_grads(model, ids)
    with fused_swiglu(model) as n:
        assert n == 2 == len(swiglu_mlps(model))
        calls = []
        original = LoRASwiGLU.apply
        LoRASwiGLU.apply = lambda *a: (calls.append(1), original(*a))[1]
        try:
            got_logits, got = _logits_and_grads(model, ids)
        finally:
            LoRASwiGLU.apply = original
    assert len(calls) == 2
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=1e-5)
    assert got.keys() == want.keys() and any("mlp" in k for k in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)
    assert all("forward" not in m.__dict__ for m in swiglu_mlps(model))


def test_bf16_model_with_fp32_adapters_matches_peft():
    """Checks the mixed-precision case of the paper profile (bf16 model, peft's fp32 adapters):
    the fused path is taken and its logits and LoRA gradients match peft's within bf16 rounding."""
    model = _tiny_peft("llama", dtype=torch.bfloat16)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    want_logits, want = _logits_and_grads(model, ids)
    calls = []
    original = LoRASwiGLU.apply
    LoRASwiGLU.apply = lambda *a: (calls.append(1), original(*a))[1]
    try:
        with fused_swiglu(model):
            got_logits, got = _logits_and_grads(model, ids)
    finally:
        LoRASwiGLU.apply = original
    assert len(calls) == 2
    torch.testing.assert_close(got_logits, want_logits, atol=2e-2, rtol=2e-2)
    for name in want:
        scale = want[name].abs().max()
        torch.testing.assert_close(got[name] / scale, want[name] / scale, atol=3e-2, rtol=0, msg=name)


def _saved_bytes(model, ids):
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return sum(seen.values())


def test_saves_two_intermediate_tensors_fewer_per_layer():
    """Checks the memory claim: per layer, the patched MLP keeps two (N, I) tensors fewer than
    peft's (silu(g) and the product), counted over the storages autograd saves."""
    model = _tiny_peft("llama")
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    plain = _saved_bytes(model, ids)
    with fused_swiglu(model):
        fused = _saved_bytes(model, ids)
    n_tokens, inter, layers = 3 * 9, 80, 2
    assert plain - fused == 2 * n_tokens * inter * 4 * layers


@pytest.mark.parametrize("case", ["no_grad", "adapter_disabled", "lora_dropout"])
def test_falls_back_where_it_does_not_apply(case):
    """Checks that the module's own forward runs (no LoRASwiGLU node, same output bit for bit)
    without gradient (sampler, teacher), with the adapter disabled (the base teacher) and with
    active LoRA dropout."""
    import contextlib

    model = _tiny_peft("llama", dropout=0.1 if case == "lora_dropout" else 0.0)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))

    def run():
        with contextlib.ExitStack() as stack:
            if case == "no_grad":
                stack.enter_context(torch.no_grad())
            if case == "adapter_disabled":
                stack.enter_context(model.disable_adapter())
            torch.manual_seed(5)  # the same dropout masks
            return model(input_ids=ids).logits

    want = run()
    original = LoRASwiGLU.apply
    LoRASwiGLU.apply = lambda *a: pytest.fail("fused path taken")
    try:
        with fused_swiglu(model) as n:
            assert n == 2
            got = run()
    finally:
        LoRASwiGLU.apply = original
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_nesting_and_disabled():
    """Checks that `enabled=False` (or unsloth loaded) patches nothing and a nested block leaves
    the outer patch."""
    import sys

    model = _tiny_peft("llama")
    with fused_swiglu(model, enabled=False) as n:
        assert n == 0
    sys.modules["unsloth"] = object()
    try:
        with fused_swiglu(model) as n:
            assert n == 0
    finally:
        del sys.modules["unsloth"]
    with fused_swiglu(model) as outer:
        with fused_swiglu(model) as inner:
            assert (outer, inner) == (2, 0)
        assert all("forward" in m.__dict__ for m in swiglu_mlps(model))
    assert all("forward" not in m.__dict__ for m in swiglu_mlps(model))
