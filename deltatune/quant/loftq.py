"""LoftQ (Li et al. 2023, arXiv:2310.08659): a 4-bit base whose LoRA starts from its rounding error.

QLoRA rounds the base ``W`` to NF4 and starts LoRA at zero, so training first has to make up for
the rounding. LoftQ chooses the 4-bit base ``Q`` and the factors together, alternating

    Q_t   = NF4(W - L_{t-1})                      (L_0 = 0: the first Q is plain NF4 of W)
    L_t   = best rank-r approximation of W - dequant(Q_t)   (truncated SVD, Eckart-Young)

and the adapter starts as ``s·B A = L_t``, so the layer's effective weight ``dequant(Q_t) + L_t``
is as close to ``W`` as rank r allows around that base. With one iteration that is exactly
"NF4 of W plus the best rank-r fix of its rounding error". The rounding step is not an exact
projection (NF4's block scales move with the block), so an iteration can in principle end
further from ``W`` than the one before; the iterate with the smallest ``||W - dequant(Q) - L||_F``
is kept, so more iterations never increase the error.

Unlike peft 0.21 (whose LoftQ moves weights to CUDA), this runs wherever bitsandbytes quantizes:
CPU and GPU alike. The scaling ``s = lora_alpha / r`` is divided out of the factors
(``A = sqrt(S/s)·Vh``, ``B = U·sqrt(S/s)``), so the start is right for any ``lora_alpha``.

Two entry points, as in peft:

- ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_iter=N))`` on a
  full-precision model: each targeted linear layer becomes a ``Linear4bit`` (NF4 + double
  quantization, the layer ``deltatune.quantize`` makes) holding ``Q``, with the factors on top.
- ``replace_lora_weights_loftq(peft_model, model_path=...)`` for a model already in 4 bits
  (``deltatune.quantize`` or transformers' ``load_in_4bit``): the base stays, the dense weights
  are read from the safetensors file and the factors become the SVD of the rounding error.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from deltatune import registry
from deltatune.config import ConfigError
from deltatune.quant.layers import dense_weight, is_4bit
from deltatune.quant.nf4 import Linear4bit, check_backend

__all__ = ["LoftQResult", "loftq_decompose", "low_rank_factors", "replace_lora_weights_loftq", "save_4bit_layers",
           "load_4bit_layers", "BASE_FILE"]

logger = logging.getLogger(__name__)


@dataclass
class LoftQResult:
    """What ``loftq_decompose`` returns for one weight.

    Attributes:
        layer: the 4-bit layer holding the chosen ``Q`` (no bias set).
        A: (r, in) and B: (out, r) fp32 factors with ``s·B@A`` the low-rank part.
        errors: ``||W - dequant(Q_t) - L_t||_F / ||W||_F`` after each iteration t.
        quant_error: ``||W - dequant(NF4(W))||_F / ||W||_F``, plain QLoRA's error (iteration 1's Q).
        best: index (0-based) of the iteration kept.
    """

    layer: Linear4bit
    A: torch.Tensor
    B: torch.Tensor
    errors: list[float] = field(default_factory=list)
    quant_error: float = 0.0
    best: int = 0

    @property
    def error(self) -> float:
        """Relative error of the kept iterate."""
        return self.errors[self.best]


def low_rank_factors(R: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, residual norm)`` with ``scaling·B@A`` the best rank-``r`` approximation of ``R`` (out, in).

    Truncated SVD (Eckart-Young): ``A = sqrt(S_r/s)·Vh_r`` (r, in), ``B = U_r·sqrt(S_r/s)`` (out, r);
    the returned norm is ``||R - s·B@A||_F = sqrt(sum of the dropped S²)``.
    """
    U, S, Vh = torch.linalg.svd(R.float(), full_matrices=False)     # (out, k), (k,), (k, in)
    k = min(r, S.numel())
    root = torch.sqrt(S[:k] / scaling)                               # (k,)
    A = R.new_zeros(r, R.shape[1], dtype=torch.float32)
    B = R.new_zeros(R.shape[0], r, dtype=torch.float32)
    A[:k] = root[:, None] * Vh[:k]
    B[:, :k] = U[:, :k] * root[None, :]
    return A, B, S[k:].pow(2).sum().sqrt().item()


