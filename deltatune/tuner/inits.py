"""LoRA initialisations peft users set by name: ``init_lora_weights="olora"``, ``"orthogonal"`` and ``"mica"``.

Registered with ``registry.register_init`` when ``deltatune.tuner`` is imported (every
``PeftModel`` imports it), so the adapter layers call them without importing this module. Each
sets adapter ``name``'s factors of a linear-like ``layer`` whose factors exist already.

- OLoRA (Büyükakyüz 2024, arXiv:2406.01775): ``W = Q R``; ``B = Q[:, :r]``, ``A = R[:r]``, and the
  base weight keeps the residual ``W - s·B A``, so the wrapped layer starts unchanged.
- Orthogonal: a random orthogonal ``r x r`` matrix ``Q``; A is built on its even rows, B on its
  odd rows, so ``B A = 0`` (the rows are orthogonal) while both factors are non-zero.
- MiCA (Minor Component Adaptation, arXiv:2604.01694): ``B`` = the ``r`` left singular vectors of
  ``W`` with the *smallest* singular values, ``A = 0`` (so the layer starts unchanged), and ``B``
  stays frozen in training: only ``A`` learns (``frozen_parameters``). Linear and embedding layers.
"""
from __future__ import annotations

import torch
from torch import nn

from deltatune import registry
from deltatune.config import ConfigError


def _dense_linear(layer: nn.Module, value: str, module_name: str) -> torch.Tensor:
    """The base weight (out, in) of a linear-like layer, else a ConfigError naming the module."""
    base = layer.get_base_layer()
    if not hasattr(layer, "lora_A") or not registry.is_linear(base):
        raise ConfigError(f"init_lora_weights={value!r} is only for linear layers, not {module_name} "
                          f"({type(base).__name__}); leave it out of target_modules")
    weight = registry.get_weight(base)
    if not weight.is_floating_point():
        raise ConfigError(f"init_lora_weights={value!r}: {module_name} has no full-precision weight")
    return weight


def olora_init(layer: nn.Module, name: str, config, module_name: str) -> None:
    """OLoRA's factors for adapter ``name``; the base weight becomes the residual (undone by
    ``layer.undo_init`` if the adapter is not added after all)."""
    weight = _dense_linear(layer, "olora", module_name)
    r, s = layer.r[name], layer.scaling[name]
    W = weight.detach().float()                                      # (out, in)
    Q, R = torch.linalg.qr(W)                                        # (out, k), (k, in)
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    with torch.no_grad():
        A.copy_(R[:r].to(A.dtype))                                   # (r, in)
        B.copy_(Q[:, :r].to(B.dtype))                                # (out, r)
        residual = W - s * (B.float() @ A.float())
    original = weight.detach().clone()
    registry.set_weight(layer.base_layer, residual.to(weight.dtype))

    def restore(layer=layer, original=original) -> None:
        registry.set_weight(layer.base_layer, original)

    layer._undo_init[name] = restore


def orthogonal_init(layer: nn.Module, name: str, config, module_name: str) -> None:
    """Factors from orthogonal halves of a random rotation: ``B @ A = 0``, neither is zero."""
    _dense_linear(layer, "orthogonal", module_name)
    r = layer.r[name]
    if r % 2:
        raise ConfigError(f"init_lora_weights='orthogonal' needs an even rank; {module_name} has r={r}")
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    Q, _ = torch.linalg.qr(torch.randn(r, r))                        # (r, r), orthonormal rows
    with torch.no_grad():
        A.copy_((torch.randn(A.shape[1], r // 2) @ Q[0::2]).T)        # (r, in): rows in span of even rows
        B.copy_(torch.randn(B.shape[0], r // 2) @ Q[1::2])            # (out, r): B A = X Q_odd Q_evenᵀ Y = 0


def _mica_factors(layer: nn.Module, name: str, module_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W (out, in) in fp32, A factor, B factor)`` of a linear or embedding LoRA layer."""
    base = layer.get_base_layer()
    if hasattr(layer, "lora_embedding_A") and isinstance(base, nn.Embedding):
        return base.weight.detach().float().T, layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    weight = _dense_linear(layer, "mica", module_name)                 # (out, in)
    return weight.detach().float(), layer.lora_A[name].weight, layer.lora_B[name].weight


def mica_init(layer: nn.Module, name: str, config, module_name: str) -> None:
    """MiCA's factors for adapter ``name``: ``B`` from ``W``'s minor left singular vectors, ``A = 0``.

    Raises:
        ValueError: ``r`` exceeds ``min(out, in)`` of the layer (peft's words first, then the module).
        TypeError: the base weight is not float32, float16 or bfloat16.
    """
    W, A, B = _mica_factors(layer, name, module_name)                  # W: (out, in); A: (r, in); B: (out, r)
    if B.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"Please initialize MiCA under float32, float16, or bfloat16 ({module_name} is {B.dtype})")
    r = layer.r[name]
    if r > min(W.shape):
        raise ValueError(f"MiCA requires `r` <= min(in_features, out_features) but got r={r} for {module_name} "
                         f"with weight shape {tuple(W.shape)} (max usable r is {min(W.shape)})")
    U, _, _ = torch.linalg.svd(W, full_matrices=False)                 # (out, k), singular values descending
    with torch.no_grad():
        B.copy_(U[:, -r:].to(B.dtype))                                 # (out, r): the minor components
        A.zero_()


def frozen_parameters(tuner, adapter_name: str, config) -> set[int]:
    """``id``s of adapter ``adapter_name``'s parameters that its initialisation keeps frozen in
    training (MiCA's ``B``); they are saved and loaded like any other adapter tensor."""
    if getattr(config, "init_lora_weights", None) != "mica":
        return set()
    frozen = set()
    for _, layer in tuner.adapter_layers():
        for attr in ("lora_B", "lora_embedding_B"):
            container = getattr(layer, attr, None)
            if container is not None and adapter_name in container:
                item = container[adapter_name]
                frozen.update(id(p) for p in (item.parameters() if isinstance(item, nn.Module) else [item]))
    return frozen


registry.register_init("olora", olora_init)
registry.register_init("orthogonal", orthogonal_init)
registry.register_init("mica", mica_init)
