"""The one device and dtype rule (``deltatune.devices``) that training, serving and the CLI share:
``auto`` picks bf16 on a CPU only with AMX, and only for callers that can use it (the serving
engine keeps fp32 on CPU: its packed-GEMM and fused-norm fast paths are fp32); bf16 on a CPU
without native bf16 warns; names and aliases resolve the same everywhere."""
from __future__ import annotations

import warnings

import pytest
import torch

from deltatune import devices

CPU = torch.device("cpu")


def test_bf16_on_cpu_without_native_support_warns(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(devices, "cpu_prefers_bf16", lambda: False)
    assert devices.resolve_dtype("auto", CPU) == torch.float32
    with pytest.warns(UserWarning, match="slower than fp32"):
        assert devices.resolve_dtype("bfloat16", CPU) == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert devices.resolve_dtype("bf16", CPU) == torch.bfloat16


def test_auto_dtype_on_cpu_is_bf16_only_with_amx(monkeypatch):
    # AVX512-BF16 without AMX: bf16 matmuls run at about half fp32's rate, so auto picks fp32.
    monkeypatch.setattr(devices, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert devices.cpu_has_native_bf16() and not devices.cpu_prefers_bf16()
    assert devices.resolve_dtype("auto", CPU) == torch.float32
    monkeypatch.setattr(devices, "_cpu_flags", lambda: {"avx512_bf16", "amx_bf16", "amx_tile"})
    assert devices.resolve_dtype("auto", CPU) == torch.bfloat16
    assert devices.resolve_dtype(None, CPU) == torch.bfloat16
    # a caller whose CPU paths are fp32 (the serving engine) opts out of bf16 on CPU
    assert devices.resolve_dtype("auto", CPU, cpu_bf16=False) == torch.float32


def test_training_keeps_its_two_dtypes_and_training_precision_is_the_same_rule():
    from deltatune.training import precision

    assert precision.resolve_dtype is devices.resolve_dtype
    for name in ("float32", "fp32", torch.float32):
        assert devices.resolve_dtype(name, CPU) == torch.float32
    with pytest.raises(ValueError, match=r"dtype 'float16': expected auto, float32 or bfloat16"):
        devices.resolve_dtype("float16", CPU)
    with pytest.raises(ValueError, match="dtype 'int8'"):
        devices.resolve_dtype("int8", CPU, allowed=None)
    with pytest.raises(ValueError, match="dtype 'nonsense'"):
        devices.resolve_dtype("nonsense", CPU, allowed=None)
    assert devices.resolve_dtype("half", CPU, allowed=None) == torch.float16
    assert devices.resolve_dtype(torch.float64, CPU, allowed=None) == torch.float64


def test_engine_dtype_follows_the_rule(monkeypatch):
    from deltatune.serving import runner

    monkeypatch.setattr(devices, "_cpu_flags", lambda: {"avx512_bf16", "amx_bf16"})
    assert runner.engine_dtype(None, CPU) == torch.float32          # CPU fast paths are fp32
    assert runner.engine_dtype("auto", CPU) == torch.float32
    assert runner.engine_dtype("float16", CPU) == torch.float16     # serving may run fp16
    assert runner.engine_dtype(torch.bfloat16, CPU) == torch.bfloat16
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        assert runner.engine_dtype(None, cuda) == devices.auto_dtype(cuda)


def test_pick_device():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert devices.pick_device().type == want and devices.pick_device("auto").type == want
    assert devices.pick_device("cpu") == CPU
