"""``torch.compile`` of the decoder layers for training steps (``compile=True`` / ``--compile``).

Each decoder layer's call is compiled once with dynamic shapes (rows change length from step to
step) and switched on only around the training forward passes (``LayerCompiler.active``), so
evaluation and generation, whose calls carry a KV cache and one-token inputs, stay eager and never
trigger compilations of their own. The layers of a model share one code object, so they share
graphs: the first step compiles (tens of seconds to minutes on a CPU), later steps reuse it.
Inductor fuses what eager PyTorch runs as separate memory-bound passes: RMSNorm's
``pow/mean/rsqrt/mul``, rotary's ``neg/cat/mul/add``, SwiGLU's ``silu * up``, the residual adds and
LoRA's scaling, forward and backward.

Where it cannot be used the run trains eagerly and says why: no C++ compiler for inductor on the
CPU, several processes (DDP/FSDP), gradient checkpointing, or a compilation that fails (then the
step is re-run eagerly, from the same seed, and compilation stays off for the rest of the run).
Time spent compiling is counted in the run's training time and reported (``compile_s``).
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers causal LM (``model.model.layers``, GPT-2's ``h``...)."""
    from deltatune.training.loss import unwrap

    hf = unwrap(model)
    decoder = hf.get_decoder() if hasattr(hf, "get_decoder") else hf
    for attr in ("layers", "h", "blocks"):
        layers = getattr(decoder, attr, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return list(layers)
    return []


def why_not(model: nn.Module, device: torch.device, world: int, checkpointing: bool) -> str | None:
    """Why compiling the decoder layers of ``model`` is off for this run, or None if it can be on."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if world > 1:
        return "not used with several processes (DDP/FSDP)"
    if checkpointing:
        return "not used with gradient checkpointing"
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++")
                                        if c):
        return "no C++ compiler on PATH (inductor needs one on the CPU; set CXX or install g++)"
    if not decoder_layers(model):
        return "no decoder layers found in the model"
    return None


class LayerCompiler:
    """Compiled calls of a model's decoder layers, switched on by ``active()``.

    Args:
        model: the wrapped model (its transformers model's decoder layers are compiled).
        dynamic: compile for dynamic shapes (True: one graph for every row length).
        backend: ``torch.compile``'s backend (``"inductor"``; ``"eager"`` traces without generating code).
    """

    def __init__(self, model: nn.Module, dynamic: bool = True, backend: str = "inductor") -> None:
        self.layers = decoder_layers(model)
        self.calls = [torch.compile(layer._call_impl, dynamic=dynamic, backend=backend) for layer in self.layers]
        self.enabled = True
        self.error: str | None = None

    @contextmanager
    def active(self):
        """Within this context the decoder layers run their compiled calls (if still enabled)."""
        if not self.enabled:
            yield
            return
        for layer, call in zip(self.layers, self.calls):
            layer._compiled_call_impl = call
        try:
            yield
        finally:
            for layer in self.layers:
                layer._compiled_call_impl = None

    def disable(self, exc: BaseException) -> None:
        """Stop using the compiled calls after ``exc``: the run continues eagerly."""
        self.enabled = False
        self.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"


def compile_seconds() -> float:
    """Seconds this process has spent in dynamo + inductor compilation so far (torch's own timers)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # pragma: no cover - older torch
        return 0.0
    keys = [k for k in compilation_time_metrics if k in ("_compile.compile_inner", "compile_inner")]
    keys += [k for k in compilation_time_metrics if "bw_compiler" in k or k == "compile_fx.<locals>.bw_compiler"]
    return float(sum(sum(compilation_time_metrics[k]) for k in dict.fromkeys(keys)))
