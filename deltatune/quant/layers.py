"""What counts as a 4-bit layer, and how the core reaches its weight.

The adapter layers never import ``deltatune.quant``: they reach a 4-bit layer through the base
layer they wrap and through ``deltatune.registry``'s weight access, which ``_register`` (run on
import) fills in for ``Linear4bit`` (ours) and ``bitsandbytes.nn.Linear4bit`` (a model loaded by
transformers with ``BitsAndBytesConfig(load_in_4bit=True)``).
"""
from __future__ import annotations

import logging
import sys
import warnings

import torch
from torch import nn

from deltatune.quant.nf4 import Linear4bit, bnb_dequantize, bnb_requantize, import_bnb, use_fast_compute_dtype

logger = logging.getLogger("deltatune.quant")
_BNB_REGISTERED = False


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


def _error(W: torch.Tensor, Q: torch.Tensor, reference: torch.Tensor | None = None) -> dict:
    diff = (W.float() - Q.float())
    out = {"max_abs": diff.abs().max().item(), "rel": (diff.norm() / W.float().norm().clamp_min(1e-30)).item()}
    if reference is not None:
        out["rel_delta"] = (diff.norm() / reference.float().norm().clamp_min(1e-30)).item()
    return out


_register()
