"""peft's adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``.

Pure file format: configs and tensors in, directories out, and back; this module never sees a
model. Keys in the file are ``base_model.model.<module path>.<suffix>`` where the suffix is what
the adapter layer reports (``lora_A.weight``, ``lora_embedding_B``, ...) without the adapter
name, exactly as peft writes them; callers pass and receive keys relative to the user's model
(``<module path>.<suffix>``), and ``to_file_keys`` / ``from_file_keys`` add or remove the prefix,
so saving and loading cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable

import torch

from deltatune import registry
from deltatune.checkpoint.io import CheckpointError, atomic_directory, atomic_save_tensors, load_tensors
from deltatune.config import CONFIG_NAME, PeftConfig

PREFIX = "base_model.model."
# Keys peft writes at the top level, without a prefix: the virtual tokens of prompt learning.
TOP_LEVEL_KEYS = ("prompt_embeddings",)
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # peft's ``safe_serialization=False`` file (torch.save)
# safetensors metadata key marking an adapter initialised by LoftQ: its factors belong to the 4-bit
# base LoftQ made (value: the loftq_config as JSON). peft and other loaders ignore it.
LOFTQ_METADATA = "deltatune_loftq_config"


def to_file_keys(tensors: dict[str, torch.Tensor], prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """Model-relative keys -> the keys peft writes (``prefix``, the config's ``file_key_prefix``;
    ``TOP_LEVEL_KEYS`` stay as they are)."""
    return {k if k in TOP_LEVEL_KEYS else prefix + k: v for k, v in tensors.items()}


def from_file_keys(tensors: dict[str, torch.Tensor], source, prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """File keys -> model-relative keys; a key without peft's prefix is an error naming it."""
    bad = sorted(k for k in tensors if not k.startswith(prefix) and k not in TOP_LEVEL_KEYS)
    if bad:
        raise CheckpointError(f"{source}: key {bad[0]!r} does not start with {prefix!r}; not a peft adapter file")
    return {k if k in TOP_LEVEL_KEYS else k[len(prefix):]: v for k, v in tensors.items()}


# -- configs -------------------------------------------------------------------------------------
def read_config(directory: str | os.PathLike) -> PeftConfig:
    """Read ``adapter_config.json`` from ``directory`` into the config its ``peft_type`` names
    (``PeftConfig.from_pretrained``: the config module owns its JSON).

    Raises:
        FileNotFoundError: no adapter_config.json in ``directory``.
        ConfigError: unreadable JSON, unknown ``peft_type``, or an unsupported field (the message
            names the file and the key).
    """
    return PeftConfig.from_pretrained(directory)


def write_config(directory: str | os.PathLike, config: PeftConfig, inference_mode: bool | None = None) -> None:
    """Write ``directory/adapter_config.json`` atomically (``inference_mode`` overrides the field)."""
    config.save_pretrained(directory, **({} if inference_mode is None else {"inference_mode": inference_mode}))


# -- directories ---------------------------------------------------------------------------------
def write_adapters(root: str | os.PathLike, adapters: dict[str, tuple[PeftConfig, dict[str, torch.Tensor]]],
                   metadata: dict[str, str] | None = None, safe_serialization: bool = True,
                   files: dict[str, str] | None = None) -> None:
    """Write adapters in peft's layout under ``root``, all at once.

    ``adapters`` maps a relative directory (``""`` for ``root`` itself, peft's place for the
    adapter named ``default``; an adapter's name for the others) to ``(config, tensors)`` with
    model-relative keys. The whole tree is assembled beside ``root`` and switched in atomically
    (``atomic_directory``), so weights and config always come from the same save.
    ``safe_serialization=False`` writes peft's ``adapter_model.bin`` (``torch.save``) instead of
    safetensors; ``files``: more text files for ``root`` (name -> content, e.g. ``README.md``).
    """
    owned = {CONFIG_NAME, WEIGHTS_NAME, PICKLE_WEIGHTS_NAME} if "" in adapters else set()
    owned |= {rel.split("/")[0] for rel in adapters if rel} | set(files or {})
    with atomic_directory(root, owned) as tmp:
        for rel, (config, tensors) in adapters.items():
            target = tmp / rel if rel else tmp
            target.mkdir(parents=True, exist_ok=True)
            config, marker = file_form(config)
            tensors = {k: v.detach().cpu() for k, v in to_file_keys(tensors, config.file_key_prefix).items()}
            if safe_serialization:
                atomic_save_tensors(tensors, target / WEIGHTS_NAME, metadata={**(metadata or {"format": "pt"}), **marker})
            else:
                torch.save({k: v.contiguous() for k, v in tensors.items()}, target / PICKLE_WEIGHTS_NAME)
            write_config(target, config, inference_mode=True)  # as peft: loading decides trainability
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")


