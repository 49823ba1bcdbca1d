"""The LoRA files of the diffusion world, as tensors and dicts (no model here).

Two layouts are read and written:

- **diffusers** (``pytorch_lora_weights.safetensors``): peft's key suffixes under a component
  prefix, ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (DoRA adds
  ``.lora_magnitude_vector``), and the adapter config as JSON in the safetensors header under
  ``lora_adapter_metadata``. Pipelines write that JSON with prefixed keys (``{"unet.r": 4,
  "unet.lora_alpha": 8, ...}``); a model's own ``save_lora_adapter`` writes them bare. Without
  the metadata diffusers builds ``alpha = r`` for every module (scale 1.0), which silently
  changes an adapter trained with ``alpha != r``.
- **kohya** (sd-scripts and the UIs that read its files): one flat name per module, the
  module path with ``_`` for ``.`` behind a component tag (``lora_unet_down_blocks_0_..._to_q``),
  then ``.lora_down.weight`` (= A), ``.lora_up.weight`` (= B) and ``.alpha`` (a scalar tensor;
  the scale is ``alpha / r``; no alpha means ``alpha = r``).

Everything is converted to one neutral form: model-relative peft keys
(``<module>.lora_A.weight``), a rank and an alpha per module, and for error messages the file
key each tensor came from.
"""
from __future__ import annotations

import collections
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltatune.checkpoint.io import CheckpointError, load_tensors

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"

# Component prefix (diffusers' attribute names) -> kohya's tags for it.
KOHYA_TAGS = {
    "unet": ("lora_unet_",),
    "text_encoder": ("lora_te_", "lora_te1_"),
    "text_encoder_2": ("lora_te2_",),
    "transformer": ("lora_transformer_",),
}
# Other components a pipeline file may hold beside the one being loaded (skipped, not errors).
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "controlnet")
_KOHYA_SUFFIX = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
# Config fields that change what the weights compute; the rest of a metadata dict is ignored.
_MATH_FIELDS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora")


@dataclass
class LoraFile:
    """One component's LoRA from a file, in model-relative peft keys.

    Attributes:
        path: the safetensors file.
        layout: ``"diffusers"`` or ``"kohya"``.
        tensors: ``<module>.lora_A.weight`` -> tensor (and ``lora_B``, ``lora_magnitude_vector``).
        file_keys: each entry of ``tensors`` -> the key it has in the file (for messages).
        alphas: module -> alpha, where the file says (kohya ``.alpha``); empty for diffusers.
        metadata: the config dict from ``lora_adapter_metadata`` (prefix removed), or None.
        skipped: file keys of other components (a pipeline file's text encoder, ...).
    """

    path: Path
    layout: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    file_keys: dict[str, str] = field(default_factory=dict)
    alphas: dict[str, float] = field(default_factory=dict)
    metadata: dict | None = None
    skipped: list[str] = field(default_factory=list)

    def modules(self) -> list[str]:
        """Module paths the file adapts, in file order."""
        return list(dict.fromkeys(module_of(k) for k in self.tensors))

    def ranks(self) -> dict[str, int]:
        """Module -> rank, read from the A factors' first dimension."""
        return {module_of(k): int(t.shape[0]) for k, t in self.tensors.items() if k.endswith(".lora_A.weight")}


def module_of(key: str) -> str:
    """``down.to_q.lora_A.weight`` -> ``down.to_q`` (everything before the ``.lora_`` part)."""
    return key.split(".lora_", 1)[0]


