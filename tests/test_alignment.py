"""Tests for sd_lib.alignment on a tiny random LlamaForCausalLM (no downloads)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sd_lib.advantages import token_advantages
from sd_lib.alignment import (EmaAdapter, completion_hidden, completion_logps, output_weight,
                              pack_batch, pack_student_teacher, selective_log_softmax,
                              student_teacher_hidden, student_teacher_logps, teacher_mode)
from sd_lib.losses import chunked_sd_loss

PAD = 0
STUDENT_PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
TEACHER_PROMPTS = [[5, 6, 7, 40, 41], [8, 9, 10, 11, 12, 13, 42], [14, 43, 44, 45, 46, 47, 48, 49]]
COMPLETIONS = [[20, 21, 22, 23], [24], [25, 26, 27, 28, 29, 30, 31]]


def tiny_llama(seed=0, attn="sdpa", dropout=0.0, tie=False):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=128,
                         attention_dropout=dropout, tie_word_embeddings=tie, pad_token_id=PAD)
    config._attn_implementation = attn
    return LlamaForCausalLM(config)


def tiny_lora(seed=0, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(seed, dropout=dropout)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def test_pack_batch_layout():
    """Checks against a hand-written layout: left-padded prompts, right-padded completions,
    positions counting real tokens only."""
    batch = pack_batch([[1, 2], [3]], [[4], [5, 6]], pad_token_id=PAD)
    assert batch.input_ids.tolist() == [[1, 2, 4, 0], [0, 3, 5, 6]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 2], [0, 0, 1, 2]]
    assert batch.completion_ids.tolist() == [[4, 0], [5, 6]]
    assert batch.completion_mask.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    assert batch.prompt_width == 2
    assert batch.shared_prefix == 0
    with pytest.raises(ValueError, match="prompt needs"):
        pack_batch([[]], [[1]], pad_token_id=PAD)
    with pytest.raises(ValueError, match="student prompts"):
        pack_student_teacher([[1]], [[1], [2]], [[3]], pad_token_id=PAD)


def test_shared_prefix_by_hand():
    """Checks `shared_prefix` against hand-counted prefixes: the common start of all prompts,
    always shorter than the shortest prompt (its last token must stay the row's own)."""
    def shared(prompts):
        return pack_batch(prompts, [[9]] * len(prompts), pad_token_id=PAD).shared_prefix

    assert shared([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared([[1, 2, 3], [1, 2, 3]]) == 2  # identical prompts: all but the last token
    assert shared([[1, 2, 3], [4, 2, 3]]) == 0
    assert shared([[1, 2, 3]]) == 2
    assert shared([[7], [7, 8]]) == 0


SHARED_PROMPTS = [[5, 6, 7, 8, 1, 2], [5, 6, 7, 8, 3], [5, 6, 7, 8, 4, 4, 4, 4], [5, 6, 7, 8, 9]]
SHARED_COMPLETIONS = [[20, 21, 22], [23], [24, 25], [26, 27, 28, 29, 30]]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_shared_prefix_forward_matches_full_rows(arch):
    """Checks `completion_hidden` and `completion_logps` with `share_prefix=True` (prefix run once,
    its cache broadcast) against every row run in full (`share_prefix=False`): hidden states,
    log-probs and every LoRA gradient
    in float64 (to 1e-6 relative: rotary tables are built in float32 from differently shaped
    position tensors), unequal prompt and completion lengths; and the teacher side without grad."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3Config, Qwen3ForCausalLM

    import sd_lib.alignment as alignment

    torch.manual_seed(0)
    if arch == "qwen3":
        base = Qwen3ForCausalLM(Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                            vocab_size=128, pad_token_id=PAD))
    else:
        base = tiny_llama()
    model = get_peft_model(base.double(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                     target_modules=["q_proj", "v_proj", "up_proj"]))
    batch = pack_batch(SHARED_PROMPTS, SHARED_COMPLETIONS, pad_token_id=PAD)
    assert batch.shared_prefix == 4

    def run(share):
        model.zero_grad()
        hidden = completion_hidden(model, batch, share_prefix=share)
        logps = completion_logps(model, batch, share_prefix=share)
        ((hidden ** 2).sum() + logps.sum()).backward()
        with teacher_mode(model, "base"):
            teacher = completion_hidden(model, batch, share_prefix=share)
        return (hidden.detach(), logps.detach(), teacher,
                {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

    calls = []
    shared_forward = alignment._prefix_shared_forward
    alignment._prefix_shared_forward = lambda *a: (calls.append(1), shared_forward(*a))[1]
    try:
        want, want_logps, want_teacher, want_grads = run(False)
        assert calls == []
        got, got_logps, got_teacher, got_grads = run(True)
        assert calls == [1, 1, 1]  # student hidden, student log-probs, teacher
    finally:
        alignment._prefix_shared_forward = shared_forward
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(got_logps, want_logps, atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(got_teacher, want_teacher, atol=1e-9, rtol=1e-6)
    for name in want_grads:
        scale = want_grads[name].abs().max()
        torch.testing.assert_close(got_grads[name] / scale, want_grads[name] / scale, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_selective_log_softmax_matches_trl_and_naive(dtype):
    """Checks against the naive log_softmax+gather and TRL 1.15 `trl.trainer.utils.selective_log_softmax`."""
    from trl.trainer.utils import selective_log_softmax as trl_selective

    logits = (torch.randn(3, 5, 17, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    index = torch.randint(0, 17, (3, 5), generator=torch.Generator().manual_seed(1))
    got = selective_log_softmax(logits, index)
    naive = logits.log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype != torch.bfloat16 else dict(atol=0.0, rtol=0.0)
    torch.testing.assert_close(got, naive, **tol)
    torch.testing.assert_close(got, trl_selective(logits, index), **tol)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_batch_matches_each_sequence_alone(attn):
    """Checks alignment against running every sequence alone, unpadded (within 1e-5), for
    unequal prompt and completion lengths; and the hidden-state path (hidden @ W^T) against
    the logits path."""
    model = tiny_llama(attn=attn).eval()
    batch = pack_batch(STUDENT_PROMPTS, COMPLETIONS, pad_token_id=PAD)
    with torch.no_grad():
        padded = completion_logps(model, batch)
        hidden_logps = selective_log_softmax(completion_hidden(model, batch) @ output_weight(model).T,
                                             batch.completion_ids)
        for row, (prompt, completion) in enumerate(zip(STUDENT_PROMPTS, COMPLETIONS)):
            alone = pack_batch([prompt], [completion], pad_token_id=PAD)
            assert alone.attention_mask.all()  # really unpadded
            logits = model(input_ids=alone.input_ids).logits[0, len(prompt) - 1: -1]  # plain forward
            want = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)
            torch.testing.assert_close(padded[row, :len(completion)], want, atol=1e-5, rtol=0)
            assert (padded[row, len(completion):] == 0).all()
    torch.testing.assert_close(hidden_logps * batch.completion_mask, padded, atol=1e-5, rtol=0)


def test_identical_contexts_give_exactly_zero_advantages():
    """Checks the alignment invariant: same prompt for student and teacher => A_t == 0 exactly
    at every completion position (and the hidden states equal bitwise), unequal lengths; for a
    plain model ("live" teacher) and a fresh LoRA model ("base" teacher, adapter B = 0)."""
    for model, kind in [(tiny_llama().eval(), "live"), (tiny_lora().eval(), "base")]:
        student, teacher = pack_student_teacher(STUDENT_PROMPTS, STUDENT_PROMPTS, COMPLETIONS, pad_token_id=PAD)
        logps, teacher_logps, mask = student_teacher_logps(model, student, teacher, teacher_kind=kind)
        adv = token_advantages(teacher_logps, logps, mask)
        assert torch.equal(adv, torch.zeros_like(adv)), kind
        assert mask.sum().item() == sum(map(len, COMPLETIONS))
        h_s, h_t, _, _ = student_teacher_hidden(model, student, teacher, teacher_kind=kind)
        assert torch.equal(h_s, h_t), kind
        # different contexts really change the teacher (the test is not vacuous)
        student, teacher = pack_student_teacher(STUDENT_PROMPTS, TEACHER_PROMPTS, COMPLETIONS, pad_token_id=PAD)
        _, teacher_logps, _ = student_teacher_logps(model, student, teacher, teacher_kind=kind)
        assert (token_advantages(teacher_logps, logps, mask).abs() > 0).sum() == mask.sum()


def test_base_teacher_gets_no_gradient_and_stays_frozen():
    """Checks on a peft-LoRA tiny Llama (dropout on, train mode): the "base" teacher runs in
    eval mode without gradient, the train flags come back, one AdamW step on the chunked SD
    loss changes the LoRA weights but no base weight, and the base teacher is unchanged."""
    model = tiny_lora(dropout=0.1).train()
    student, teacher = pack_student_teacher(STUDENT_PROMPTS, TEACHER_PROMPTS, COMPLETIONS, pad_token_id=PAD)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with teacher_mode(model, "base"):
        assert not model.training and not torch.is_grad_enabled()
        teacher_before = completion_logps(model, teacher)
    assert model.training and all(m.training for m in model.modules())

    h_s, h_t, weight, mask = student_teacher_hidden(model, student, teacher, teacher_kind="base")
    assert h_s.requires_grad and not h_t.requires_grad and not weight.requires_grad
    loss = chunked_sd_loss(h_s, h_t, weight, mask, divergence="forward_kl")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss.backward()
    optimizer.step()

    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if "lora_" not in n)
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_" in n)
    with teacher_mode(model, "base"):
        assert torch.equal(completion_logps(model, teacher), teacher_before)
    assert model.training


def test_teacher_mode_dropout_off_kinds_and_errors():
    """Checks teacher_mode: dropout off (deterministic in a train-mode model), mixed per-module
    flags restored, and ValueErrors naming the kind."""
    model = tiny_llama(dropout=0.5).train()
    model.model.layers[0].eval()  # a deliberately mixed state must survive
    batch = pack_batch(STUDENT_PROMPTS, COMPLETIONS, pad_token_id=PAD)
    with teacher_mode(model, "live"):
        first, second = completion_logps(model, batch), completion_logps(model, batch)
    assert torch.equal(first, second) and not first.requires_grad
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    with pytest.raises(ValueError, match="kind='frozen'"):
        with teacher_mode(model, "frozen"):
            pass
    with pytest.raises(ValueError, match="kind='base' needs a peft model"):
        with teacher_mode(model, "base"):
            pass
    with pytest.raises(ValueError, match="kind='ema' needs ema"):
        with teacher_mode(model, "ema"):
            pass


def test_ema_adapter_update_swap_and_teacher():
    """Checks EmaAdapter by hand (theta_ema = d theta_ema + (1-d) theta), swap-in/restore, and that
    an EMA teacher with decay 1 (the initial adapter, B = 0) equals the base teacher."""
    model = tiny_lora().eval()
    ema = EmaAdapter(model)
    name, param = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    start = param.detach().clone()
    with torch.no_grad():
        param.add_(1.0)
    ema.update(model, decay=0.75)
    torch.testing.assert_close(ema.shadow[name], start + 0.25)
    with ema.swapped_in(model):
        torch.testing.assert_close(param.detach(), start + 0.25)
    torch.testing.assert_close(param.detach(), start + 1.0)

    frozen = EmaAdapter(model)  # shadow = current (B = 1 everywhere for one matrix)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                frozen.shadow[n].zero_()  # emulate an EMA that never moved from init
        param.add_(3.0)
    frozen.update(model, decay=1.0)
    student, teacher = pack_student_teacher(STUDENT_PROMPTS, TEACHER_PROMPTS, COMPLETIONS, pad_token_id=PAD)
    _, via_ema, _ = student_teacher_logps(model, student, teacher, teacher_kind="ema", ema=frozen)
    _, via_base, _ = student_teacher_logps(model, student, teacher, teacher_kind="base")
    torch.testing.assert_close(via_ema, via_base, atol=1e-6, rtol=0)
    torch.testing.assert_close(param.detach(), start + 4.0)  # live weights restored


def test_output_weight_tied_and_peft():
    """Checks output_weight against model.get_output_embeddings().weight: tied to the input
    embedding when tie_word_embeddings, and reachable through a peft wrapper."""
    tied = tiny_llama(tie=True)
    assert output_weight(tied).data_ptr() == tied.get_input_embeddings().weight.data_ptr()
    lora = tiny_lora()
    assert output_weight(lora) is lora.get_base_model().lm_head.weight
