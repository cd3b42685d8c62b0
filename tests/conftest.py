"""Shared fixtures: the embedded tokenizer and tiny randomly initialised solvers built from it."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from sd_lib.models import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer("embedded:SmolLM2-135M-Instruct")
    return tok


def _save_tiny(path, tokenizer, arch: str):
    """A 2-layer random model of `arch` with the embedded tokenizer, saved as a local folder."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, max_position_embeddings=2048)
    if arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_solver(tmp_path_factory, embedded_tokenizer):
    """Folder of a tiny random Llama solver (the embedded model's architecture family)."""
    return _save_tiny(tmp_path_factory.mktemp("tiny_llama"), embedded_tokenizer, "llama")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory, embedded_tokenizer):
    """Folder of a tiny random model of the Qwen3 architecture (the paper's solver family)."""
    return _save_tiny(tmp_path_factory.mktemp("tiny_qwen3"), embedded_tokenizer, "qwen3")
