"""DoRA (Liu et al. 2024, arXiv:2402.09353): weight = magnitude x direction, LoRA moves the direction.

    W' = m * (W + s·B A) / ||W + s·B A||        (norm per output row; per column for Embedding)

so the layer output is computed from the base output ``base(x) = W x + bias`` as

    y = (m / n) * (base(x) - bias + s·B(A(x))) + bias

(with LoRA dropout in training, ``W x`` must see the dropped-out input, as in peft, which costs one
more pass through the base layer).
``m`` (``lora_magnitude_vector``) starts at ``||W + s·B A||`` so a new adapter leaves the model
unchanged. Following the paper's section 4.3 the norm ``n`` is treated as a constant: it gets no
gradient, so it is computed under ``no_grad`` and never enters the autograd graph.

The norm is computed without forming ``W + s·B A``:

    ||W_i + s (B A)_i||² = ||W_i||² + 2s·<B_i, (W Aᵀ)_i> + s²·B_i (A Aᵀ) B_iᵀ

``||W_i||²`` is cached while the base weight is unchanged, ``W Aᵀ`` is one (out, in) x (in, r)
product reading ``W`` once, the rest is r x r work: no dense copy of the weight per step. In eval
mode the norm itself is cached until the base weight or the factors change.

Files are peft's: the magnitude is saved as ``<module>.lora_magnitude_vector`` with peft's shapes
((out,) for linear layers, (dim,) for Embedding, (1, out, 1, 1) for Conv2d).

The DoRA layers subclass the LoRA layers; a DoRA layer may also hold plain LoRA adapters (those
without a magnitude). They are registered as the ``use_dora`` variant of the LoRA method, so
``TunerModel.inject`` picks them whenever ``LoraConfig(use_dora=True)``.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
from torch import nn

from deltatune import registry
from deltatune.adapter_set import AdapterSet, MixingError
from deltatune.config import LoraConfig, PeftType
from deltatune.merging import dora_merge, dora_unmerge
from deltatune.methods.base import tensor_versions
from deltatune.methods.lora import LoraConv2d, LoraEmbedding, LoraLinear, gather_lora, lora_bmm

MAGNITUDE = "lora_magnitude_vector"


class Magnitude(nn.Module):
    """One adapter's magnitude vector, as ``.weight`` (peft's module layout, so state dicts match)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(value)


def row_norms(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float,
              base_sq: torch.Tensor | None = None) -> torch.Tensor:
    """``||W_i + s·(B A)_i||`` for every row ``i``, fp32, without forming ``W + s·B A``.

    Args:
        W: (out, k) base weight rows (any float dtype; not copied when it is fp32).
        A: (r, k) and B: (out, r) LoRA factors in the same row layout.
        s: LoRA scaling.
        base_sq: cached ``||W_i||²`` (out,) fp32; computed when None.
    """
    A32, B32 = A.float(), B.float()
    if base_sq is None:
        base_sq = torch.linalg.vector_norm(W, dim=1, dtype=torch.float32).square()
    WA = (W @ A.to(W.dtype).T).float()                                  # (out, r)
    t = torch.addmm(WA, B32, A32 @ A32.T, beta=2 * s, alpha=s * s)       # 2s·W Aᵀ + s²·B A Aᵀ
    return torch.linalg.vecdot(B32, t).add_(base_sq).sqrt_()            # (out,)


