"""peft's adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module path>.<suffix>`` where the suffix is what the adapter layer
reports (``lora_A.weight``, ``lora_embedding_B``, ...) without the adapter name, exactly as peft
writes them. The same key map is used to save and to load, so the two cannot drift apart.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from deltatune.checkpoint.io import CheckpointError, atomic_save_tensors, atomic_write_json, load_tensors
from deltatune.config import PeftConfig, load_config
from deltatune import registry

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
# Embedding layer names for which peft also saves the base weight when they are targeted
# (its ``save_embedding_layers="auto"``), so resized vocabularies travel with the adapter.
EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def adapter_key_map(tuner, adapter_name: str, config: PeftConfig) -> dict[str, torch.Tensor]:
    """Saved key -> live tensor for adapter ``adapter_name`` (the tensors themselves, not copies)."""
    from deltatune.peft_model import bias_parameters

    out: dict[str, torch.Tensor] = {}
    for name, layer in tuner.adapter_layers():
        for suffix, p in layer.adapter_parameters(adapter_name):
            out[f"{PREFIX}{name}.{suffix}"] = p
    for pname, p in bias_parameters(tuner, adapter_name, getattr(config, "bias", "none")).items():
        out[f"{PREFIX}{pname}"] = p
    out.update(_embedding_base_weights(tuner, config))
    return out


def _embedding_base_weights(tuner, config) -> dict[str, torch.Tensor]:
    targets = getattr(config, "target_modules", None)
    if not isinstance(targets, list) or not any(e in targets for e in EMBEDDING_NAMES):
        return {}
    from deltatune.methods.base import ModulesToSaveWrapper

    out = {}
    for name, layer in tuner.adapter_layers():
        if isinstance(layer, ModulesToSaveWrapper):
            continue  # its trained copy is saved whole already
        if name.rsplit(".", 1)[-1] in EMBEDDING_NAMES and hasattr(layer.get_base_layer(), "weight"):
            out[f"{PREFIX}{name}.base_layer.weight"] = layer.get_base_layer().weight
    return out


def save_adapter(peft_model, adapter_name: str, directory: str | os.PathLike) -> None:
    """Write adapter ``adapter_name`` of ``peft_model`` into ``directory`` (atomically, file by file)."""
    config = peft_model.peft_config[adapter_name]
    tensors = {k: v.detach().cpu() for k, v in adapter_key_map(peft_model.base_model, adapter_name, config).items()}
    Path(directory).mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(tensors, Path(directory) / WEIGHTS_NAME, metadata={"format": "pt"})
    data = config.to_dict()
    data["inference_mode"] = True  # peft writes files for inference; loading decides trainability
    atomic_write_json(Path(directory) / CONFIG_NAME, data)


def read_adapter(directory: str | os.PathLike, config: PeftConfig | None = None):
    """Read and check an adapter directory: ``(config, tensors)``; nothing is applied yet.

    Raises:
        FileNotFoundError: the directory or a file is missing (named).
        ConfigError / CheckpointError: bad config or weights file (named).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: adapter directory not found")
    config = config or load_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.exists() and (directory / "adapter_model.bin").exists():
        raise CheckpointError(f"{directory / 'adapter_model.bin'}: pickle weights are not loaded (unsafe); "
                              "re-save the adapter with safetensors")
    return config, load_tensors(weights)


def load_adapter_weights(tuner, adapter_name: str, config: PeftConfig, tensors: dict[str, torch.Tensor],
                         source) -> None:
    """Copy ``tensors`` into adapter ``adapter_name``, strictly.

    Every expected key must be present with the same shape, and every key in the file must be
    used; otherwise a CheckpointError names the key and the file, and nothing is copied.
    """
    expected = adapter_key_map(tuner, adapter_name, config)
    where = Path(source) / WEIGHTS_NAME
    tensors = drop_peft_artefacts(tensors, tuner)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{where}: missing key {missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                              + " — the adapter does not match this base model or config")
    if unexpected:
        raise CheckpointError(f"{where}: unexpected key {unexpected[0]!r}"
                              + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
                              + " — the adapter was made for a different base model or config")
    for key, live in expected.items():
        if tuple(tensors[key].shape) != tuple(live.shape):
            raise CheckpointError(f"{where}: key {key!r} has shape {tuple(tensors[key].shape)}, the model "
                                  f"expects {tuple(live.shape)} — the adapter was made for another base")
    with torch.no_grad():
        for key, live in expected.items():
            live.copy_(tensors[key].to(device=live.device, dtype=live.dtype))


def drop_peft_artefacts(tensors: dict[str, torch.Tensor], tuner) -> dict[str, torch.Tensor]:
    """Remove keys peft writes by accident around ``modules_to_save`` with ``bias="all"``.

    peft's bias filter also catches the frozen original (``X.original_module.bias``) and repeats
    the trained copy's bias as ``X.modules_to_save.bias``; the copy itself is saved as ``X.bias``.
    """
    from deltatune.methods.base import ModulesToSaveWrapper

    wrappers = [name for name, layer in tuner.adapter_layers() if isinstance(layer, ModulesToSaveWrapper)]
    noise = tuple(f"{PREFIX}{w}.{part}." for w in wrappers for part in ("original_module", "modules_to_save"))
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
        parts = key[len(PREFIX):].split(".")
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
        "lora_alpha": getattr(config, "lora_alpha", None),
        "modules": len(modules),
        "parameters": sum(t.numel() for t in tensors.values()),
        "tensors": len(tensors),
        "file_bytes": path.stat().st_size,
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
    }