def loftq_decompose(W: torch.Tensor, r: int, scaling: float = 1.0, num_iter: int = 1, quant_type: str = "nf4",
                    double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> LoftQResult:
    """LoftQ on one dense weight ``W`` (out, in): a 4-bit layer and factors (see the module doc).

    Args:
        W: the full-precision weight, any float dtype, on a device bitsandbytes quantizes on.
        r: LoRA rank; scaling: the adapter's ``lora_alpha / r`` (or rsLoRA's) folded out of the factors.
        num_iter: alternating iterations (>= 1); the best iterate is kept.
        quant_type, double_quant, compute_dtype: the ``Linear4bit`` made (default: what ``quantize`` makes).

    Raises:
        ValueError: ``num_iter`` < 1 or ``r`` < 1.
    """
    if num_iter < 1 or r < 1:
        raise ValueError(f"loftq_decompose: num_iter={num_iter} and r={r} must be >= 1")
    W = W.detach().float()                                           # (out, in)
    norm = W.norm().clamp_min(1e-30).item()
    out_f, in_f = W.shape
    low_rank = torch.zeros_like(W)
    best = None
    errors: list[float] = []
    quant_error = 0.0
    for t in range(num_iter):
        layer = Linear4bit(in_f, out_f, bias=False, quant_type=quant_type, double_quant=double_quant,
                           compute_dtype=compute_dtype, device="meta")
        layer.quantize_(W - low_rank)
        residual = W - layer.dequantize(torch.float32)               # (out, in)
        if t == 0:
            quant_error = residual.norm().item() / norm
        A, B, left = low_rank_factors(residual, r, scaling)
        errors.append(left / norm)
        if best is None or errors[-1] < errors[best[0]]:
            best = (t, layer, A, B)
        if t + 1 < num_iter:
            low_rank = scaling * (B @ A)                             # (out, in)
    t, layer, A, B = best
    return LoftQResult(layer, A, B, errors, quant_error, t)


# ---------------------------------------------------------------------------------------------
# init_lora_weights="loftq" (registered with the core; the adapter layers never import this)

def _conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _loftq_init(layer: nn.Module, name: str, config, module_name: str) -> None:
    """Replace ``layer``'s dense base by LoftQ's 4-bit one and set adapter ``name``'s factors."""
    base = layer.base_layer
    if is_4bit(base):
        raise ConfigError(
            f"init_lora_weights='loftq': {module_name} is already 4-bit, and LoftQ needs its full-precision "
            "weights; wrap the model with the default init and call "
            "deltatune.replace_lora_weights_loftq(peft_model, model_path=<the dense safetensors>) instead")
    if type(base) is not nn.Linear and not isinstance(base, _conv1d_type()):
        raise ConfigError(f"init_lora_weights='loftq' is for linear layers; {module_name} is a "
                          f"{type(base).__name__}: leave it out of target_modules")
    if layer.held:
        raise ConfigError(f"init_lora_weights='loftq': {module_name} already holds adapter(s) {layer.held}; "
                          "LoftQ replaces the base layer under them, so add the LoftQ adapter first")
    weight = registry.get_weight(base)                               # (out, in)
    check_backend(weight.device)
    settings = config.loftq_config
    result = loftq_decompose(weight, layer.r[name], layer.scaling[name], settings["loftq_iter"])
    quantized = result.layer
    if getattr(base, "bias", None) is not None:
        quantized.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    quantized.deltatune_loftq_error = {"quant": result.quant_error, "loftq": result.error,
                                       "per_iter": result.errors, "kept_iter": result.best + 1}
    with torch.no_grad():
        factor_a, factor_b = layer.lora_A[name].weight, layer.lora_B[name].weight
        factor_a.copy_(result.A.to(factor_a.dtype))
        factor_b.copy_(result.B.to(factor_b.dtype))
    layer.base_layer = quantized
    layer.train(layer.training)

    def restore(layer=layer, base=base) -> None:
        layer.base_layer = base

    layer._undo_init[name] = restore
    logger.info("LoftQ %s: relative error %.4g (NF4 alone %.4g), iteration %d of %d kept", module_name,
                result.error, result.quant_error, result.best + 1, len(result.errors))


registry.register_init("loftq", _loftq_init)


# ---------------------------------------------------------------------------------------------
# peft's replace_lora_weights_loftq: a model already in 4 bits, dense weights from safetensors

class _DenseWeights:
    """Reads tensors by name from a safetensors model: one file, or shards with an index."""

    INDEX = "model.safetensors.index.json"

    def __init__(self, path: Path, prefix: str | None) -> None:
        self.prefix = prefix
        if path.is_file():
            self.files = None
            self.single = path
        elif (path / "model.safetensors").is_file():
            self.files, self.single = None, path / "model.safetensors"
        elif (path / self.INDEX).is_file():
            index = json.loads((path / self.INDEX).read_text())
            self.files = {k: path / v for k, v in index.get("weight_map", {}).items()}
            self.single = None
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or {self.INDEX} (LoftQ reads the dense weights "
                                    "from safetensors files; pickle checkpoints are not read)")
        self.source = self.single or path / self.INDEX
        self._keys = set(self.files) if self.files is not None else self._file_keys(self.single)

    @staticmethod
    def _file_keys(path: Path) -> set[str]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return set(fh.keys())

    def key_for(self, module_name: str) -> str:
        """The file's key for ``module_name``'s weight (with or without the model's prefix)."""
        candidates = [f"{module_name}.weight"]
        if self.prefix:
            head = self.prefix + "."
            candidates.append(module_name[len(head):] + ".weight" if module_name.startswith(head)
                              else head + module_name + ".weight")
        for key in candidates:
            if key in self._keys:
                return key
        raise KeyError(f"{self.source}: no tensor {candidates[0]!r} (nor {candidates[1:]}) for the 4-bit layer "
                       f"{module_name}; is model_path the model this base was quantized from?")

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file(key)), framework="pt", device="cpu") as fh:
            return fh.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(str(self._file(key)), framework="pt", device="cpu") as fh:
            return tuple(fh.get_slice(key).get_shape())

    def _file(self, key: str) -> Path:
        return self.single if self.files is None else self.files[key]


