"""BD-LoRA (block-diagonal LoRA): one of the two factors of a linear layer's LoRA is block-diagonal.

A tensor-parallel server shards a column-parallel layer (q/k/v, up/gate) by output rows and a
row-parallel one (o, down) by input columns. With ``B`` block-diagonal in ``nblocks`` blocks on a
column-sharded layer (``A`` on a row-sharded one), each shard's part of ``B A x`` needs only its
own slice of the rank-r activations, so the adapter adds no all-gather / all-reduce between GPUs.
That is the whole method; the math is LoRA's ``h = W x + s·B A x`` with

    A = blockdiag(A_1 .. A_k)  (r, in),  A_i (r/k, in/k)      (``target_modules_bd_a``)
    B = blockdiag(B_1 .. B_k)  (out, r), B_i (out/k, r/k)     (``target_modules_bd_b``)

Files are peft's: a block-diagonal factor is saved compactly, its blocks stacked along the rows,
``lora_A.weight`` (r, in/k) or ``lora_B.weight`` (out, r/k), under the usual keys.

Here a block-diagonal factor is a ``BlockDiagonalLinear`` child of ``lora_A``/``lora_B`` holding
that compact weight; ``LoraLinear`` reads every factor through ``dense_weight`` (the blocks laid
on the diagonal, zeros elsewhere), so its one-adapter path, its mixed-batch bank and merging are
LoRA's own. Only ``nn.Linear``-like layers take it (as in peft; other layer types ignore it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from deltatune.config import ConfigError


@dataclass
class BdLoraConfig:
    """Which targeted modules get a block-diagonal factor, and how many blocks (peft's names).

    Pass as ``LoraConfig(use_bdlora=BdLoraConfig(...))`` (or its dict, as a saved file holds it).

    Attributes:
        target_modules_bd_a: module-name substrings (``pattern in name``) whose ``A`` is
            block-diagonal: the row-sharded layers (attention out, MLP down).
        target_modules_bd_b: the same for ``B``: the column-sharded layers (q, k, v, up, gate).
        nblocks: blocks per block-diagonal factor, the serving shard count (default 1). The rank
            and the factor's outer dimension must both divide by it.
        match_strict: if True (default) every targeted module must match one of the two lists;
            False lets the others be plain LoRA.

    Raises:
        ValueError: a pattern is in both lists, or ``nblocks`` is not a positive integer.
    """

    target_modules_bd_a: Optional[list[str]] = None
    target_modules_bd_b: Optional[list[str]] = None
    nblocks: int = 1
    match_strict: bool = True

    def __post_init__(self) -> None:
        overlap = set(self.target_modules_bd_a or []) & set(self.target_modules_bd_b or [])
        if overlap:
            raise ConfigError(f"Found overlapping modules in target_modules_bd lists: {sorted(overlap)} are in both "
                              f"target_modules_bd_a={self.target_modules_bd_a} and "
                              f"target_modules_bd_b={self.target_modules_bd_b} (a factor pair has one block-diagonal side)")
        if isinstance(self.nblocks, bool) or not isinstance(self.nblocks, int) or self.nblocks < 1:
            raise ConfigError(f"use_bdlora.nblocks={self.nblocks!r} must be a positive integer")


def bdlora_settings(config) -> BdLoraConfig | None:
    """``config.use_bdlora`` as a ``BdLoraConfig`` (a file's dict is validated here, when the
    adapter is added, as peft does), or None when the adapter is plain LoRA.

    Raises:
        ConfigError: an unknown key or an invalid value in the dict, or BD-LoRA combined with
            DoRA or with an initialisation that reads the base weight (PiSSA, OLoRA, LoftQ, ...).
    """
    value = getattr(config, "use_bdlora", None)
    if value is None:
        return None
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(BdLoraConfig)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"use_bdlora: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
        value = BdLoraConfig(**value)
    if not isinstance(value, BdLoraConfig):
        raise ConfigError(f"use_bdlora must be a BdLoraConfig or its dict, got {value!r}")
    if getattr(config, "use_dora", False):
        raise ConfigError("use_bdlora cannot be combined with use_dora: DoRA's norms need the full factors")
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init != "gaussian":
        raise ConfigError(f"use_bdlora with init_lora_weights={init!r} is not supported: that initialisation "
                          "fills full (not block-diagonal) factors; use True, False or 'gaussian'")
    return value


class BlockDiagonalLinear(nn.Module):
    """A bias-free linear map whose matrix is ``blockdiag(W_1 .. W_k)``, stored compactly.

    ``weight`` is (out, in/k): the k blocks (out/k, in/k) stacked along the rows, peft's layout.
    """

    def __init__(self, in_features: int, out_features: int, nblocks: int, device=None) -> None:
        super().__init__()
        if in_features % nblocks or out_features % nblocks:
            raise ConfigError(f"BD-LoRA: in_features={in_features} or out_features={out_features} is not "
                              f"divisible by nblocks={nblocks}")
        self.in_features, self.out_features, self.nblocks = in_features, out_features, nblocks
        self.weight = nn.Parameter(torch.empty(out_features, in_features // nblocks, device=device))

    def dense_weight(self) -> torch.Tensor:
        """The full (out, in) matrix: the blocks on the diagonal, zeros elsewhere (differentiable)."""
        return torch.block_diag(*self.weight.chunk(self.nblocks, dim=0))

    weight_as_blockdiagonal_matrix = dense_weight   # peft's name for it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each block on its own slice of the input: (..., in) -> (..., out)."""
        k = self.nblocks
        xs = x.reshape(*x.shape[:-1], k, self.in_features // k)                  # (..., k, in/k)
        w = self.weight.reshape(k, self.out_features // k, self.in_features // k)  # (k, out/k, in/k)
        return torch.einsum("...km,knm->...kn", xs, w).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nblocks={self.nblocks}"


def dense_weight(factor: nn.Module) -> torch.Tensor:
    """A LoRA factor's matrix: ``factor.weight``, or a block-diagonal factor's full matrix."""
    if isinstance(factor, BlockDiagonalLinear):
        return factor.dense_weight()
    return factor.weight


def add_block_diagonal(layer: nn.Module, name: str, config, module_name: str) -> None:
    """Make one factor of adapter ``name`` on ``layer`` (a ``LoraLinear`` at ``module_name``)
    block-diagonal, as ``config.use_bdlora`` says; nothing when it does not use BD-LoRA.

    The new factor starts as peft's does: ``A`` Kaiming-uniform, ``B`` zeros (for any
    ``init_lora_weights``).

    Raises:
        ConfigError: ``module_name`` matches both lists, or neither with ``match_strict``, or a
            dimension does not divide by ``nblocks`` (each message names the module).
    """
    bd = bdlora_settings(config)
    if bd is None:
        return
    on_a = any(p in module_name for p in bd.target_modules_bd_a or [])
    on_b = any(p in module_name for p in bd.target_modules_bd_b or [])
    if on_a and on_b:
        raise ConfigError(f"Target {module_name} matches both A and B block-diagonal patterns of use_bdlora")
    if not (on_a or on_b):
        if bd.match_strict:
            raise ConfigError(f"Target {module_name} matches neither A nor B block-diagonal patterns of use_bdlora. "
                              "If this is intentional, set match_strict=False in BdLoraConfig.")
        return
    r, device = layer.r[name], layer.lora_A[name].weight.device
    try:
        if on_a:
            factor = BlockDiagonalLinear(layer.in_features, r, bd.nblocks, device=device)
            nn.init.kaiming_uniform_(factor.weight, a=0.0)   # peft's gain for this factor (not LoRA's a=sqrt(5))
        else:
            factor = BlockDiagonalLinear(r, layer.out_features, bd.nblocks, device=device)
            nn.init.zeros_(factor.weight)
    except ConfigError as exc:
        raise ConfigError(f"{module_name}: {exc}") from None
    (layer.lora_A if on_a else layer.lora_B)[name] = factor
    layer._register(name)   # drops caches that listed the replaced factor


__all__ = ["BdLoraConfig", "BlockDiagonalLinear", "add_block_diagonal", "bdlora_settings", "dense_weight"]
