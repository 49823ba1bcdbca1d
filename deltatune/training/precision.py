"""Compute dtype: fp32, or bf16 where the hardware runs it natively.

bf16 mode keeps the frozen base weights in bf16 (half the memory, no per-step casts) and the
trainable adapter parameters, their gradients and AdamW state in fp32; matmuls run under
``torch.autocast``. The loss is always accumulated in fp32.

On CPUs without native bf16 instructions (no AVX512-BF16 / AMX), bf16 matmuls are emulated and
several times slower than fp32, so ``auto`` picks fp32 there and an explicit ``bfloat16`` warns.
"""
from __future__ import annotations

import functools
import os
import warnings
from contextlib import nullcontext

import torch


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


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on GPUs that support it and on CPUs where bf16 is the faster choice (AMX),
    else fp32.

    ``bfloat16`` on a CPU without native bf16 is honoured with a warning (it is slow there).
    """
    name = {"fp32": "float32", "bf16": "bfloat16"}.get(name, name)
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.bfloat16 if device.type == "cpu" and cpu_prefers_bf16() else torch.float32
    if name == "bfloat16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("bf16 compute on a CPU without native bf16 (no AVX512-BF16/AMX): bf16 matmuls "
                      "are emulated and several times slower than fp32 here; prefer --dtype float32",
                      stacklevel=2)
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype {name!r}: expected auto, float32 or bfloat16")
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def autocast_for(dtype: torch.dtype, device: torch.device):
    """A zero-argument context-manager factory: autocast to ``dtype``, or nothing for fp32."""
    if dtype == torch.float32:
        return nullcontext
    return functools.partial(torch.autocast, device.type, dtype=dtype)


# Entries kept in PyTorch's (ideep) and oneDNN's per-shape kernel caches; see ``bound_cpu_kernel_caches``.
CPU_KERNEL_CACHE = "32"


def bound_cpu_kernel_caches() -> None:
    """Cap the per-shape kernel caches bf16 matmuls fill on the CPU (default 1024 entries each).

    bf16 matmuls go through oneDNN, which JIT-compiles and caches a kernel per tensor shape.
    Training on variable-length batches meets new shapes at almost every step, so the caches
    grow the process by ~15 MB per step until they hold 1024 entries each (measured on
    SmolLM2-135M: +450 MB after 25 steps; fp32 stays flat). The entries are rarely reused, so
    a small cache costs no measurable speed. Takes effect if called before the first bf16
    matmul of the process; explicit ``LRU_CACHE_CAPACITY`` / ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``
    settings win.
    """
    os.environ.setdefault("LRU_CACHE_CAPACITY", CPU_KERNEL_CACHE)
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", CPU_KERNEL_CACHE)
