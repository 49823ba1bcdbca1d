"""Base ``nn.Linear`` weights pre-packed for MKL's GEMM at the engine's decode batch size (CPU, fp32).

Why: a decode step multiplies ``B`` rows (one token per running sequence, ``B <= max_num_seqs``)
by every weight matrix of the model. At such a small ``M`` an ordinary ``sgemm`` spends a large
part of its time re-packing the weight (``N x K``) into its blocked layout, on every call.
``cblas_sgemm_pack`` does that once (``torch.ops.mkl._mkl_reorder_linear_weight``) and
``cblas_sgemm_compute`` (``torch.ops.mkl._mkl_linear``) then multiplies against the packed copy.
The packed layout depends on ``M``, so it is made for one row count, ``max_num_seqs``: decode
steps of a full batch (the case where throughput matters) and prefills of that many prompts
through the LM head take it; a batch of more than half that many rows is padded with zero rows
up to it (still faster, measured); other row counts go through the ordinary ``F.linear``. The results are ``F.linear``'s up to
the order of float sums (equal to the bit for the default model's shapes at 32 rows here; the
tests check them to fp32 tolerance).

Cost: a packed copy of every base linear weight; the original stays, for the fallback and for
the adapter layers that read it (measured: an engine on the default model, 0.45 GB resident
unpacked, holds 1.46 GB packed). Only where the packed
ops exist (PyTorch built with MKL), on CPU, in float32 and without autograd; anything else runs
the plain ``nn.Linear``. A weight changed after packing (``copy_``, a new tensor) is packed
again before its next use.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.surgery import replace_module


def available() -> bool:
    """True where PyTorch has MKL's packed GEMM ops (x86 builds with MKL)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


# the overloads themselves: calling them skips the op packet's overload resolution on every call
_MKL_LINEAR = torch.ops.mkl._mkl_linear.default if available() else None
_REORDER = torch.ops.mkl._mkl_reorder_linear_weight.default if available() else None


class PackedLinear(nn.Linear):
    """``nn.Linear`` whose weight also lives packed for ``rows``-row GEMMs (see the module doc).

    Built from an existing layer with ``PackedLinear.from_linear(layer, rows)``; shares its
    parameters (no copy of ``weight`` or ``bias``), so adapters wrap it like any ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rows: int = 1,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.rows = rows
        self._packed: torch.Tensor | None = None
        self._key: tuple | None = None

    @classmethod
    def from_linear(cls, layer: nn.Linear, rows: int) -> "PackedLinear":
        """A ``PackedLinear`` sharing ``layer``'s parameters, packed for ``rows`` rows."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.weight = layer.weight
        new.register_parameter("bias", layer.bias)
        new.rows, new._packed, new._key = rows, None, None
        new.train(layer.training)
        return new

    def packed_weight(self) -> torch.Tensor | None:
        """The packed copy of the current weight (packed again if the weight changed since); None
        while the weight is not a float32 CPU tensor."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._key != key:
            usable = w.dtype is torch.float32 and w.device.type == "cpu"
            self._packed = _REORDER(w.detach(), self.rows) if usable else None
            self._key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The checks are ordered cheapest first: this runs for every linear of every step.
        m = x.numel() // x.shape[-1]
        if self.rows // 2 < m <= self.rows and x.dtype is torch.float32 and not x.is_cuda:
            w, packed = self.weight, self.packed_weight()
            if packed is not None and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):
                if m == self.rows:
                    return _MKL_LINEAR(x, packed, w, self.bias, m)
                # a batch short of full: zero rows up to the packed count still beat the unpacked GEMM
                rows = x.new_zeros(self.rows, x.shape[-1])                           # (rows, in)
                rows[:m] = x.reshape(m, -1)
                out = _MKL_LINEAR(rows, packed, w, self.bias, self.rows)
                return out[:m].reshape(*x.shape[:-1], -1)                            # (..., out)
        return F.linear(x, self.weight, self.bias)

    def __deepcopy__(self, memo) -> "PackedLinear":
        """A copy (``modules_to_save`` copies its base layer) that starts unpacked: MKL's packed
        tensor is opaque, with no storage to copy, and the copy packs its own weight on first use."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = None if key in ("_packed", "_key") else copy.deepcopy(value, memo)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, packed_rows={self.rows}"


def pack_linears(model: nn.Module, rows: int) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` with a ``PackedLinear`` for ``rows`` rows,
    packed now; returns how many. Call it on the bare base model, before adapters wrap it.

    Raises:
        RuntimeError: this PyTorch has no MKL packed GEMM (check ``available()`` first).
    """
    if not available():
        raise RuntimeError("this PyTorch build has no MKL packed GEMM (torch.ops.mkl._mkl_linear)")
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    for name in names:
        layer = PackedLinear.from_linear(model.get_submodule(name), rows)
        layer.packed_weight()
        replace_module(model, name, layer)
    return len(names)