def resolve(path: str | os.PathLike) -> Path:
    """A LoRA file path: the file itself, or ``pytorch_lora_weights.safetensors`` in a directory.

    Raises:
        FileNotFoundError: nothing there (the message names the path).
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: LoRA file not found")
    return path


def read_header_metadata(path: Path) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (string -> string), ``{}`` when absent."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises several types for a bad header
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def read_metadata(path: Path, header: dict[str, str], prefix: str | None) -> dict | None:
    """The adapter config in ``lora_adapter_metadata``, keys stripped of ``prefix.``; None if absent.

    Raises:
        CheckpointError: the entry is not a JSON object (named with the file).
    """
    raw = header.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: header entry {METADATA_KEY!r} is not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: header entry {METADATA_KEY!r} is not a JSON object")
    if prefix:
        data = {k[len(prefix) + 1:]: v for k, v in data.items() if k.startswith(prefix + ".")}
    return data or None


def is_kohya(keys) -> bool:
    """True for kohya-style keys (``lora_unet_...lora_down.weight``)."""
    return any(k.startswith("lora_") and (".lora_down." in k or ".lora_up." in k) for k in keys)


def read_lora_file(path: str | os.PathLike, prefix: str | None, module_names) -> LoraFile:
    """Read a diffusers- or kohya-style file and keep component ``prefix``'s LoRA.

    Args:
        path: the ``.safetensors`` file or a directory holding ``pytorch_lora_weights.safetensors``.
        prefix: the component (``"unet"``, ``"transformer"``, ``"text_encoder"``) or None for a
            file of bare module keys (a model's ``save_lora_adapter``).
        module_names: the model's module paths; kohya's flat names are matched against them.

    Raises:
        FileNotFoundError, CheckpointError: a missing or unreadable file, or a key that fits no
            layout or no module (named).
    """
    path = resolve(path)
    tensors = load_tensors(path)
    header = read_header_metadata(path)
    if is_kohya(tensors):
        return _from_kohya(path, tensors, prefix, module_names)
    out = LoraFile(path, "diffusers", metadata=read_metadata(path, header, prefix))
    for key, tensor in tensors.items():
        rel = key
        if prefix:
            if not key.startswith(prefix + "."):
                if key.split(".", 1)[0] in COMPONENTS:
                    out.skipped.append(key)
                    continue
                raise CheckpointError(f"{path}: key {key!r} does not start with {prefix + '.'!r} "
                                      f"(components seen: {_components(tensors)}); pass prefix= to pick one")
            rel = key[len(prefix) + 1:]
        if ".lora_" not in rel:
            raise CheckpointError(f"{path}: key {key!r} is not a LoRA factor (expected "
                                  "'<module>.lora_A.weight' / '.lora_B.weight')")
        out.tensors[rel], out.file_keys[rel] = tensor, key
    return _nonempty(out, prefix)


def _components(tensors) -> list[str]:
    return sorted({k.split(".", 1)[0] for k in tensors})


def _nonempty(found: LoraFile, prefix) -> LoraFile:
    if not found.tensors:
        raise CheckpointError(f"{found.path}: no LoRA tensors for component {prefix!r} "
                              f"(the file holds {len(found.skipped)} keys of other components)")
    return found


def _from_kohya(path: Path, tensors: dict, prefix: str | None, module_names) -> LoraFile:
    """kohya keys -> model-relative peft keys, module names found by their underscored form."""
    if prefix not in KOHYA_TAGS:
        raise CheckpointError(f"{path}: kohya-style file; prefix must be one of {sorted(KOHYA_TAGS)}, "
                              f"got {prefix!r}")
    tags = KOHYA_TAGS[prefix]
    flat = flat_names(module_names)
    out = LoraFile(path, "kohya")
    for key, tensor in tensors.items():
        if not key.startswith(tags):
            if key.startswith("lora_"):
                out.skipped.append(key)
                continue
            raise CheckpointError(f"{path}: key {key!r} is not a kohya LoRA key ('lora_<component>_<module>...')")
        name, _, suffix = key.partition(".")
        tag = next(t for t in tags if name.startswith(t))
        module = flat.get(name[len(tag):])
        if module is None:
            raise CheckpointError(f"{path}: key {key!r} matches no module of the model (looked for a module "
                                  f"named {name[len(tag):]!r} with '_' for '.'; SGM/LDM names such as "
                                  "input_blocks are not mapped)")
        if suffix == "alpha":
            out.alphas[module] = float(tensor.reshape(-1)[0])
            continue
        if suffix not in _KOHYA_SUFFIX:
            raise CheckpointError(f"{path}: key {key!r} has suffix {suffix!r}; kohya LoRA files hold "
                                  "lora_down.weight, lora_up.weight and alpha")
        rel = f"{module}.{_KOHYA_SUFFIX[suffix]}"
        out.tensors[rel], out.file_keys[rel] = tensor, key
    return _nonempty(out, prefix)


def flat_names(module_names) -> dict[str, str]:
    """kohya's flat name (``.`` -> ``_``) -> module path; a flat name two paths share maps to neither."""
    flat: dict[str, str | None] = {}
    for name in module_names:
        key = name.replace(".", "_")
        flat[key] = None if key in flat and flat[key] != name else name
    return {k: v for k, v in flat.items() if v is not None}


# -- configs -------------------------------------------------------------------------------------
def config_fields(found: LoraFile) -> dict:
    """LoraConfig fields giving the outputs diffusers gives for this file.

    With metadata: its ``r``, ``lora_alpha``, patterns, rsLoRA and DoRA flags. Without: the most
    common rank and alpha, the rest as per-module patterns; the alpha of a module is kohya's
    ``.alpha`` where the file has one, else its rank (diffusers' rule). ``target_modules`` is
    always the exact list of modules in the file.
    """
    modules = found.modules()
    if found.metadata is not None:
        fields = {k: found.metadata[k] for k in _MATH_FIELDS if k in found.metadata}
        return {**fields, "target_modules": modules}
    ranks = found.ranks()
    alphas = {m: found.alphas.get(m, float(ranks[m])) for m in ranks}
    r, rank_pattern = _common_and_rest(ranks)
    alpha, alpha_pattern = _common_and_rest(alphas)
    if alpha == int(alpha):
        alpha = int(alpha)
    return {"r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
            "target_modules": modules}


def _common_and_rest(values: dict[str, float]):
    """The most common value, and ``{exact-name pattern: value}`` for modules that differ."""
    common = collections.Counter(values.values()).most_common(1)[0][0]
    return common, {re.escape(m): v for m, v in values.items() if v != common}


def metadata_for(config_dict: dict, modules: list[str], prefix: str | None) -> str:
    """The ``lora_adapter_metadata`` header value diffusers builds its LoraConfig from.

    Only fields peft's ``LoraConfig`` has known for long (a newer field would make an older
    peft refuse the file), ``target_modules`` as the exact module list, keys prefixed the way
    diffusers' pipelines write them.
    """
    keep = _MATH_FIELDS + ("lora_dropout", "bias", "init_lora_weights", "peft_type")
    data = {k: config_dict[k] for k in keep if k in config_dict}
    data["target_modules"] = sorted(modules)
    if prefix:
        data = {f"{prefix}.{k}": v for k, v in data.items()}
    return json.dumps(data, indent=2, sort_keys=True)
