"""Frozen fp32 linear layers through oneDNN's matmul on the CPU, during training steps only.

PyTorch sends fp32 ``F.linear``/``mm`` on the CPU to MKL's sgemm. On an AMD EPYC (Zen 4, AVX-512,
no AMX), one thread, measured in CPU time so that other processes on the core do not count,
oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the kernel inductor's CPU fusions call)
ran the default model's training shapes 8-15% faster than MKL, forward (``x Wᵀ``) and backward
(``g W``) alike, and the 49k-vocabulary head's logits 38% faster::

    (465, 576) x (576, 1536): MKL 78-92 GFLOP/s, oneDNN 94-102
    (125, 576) x (576, 49152): MKL 68, oneDNN 94

Those GEMMs are ~3/4 of an fp32 LoRA training step. ``FastLinears.active`` routes the frozen
``nn.Linear`` layers of a model (the base layers under the adapters) through ``FrozenLinear``
for the training forward passes; evaluation and generation keep ``F.linear``. Results differ
from MKL's only by summation order (fp32 rounding, ~1e-4 relative on these sizes).
"""
from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from deltatune.devices import onednn_linear, onednn_linear_available

# ``DELTATUNE_ONEDNN_LINEAR=0`` keeps every matmul on PyTorch's default kernel (A/B runs, bugs).
ENV = "DELTATUNE_ONEDNN_LINEAR"
# probed once: ``wants`` runs on every frozen linear's forward, and the probe costs ~5 us a call
_KERNEL = onednn_linear_available()


def available() -> bool:
    """Whether oneDNN's linear kernel exists in this torch build (and is not switched off by ``ENV``)."""
    return os.environ.get(ENV, "1") != "0" and _KERNEL


def wants(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where ``onednn_linear`` should replace ``F.linear``: fp32 on the CPU, plain tensors."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and available()
            and type(weight) in (torch.Tensor, nn.Parameter) and not torch.is_autocast_enabled("cpu"))


class FrozenLinear(torch.autograd.Function):
    """``x Wᵀ + b`` with a frozen ``W`` and ``b``: the gradient goes to ``x`` only (``g W``)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return onednn_linear(x, weight, bias)                                  # (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        return onednn_linear(grad_out, weight.t()), None, None                 # (..., in)


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for a frozen weight and bias, through oneDNN (autograd only where ``x`` needs it)."""
    if x.requires_grad and torch.is_grad_enabled():
        return FrozenLinear.apply(x, weight, bias)
    return onednn_linear(x, weight, bias)


def _forward(module: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not wants(x, module.weight):
            return nn.functional.linear(x, module.weight, module.bias)
        return frozen_linear(x, module.weight, module.bias)
    return forward


def frozen_linears(model: nn.Module) -> list[nn.Linear]:
    """The plain ``nn.Linear`` modules of ``model`` whose weight and bias are frozen fp32 CPU tensors."""
    out = []
    for m in model.modules():
        if type(m) is not nn.Linear:
            continue
        w, b = m.weight, m.bias
        if w.requires_grad or (b is not None and b.requires_grad) or w.dtype != torch.float32 \
                or w.device.type != "cpu" or type(w) not in (torch.Tensor, nn.Parameter):
            continue
        out.append(m)
    return out


class FastLinears:
    """The frozen linear layers of ``model``, switched to ``FrozenLinear`` within ``active()``."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = frozen_linears(model)
        self._forwards = [_forward(m) for m in self.layers]  # made once: active() is entered every pass

    def active(self):
        """Within this context the frozen linear layers compute through oneDNN."""
        return forwards_swapped(self.layers, self._forwards)


@contextmanager
def forwards_swapped(modules: list[nn.Module], forwards: list):
    """Within this context each module runs its given forward (an instance attribute, made once by
    the caller); the class's forward comes back on exit, also on an error."""
    for m, forward in zip(modules, forwards):
        m.forward = forward
    try:
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)


def all_active(*switches) -> ExitStack:
    """Every given switch's ``active()`` entered (None: skipped), as one context: the training
    forward's kernel switches (``FastLinears``, ``fused.FusedMLPs``), for ``deltatune train`` and
    ``train_many`` alike."""
    stack = ExitStack()
    for switch in switches:
        if switch is not None:
            stack.enter_context(switch.active())
    return stack


def why_not(device: torch.device, dtype: torch.dtype, sharded: bool, compiled: bool,
            checkpointing: bool) -> str | None:
    """Why a run keeps PyTorch's default fp32 matmuls, or None where ``FastLinears`` applies."""
    if device.type != "cpu" or dtype != torch.float32:
        return "only fp32 on the CPU"
    if sharded or compiled or checkpointing:
        return "not with FSDP, compile or gradient checkpointing"
    if not available():
        return f"no oneDNN linear kernel in this torch (or {ENV}=0)"
    return None


def fast_linears_for(model: nn.Module, device: torch.device, dtype: torch.dtype, sharded: bool = False,
                     compiled: bool = False, checkpointing: bool = False) -> FastLinears | None:
    """``FastLinears`` of ``model`` where they apply (``why_not`` is None), else None: the one
    builder for ``deltatune train`` and ``train_many``, so a multi-task pass runs its frozen GEMMs
    as a solo run does."""
    if why_not(device, dtype, sharded, compiled, checkpointing) is not None:
        return None
    from deltatune.training.precision import bound_cpu_kernel_caches

    bound_cpu_kernel_caches()  # oneDNN caches a kernel per shape, and row lengths vary
    return FastLinears(model)