def _model_path(peft_model, model_path) -> Path:
    if model_path is not None:
        path = Path(model_path)
        if not path.exists():
            raise FileNotFoundError(f"model_path={str(model_path)!r}: not found")
        return path
    source = getattr(getattr(peft_model.get_base_model(), "config", None), "_name_or_path", None)
    if source and Path(source).exists():
        return Path(source)
    if source:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(source, local_files_only=True))
        except Exception:  # noqa: BLE001 - not a hub id, or not cached: say what to pass instead
            pass
    raise ValueError(f"replace_lora_weights_loftq: cannot find the dense weights of {source or 'this model'!r} "
                     "on disk; pass model_path=<directory or .safetensors file of the full-precision model>")


@torch.no_grad()
def replace_lora_weights_loftq(peft_model, model_path: str | os.PathLike | None = None, adapter_name: str = "default",
                               callback: Callable[[nn.Module, str], bool] | None = None) -> dict[str, dict]:
    """Re-initialise a LoRA adapter on a 4-bit base with LoftQ (one iteration), peft's function.

    For every layer of ``adapter_name`` whose base is 4-bit (``deltatune.quantize``'s ``Linear4bit``
    or ``bitsandbytes.nn.Linear4bit``), reads the dense weight ``W`` from the safetensors model at
    ``model_path`` and sets the factors to the best rank-r approximation of ``W - dequant(Q)``
    (scaling folded out). The 4-bit base is not changed.

    Args:
        peft_model: a ``PeftModel`` with LoRA on a 4-bit base.
        model_path: directory (``model.safetensors`` or a sharded index) or ``.safetensors`` file of
            the full-precision model; default: the base's ``config._name_or_path`` when that is a
            local directory or a model in the Hugging Face cache.
        adapter_name: the adapter to re-initialise.
        callback: ``callback(peft_model, module_name) -> bool`` after each layer; False puts that
            layer's previous factors back (peft's greedy check, e.g. on logits).

    Returns:
        module name -> ``{"before", "after"}``: ``||W - W_eff||_F / ||W||_F`` with the old and the
        new factors (kept or rolled back).

    Raises:
        ValueError: no LoRA layer of ``adapter_name`` sits on a 4-bit base, or no model path.
        FileNotFoundError / KeyError: the file, or a layer's tensor in it, is missing (named).
        All tensors are read and checked before any factor is written.
    """
    from tqdm.auto import tqdm

    layers = [(n, m) for n, m in peft_model.base_model.adapter_layers()
              if adapter_name in getattr(m, "held", ()) and hasattr(m, "lora_A") and is_4bit(m.base_layer)]
    if not layers:
        raise ValueError(f"replace_lora_weights_loftq: no LoRA layer of adapter {adapter_name!r} on a 4-bit base "
                         "(quantize the base with deltatune.quantize or load_in_4bit before get_peft_model)")
    reader = _DenseWeights(_model_path(peft_model, model_path),
                           getattr(peft_model.get_base_model(), "base_model_prefix", None))
    keys = {name: reader.key_for(name) for name, _ in layers}      # every tensor present before any write
    for name, layer in layers:
        shape = reader.shape(keys[name])
        if shape != (layer.out_features, layer.in_features):
            raise ValueError(f"{reader.source}: {keys[name]} has shape {shape}, the 4-bit layer {name} "
                             f"is {(layer.out_features, layer.in_features)}")
    report = {}
    for name, layer in tqdm(layers, desc="LoftQ", unit="layer", disable=len(layers) < 8):
        Q = dense_weight(layer.base_layer)                           # (out, in)
        W = reader.get(keys[name]).to(Q.device, torch.float32)
        A_live, B_live = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        old = (A_live.detach().clone(), B_live.detach().clone())
        norm = W.norm().clamp_min(1e-30)
        before = ((W - Q - layer.delta_weight(adapter_name).to(Q.device)).norm() / norm).item()
        A, B, left = low_rank_factors(W - Q, layer.r[adapter_name], layer.scaling[adapter_name])
        A_live.copy_(A.to(A_live.dtype))
        B_live.copy_(B.to(B_live.dtype))
        after = left / norm.item()
        if callback is not None and not callback(peft_model, name):
            A_live.copy_(old[0])
            B_live.copy_(old[1])
            after = before
        report[name] = {"before": before, "after": after}
    return report



