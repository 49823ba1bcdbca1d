"""The one LoRA kernel and the tensors it is fed: ``lora_matmul`` computes ``scale · x A B`` for one
adapter or for each row's own factors (gathered from a layer's bank), in place into a base output
in inference or out of place under autograd. Every LoRA and DoRA layer's delta ends here, so a
fused gather-matmul kernel (punica/S-LoRA style) would replace this one function.
"""
from __future__ import annotations

import functools

import torch

def lora_matmul(x: torch.Tensor, A: torch.Tensor | None, B: torch.Tensor, scale=1.0,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``scale · x A B``: the one LoRA kernel (a fused gather-matmul kernel would replace it here).

    Shapes:
        one adapter: ``x`` (..., in), ``A`` (in, r), ``B`` (r, out) -> (..., out);
        a factor per row: ``x`` (N, T.., in), ``A`` (N, in, r), ``B`` (N, r, out) -> (N, T.., out).
        ``A`` None: ``x`` is already in rank space (..., r) (an embedding's row lookup).
    Args:
        scale: a number, or a 0-d tensor (a compiled hot-swap's: no recompile when it changes).
        out: the base output to add into in place (inference: no autograd, the input's dtype, its
            own contiguous memory), returned; None: a new tensor (autograd-safe).
    """
    if out is None:
        h = x if A is None else x @ A                                          # (..., r)
        return (h * scale) @ B                                                 # (..., out)
    if B.dim() == 3:                                                           # a factor per row
        xs = x.reshape(x.shape[0], -1, x.shape[-1])                            # (N, T, in)
        h = xs if A is None else torch.bmm(xs, A)                              # (N, T, r)
        if isinstance(scale, torch.Tensor):
            h, scale = h * scale.to(h.dtype), 1.0
        rows = out.view(x.shape[0], -1, out.shape[-1])                         # (N, T, out)
        rows.baddbmm_(h, B) if scale == 1.0 else rows.baddbmm_(h, B, alpha=scale)
        return out
    xs = x.reshape(-1, x.shape[-1])                                            # (M, in)
    h = xs if A is None else xs @ A                                            # (M, r)
    if isinstance(scale, torch.Tensor):
        h, scale = h * scale.to(h.dtype), 1.0
    out.view(-1, out.shape[-1]).addmm_(h, B, alpha=scale)                     # (M, r) @ (r, out)
    return out


def add_bias(y: torch.Tensor, bias: torch.Tensor | None, scale=1.0, in_place: bool = False) -> torch.Tensor:
    """``y + scale·bias`` over the last dimension (``lora_bias``: B's bias is scaled like the rest
    of the delta); ``y`` (..., out), ``bias`` (out,) or None (returns ``y``). ``in_place``: add
    into ``y`` (inference, ``y`` the base output)."""
    if bias is None:
        return y
    b = (bias * scale).to(y.dtype)                                             # (out,)
    return y.add_(b) if in_place else y + b


def add_row_bias(y: torch.Tensor, bias: torch.Tensor | None, in_place: bool = False) -> torch.Tensor:
    """Each row's own bias (scale folded in, gathered by ``gather_bias``): ``y`` (N, ..., out),
    ``bias`` (N, out) or None (no adapter in the bank has one: returns ``y``)."""
    if bias is None:
        return y
    b = bias.to(y.dtype)[:, None, :]                                           # (N, 1, out)
    rows = y.view(y.shape[0], -1, y.shape[-1]) if in_place else y.reshape(y.shape[0], -1, y.shape[-1])
    if in_place:
        rows.add_(b)
        return y
    return (rows + b).view(y.shape)


def gather_bias(bank: dict[str, torch.Tensor], rows: torch.Tensor):
    """Each row's scaled B bias ``(N, out)`` from a bank's ``b`` (slots, out); None when the bank
    has none (no held adapter with ``lora_bias``)."""
    return bank["b"][rows] if "b" in bank else None


def bank_bias(layer, like: torch.Tensor, out_features: int) -> torch.Tensor | None:
    """A bank's ``b`` (slots, out): each ``lora_bias`` adapter's B bias times its scaling, zeros
    elsewhere (slot 0, adapters without one); None when no held adapter has one."""
    names = [n for n in layer.held if layer.B_bias(n) is not None]
    if not names:
        return None
    b = like.new_zeros(layer.adapter_set.num_slots, out_features)
    for name in names:
        b[layer.adapter_set.slots[name]] = layer.B_bias(name).to(b.dtype) * layer.scaling[name]
    return b


def gather_lora(bank: dict[str, torch.Tensor], rows: torch.Tensor):
    """Each row's factors from a linear layer's bank: ``A (N, in, r)``, ``B (N, r, out)`` (scale
    folded in), dropout probability ``p (N,)``."""
    return bank["A"][rows].transpose(1, 2), bank["B"][rows].transpose(1, 2), bank["p"][rows]


_GATHER_AS: dict = {}


def cast_factors_on(device: torch.device) -> bool:
    """Whether inference on a 16-bit input should run fp32 LoRA factors as 16-bit copies.

    Not on the CPU: there small bf16 GEMMs cost more than the fp32 ones plus the casts (measured
    on this machine, (32, 576) x (576, 16) then x (16, 576): 68 us in bf16, 37 us casting to fp32),
    so the out-of-place path, which computes the delta in the factors' fp32, is kept. On
    accelerators 16-bit GEMMs are the fast ones.
    """
    return device.type != "cpu"


def gather_lora_as(dtype: torch.dtype):
    """``gather_lora`` returning the factors in ``dtype`` (one function object per dtype, so the
    per-route cache in ``AdapterLayer.gathered`` keeps one entry per dtype)."""
    if dtype not in _GATHER_AS:
        def gather(bank, rows):
            A, B, p = gather_lora(bank, rows)
            return A.to(dtype), B.to(dtype), p
        _GATHER_AS[dtype] = gather
    return _GATHER_AS[dtype]


def gather_embedding(bank: dict[str, torch.Tensor], rows: torch.Tensor):
    """Rows' slots, the whole lookup bank ``A (slots, vocab, r)`` and each row's ``B (N, r, dim)``."""
    return rows, bank["A"], bank["B"][rows]


def row_dropout(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Inverted dropout with a probability per row: ``x`` (N, T, d), ``p`` (N,)."""
    keep = (1.0 - p).to(x.dtype)[:, None, None]                        # (N, 1, 1)
    mask = torch.rand_like(x) < keep
    return torch.where(mask, x / keep.clamp_min(1e-12), torch.zeros_like(x))


def may_add_in_place(x: torch.Tensor, result: torch.Tensor) -> bool:
    """True when the delta may be added into the base output in place: no autograd, same dtype,
    and an output whose memory is its own layout (a fresh, contiguous tensor)."""
    return not torch.is_grad_enabled() and x.dtype == result.dtype and result.is_contiguous()


def by_runs(x: torch.Tensor, runs: list[tuple[int, int, int]], out_features: int, delta_of) -> torch.Tensor:
    """A mixed batch's delta computed run by run: ``delta_of(slot, x[start:end])`` for each run
    ``(start, end, slot)`` of ``adapter_set.row_runs`` (None: those rows get zeros, the base's),
    joined in row order; ``x`` (n, ..., in) -> (n, ..., out).

    What training's mixed passes use (their rows come grouped by task): gathering every row's
    factors from a stacked bank keeps an (n, in, r) and an (n, r, out) copy per layer for
    backward and restacks the bank on every call, since the factors change at every step.
    """
    parts = []
    for start, end, slot in runs:
        y = delta_of(slot, x[start:end])
        parts.append(x.new_zeros(end - start, *x.shape[1:-1], out_features) if y is None else y)
    if len(parts) == 1:
        return parts[0]
    dtype = functools.reduce(torch.promote_types, (p.dtype for p in parts))
    return torch.cat([p.to(dtype) for p in parts])
