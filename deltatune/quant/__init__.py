"""4-bit bases for QLoRA: quantize a loaded model, prepare it for training, merge back to dense.

The adapter layers never import this package: they reach a 4-bit layer through the base layer
they wrap and through ``deltatune.registry``'s weight access, which ``_register`` fills in for
``Linear4bit`` (ours) and ``bitsandbytes.nn.Linear4bit`` (a model loaded by transformers with
``BitsAndBytesConfig(load_in_4bit=True)``).

Typical use::

    model = deltatune.quantize(model)                  # or transformers' load_in_4bit=True
    model = deltatune.prepare_model_for_kbit_training(model)
    model = deltatune.get_peft_model(model, LoraConfig(r=16, target_modules=[...]))
    ...
    deltatune.dequantize_model(model)                  # 4-bit bases -> fp32 nn.Linear
    merged = model.merge_and_unload()                  # full precision, delta on dequantized W
"""
from __future__ import annotations

import gc
import inspect
import logging
import re
import sys
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from deltatune.quant.nf4 import (QUANT_TYPES, Linear4bit, bnb_dequantize, bnb_requantize, bnb_tensors,
                                 check_backend, import_bnb, resolve_compute_dtype, use_fast_compute_dtype)
from deltatune.surgery import replace_module

__all__ = ["Linear4bit", "quantize", "prepare_model_for_kbit_training", "dequantize_model", "requantize",
           "quantized_bits_per_param", "quantization_footprint", "QuantReport", "is_4bit",
           "resolve_compute_dtype", "check_dense_copies", "prepare_4bit_layers"]

logger = logging.getLogger(__name__)
_BNB_REGISTERED = False


# ---------------------------------------------------------------------------------------------
# What counts as a 4-bit layer

def _is_bnb_4bit(module: nn.Module) -> bool:
    # bitsandbytes is necessarily imported if such a module exists, so this never imports it.
    bnb = sys.modules.get("bitsandbytes.nn")
    return bnb is not None and isinstance(module, bnb.Linear4bit)


def is_4bit(module: nn.Module) -> bool:
    """True for ``Linear4bit`` and ``bitsandbytes.nn.Linear4bit``."""
    return isinstance(module, Linear4bit) or _is_bnb_4bit(module)


def dense_weight(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantized (out, in) weight of a 4-bit layer, exactly as bitsandbytes gives it."""
    return module.dequantize(dtype) if isinstance(module, Linear4bit) else bnb_dequantize(module, dtype)


# ---------------------------------------------------------------------------------------------
# Registration with the core (weight access for merging, DoRA, PiSSA; "linear" for targeting)

def _set_4bit_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Write a dense weight into a 4-bit layer: it is re-rounded to 4 bits, which the warning sizes."""
    old = dense_weight(module)
    W = W.to(old.device, torch.float32)
    if isinstance(module, Linear4bit):
        module.quantize_(W)
    else:
        bnb_requantize(module, W)
    err = _error(W, dense_weight(module), reference=W - old)
    module.deltatune_requantization_error = err
    logger.info("re-quantized a 4-bit weight: max abs error %.3g, relative to W %.3g, relative to the change %.3g",
                err["max_abs"], err["rel"], err["rel_delta"])
    warnings.warn(
        "Writing into a 4-bit base weight (e.g. merging an adapter without a full-precision copy) re-rounds "
        "the sum W + delta to 4 bits: weights move by up to half a quantization step, usually more than a "
        "LoRA delta, so much of the delta is lost, and unmerge() cannot restore the original 4-bit weights. "
        "Call deltatune.dequantize_model(model) first to merge in full precision. Each layer's error is in "
        "its `deltatune_requantization_error` (max_abs, rel, rel_delta) and logged at INFO.", stacklevel=3)


def _register() -> None:
    """Register ``Linear4bit`` (and bitsandbytes' layer, when bitsandbytes is loaded) with the core."""
    from deltatune import registry

    registry.register_weight_access(Linear4bit, dense_weight, _set_4bit_weight, linear=True)
    if "bitsandbytes" in sys.modules:
        _register_bnb()


def _register_bnb() -> None:
    global _BNB_REGISTERED
    if not _BNB_REGISTERED:
        from deltatune import registry

        registry.register_weight_access(import_bnb().nn.Linear4bit, dense_weight, _set_4bit_weight, linear=True)
        _BNB_REGISTERED = True


def prepare_4bit_layers(model: nn.Module) -> int:
    """Make a model's bitsandbytes 4-bit layers known to the core and fast; returns how many there are.

    Idempotent and cheap; ``prepare_model_for_kbit_training`` and ``quantize`` call it. Registers
    ``bitsandbytes.nn.Linear4bit`` with the registry and, on CPU, switches its compute dtype to
    fp32 (with one warning) when bf16/fp16 would be slow there.
    """
    count = 0
    for module in model.modules():
        if _is_bnb_4bit(module):
            _register_bnb()
            use_fast_compute_dtype(module)
            count += 1
    return count


# ---------------------------------------------------------------------------------------------
# Quantizing

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


def _error(W: torch.Tensor, Q: torch.Tensor, reference: torch.Tensor | None = None) -> dict:
    diff = (W.float() - Q.float())
    out = {"max_abs": diff.abs().max().item(), "rel": (diff.norm() / W.float().norm().clamp_min(1e-30)).item()}
    if reference is not None:
        out["rel_delta"] = (diff.norm() / reference.float().norm().clamp_min(1e-30)).item()
    return out


def _validate(bits, quant_type) -> None:
    if bits != 4:
        raise ValueError(f"bits={bits!r}: only 4-bit quantization is supported (bits=4)")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r}: must be one of {QUANT_TYPES}")