# ---------------------------------------------------------------------------------------------
# Keeping the base: with loftq_iter > 1 the 4-bit weights are not NF4(W), so they travel with the adapter

BASE_FILE = "loftq_base.safetensors"     # beside adapter_model.safetensors; peft ignores it
_LAYOUT_KEY = "deltatune_4bit_layers"


def _plain_name(name: str) -> str:
    """Module name in the user's model: without PeftModel's prefix and adapter layers' ``base_layer``."""
    for head in ("base_model.model.", "model.base_model.model."):
        if name.startswith(head):
            name = name[len(head):]
            break
    return ".".join(part for part in name.split(".") if part != "base_layer")


def save_4bit_layers(model: nn.Module, path: str | os.PathLike) -> int:
    """Write every ``Linear4bit`` of ``model`` (a PeftModel or a plain model) to a safetensors file.

    Keys are ``<module name in the user's model>.<tensor>``; the layers' shapes and settings go
    into the file's metadata. The file is written atomically. Returns the number of layers.
    ``load_4bit_layers`` puts them back into a freshly loaded dense model, bit for bit.
    """
    from deltatune.checkpoint.io import atomic_save_tensors

    tensors, layout = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            key = _plain_name(name)
            layout[key] = {"in": module.in_features, "out": module.out_features, "bias": module.bias is not None,
                           "quant_type": module.quant_type, "double_quant": module.double_quant}
            for tname, t in module.state_dict().items():
                tensors[f"{key}.{tname}"] = t.detach().cpu()
    atomic_save_tensors(tensors, path, metadata={"format": "pt", _LAYOUT_KEY: json.dumps(layout)})
    return len(layout)


def load_4bit_layers(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Replace ``model``'s dense layers named in a ``save_4bit_layers`` file by those 4-bit layers.

    Call it on the dense base before ``PeftModel.from_pretrained``; the model is changed only
    once every layer has been read and checked. Returns ``model``.

    Raises:
        CheckpointError: the file is unreadable or not such a file; a layer it names is missing
            from ``model`` or has another shape (named).
    """
    from deltatune.checkpoint.io import CheckpointError, load_tensors
    from deltatune.surgery import replace_module

    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        layout = json.loads((fh.metadata() or {}).get(_LAYOUT_KEY, "null") or "null")
    if not isinstance(layout, dict):
        raise CheckpointError(f"{path}: no {_LAYOUT_KEY!r} metadata; not a file written by save_4bit_layers")
    built = {}
    for name, spec in layout.items():
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: layer {name!r} is not in the model") from None
        have = registry.features(dense) if registry.is_linear(dense) else None
        if have != (spec["in"], spec["out"]):
            raise CheckpointError(f"{path}: layer {name!r} is {spec['out']}x{spec['in']}, the model's is "
                                  f"{type(dense).__name__} {have}")
        layer = Linear4bit(spec["in"], spec["out"], spec["bias"], spec["quant_type"], spec["double_quant"],
                           device="meta")
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: layer {name!r}: {exc}") from None
        layer.weight.requires_grad_(False)
        layer.weight.deltatune_params_per_element = 2
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        built[name] = layer.to(next(iter(dense.parameters())).device)
    for name, layer in built.items():
        replace_module(model, name, layer)
    return model