def file_form(config: PeftConfig) -> tuple[PeftConfig, dict[str, str]]:
    """``(config as written, extra safetensors metadata)``.

    A LoftQ adapter (``init_lora_weights="loftq"``) is written as plain LoRA
    (``init_lora_weights: true``, as peft's LoftQ example saves it), so that no loader redoes
    LoftQ on load; its ``loftq_config`` goes into the weights file's metadata instead
    (``LOFTQ_METADATA``), which ``loftq_of`` reads back.
    """
    if getattr(config, "init_lora_weights", None) != "loftq":
        return config, {}
    plain = dataclasses.replace(config, init_lora_weights=True, loftq_config={})
    return plain, {LOFTQ_METADATA: json.dumps(config.loftq_config, sort_keys=True)}


def loftq_of(directory: str | os.PathLike, config: PeftConfig) -> dict | None:
    """The ``loftq_config`` an adapter directory was initialised with, or None.

    Read from the weights file's metadata (deltatune's files) or from the config itself
    (``init_lora_weights: "loftq"``, as peft writes unless told otherwise).
    """
    if getattr(config, "init_lora_weights", None) == "loftq":
        return dict(config.loftq_config)
    path = Path(directory) / WEIGHTS_NAME
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as fh:
            value = (fh.metadata() or {}).get(LOFTQ_METADATA)
    except Exception:  # noqa: BLE001 - an unreadable file is reported by read_adapter, not here
        return None
    return json.loads(value) if value else None


def read_adapter(directory: str | os.PathLike, config: PeftConfig | None = None):
    """Read and check an adapter directory: ``(config, tensors)`` with model-relative keys.

    Raises:
        FileNotFoundError: the directory or a file is missing (named).
        ConfigError / CheckpointError: bad config or weights file (named).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: adapter directory not found")
    config = config or read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.exists() and (directory / PICKLE_WEIGHTS_NAME).exists():
        weights = directory / PICKLE_WEIGHTS_NAME
        return config, from_file_keys(_load_pickle_tensors(weights), weights, config.file_key_prefix)
    return config, from_file_keys(load_tensors(weights), weights, config.file_key_prefix)


def _load_pickle_tensors(path: Path) -> dict[str, torch.Tensor]:
    """peft's ``adapter_model.bin``, read with ``weights_only=True`` (tensors only: no code runs)."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling raises many types
        raise CheckpointError(f"{path}: not a readable torch weights file ({exc})") from exc
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return tensors


def check_tensors(expected: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor], source) -> None:
    """Strict key and shape check of ``tensors`` against ``expected`` (key -> shape).

    Raises:
        CheckpointError: the first missing key, unexpected key or wrong shape, named with the file.
    """
    where = Path(source) / WEIGHTS_NAME
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing key {PREFIX + missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                              + " — the adapter does not match this base model or config")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected key {PREFIX + unexpected[0]!r}"
                              + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
                              + " — the adapter was made for a different base model or config")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise CheckpointError(f"{where}: key {PREFIX + key!r} has shape {tuple(tensors[key].shape)}, the "
                                  f"model expects {tuple(shape)} — the adapter was made for another base")


def drop_peft_artefacts(tensors: dict[str, torch.Tensor], saved_modules: Iterable[str]) -> dict[str, torch.Tensor]:
    """Remove keys peft writes by accident around ``modules_to_save`` with ``bias="all"``.

    peft's bias filter also catches the frozen original (``X.original_module.bias``) and repeats
    the trained copy's bias as ``X.modules_to_save.bias``; the copy itself is saved as ``X.bias``.
    ``saved_modules`` are the model-relative names of the modules-to-save.
    """
    noise = tuple(f"{m}.{part}." for m in saved_modules for part in ("original_module", "modules_to_save"))
    return {k: v for k, v in tensors.items() if not k.startswith(noise)} if noise else tensors


def adapter_summary(directory: str | os.PathLike) -> dict:
    """Facts about a saved adapter, for ``deltatune info``: method, targets, rank, params, size."""
    config, tensors = read_adapter(directory)
    path = Path(directory) / WEIGHTS_NAME
    # "<module>.lora_A.weight" -> "<module>", "<module>.adapter_up.bias" -> "<module>"; keys
    # without an adapter container (modules_to_save copies, trained biases) are not adapted modules.
    containers = registry.method_for(config.peft_type.value).container_names()
    modules = set()
    for key in tensors:
        parts = key.split(".")
        cut = next((i for i, part in enumerate(parts) if part in containers), None)
        if cut:
            modules.add(".".join(parts[:cut]))
    return {
        "directory": str(directory),
        "peft_type": config.peft_type.value,
        "task_type": config.task_type,
        "base_model": config.base_model_name_or_path,
        "target_modules": getattr(config, "target_modules", None),
        "r": getattr(config, "r", None),
        "virtual_tokens": getattr(config, "num_virtual_tokens", None),
        "lora_alpha": getattr(config, "lora_alpha", None),
        "modules": len(modules),
        "parameters": sum(t.numel() for t in tensors.values()),
        "tensors": len(tensors),
        "file_bytes": path.stat().st_size,
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
    }