class DoraMixin:
    """What DoRA adds to a LoRA layer class: magnitudes, the norm, the DoRA merge.

    A subclass defines ``_as_rows`` (weight layout -> (n_norms, k) rows), ``_from_rows`` (inverse)
    and ``_factor_rows`` (the adapter's ``(A, B)`` in that row layout).
    """

    def __init__(self, base_layer: nn.Module, adapter_set: AdapterSet | None = None) -> None:
        super().__init__(base_layer, adapter_set)
        self.lora_magnitude_vector = nn.ModuleDict()
        self._base_sq: tuple | None = None                    # (base version key, ||W_i||²)
        self._norm_cache: dict[str, tuple] = {}               # name -> (version key, n)
        self._merge_norms: dict[str, torch.Tensor] = {}       # name -> n used when it was merged

    def per_adapter_tables(self) -> list[dict]:
        return super().per_adapter_tables() + [self._norm_cache, self._merge_norms]

    def train(self, mode: bool = True):
        """Switching mode drops cached norms: fused optimizers update the factors in place
        without bumping their version counters, so a cache from before training is not trusted."""
        self._norm_cache.clear()
        return super().train(mode)

    def add_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        """The LoRA adapter, plus (when ``config.use_dora``) its magnitude ``m = ||W + s·B A||``."""
        super().add_adapter(name, dataclasses.replace(config, use_dora=False), module_name)
        if not config.use_dora:
            return
        with torch.no_grad():
            m = self.weight_norm(name, cached=False)
        dtype = self._factor_rows(name)[0].dtype
        self.lora_magnitude_vector[name] = Magnitude(self._magnitude_shape(m).to(dtype))
        self._register(name)  # the magnitude is one more of this adapter's tensors

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """peft saves ``lora_magnitude_vector.<name>.weight`` as ``lora_magnitude_vector``."""
        for key, p in super().adapter_parameters(name):
            yield (MAGNITUDE if key == f"{MAGNITUDE}.weight" else key), p

    def _magnitude_shape(self, m: torch.Tensor) -> torch.Tensor:
        return m

    def magnitude(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s magnitude as a flat (n_norms,) vector."""
        m = self.lora_magnitude_vector[name].weight
        return m if m.dim() == 1 else m.reshape(-1)

    # -- the norm ------------------------------------------------------------------------------
    def _base_rows(self) -> torch.Tensor:
        return self._as_rows(registry.get_weight(self.base_layer))

    def _base_key(self) -> tuple:
        """Identity and version of the base layer's own tensors: changes when they are written."""
        base = self.base_layer
        return tensor_versions(t for t in (*base._parameters.values(), *base._buffers.values()) if t is not None)

    def _base_sq_norms(self, W: torch.Tensor) -> torch.Tensor:
        """``||W_i||²`` (fp32), recomputed only when the base weight changed (merge, PiSSA, ...)."""
        key = self._base_key()
        if self._base_sq is None or self._base_sq[0] != key:
            self._base_sq = (key, torch.linalg.vector_norm(W, dim=1, dtype=torch.float32).square())
        return self._base_sq[1]

    def weight_norm(self, name: str, cached: bool = True) -> torch.Tensor:
        """``||W + s·B A||`` per row (fp32, no grad).

        In eval mode the result is cached until the base weight, the factors or the scaling
        change (or the mode changes); in training the factors change every step, so it is
        recomputed (cheaply).
        """
        A, B = self._factor_rows(name)
        s = self.scaling[name]
        use_cache = cached and not self.training
        if use_cache:
            key = (self._base_key(), tensor_versions((A, B)), s)
            hit = self._norm_cache.get(name)
            if hit is not None and hit[0] == key:
                return hit[1]
        with torch.no_grad():
            W = self._base_rows()                                            # (out, k)
            n = row_norms(W, A, B, s, self._base_sq_norms(W))
        if use_cache:
            self._norm_cache[name] = (key, n)
        return n

    # -- merging -------------------------------------------------------------------------------
    def merged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """``(m / n) * (W + ΔW)``; remembers ``n`` so ``unmerged_weight`` can invert exactly."""
        if name not in self.lora_magnitude_vector:
            return super().merged_weight(weight, name)
        delta = self._as_rows(self.delta_weight(name).to(weight.device))             # (out, k)
        rows, self._merge_norms[name] = dora_merge(self._as_rows(weight), delta, self.magnitude(name))
        return self._from_rows(rows, weight)

    def unmerged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return super().unmerged_weight(weight, name)
        delta = self._as_rows(self.delta_weight(name).to(weight.device))
        rows = dora_unmerge(self._as_rows(weight), delta, self.magnitude(name), self._merge_norms.pop(name))
        return self._from_rows(rows, weight)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        route = self.route()
        if route is None or (isinstance(route, str) and route not in self.lora_magnitude_vector) \
                or (isinstance(route, torch.Tensor) and not len(self.lora_magnitude_vector)):
            return super().forward(x, *args, **kwargs)                # base, or a plain LoRA adapter
        base = self.base_layer(x, *args, **kwargs)
        if isinstance(route, str):
            return self._dora_output(route, x, base)
        return self._mixed_output(x, route, base)

    def build_bank(self) -> dict[str, torch.Tensor]:
        """LoRA's bank plus ``g (slots, n_norms)``: ``m / ||W + s·B A||`` for DoRA adapters, ones for
        plain LoRA adapters and slot 0, so every row computes ``g * (W x + s·B A x) + bias``."""
        bank = super().build_bank()
        like = next(iter(bank.values()))
        g = torch.ones(self.adapter_set.num_slots, self.magnitude(next(iter(self.lora_magnitude_vector))).numel(),
                       dtype=like.dtype, device=like.device)
        for name in self.lora_magnitude_vector:
            m = self.magnitude(name)
            g[self.adapter_set.slots[name]] = (m / self.weight_norm(name).to(m.dtype)).to(g.dtype)
        bank["g"] = g
        return bank

    def _scale(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """``m / n`` (n_norms,) in ``like``'s dtype; gradient flows to ``m`` only."""
        m = self.magnitude(name)
        return (m / self.weight_norm(name).to(m.dtype)).to(like.dtype)

    def _dora_linear_output(self, name: str, x: torch.Tensor, base: torch.Tensor, bias, view) -> torch.Tensor:
        """Shared by Linear and Conv2d: ``(m/n) * (W x + s·B A x) + bias``.

        ``bias`` is the base layer's bias already shaped to broadcast (or None); ``view`` shapes
        the (out,) scale the same way.
        """
        A, B = self.lora_A[name], self.lora_B[name]
        dropout, s = self.lora_dropout[name], self.scaling[name]
        scale = view(self._scale(name, base))
        if isinstance(dropout, nn.Identity) or not self.training:
            lora = B(A(x.to(A.weight.dtype))).to(base.dtype)
            direction = base if bias is None else base - bias            # W x
            out = scale * torch.add(direction, lora, alpha=s)
            return out if bias is None else out + bias
        # Training with dropout: the direction must see the same dropped-out input as the LoRA
        # path (as in peft), which costs one more pass through the base layer.
        h = dropout(x.to(A.weight.dtype))
        lora = B(A(h)).to(base.dtype)
        direction = self.base_layer(h.to(x.dtype))
        direction = direction if bias is None else direction - bias
        return base + scale * torch.add(direction, lora, alpha=s) - direction


def gather_dora(bank: dict[str, torch.Tensor], rows: torch.Tensor):
    """``gather_lora``'s factors plus each row's DoRA scale ``g (N, out)``."""
    return (*gather_lora(bank, rows), bank["g"][rows])


def _gather_g(bank: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    return bank["g"][rows]


class DoraLinear(DoraMixin, LoraLinear):
    """DoRA on a linear-like layer (``nn.Linear``, transformers' ``Conv1D``)."""

    adapter_containers = LoraLinear.adapter_containers + (MAGNITUDE,)

    def _as_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight                                                        # (out, in)

    def _from_rows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return rows

    def _factor_rows(self, name: str):
        return self.lora_A[name].weight, self.lora_B[name].weight              # (r, in), (out, r)

    def _dora_output(self, name: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.base_layer, "bias", None)                        # (out,) or None
        return self._dora_linear_output(name, x, base, bias, lambda t: t)    # (..., out)

    def _mixed_output(self, x: torch.Tensor, route: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Each row: ``g * (base(x) - bias + s·B A x) + bias`` with its own factors and ``g``."""
        n = x.shape[0]
        A, B, p, g = self.gathered(route, n, gather_dora)       # (n, in, r), (n, r, out), (n,), (n, out)
        if self.training and bool((p > 0).any()):
            raise MixingError("DoRA with lora_dropout cannot train on a mixed-adapter batch (its direction "
                              "needs a second base pass per row); train each adapter on its own batches")
        h = x.reshape(n, -1, x.shape[-1]).to(A.dtype)
        delta = lora_bmm(h, A, B).reshape(base.shape).to(base.dtype)        # (..., out)
        bias = getattr(self.base_layer, "bias", None)
        g = g.to(base.dtype).view(n, *([1] * (base.dim() - 2)), -1)          # (n, 1.., out)
        out = g * ((base if bias is None else base - bias) + delta)
        return out if bias is None else out + bias


class DoraEmbedding(DoraMixin, LoraEmbedding):
    """DoRA on ``nn.Embedding``: one magnitude per embedding dimension (norms over the vocabulary)."""

    adapter_containers = LoraEmbedding.adapter_containers + (MAGNITUDE,)

    def _as_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T                                                      # (dim, vocab)

    def _from_rows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return rows.T

    def _factor_rows(self, name: str):
        return self.lora_embedding_A[name], self.lora_embedding_B[name]      # (r, vocab), (dim, r)

    def _lookup(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.lookup(name, x)                                          # (..., dim)

    def _dora_output(self, name: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        scale = self._scale(name, base)                                      # (dim,)
        lora = self._lookup(name, x).to(base.dtype)                          # (..., dim)
        return scale * torch.add(base, lora, alpha=self.scaling[name])

    def _mixed_output(self, x: torch.Tensor, route: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Each row: ``g * (base + s·B A[:, x])`` with its own factors and ``g``."""
        n = x.shape[0]
        g = self.gathered(route, n, _gather_g)                               # (n, dim)
        g = g.to(base.dtype).view(n, *([1] * (base.dim() - 2)), -1)
        return g * (base + self.mixed_delta(x, route).to(base.dtype))


class DoraConv2d(DoraMixin, LoraConv2d):
    """DoRA on ``nn.Conv2d``: one magnitude per output channel, stored (1, out, 1, 1) as in peft."""

    adapter_containers = LoraConv2d.adapter_containers + (MAGNITUDE,)

    def _magnitude_shape(self, m: torch.Tensor) -> torch.Tensor:
        return m.view(1, -1, 1, 1)

    def _as_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)                                             # (out, in·kh·kw)

    def _from_rows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return rows.reshape(like.shape)

    def _factor_rows(self, name: str):
        return self.lora_A[name].weight.flatten(1), self.lora_B[name].weight.flatten(1)  # (r, k), (out, r)

    def _dora_output(self, name: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        bias = self.base_layer.bias
        bias = None if bias is None else bias.view(1, -1, 1, 1)
        return self._dora_linear_output(name, x, base, bias, lambda t: t.view(1, -1, 1, 1))  # (N, out, H', W')


def _register() -> None:
    from transformers.pytorch_utils import Conv1D

    key = PeftType.LORA.value
    registry.register_method(key, LoraConfig, cli_names=("dora",), overrides={"use_dora": True})
    for base_type in (nn.Linear, Conv1D):
        registry.register_layer(key, base_type, DoraLinear, variant="use_dora")
    registry.register_layer(key, nn.Embedding, DoraEmbedding, variant="use_dora")
    registry.register_layer(key, nn.Conv2d, DoraConv2d, variant="use_dora")


_register()
