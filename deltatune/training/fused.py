"""SwiGLU (``silu(gate) * up``) as one autograd node that keeps two activations instead of three.

Eager PyTorch runs a Llama-family MLP's ``act_fn(gate_proj(x)) * up_proj(x)`` as two autograd
nodes: ``silu`` keeps ``gate`` and ``mul`` keeps ``silu(gate)`` and ``up``, three (N, I) tensors
per layer alive until the backward, of the ~10k floats per token and layer a LoRA training step
keeps in fp32 (SmolLM2: I = 1536 of them). ``SwiGLU`` keeps ``gate`` and ``up`` and recomputes
``silu(gate)`` in the backward (one elementwise pass), 15% less activation memory per token:
room for larger forward passes in the same memory (``max_batch_tokens``). Values and gradients
are the same ops in the same order as eager (``aten::silu``, ``silu_backward``).

``FusedMLPs.active`` switches the MLPs of a model to it for the training forward passes only.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from deltatune.training.cpu_linear import forwards_swapped

# activation classes that compute ``F.silu`` (torch's, and transformers 5's ``ACT2FN["silu"]``)
SILU = ("SiLU", "SiLUActivation")
# ``DELTATUNE_FUSED_MLP=0`` keeps eager MLPs (A/B runs, bugs).
ENV = "DELTATUNE_FUSED_MLP"


class SwiGLU(torch.autograd.Function):
    """``silu(gate) * up`` for (..., I) tensors; the backward recomputes ``silu(gate)``."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.nn.functional.silu(gate) * up                               # (..., I)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        grad_up = grad * torch.nn.functional.silu(gate) if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up                                                # (..., I) each


def swiglu_mlps(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that compute ``down_proj(silu(gate_proj(x)) * up_proj(x))``: a
    transformers ``*MLP`` class with those three projections and a SiLU ``act_fn``."""
    out = []
    for m in model.modules():
        if not type(m).__name__.endswith("MLP") or type(getattr(m, "act_fn", None)).__name__ not in SILU:
            continue
        if all(isinstance(getattr(m, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")):
            out.append(m)
    return out


def _forward(mlp: nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)                              # (..., I) each
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            return mlp.down_proj(SwiGLU.apply(gate, up))                         # (..., d)
        return mlp.down_proj(mlp.act_fn(gate) * up)
    return forward


class FusedMLPs:
    """The SwiGLU MLPs of ``model``, switched to ``SwiGLU`` within ``active()``."""

    def __init__(self, model: nn.Module) -> None:
        self.mlps = swiglu_mlps(model)
        self._forwards = [_forward(m) for m in self.mlps]

    def active(self):
        """Within this context the MLPs compute ``silu(gate) * up`` through ``SwiGLU``."""
        return forwards_swapped(self.mlps, self._forwards)


def fused_mlps_for(model: nn.Module, checkpointing: bool = False) -> FusedMLPs | None:
    """``FusedMLPs`` of ``model`` for ``deltatune train`` and ``train_many`` alike, or None where
    they do not apply: under gradient checkpointing (its recompute runs after ``active()`` has
    ended, eagerly) or with ``DELTATUNE_FUSED_MLP=0``."""
    if checkpointing or os.environ.get(ENV, "1") == "0":
        return None
    return FusedMLPs(model)
