"""Turning a model's ``nn.Linear`` layers into 4-bit ``Linear4bit`` layers and back.

``quantize`` (QLoRA's NF4 by default), ``requantize`` (the same, with a report of the error),
``dequantize_model`` (every 4-bit layer back to a dense ``nn.Linear``, e.g. to merge in full
precision).
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from deltatune.quant.layers import _error, is_4bit, prepare_4bit_layers
from deltatune.quant.memory import _leave_checkpoint_mapping, _warn_if_alive
from deltatune.quant.nf4 import QUANT_TYPES, Linear4bit, bnb_dequantize, check_backend, import_bnb, \
    resolve_compute_dtype
from deltatune.surgery import replace_module
from deltatune.targeting import _matches


@dataclass
class QuantReport:
    """Error introduced by quantizing: per layer and the worst over layers.

    ``max_abs``: max |W - Q(W)|; ``rel``: ||W - Q(W)||_F / ||W||_F.
    """

    layers: dict[str, dict] = field(default_factory=dict)

    @property
    def max_abs(self) -> float:
        return max((e["max_abs"] for e in self.layers.values()), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((e["rel"] for e in self.layers.values()), default=0.0)

    def __str__(self) -> str:
        return (f"{len(self.layers)} layers re-quantized: max abs error {self.max_abs:.3g}, "
                f"max relative error {self.max_rel:.3g}")


def _validate(bits, quant_type) -> None:
    if bits != 4:
        raise ValueError(f"bits={bits!r}: only 4-bit quantization is supported (bits=4)")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r}: must be one of {QUANT_TYPES}")


def _select(model: nn.Module, target_modules, skip_modules) -> list[str]:
    """Names of the nn.Linear layers to quantize (see ``quantize``)."""
    if any(hasattr(m, "adapter_containers") for m in model.modules()):
        raise ValueError("quantize() the base model before adding adapters (get_peft_model), not after")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    if target_modules is None:
        names = [n for n, m in linears if m is not head]
    else:
        names = [n for n, _ in linears if _matches(target_modules, n)]
        if not names:
            raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear layer of the model")
    if skip_modules:
        names = [n for n in names if not _matches(skip_modules, n)]
    return _drop_tied(model, names)


def _drop_tied(model: nn.Module, names: list[str]) -> list[str]:
    """Leave dense (with a warning) layers whose weight is shared with a module kept dense."""
    chosen = set(names)
    owners: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(mname)
    kept = []
    for name in names:
        others = [o for o in owners.get(id(model.get_submodule(name).weight), []) if o != name and o not in chosen]
        if others:
            warnings.warn(f"{name}.weight is tied to {others[0]}, which stays dense; quantizing it would keep a "
                          "4-bit and a dense copy of the same weights, so it is left dense", stacklevel=3)
        else:
            kept.append(name)
    return kept


def _quantize_named(model: nn.Module, names: list[str], quant_type: str, double_quant: bool,
                    compute_dtype, report: QuantReport | None) -> list:
    """Replace each named nn.Linear by a Linear4bit; returns weak references to the dense weights."""
    dense_refs = []
    for name in names:
        linear = model.get_submodule(name)
        check_backend(linear.weight.device)
        layer = Linear4bit.from_linear(linear, quant_type, double_quant, compute_dtype)
        if report is not None:
            report.layers[name] = _error(linear.weight.detach(), layer.dequantize())
        dense_refs.append(weakref.ref(linear.weight))
        replace_module(model, name, layer)
        del linear
    return dense_refs


def quantize(model: nn.Module, bits: int = 4, quant_type: str = "nf4", double_quant: bool = True,
             compute_dtype: torch.dtype | None = None, target_modules=None, skip_modules=None) -> nn.Module:
    """Quantize a loaded model's ``nn.Linear`` layers to 4 bits in place (QLoRA's NF4 by default).

    Args:
        model: any ``nn.Module``; for transformers models the output head
            (``get_output_embeddings()``) is left dense unless ``target_modules`` names it.
        bits: must be 4.
        quant_type: "nf4" (default) or "fp4".
        double_quant: also quantize the per-block scales (default True: 4.127 bits/weight).
        compute_dtype: matmul dtype wanted (e.g. ``torch.bfloat16`` on a GPU). On CPUs without AMX
            fp32 is used instead, with a warning (see ``resolve_compute_dtype``). None: input's dtype.
        target_modules: quantize only these: a list of module-name suffixes (``["q_proj", "v_proj"]``)
            or a regex matched against full names. Default: every nn.Linear but the head.
        skip_modules: names (same forms) to leave dense.

    Returns:
        ``model`` itself, its selected layers now ``Linear4bit``. A layer whose weight is tied to a
        module left dense is skipped with a warning. Tensors left dense that still point into a
        memory-mapped checkpoint (transformers loads safetensors that way) are copied out of it,
        so the mapping, and with it the dense weights' pages, can go (see ``_leave_checkpoint_mapping``).

    Raises:
        ValueError: ``bits``/``quant_type`` unsupported (the message names the field), nothing
            matches ``target_modules``, or the model already holds adapters.
        ImportError: bitsandbytes is missing (the message gives ``pip install bitsandbytes``).
        RuntimeError: bitsandbytes cannot quantize on the model's device (message gives the fix).
    """
    _validate(bits, quant_type)
    import_bnb()
    prepare_4bit_layers(model)
    names = _select(model, target_modules, skip_modules)
    refs = _quantize_named(model, names, quant_type, double_quant, compute_dtype, report=None)
    if names:
        _leave_checkpoint_mapping(model)
    if compute_dtype is not None:
        resolve_compute_dtype(compute_dtype, next((p.device for p in model.parameters()), torch.device("cpu")))
    _warn_if_alive(refs)
    return model


def requantize(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
               compute_dtype: torch.dtype | None = None, target_modules=None, skip_modules=None) -> QuantReport:
    """``quantize`` plus a report of the error it introduces (e.g. after a full-precision merge).

    Layers that ``dequantize_model`` turned dense are re-quantized with their former settings
    when ``target_modules`` is None; otherwise the selection is as in ``quantize``. The report's
    summary is also logged as a warning.
    """
    _validate(4, quant_type)
    import_bnb()
    previous = {n: m.deltatune_was_4bit for n, m in model.named_modules()
                if type(m) is nn.Linear and hasattr(m, "deltatune_was_4bit")}
    if target_modules is None and previous:
        names = [n for n in previous if not (skip_modules and _matches(skip_modules, n))]
    else:
        names = _select(model, target_modules, skip_modules)
    report = QuantReport()
    for name in names:
        settings = previous.get(name, {"quant_type": quant_type, "double_quant": double_quant,
                                       "compute_dtype": compute_dtype})
        _quantize_named(model, [name], settings["quant_type"], settings["double_quant"],
                        settings["compute_dtype"], report)
    warnings.warn(f"requantize: {report}", stacklevel=2)
    return report


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every 4-bit layer (ours or bitsandbytes') by a dense ``nn.Linear`` in ``dtype``, in place.

    Works before or after ``get_peft_model`` (a wrapped layer's ``base_layer`` is replaced), so
    ``dequantize_model(peft_model); peft_model.merge_and_unload()`` adds each delta to the
    dequantized weight in full precision. ``requantize`` turns the layers back to 4 bits. A
    transformers model loaded with ``load_in_4bit`` loses its quantization config once no
    4-bit layer is left. Returns ``model``.
    """
    for name, module in list(model.named_modules()):
        if is_4bit(module):
            dense = module.to_linear(dtype) if isinstance(module, Linear4bit) else _bnb_to_linear(module, dtype)
            dense.deltatune_was_4bit = _settings(module)
            replace_module(model, name, dense)
    if not any(is_4bit(m) for m in model.modules()):
        for module in model.modules():
            quantizer = getattr(module, "hf_quantizer", None)
            if "hf_quantizer" in vars(module) and hasattr(quantizer, "remove_quantization_config"):
                quantizer.remove_quantization_config(module)
                if hasattr(module, "is_loaded_in_4bit"):
                    module.is_loaded_in_4bit = False
    return model


def _bnb_to_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device="meta", dtype=dtype)
    linear.weight = nn.Parameter(bnb_dequantize(module, dtype), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach().to(dtype).clone(), requires_grad=module.bias.requires_grad)
    return linear


def _settings(module: nn.Module) -> dict:
    if isinstance(module, Linear4bit):
        return {"quant_type": module.quant_type, "double_quant": module.double_quant,
                "compute_dtype": module.compute_dtype}
    state = module.weight.quant_state
    return {"quant_type": state.quant_type, "double_quant": state.nested, "compute_dtype": module.compute_dtype}
