"""DoRA (Liu et al. 2024, arXiv:2402.09353): weight = magnitude x direction, LoRA moves the direction.

    W' = m * (W + s·B A) / ||W + s·B A||        (norm per output row; per column for Embedding)

so the layer output is computed from the base output ``base(x) = W x + bias`` as

    y = g * (base(x) - bias + s·B(A(x))) + bias,      g = m / ||W + s·B A||

where ``s·B(A(x))`` is the LoRA layer's own ``delta`` (one kernel for LoRA and DoRA alike; in
inference it is added into the base output in place, then scaled by ``g``). With LoRA dropout in
training, ``W x`` must see the dropped-out input, as in peft, which costs one more pass through the
base layer. ``m`` (``lora_magnitude_vector``) starts at ``||W + s·B A||`` so a new adapter leaves
the model unchanged. Following the paper's section 4.3 the norm is treated as a constant: it gets
no gradient, so it is computed under ``no_grad`` and never enters the autograd graph.

The norm is computed without forming ``W + s·B A``:

    ||W_i + s (B A)_i||² = ||W_i||² + 2s·<B_i, (W Aᵀ)_i> + s²·B_i (A Aᵀ) B_iᵀ

``||W_i||²`` is cached while the base weight is unchanged, ``W Aᵀ`` is one (out, in) x (in, r)
product reading ``W`` once, the rest is r x r work: no dense copy of the weight per step. In eval
mode the norm itself is cached until the base weight or the factors change.

DoRA is not a layer class of its own: ``DoraMixin`` is what the one LoRA layer class per base type
(``methods/lora.py``) uses for its adapters that have a magnitude, beside plain LoRA adapters in the
same layer, so the order in which adapters wrap a module never matters. Files are peft's: the
magnitude is saved as ``<module>.lora_magnitude_vector`` with peft's shapes ((out,) for linear
layers, (dim,) for Embedding, (1, out, 1..) for Conv1d/2d/3d).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from deltatune import registry
from deltatune.adapter_set import MixingError
from deltatune.merging import dora_merge, dora_unmerge
from deltatune.methods.base import tensor_versions
from deltatune.methods.lora_kernel import may_add_in_place

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


def _gather_g(bank: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    return bank["g"][rows]                                              # (N, n_norms)


class DoraMixin:
    """What DoRA adds to a LoRA layer: magnitudes, the norm, the DoRA merge and output.

    The layer class provides ``delta``, ``adds_in_place`` and ``_dropout_active``, and may change the
    row layout below (one norm per output feature or channel; Embedding's are per dimension):
    ``_as_rows`` (weight -> (n_norms, k)), ``_from_rows`` (its inverse), ``_factor_rows`` (an
    adapter's ``(A, B)`` in that layout), ``_magnitude_shape`` (peft's stored shape) and
    ``_channel_view`` (an (out,) vector shaped to broadcast over the layer's output) and ``_row_view``
    (each row's (n, out) gains shaped likewise).
    """

    def _init_dora(self) -> None:
        self.lora_magnitude_vector = nn.ModuleDict()
        self._dora: dict[str, bool] = {}                       # names with a magnitude (a plain dict: read per call)
        self._base_sq: tuple | None = None                    # (base version key, ||W_i||²)
        self._norm_cache: dict[str, tuple] = {}               # name -> (version key, n)
        self._merge_norms: dict[str, torch.Tensor] = {}       # name -> n used when it was merged

    def per_adapter_tables(self) -> list[dict]:
        return super().per_adapter_tables() + [self._dora, self._norm_cache, self._merge_norms]

    def train(self, mode: bool = True):
        """Switching mode drops cached norms: fused optimizers update the factors in place
        without bumping their version counters, so a cache from before training is not trusted."""
        self._norm_cache.clear()
        return super().train(mode)

    def add_magnitude(self, name: str) -> None:
        """Make adapter ``name`` (its LoRA factors already made) a DoRA adapter: ``m = ||W + s·B A||``."""
        with torch.no_grad():
            m = self.weight_norm(name, cached=False)
        dtype = self._factor_rows(name)[0].dtype
        self.lora_magnitude_vector[name] = Magnitude(self._magnitude_shape(m).to(dtype))
        self._dora[name] = True
        self._register(name)  # the magnitude is one more of this adapter's tensors

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """peft saves ``lora_magnitude_vector.<name>.weight`` as ``lora_magnitude_vector``."""
        for key, p in super().adapter_parameters(name):
            yield (MAGNITUDE if key == f"{MAGNITUDE}.weight" else key), p

    # -- row layout (linear-likes and convolutions; Embedding overrides) --------------------------
    def _as_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)                                             # (out, in[·kh·kw])

    def _from_rows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return rows.reshape(like.shape)

    def _factor_rows(self, name: str):
        return self.lora_A[name].weight.flatten(1), self.lora_B[name].weight.flatten(1)  # (r, k), (out, r)

    def _factor_tensors(self, name: str) -> tuple:
        """The adapter's own factor tensors whose versions key the norm cache (a layout that
        builds new tensors, e.g. a grouped conv's, overrides this: new tensors have no history)."""
        return self._factor_rows(name)

    def _magnitude_shape(self, m: torch.Tensor) -> torch.Tensor:
        return m

    def _channel_view(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return t                                                             # features last

    def _row_view(self, g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Each row's (n, out) gains shaped to scale ``like`` row by row: (n, 1.., out) here."""
        return g.view(g.shape[0], *([1] * (like.dim() - 2)), -1)

    def magnitude(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s magnitude as a flat (n_norms,) vector."""
        m = self.lora_magnitude_vector[name].weight
        return m if m.dim() == 1 else m.reshape(-1)

    def uses_dora(self, route) -> bool:
        """True when this call's route (a held adapter's name, or per-row slots) needs DoRA's output."""
        return route in self._dora if isinstance(route, str) else bool(self._dora)

    # -- the norm ------------------------------------------------------------------------------
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
            key = (self._base_key(), tensor_versions(self._factor_tensors(name)), s)
            hit = self._norm_cache.get(name)
            if hit is not None and hit[0] == key:
                return hit[1]
        with torch.no_grad():
            W = self._as_rows(registry.get_weight(self.base_layer))           # (out, k)
            n = row_norms(W, A, B, s, self._base_sq_norms(W))
        if use_cache:
            self._norm_cache[name] = (key, n)
        return n

    def dora_gains(self, like: torch.Tensor) -> torch.Tensor:
        """The bank's ``g (slots, n_norms)``: ``m / ||W + s·B A||`` for DoRA adapters, ones for plain
        LoRA adapters and slot 0, so every row of a mixed batch computes ``g * (W x + s·B A x) + bias``."""
        first = next(iter(self.lora_magnitude_vector))
        g = torch.ones(self.adapter_set.num_slots, self.magnitude(first).numel(), dtype=like.dtype,
                       device=like.device)
        for name in self.lora_magnitude_vector:
            g[self.adapter_set.slots[name]] = self._gain_of(name, g)
        return g

    def _gain_of(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """``m / n`` (n_norms,) in ``like``'s dtype; gradient flows to ``m`` only."""
        m = self.magnitude(name)
        return (m / self.weight_norm(name).to(m.dtype)).to(like.dtype)

    # -- merging -------------------------------------------------------------------------------
    def dora_merged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """``(m / n) * (W + ΔW)``; remembers ``n`` so ``dora_unmerged_weight`` can invert exactly."""
        delta = self._as_rows(self.delta_weight(name).to(weight.device))             # (out, k)
        rows, self._merge_norms[name] = dora_merge(self._as_rows(weight), delta, self.magnitude(name))
        return self._from_rows(rows, weight)

    def dora_unmerged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        delta = self._as_rows(self.delta_weight(name).to(weight.device))
        rows = dora_unmerge(self._as_rows(weight), delta, self.magnitude(name), self._merge_norms.pop(name))
        return self._from_rows(rows, weight)

    # -- forward -------------------------------------------------------------------------------
    def dora_forward(self, x: torch.Tensor, route, base: torch.Tensor) -> torch.Tensor:
        """``g * (base - bias + delta(x, route)) + bias`` from the base output ``base``; in
        inference the delta goes into ``base`` in place (the LoRA fast path) and ``g`` scales it there."""
        bias = self._channel_view(getattr(self.base_layer, "bias", None))
        if isinstance(route, str) and self._dropout_active(route):
            return self._dora_dropout(x, route, base, bias)
        if not isinstance(route, str) and self.training:
            self._refuse_dropout_rows(route)
        if self.adds_in_place and may_add_in_place(x, base):
            out = self.delta(x, route, out=base if bias is None else base.sub_(bias))   # in place if it can
            out.mul_(self._gain(route, out))
            return out if bias is None else out.add_(bias)
        lora = self.delta(x, route).to(base.dtype)                           # (..., out)
        out = self._gain(route, base) * ((base if bias is None else base - bias) + lora)
        return out if bias is None else out + bias

    def _gain(self, route, like: torch.Tensor) -> torch.Tensor:
        """``g`` shaped to scale ``like``: one adapter's (out,) (channels for convolutions), or each
        row's (n, 1.., out) in a mixed batch."""
        if isinstance(route, str):
            return self._channel_view(self._gain_of(route, like))
        g = self.gathered(route, like.shape[0], _gather_g).to(like.dtype)    # (n, out)
        return self._row_view(g, like)

    def _dora_dropout(self, x: torch.Tensor, name: str, base: torch.Tensor, bias) -> torch.Tensor:
        """Training with dropout: the direction ``W x`` sees the same dropped-out input as the
        LoRA path (as in peft), which costs one more pass through the base layer."""
        h = self.lora_dropout[name](x)
        lora = self.delta(h, name, dropout=False).to(base.dtype)
        direction = self.base_layer(h)
        direction = direction if bias is None else direction - bias
        return base + self._gain(name, base) * (direction + lora) - direction

    def _refuse_dropout_rows(self, route: torch.Tensor) -> None:
        slots = set(route.tolist())
        if any(self._dropout_active(n) for n in self.held if self.adapter_set.slots[n] in slots):
            raise MixingError("DoRA with lora_dropout cannot train on a mixed-adapter batch (its direction "
                              "needs a second base pass per row); train each adapter on its own batches")
