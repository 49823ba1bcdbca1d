"""Where to compute and in which dtype: the one rule training, serving and the CLI share.

``auto`` device: CUDA when available, else CPU. ``auto`` dtype: bf16 on CUDA GPUs that support
it; on a CPU bf16 only where it outruns fp32 (AMX tiles) and the caller can use it; fp32
elsewhere. On CPUs without native bf16 instructions (no AVX512-BF16 / AMX) bf16 matmuls are
emulated and several times slower than fp32, so an explicit bf16 there is honoured with a warning.

This module sits at the bottom of the package: it imports nothing from ``deltatune``, so the
siblings ``training``, ``serving`` and ``advisor`` may all use it.
"""
from __future__ import annotations

import functools
import warnings

import torch

# Spellings accepted for dtypes besides torch's own names ("float32", "bfloat16", "float16").
ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "half": "float16", "fp16": "float16"}
TRAINING_DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux ``/proc/cpuinfo``); empty where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """True if this CPU advertises bf16 dot-product instructions (AVX512-BF16 or AMX)."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_prefers_bf16() -> bool:
    """True if bf16 matmuls outrun fp32 ones on this CPU: it has AMX tiles (``amx_bf16``).

    AVX512-BF16 alone is not enough: measured on such a CPU (2 cores, no AMX) bf16 matmuls peaked
    at 186 GFLOP/s against fp32's 350, and LoRA training on the default model ran 249 tokens/s in
    bf16 against 365 in fp32 (``benchmarks/train_throughput.py``, README). With AMX bf16 runs
    several times faster than fp32 (1,000-1,600 GFLOP/s measured).
    """
    return "amx_bf16" in _cpu_flags()


def pick_device(device=None) -> torch.device:
    """``None`` or ``"auto"``: CUDA when available, else CPU; anything else as ``torch.device`` reads it."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def auto_dtype(device: torch.device, *, cpu_bf16: bool = True) -> torch.dtype:
    """The ``auto`` compute dtype on ``device``: bf16 on CUDA GPUs that support it; on a CPU bf16
    only when ``cpu_bf16`` and the CPU prefers it (``cpu_prefers_bf16``); fp32 elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_bf16 and cpu_prefers_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype, device: torch.device, *, allowed: tuple[torch.dtype, ...] | None = TRAINING_DTYPES,
                  cpu_bf16: bool = True) -> torch.dtype:
    """A compute dtype from ``dtype``: None or ``"auto"`` (see ``auto_dtype``), a name (torch's or an
    alias such as ``bf16``/``fp32``/``half``) or a ``torch.dtype``.

    Args:
        device: where the model runs.
        allowed: the dtypes this caller can compute in (default float32 and bfloat16, what training
            supports); None allows any floating-point dtype.
        cpu_bf16: whether ``auto`` may pick bf16 on a CPU with AMX (``auto_dtype``).

    Raises:
        ValueError: a name that is not a dtype, or a dtype outside ``allowed``.

    Warns:
        UserWarning: bfloat16 on a CPU without native bf16 (slow there).
    """
    if dtype is None or dtype == "auto":
        return auto_dtype(device, cpu_bf16=cpu_bf16)
    value = dtype
    if isinstance(dtype, str):
        value = getattr(torch, ALIASES.get(dtype, dtype), None)
    ok = isinstance(value, torch.dtype) and value.is_floating_point and (allowed is None or value in allowed)
    if not ok:
        names = [str(d).removeprefix("torch.") for d in allowed] if allowed else ["float32", "bfloat16", "float16"]
        raise ValueError(f"dtype {dtype!r}: expected auto, {', '.join(names[:-1])} or {names[-1]}")
    if value == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("bf16 compute on a CPU without native bf16 (no AVX512-BF16/AMX): bf16 matmuls "
                      "are emulated and several times slower than fp32 here; prefer --dtype float32",
                      stacklevel=2)
    return value


def onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's linear kernel (``torch.ops.mkldnn._linear_pointwise``),
    which training's frozen linears and the engine's packed weights call on the CPU."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x Wᵀ + b`` by oneDNN: ``x`` (..., in); ``weight`` (out, in), a transposed view, or a copy
    packed by ``torch.ops.mkldnn._reorder_linear_weight``; ``bias`` (out,) or None -> (..., out).
    No autograd of its own."""
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")


# the overload itself: calling it skips the op packet's overload resolution on every call (a decode
# step calls it for every linear layer)
_ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise.default if onednn_linear_available() else None