def _matches(name: str, spec) -> bool:
    """peft's rule: a string is a regex matched against the full name; a list matches name suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _select(model: nn.Module, target_modules, skip_modules) -> list[str]:
    """Names of the nn.Linear layers to quantize (see ``quantize``)."""
    if any(hasattr(m, "adapter_containers") for m in model.modules()):
        raise ValueError("quantize() the base model before adding adapters (get_peft_model), not after")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    if target_modules is None:
        names = [n for n, m in linears if m is not head]
    else:
        names = [n for n, _ in linears if _matches(n, target_modules)]
        if not names:
            raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear layer of the model")
    if skip_modules:
        names = [n for n in names if not _matches(n, skip_modules)]
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
        names = [n for n in previous if not (skip_modules and _matches(n, skip_modules))]
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


# ---------------------------------------------------------------------------------------------
# Counting and checking

def quantization_footprint(model: nn.Module) -> dict:
    """Bytes and parameters of the model's 4-bit weights, counted from the stored tensors.

    Returns ``{"layers", "params", "bytes", "bits_per_param"}``: ``bytes`` covers packed codes,
    absmax (8-bit with double quantization), second-level scales, offsets and the shared code
    books (each distinct tensor once). Layers with no 4-bit weights give ``bits_per_param`` 0.
    """
    seen: set[tuple[int, int]] = set()
    params = nbytes = layers = 0

    def add(t: torch.Tensor) -> None:
        nonlocal nbytes
        key = (t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            nbytes += t.nbytes

    for module in model.modules():
        if isinstance(module, Linear4bit):
            own, shared = module.quantized_tensors(), module.shared_tensors()
        elif _is_bnb_4bit(module):
            own, shared = bnb_tensors(module)
        else:
            continue
        layers += 1
        params += module.in_features * module.out_features
        for t in own + shared:
            add(t)
    return {"layers": layers, "params": params, "bytes": nbytes,
            "bits_per_param": 8 * nbytes / params if params else 0.0}


def quantized_bits_per_param(model: nn.Module) -> float:
    """Bits per weight of the model's 4-bit layers, from the stored tensors (NF4 + double quant: ~4.13)."""
    return quantization_footprint(model)["bits_per_param"]


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed mappings other than shared libraries (Linux)."""
    try:
        with open("/proc/self/maps") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/") and ".so" not in parts[5].rsplit("/", 1)[-1]:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def _leave_checkpoint_mapping(model: nn.Module) -> int:
    """Copy dense CPU tensors that live in a file mapping into private memory; returns bytes copied.

    A model loaded from safetensors keeps its tensors in one mmap of the file. Quantizing frees
    the linear weights, but the mapping, with every page read while quantizing (the whole ~4x
    larger dense weights), stays resident for as long as one tensor (embedding, norms) points
    into it. Copying those few tensors lets the mapping go: on the default model ~400 MiB of
    RSS for a 113 MiB copy. Memory given back to the C heap is trimmed too (glibc).
    """
    ranges = _file_mappings()
    copied, seen = 0, set()
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for t in table.values():
                if t is None or id(t) in seen or t.device.type != "cpu" or t.numel() == 0:
                    continue
                seen.add(id(t))
                ptr = t.untyped_storage().data_ptr()
                if any(lo <= ptr < hi for lo, hi in ranges):
                    t.data = t.data.clone()
                    copied += t.nbytes
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return copied


def _warn_if_alive(refs: list) -> None:
    """Warn if dense weights just quantized are still referenced elsewhere (a second, dense copy)."""
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    if alive:
        mib = sum(t.nbytes for t in alive) / 2**20
        warnings.warn(
            f"{len(alive)} of {len(refs)} quantized layers still have their dense {alive[0].dtype} weights alive "
            f"elsewhere ({mib:.0f} MiB), e.g. another reference to the original model, a deepcopy or an "
            "optimizer: the 4-bit base saves no memory while that dense copy lives. Drop those references.",
            stacklevel=3)


def check_dense_copies(model: nn.Module) -> list[tuple[str, str]]:
    """Warn about dense (fp32/bf16/fp16) parameters that duplicate a 4-bit layer's weights.

    A 4-bit base next to a dense copy of the same weights (the "QLoRA + bf16 base" mistake)
    spends the memory QLoRA was meant to save. A dense tensor counts as a copy when it has the
    layer's shape and lies within 4-bit rounding of its dequantized weight (relative error < 0.25;
    unrelated weights give ~1.4). Returns ``[(dense parameter name, 4-bit layer name)]``.
    """
    quantized = {n: m for n, m in model.named_modules() if is_4bit(m)}
    by_shape: dict[tuple, list[str]] = {}
    for n, m in quantized.items():
        by_shape.setdefault((m.out_features, m.in_features), []).append(n)
    found = []
    for pname, p in model.named_parameters():
        if not p.is_floating_point() or tuple(p.shape) not in by_shape:
            continue
        for qname in by_shape[tuple(p.shape)]:
            Q = dense_weight(quantized[qname]).to(p.device)
            if _error(Q, p.detach())["rel"] < 0.25:
                found.append((pname, qname))
                break
    if found:
        names = ", ".join(f"{d} ~ {q}" for d, q in found[:3])
        more = ", ..." if len(found) > 3 else ""
        warnings.warn(f"{len(found)} dense parameter(s) duplicate 4-bit weights ({names}{more}): "
                      "a 4-bit base with a dense copy of the same weights uses more memory than the dense model "
                      "alone. Keep one: quantize in place, or drop the dense copy.", stacklevel=2)
    return found


# ---------------------------------------------------------------------------------------------
# peft's prepare_model_for_kbit_training

def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """Get a 4-bit model ready for adapter training, as peft's function of the same name does.

    Freezes every parameter; casts fp16/bf16 parameters that are not 4-bit (norms, embeddings,
    head) to fp32 for stable training; for a model holding 4-bit layers (ours, or loaded by
    transformers with ``BitsAndBytesConfig(load_in_4bit=True)``) with ``use_gradient_checkpointing``,
    makes the input embeddings' output require grad (needed by reentrant checkpointing) and turns
    on gradient checkpointing with ``gradient_checkpointing_kwargs``. bitsandbytes layers on CPU
    are switched to the fast compute dtype (see ``resolve_compute_dtype``), and dense tensors still
    in a memory-mapped checkpoint are copied out so its pages can go (as in ``quantize``). Warns
    about dense copies of 4-bit weights (``check_dense_copies``). ``gradient_checkpointing_kwargs``
    None keeps transformers' default (non-reentrant). Returns ``model``.
    """
    kbit = (prepare_4bit_layers(model) > 0 or any(isinstance(m, Linear4bit) for m in model.modules())
            or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16) and type(p).__name__ != "Params4bit":
            p.data = p.data.float()
    if kbit:
        _leave_checkpoint_mapping(model)
    if kbit and use_gradient_checkpointing:
        kwargs = gradient_checkpointing_kwargs
        if (kwargs or {}).get("use_reentrant", True):
            _enable_input_require_grads(model)
        _enable_checkpointing(model, kwargs)
    check_dense_copies(model)
    return model


def _enable_checkpointing(model: nn.Module, kwargs: dict | None) -> None:
    """transformers >= 5 names it ``activation_checkpointing_enable``; older, ``gradient_...``."""
    for attr, key in (("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
                      ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs")):
        enable = getattr(model, attr, None)
        if enable is not None:
            accepts = key in inspect.signature(enable).parameters
            enable(**({key: kwargs} if accepts and kwargs is not None else {}))
            return
    warnings.warn(f"{type(model).__name__} has no gradient_checkpointing_enable(); training without "
                  "gradient checkpointing", stacklevel=3)


def _enable_input_require_grads(model: nn.Module) -> None:
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    elif hasattr(model, "get_input_embeddings"):
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))


_register()
