"""Save and load LoRA adapters of diffusion models in diffusers' and kohya's files.

``save_lora_weights(peft_model, directory)`` writes what diffusers' ``load_lora_weights`` /
``load_lora_adapter`` read, with the adapter config in the header so alpha survives;
``load_lora_weights(model, path)`` reads such a file (with or without that config) or a
kohya-style one into a ``PeftModel``. Layouts and key rules: ``deltatune.diffusion.formats``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from deltatune import targeting
from deltatune.checkpoint.io import CheckpointError, atomic_save_tensors
from deltatune.config import ConfigError, LoraConfig
from deltatune.diffusion import formats
from deltatune.diffusion.formats import KOHYA_TAGS, METADATA_KEY, WEIGHT_NAME


def save_lora_weights(peft_model, directory: str | os.PathLike, prefix: str | None = "unet",
                      adapter_name: str | None = None, weight_name: str = WEIGHT_NAME,
                      layout: str = "diffusers") -> Path:
    """Write a LoRA adapter of ``peft_model`` as a diffusers (or kohya) safetensors file.

    Args:
        peft_model: a ``PeftModel`` around a diffusers model (UNet, transformer) or any module.
        directory: where ``weight_name`` goes (created if missing).
        prefix: the pipeline component the model is (``"unet"``, ``"transformer"``,
            ``"text_encoder"``); None writes bare module keys, as a model's ``save_lora_adapter``.
        adapter_name: which adapter (default: the active one).
        weight_name: file name, ``pytorch_lora_weights.safetensors`` by default (what
            diffusers' loaders look for in a directory).
        layout: ``"diffusers"`` (``unet.<module>.lora_A.weight`` keys, the config as
            ``lora_adapter_metadata`` in the header) or ``"kohya"`` (``lora_unet_<module>``
            names with ``lora_down`` / ``lora_up`` / ``alpha``; plain LoRA only).

    Returns:
        The path of the written file (written atomically).

    Raises:
        ValueError: unknown adapter or layout; a config these files cannot hold (another
            method, trained biases, modules_to_save, DoRA in kohya's layout), named.
    """
    name = adapter_name or peft_model.active_adapter
    if name not in peft_model.peft_config:
        raise ValueError(f"adapter {name!r} not found; have {sorted(peft_model.peft_config)}")
    config = peft_model.peft_config[name]
    _check_saveable(config, layout, prefix)
    tensors = peft_model.base_model.adapter_state(name)       # <module>.lora_A.weight -> tensor
    modules = list(dict.fromkeys(formats.module_of(k) for k in tensors))
    header = {"format": "pt"}
    if layout == "diffusers":
        keyed = {(f"{prefix}.{k}" if prefix else k): v for k, v in tensors.items()}
        header[METADATA_KEY] = formats.metadata_for(config.to_dict(), modules, prefix)
    else:
        keyed, alphas = {}, {}
        tag = KOHYA_TAGS[prefix][0]
        for module, layer in peft_model.base_model.adapter_layers():
            if name not in layer.held:
                continue
            if not hasattr(layer, "lora_A"):
                raise ValueError(f"kohya layout: {module} ({type(layer).__name__}) has no lora_A/lora_B factors")
            flat = tag + module.replace(".", "_")
            keyed[f"{flat}.lora_down.weight"] = layer.lora_A[name].weight
            keyed[f"{flat}.lora_up.weight"] = layer.lora_B[name].weight
            alphas[flat] = layer.scaling[name] * layer.r[name]   # kohya scales by alpha / r
            keyed[f"{flat}.alpha"] = torch.tensor(alphas[flat])
        header.update({"ss_network_module": "networks.lora", "ss_network_dim": str(config.r),
                       "ss_network_alpha": str(config.lora_alpha)})
    path = Path(directory) / weight_name
    atomic_save_tensors({k: v.detach().cpu() for k, v in keyed.items()}, path, metadata=header)
    return path


def _check_saveable(config, layout: str, prefix) -> None:
    if layout not in ("diffusers", "kohya"):
        raise ValueError(f"layout={layout!r}: expected 'diffusers' or 'kohya'")
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{config.peft_type.value} adapters have no diffusers/kohya LoRA file layout; LoRA only")
    if config.bias != "none" or config.modules_to_save:
        raise ValueError(f"bias={config.bias!r} / modules_to_save={config.modules_to_save!r}: diffusers' LoRA "
                         "files hold only LoRA factors; save with peft's format (save_pretrained) instead")
    if layout == "kohya" and (config.use_dora or prefix not in KOHYA_TAGS):
        raise ValueError(f"kohya layout: plain LoRA on one of {sorted(KOHYA_TAGS)} only "
                         f"(use_dora={config.use_dora}, prefix={prefix!r})")


def load_lora_weights(model: nn.Module, path: str | os.PathLike, prefix: str | None = "unet",
                      adapter_name: str = "default", is_trainable: bool = False):
    """Load a diffusers- or kohya-style LoRA file into ``model``; returns a ``PeftModel``.

    The outputs are those diffusers gives for the same file: its ``lora_adapter_metadata``
    config when present, else ``alpha = r`` per module for diffusers files and kohya's
    ``alpha`` tensors (scale ``alpha / r``) for kohya files.

    Args:
        model: the diffusers model (``UNet2DConditionModel``, ``UNet2DModel``,
            ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ...) or a ``PeftModel``
            around it (then the adapter is added beside the others, not activated).
        path: the ``.safetensors`` file, or a directory with ``pytorch_lora_weights.safetensors``.
        prefix: the component to take from a pipeline file (``"unet"``, ``"transformer"``,
            ``"text_encoder"``); keys of other components are skipped. None: bare module keys.
        adapter_name: the new adapter's name.
        is_trainable: keep the adapter trainable (default: inference mode, model in eval()).

    Raises:
        FileNotFoundError, CheckpointError: missing/unreadable file; a key that matches no
            module, a missing or misshapen factor (the message names the file and the key).
            ``model`` is left as it was.
    """
    from deltatune.peft_model import PeftModel

    existing = model if isinstance(model, PeftModel) else None
    inner = existing.get_base_model() if existing is not None else model
    modules = dict(targeting.iter_candidates(inner))
    found = formats.read_lora_file(path, prefix, modules)
    for module in found.modules():
        if module not in modules:
            key = next(k for k, v in found.file_keys.items() if formats.module_of(k) == module)
            raise CheckpointError(f"{found.path}: key {found.file_keys[key]!r} matches no module of the "
                                  f"model ({type(inner).__name__} has no {module!r})")
    try:
        config = LoraConfig(**formats.config_fields(found), inference_mode=not is_trainable)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{found.path}: {METADATA_KEY} does not give a LoRA config: {exc}") from None
    if existing is None:
        peft_model = PeftModel(model, config, adapter_name)
    else:
        peft_model = existing
        peft_model.add_adapter(adapter_name, config)
    try:
        _copy_strict(peft_model, adapter_name, found)
    except BaseException:
        peft_model._discard(adapter_name)
        if existing is not None:
            peft_model._refresh()
        raise
    if existing is not None:
        peft_model._refresh()
    elif not is_trainable:
        peft_model.eval()
    return peft_model


def _copy_strict(peft_model, adapter_name: str, found: formats.LoraFile) -> None:
    """Copy the file's factors into the adapter: every expected key present with its shape, no
    key left over; else nothing is copied and the error names the file's own key."""
    expected = peft_model.base_model.adapter_state(adapter_name)
    missing = [k for k in expected if k not in found.tensors]
    unused = [k for k in found.tensors if k not in expected]
    if unused:
        raise CheckpointError(f"{found.path}: key {found.file_keys[unused[0]]!r} matches nothing the adapter "
                              f"has ({len(unused)} such keys)")
    if missing:
        raise CheckpointError(f"{found.path}: no tensor for {missing[0]!r} ({len(missing)} missing); "
                              "the file lacks a factor of a module it adapts")
    for key, live in expected.items():
        if tuple(found.tensors[key].shape) != tuple(live.shape):
            raise CheckpointError(f"{found.path}: key {found.file_keys[key]!r} has shape "
                                  f"{tuple(found.tensors[key].shape)}, the adapter expects {tuple(live.shape)}")
    with torch.no_grad():
        for key, live in expected.items():
            live.copy_(found.tensors[key].to(device=live.device, dtype=live.dtype))


def is_lora_file(path: str | os.PathLike) -> bool:
    """True for a diffusers/kohya LoRA file, or a directory with ``pytorch_lora_weights.safetensors``
    and no peft ``adapter_config.json`` (``deltatune info`` picks its report by this)."""
    path = Path(path)
    if path.is_dir():
        return (path / WEIGHT_NAME).is_file() and not (path / "adapter_config.json").is_file()
    return path.is_file() and path.suffix == ".safetensors"


def lora_file_summary(path: str | os.PathLike) -> dict:
    """Facts about a diffusers/kohya LoRA file for ``deltatune info``: layout, components,
    modules, ranks, alphas and where they come from, parameters, size."""
    path = formats.resolve(path)
    tensors = formats.load_tensors(path)
    header = formats.read_header_metadata(path)
    kohya = formats.is_kohya(tensors)
    groups: dict[str, dict] = {}
    kohya_tags = [tag for tags in KOHYA_TAGS.values() for tag in tags]
    for key, t in tensors.items():
        if kohya:                      # lora_unet_<flat name>.lora_down.weight
            module, _, suffix = key.partition(".")
            component = next((tag.strip("_") for tag in kohya_tags if module.startswith(tag)), "other")
        else:                          # [unet.]<module>.lora_A.weight
            head, _, rest = key.partition(".")
            component, rest = (head, rest) if head in formats.COMPONENTS else ("(no prefix)", key)
            module = formats.module_of(rest)
            suffix = rest[len(module) + 1:]
        g = groups.setdefault(component, {"modules": set(), "ranks": set(), "alphas": set()})
        g["modules"].add(module)
        if suffix in ("lora_A.weight", "lora_down.weight"):
            g["ranks"].add(int(t.shape[0]))
        elif suffix == "alpha":
            g["alphas"].add(float(t.reshape(-1)[0]))
    meta = header.get(METADATA_KEY)
    alpha_source = ("kohya alpha tensors" if kohya else
                    f"{METADATA_KEY} in the header" if meta else
                    f"none: no {METADATA_KEY}, diffusers loads it with alpha = r (scale 1.0)")
    return {
        "file": str(path),
        "layout": "kohya" if kohya else "diffusers",
        "components": {c: {"modules": len(g["modules"]), "ranks": sorted(g["ranks"]),
                           "alphas": sorted(g["alphas"])} for c, g in groups.items()},
        "alpha_source": alpha_source,
        "metadata": formats.read_metadata(path, header, None) if meta else None,
        "parameters": sum(t.numel() for t in tensors.values()),
        "tensors": len(tensors),
        "file_bytes": path.stat().st_size,
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}),
    }


def summary_rows(info: dict) -> list[tuple[str, str]]:
    """``lora_file_summary`` as (label, value) rows for ``deltatune info``."""
    rows = [("file", info["file"]), ("layout", info["layout"])]
    for component, c in info["components"].items():
        alphas = f", alpha {'/'.join(f'{a:g}' for a in c['alphas'])}" if c["alphas"] else ""
        rows.append((f"component {component}", f"{c['modules']} modules, rank {'/'.join(map(str, c['ranks']))}"
                     + alphas))
    meta = info["metadata"] or {}
    alpha = {k: v for k, v in meta.items() if k.endswith(("lora_alpha", ".r")) or k == "r"}
    rows.append(("alpha from", info["alpha_source"] + (f" ({alpha})" if alpha else "")))
    rows.append(("parameters", f"{info['parameters']:,d} in {info['tensors']} tensors ({', '.join(info['dtypes'])})"))
    rows.append(("file size", f"{info['file_bytes']:,d} B"))
    return rows
