"""LoRA (and DoRA) on ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``, grouped ones included.

One class for the three: ``A`` is a convolution with the base's kernel, stride, padding, dilation
and padding mode into ``r`` channels; ``B`` is a 1x1 convolution from ``r`` channels to the
base's outputs, with the base's ``groups`` (peft's layout, so files interchange: ``lora_A.weight``
(r, in, *kernel), ``lora_B.weight`` (out, r/groups, 1..), ``lora_magnitude_vector`` (1, out, 1..)).

A 1x1 convolution is a matmul over channels, and a grouped one a matmul by a block-diagonal
(out, r) matrix, so the delta is ``A``'s convolution, then ``lora_matmul`` (the one LoRA kernel)
over the channels. A mixed batch convolves each row with its own slot's ``A`` in one grouped
convolution (the rows as groups), then multiplies each row by its own ``B``: no loop over adapters.

With ``groups > 1`` the delta of a kernel is a dense (out, in, *kernel) kernel that the grouped
base cannot hold, so such an adapter cannot be merged (peft refuses too). DoRA's norm there follows
peft's formula (``B`` read as (out/groups, r) rows), so a DoRA file trained in peft gives the same
output here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune import registry
from deltatune.adapter_set import AdapterSet
from deltatune.config import ConfigError, LoraConfig, PeftType
from deltatune.merging import lora_delta
from deltatune.methods.lora import BaseWeightPassThrough, LoraLayer, _dropout_p, init_pair, pattern_value
from deltatune.methods.lora_kernel import add_bias, add_row_bias, bank_bias, gather_bias, lora_matmul, row_dropout

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def gather_conv(bank: dict[str, torch.Tensor], rows: torch.Tensor):
    """Each row's ``A`` kernels (N, r, in, *kernel), ``B`` (N, r, out) with the scaling folded in,
    and dropout probability ``p`` (N,)."""
    return bank["A"][rows], bank["B"][rows].transpose(1, 2), bank["p"][rows]


def conv_per_row(conv: nn.Module, x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """``conv``'s geometry (stride, padding, dilation, padding mode) with a kernel set per row.

    ``x`` (N, in, *S), ``kernels`` (N, r, in, *kernel) -> (N, r, *S'): the rows become the groups
    of one convolution.
    """
    n, nd = x.shape[0], x.dim() - 2
    padding = conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    out = _CONV_FNS[nd](x.reshape(1, -1, *x.shape[2:]), kernels.flatten(0, 1), None, conv.stride, padding,
                        conv.dilation, groups=n)                                  # (1, N·r, *S')
    return out.view(n, -1, *out.shape[2:])


class LoraConv(BaseWeightPassThrough, LoraLayer):
    """LoRA (and DoRA) on a 1-, 2- or 3-d convolution: ``y = base(x) + s·B(A(x))`` (with
    ``lora_bias``, B's 1x1 convolution has a bias per output channel, scaled with it)."""

    adds_in_place = False                    # the convolution by A makes a new tensor anyway
    takes_lora_bias = True

    def __init__(self, base_layer: nn.Module, adapter_set: AdapterSet | None = None) -> None:
        super().__init__(base_layer, adapter_set)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.nd = base_layer.weight.dim() - 2          # spatial dimensions
        self.groups = base_layer.groups

    def add_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        """As ``LoraLayer.add_adapter``; a grouped base needs a rank divisible by its groups (each
        group of outputs gets ``r/groups`` rank channels, as in peft)."""
        r = int(pattern_value(config.rank_pattern, module_name, config.r))
        if r % self.groups:
            raise ConfigError(f"LoRA on {module_name} ({type(self.base_layer).__name__}, groups={self.groups}) "
                              f"needs a rank divisible by groups; r={r} is not (set r or rank_pattern)")
        super().add_adapter(name, config, module_name)

    def create_factors(self, name: str, r: int) -> None:
        base, device, conv = self.base_layer, self._factor_device(), _CONVS[self.nd]
        self.lora_A[name] = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
                                 bias=False, padding_mode=base.padding_mode, device=device)
        self.lora_B[name] = conv(r, base.out_channels, 1, groups=self.groups, bias=False, device=device)

    def init_factors(self, name: str, init, module_name: str) -> None:
        if isinstance(init, str) and init.startswith("pissa"):
            raise ConfigError(f"init_lora_weights={init!r} is only for linear layers, not {module_name} "
                              f"({type(self.base_layer).__name__})")
        init_pair(self.lora_A[name].weight, self.lora_B[name].weight, init, self.r[name])

    def dense_B(self, name: str) -> torch.Tensor:
        """``B`` as the (out, r) matrix its 1x1 convolution multiplies the channels by
        (block-diagonal, one block per group, when the base is grouped)."""
        B = self.lora_B[name].weight.flatten(1)                              # (out, r/groups)
        if self.groups == 1:
            return B
        return torch.block_diag(*B.view(self.groups, -1, B.shape[1]))        # (out, r)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s·B A`` as a kernel (out, in, *kernel), fp32; not for a grouped base (see the module)."""
        if self.groups != 1:
            raise NotImplementedError(
                f"a LoRA adapter on a {type(self.base_layer).__name__} with groups={self.groups} cannot be merged: "
                "its delta is a dense kernel that the grouped convolution cannot hold; run it unmerged")
        return lora_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])

    # -- the delta -----------------------------------------------------------------------------
    def _one(self, name: str, x: torch.Tensor, out: torch.Tensor | None, dropout: bool) -> torch.Tensor:
        """The convolution by ``A`` into rank space, then ``lora_matmul`` over the channels:
        (N, in, *S) -> (N, out, *S') (unbatched (in, *S) too)."""
        A = self.lora_A[name]
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.weight.dtype)
        h = A(self.lora_dropout[name](x) if dropout else x).movedim(-self.nd - 1, -1)   # (N, *S', r)
        s = self.scaling[name]
        y = add_bias(lora_matmul(h, None, self.dense_B(name).T, s), self.B_bias(name), s)  # (N, *S', out)
        return y.movedim(-1, -self.nd - 1)

    def _rows(self, route: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """Each row's own adapter: its ``A`` kernels in one grouped convolution, then its ``B``."""
        n = x.shape[0]
        A, B, p = self.gathered(route, n, gather_conv)        # (n, r, in, *k), (n, r, out), (n,)
        h = x.to(A.dtype)
        if self.training and bool((p > 0).any()):
            h = row_dropout(h.reshape(n, -1, 1), p).view_as(h)
        h = conv_per_row(self.base_layer, h, A)                              # (n, r, *S')
        spatial = h.shape[2:]
        y = lora_matmul(h.flatten(2).transpose(1, 2), None, B)               # (n, T, out)
        y = add_row_bias(y, self.gathered(route, n, gather_bias))
        return y.transpose(1, 2).reshape(n, -1, *spatial)                    # (n, out, *S')

    def build_bank(self) -> dict[str, torch.Tensor]:
        """``A (slots, r_max, in, *kernel)``, ``B (slots, out, r_max)`` dense (block-diagonal when
        grouped) with the scaling folded in, dropout ``p (slots,)`` and DoRA gains ``g``; zeros
        where an adapter does not reach (slot 0, smaller ranks)."""
        S, r_max = self.adapter_set.num_slots, max(self.r[n] for n in self.held)
        like = self.lora_A[self.held[0]].weight
        A = like.new_zeros(S, r_max, *like.shape[1:])
        B = like.new_zeros(S, self.base_layer.out_channels, r_max)
        p = torch.zeros(S, device=like.device)
        for name in self.held:
            slot, r = self.adapter_set.slots[name], self.r[name]
            A[slot, :r] = self.lora_A[name].weight.to(A.dtype)
            B[slot, :, :r] = self.dense_B(name).to(B.dtype) * self.scaling[name]
            p[slot] = _dropout_p(self.lora_dropout[name])
        bank = {"A": A, "B": B, "p": p}
        b = bank_bias(self, like, self.base_layer.out_channels)
        if b is not None:
            bank["b"] = b                                                    # (slots, out), scaled
        if self.lora_magnitude_vector:
            bank["g"] = self.dora_gains(A)
        return bank

    # -- DoRA: one norm per output channel; peft stores the magnitude as (1, out, 1..) ------------
    def _magnitude_shape(self, m: torch.Tensor) -> torch.Tensor:
        return m.view(1, -1, *([1] * self.nd))

    def _channel_view(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.view(-1, *([1] * self.nd))          # (out, 1..): batched or not

    def _row_view(self, g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return g.view(g.shape[0], -1, *([1] * self.nd))                      # (n, out, 1..)

    def _factor_tensors(self, name: str) -> tuple:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _factor_rows(self, name: str):
        """``(A, B)`` rows whose product is the delta in the base weight's rows (out, in/g·kernel).

        Grouped: peft's DoRA norm reads ``B`` as (out/g, r) rows times ``A`` (r, in·kernel),
        reshaped to the grouped weight; the same product is written here as ``A`` split by input
        group (g·r, in/g·kernel) times a sparse (out, g·r) ``B``, so ``row_norms`` computes it.
        """
        A = self.lora_A[name].weight.flatten(1)                              # (r, in·k)
        B = self.lora_B[name].weight
        if self.groups == 1:
            return A, B.flatten(1)                                           # (r, in·k), (out, r)
        g, r, out = self.groups, A.shape[0], B.shape[0]
        A_rows = A.view(r, g, -1).transpose(0, 1).reshape(g * r, -1)         # (g·r, in/g·k)
        o = torch.arange(out, device=B.device)
        B_rows = B.new_zeros(out, g, r)
        B_rows[o, o % g] = B.reshape(-1, r)[o // g]                          # peft's (out/g, r) rows
        return A_rows, B_rows.view(out, g * r)


def _register() -> None:
    for base_type in _CONVS.values():
        registry.register_layer(PeftType.LORA.value, base_type, LoraConv)


_register()
