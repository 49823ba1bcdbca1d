"""Base ``nn.Linear`` weights pre-packed for the CPU's GEMM at the engine's decode batch size (fp32).

Why: a decode step multiplies ``B`` rows (one token per running sequence, ``B <= max_num_seqs``)
by every weight matrix of the model. At such a small ``M`` an ordinary ``sgemm`` spends a large
part of its time re-packing the weight (``N x K``) into its blocked layout, on every call. Two
backends pack it once:

- "onednn" (the default where PyTorch has it): ``torch.ops.mkldnn._reorder_linear_weight`` packs
  for a row-count hint and ``torch.ops.mkldnn._linear_pointwise`` multiplies against the packed
  copy at any row count (no padding), prefills included. It is what vLLM's CPU build runs
  (``onednn_mm``). On an AMD EPYC (AVX-512, no AMX) it beat MKL's packed GEMM at every shape of the
  default model, at 1 and 2 threads, interleaved: 32 rows x the LM head (576 -> 49152) 51 ms
  against 155 ms, gate 576 -> 1536 1.4 against 1.8 ms, and 1344-row prefills 15% faster (MKL
  does not use its AVX-512 kernels on AMD CPUs).
- "mkl": ``cblas_sgemm_pack`` (``torch.ops.mkl._mkl_reorder_linear_weight``) and
  ``cblas_sgemm_compute`` (``torch.ops.mkl._mkl_linear``). The packed layout depends on ``M``, so
  it is made for one row count, ``max_num_seqs``: a batch of more than half that many rows is
  padded with zero rows up to it; other row counts go through the ordinary ``F.linear``.

The results are ``F.linear``'s up to the order of float sums (MKL's equal to the bit for the
default model's shapes at 32 rows here; oneDNN's within 2e-4 on outputs of magnitude ~25; the
tests check them to fp32 tolerance, and the engine's greedy tokens against HF generate's).

Cost: a packed copy of every base linear weight; the original stays, for the fallback and for
the adapter layers that read it (measured: an engine on the default model, 0.45 GB resident
unpacked, holds 1.46 GB packed with MKL). Only where the packed ops exist, on CPU, in float32
and without autograd; anything else runs the plain ``nn.Linear``. A weight changed after packing
(``copy_``, a new tensor) is packed again before its next use.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.devices import onednn_linear, onednn_linear_available
from deltatune.surgery import replace_module


def mkl_available() -> bool:
    """True where PyTorch has MKL's packed GEMM ops (x86 builds with MKL)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def onednn_available() -> bool:
    """True where PyTorch has oneDNN's linear kernel and its weight packing (``_reorder_linear_weight``)."""
    return onednn_linear_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def default_backend() -> str | None:
    """The packed GEMM ``pack_linears`` uses: "onednn" where it exists, else "mkl", else None."""
    return "onednn" if onednn_available() else "mkl" if mkl_available() else None


def available() -> bool:
    """True where PyTorch has a packed GEMM (oneDNN's or MKL's)."""
    return default_backend() is not None


# the overloads themselves: calling them skips the op packet's overload resolution on every call
_MKL_LINEAR = torch.ops.mkl._mkl_linear.default if mkl_available() else None
_REORDER = torch.ops.mkl._mkl_reorder_linear_weight.default if mkl_available() else None
_DNN_REORDER = torch.ops.mkldnn._reorder_linear_weight.default if onednn_available() else None


class PackedLinear(nn.Linear):
    """``nn.Linear`` whose weight also lives packed for ``rows``-row GEMMs (see the module doc).

    Built from an existing layer with ``PackedLinear.from_linear(layer, rows)``; shares its
    parameters (no copy of ``weight`` or ``bias``), so adapters wrap it like any ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rows: int = 1,
                 backend: str = "mkl", device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.rows, self.backend = rows, backend
        self._packed: torch.Tensor | None = None
        self._key: tuple | None = None

    @classmethod
    def from_linear(cls, layer: nn.Linear, rows: int, backend: str = "mkl") -> "PackedLinear":
        """A ``PackedLinear`` sharing ``layer``'s parameters, packed for ``rows`` rows by ``backend``
        ("mkl" or "onednn")."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.weight = layer.weight
        new.register_parameter("bias", layer.bias)
        new.rows, new.backend, new._packed, new._key = rows, backend, None, None
        new.train(layer.training)
        return new

    def packed_weight(self) -> torch.Tensor | None:
        """The packed copy of the current weight (packed again if the weight changed since); None
        while the weight is not a float32 CPU tensor."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._key != key:
            usable = w.dtype is torch.float32 and w.device.type == "cpu"
            reorder = _DNN_REORDER if self.backend == "onednn" else _REORDER
            self._packed = reorder(w.detach(), self.rows) if usable else None
            self._key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The checks are ordered cheapest first: this runs for every linear of every step.
        if self.backend == "onednn":
            return self._onednn(x)
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
        """A copy (``modules_to_save`` copies its base layer) that starts unpacked: a packed tensor
        (MKL's or oneDNN's) is opaque, with no storage to copy; the copy packs its own weight on first use."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = None if key in ("_packed", "_key") else copy.deepcopy(value, memo)
        return new

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        """oneDNN's prepacked GEMM for any row count (no padding: its packed weight serves every M)."""
        if x.dtype is torch.float32 and not x.is_cuda:
            w, packed = self.weight, self.packed_weight()
            if packed is not None and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)):
                return onednn_linear(x, packed, self.bias)                               # (..., out)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, packed_rows={self.rows}, backend={self.backend}"


def pack_linears(model: nn.Module, rows: int, backend: str | None = None) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` with a ``PackedLinear`` for ``rows`` rows,
    packed now by ``backend`` (default ``default_backend()``); returns how many. Call it on the bare
    base model, before adapters wrap it.

    Raises:
        RuntimeError: this PyTorch has no packed GEMM of that backend (check ``available()`` first).
    """
    backend = backend or default_backend()
    if backend not in ("mkl", "onednn") or not (mkl_available() if backend == "mkl" else onednn_available()):
        raise RuntimeError(f"this PyTorch build has no packed GEMM for backend {backend!r} (MKL: torch.ops.mkl."
                           "_mkl_linear, oneDNN: torch.ops.mkldnn._linear_pointwise)")
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    for name in names:
        layer = PackedLinear.from_linear(model.get_submodule(name), rows, backend)
        layer.packed_weight()
        replace_module(model, name, layer)
    return len(names)
