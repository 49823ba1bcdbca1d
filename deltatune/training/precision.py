"""Compute dtype: fp32, or bf16 where the hardware runs it natively.

bf16 mode keeps the frozen base weights in bf16 (half the memory, no per-step casts) and the
trainable adapter parameters, their gradients and AdamW state in fp32; matmuls run under
``torch.autocast``. The loss is always accumulated in fp32.

Which dtype ``auto`` means, and the warning for bf16 on a CPU without native bf16, are the rule
``deltatune.devices`` keeps for training and serving alike (re-exported here).
"""
from __future__ import annotations

import functools
import os
from contextlib import nullcontext

import torch

from deltatune.devices import cpu_has_native_bf16, cpu_prefers_bf16, resolve_dtype  # noqa: F401  (re-exported)


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
