"""LoRA (Hu et al. 2021, arXiv:2106.09685): ``h = W x + s * B A x`` with rank-r factors.

``s = merging.lora_scaling(lora_alpha, r, use_rslora)``: ``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023, arXiv:2312.03732). ``B`` starts at zero
so a new adapter leaves the model unchanged.

One layer class per base layer type: ``LoraLinear`` (``nn.Linear``, transformers' ``Conv1D``,
registered 4-bit layers) and ``LoraEmbedding`` here, ``LoraConv`` (``nn.Conv1d/2d/3d``, grouped too)
in ``methods/lora_conv.py``, ``LoraMultiheadAttention`` in ``methods/lora_mha.py``. Each holds plain LoRA and DoRA
adapters side by side (DoRA = LoRA + a magnitude, ``methods/dora.py``), so the order in which
adapters wrap a module never matters. Each has one ``delta(x, route)``: the single-adapter path and
the mixed-batch path (each row's factors gathered from the layer's bank) both end in
``lora_matmul``, the one LoRA kernel, run in place into the base output in inference and out of
place under autograd. Factors are ``nn.Linear``/``nn.ConvNd`` children so FSDP and
``torch.compile`` see ordinary modules.
"""
from __future__ import annotations

import math
import re
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltatune import merging, registry
from deltatune.adapter_set import AdapterSet, row_runs
from deltatune.config import ConfigError, LoraConfig, PeftType
from deltatune.merging import lora_delta
from deltatune.methods.alora import activation_mask, check_layer
from deltatune.methods.base import AdapterLayer
from deltatune.methods.bdlora import add_block_diagonal, dense_weight
from deltatune.methods.dora import MAGNITUDE, DoraMixin
from deltatune.methods.lora_bias import LoraBiasMixin
from deltatune.methods.lora_kernel import (add_bias, add_row_bias, bank_bias, by_runs, cast_factors_on,
                                           gather_bias, gather_embedding, gather_lora, gather_lora_as,
                                           lora_matmul, may_add_in_place, row_dropout)
from deltatune.target_defaults import complete_targets


def _dropout_p(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) else 0.0


def pattern_value(patterns: dict, module_name: str, default):
    """peft's per-module override: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def init_pair(A: torch.Tensor, B: torch.Tensor, init, r: int) -> None:
    """peft's start for a factor pair (any layout: linear or convolution kernels): ``True`` draws
    ``A`` Kaiming-uniform and zeroes ``B`` (the model starts unchanged), ``"gaussian"`` draws ``A``
    from N(0, 1/r²), ``False`` leaves both random (tests)."""
    if init is False:
        return
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(A, std=1 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.zeros_(B)


class LoraLayer(DoraMixin, LoraBiasMixin, AdapterLayer):
    """The LoRA layer of one base type: rank, alpha, scaling and dropout per adapter; an adapter
    with a magnitude (``use_dora``) is a DoRA adapter (``DoraMixin``).

    A subclass makes the factors (``create_factors``, ``init_factors``), gives the weight-layout
    delta (``delta_weight``) and DoRA's row layout, and computes its delta for one adapter
    (``_one``) and per row (``_rows``), both through ``lora_matmul``.
    """

    adapter_containers = ("lora_A", "lora_B", MAGNITUDE)
    adds_in_place: ClassVar[bool] = True    # the layer type has an in-place inference path

    def __init__(self, base_layer: nn.Module, adapter_set: AdapterSet | None = None) -> None:
        super().__init__(base_layer, adapter_set)
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_bias: dict[str, bool] = {}   # peft's table: adapter -> whether its B has a bias
        self._init_dora()

    def hyper_key(self) -> tuple:
        """Scalings enter the bank (folded into B); dropout is read only while training, when the
        bank is rebuilt on every call anyway."""
        return tuple(s if not isinstance(s, torch.Tensor) else (s.data_ptr(), s._version)
                     for s in self.scaling.values())

    def per_adapter_tables(self) -> list[dict]:
        return super().per_adapter_tables() + [self.r, self.lora_alpha, self.scaling, self.lora_bias]

    def delete_adapter(self, name: str) -> None:
        """Also drop the adapter's dropout module (a ModuleDict, not a per-adapter table)."""
        super().delete_adapter(name)
        if name in self.lora_dropout:
            del self.lora_dropout[name]

    def add_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        """Create adapter ``name`` for this layer from ``config`` (``module_name`` picks patterns);
        with ``use_dora`` it also gets its magnitude, with ``lora_bias`` a zero-start bias on B.

        Raises:
            ConfigError: ``lora_bias`` on a layer type that cannot apply it (``takes_lora_bias``).
        """
        check_layer(self, config, module_name)   # aLoRA: linear layers only
        if config.lora_bias:
            self._check_lora_bias(module_name)
        self.lora_bias[name] = bool(config.lora_bias)
        r = int(pattern_value(config.rank_pattern, module_name, config.r))
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = merging.lora_scaling(alpha, r, config.use_rslora)
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.create_factors(name, r)
        if config.lora_bias:
            self._add_B_bias(name, zero=config.init_lora_weights is not False)
        init = registry.init_for(config.init_lora_weights)   # e.g. LoftQ (deltatune.quant.loftq)
        if init is not None:
            init(self, name, config, module_name)
        else:
            self.init_factors(name, config.init_lora_weights, module_name)
        self._register(name)
        if config.use_dora:
            self.add_magnitude(name)

    def create_factors(self, name: str, r: int) -> None:
        """Adapter ``name``'s factors at rank ``r``: ``A`` (in -> r) and ``B`` (r -> out) as bias-free
        linears in ``lora_A``/``lora_B`` (layers of other shapes override this)."""
        device = self._factor_device()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device)

    def init_factors(self, name: str, init, module_name: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:  # pragma: no cover
        """``s * B @ A`` in the base weight's layout, fp32."""
        raise NotImplementedError

    def merged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        if name in self.lora_magnitude_vector:
            return self.dora_merged_weight(weight, name)
        return weight + self.delta_weight(name).to(weight.device)

    def unmerged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        if name in self.lora_magnitude_vector:
            return self.dora_unmerged_weight(weight, name)
        return weight - self.delta_weight(name).to(weight.device)

    def _factor_device(self) -> torch.device:
        for t in self.base_layer.parameters():
            return t.device
        for t in self.base_layer.buffers():
            return t.device
        return torch.device("cpu")

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + delta(x, route)`` for this call's route (DoRA adapters: ``dora_forward``)."""
        result = self.base_layer(x, *args, **kwargs)            # (..., out) or (N, out, H', W')
        route = self.route()
        if route is None:
            return result
        keep = activation_mask(self, route, x)                  # aLoRA: 0 before each row's invocation
        if keep is not None:
            return result + (self.delta(x, route) * keep).to(result.dtype)
        if self.uses_dora(route):
            return self.dora_forward(x, route, result)
        if self.adds_in_place and may_add_in_place(x, result):
            return self.delta(x, route, out=result)
        return result + self.delta(x, route).to(result.dtype)

    def delta(self, x: torch.Tensor, route, out: torch.Tensor | None = None, dropout: bool = True) -> torch.Tensor:
        """The LoRA change ``s·B A x`` for ``route``: an adapter's name (one adapter for the whole
        batch), or per-row slots (a LongTensor, as ``route()`` gives; slot-0 rows get zeros).

        Args:
            out: inference only (``may_add_in_place``): the base output; ``out + delta`` is
                returned, computed in place into ``out`` where the factors allow it (no dropout to
                apply; fp32 factors on a 16-bit input only where ``cast_factors_on`` says so).
                None: the delta, a new tensor (autograd-safe).
            dropout: apply the adapter's dropout (one adapter; DoRA passes an input it dropped).

        Raises:
            MixingError: per-row slots on a layer type without a per-row path (MultiheadAttention).
        """
        if isinstance(route, str):
            return self._one(route, x, out, dropout)
        return self._rows(route, x, out)

    def _dropout_active(self, name: str) -> bool:
        return self.training and _dropout_p(self.lora_dropout[name]) > 0


class BaseWeightPassThrough:
    """``weight`` and ``bias`` read from the wrapped layer, for layers whose callers read them
    directly (a convolution's users, torch's attention reading ``out_proj.weight``)."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias


class LoraLinear(LoraLayer):
    """LoRA (and DoRA) on a linear-like layer: ``y = base(x) + s·(x Aᵀ Bᵀ + b)`` (``b``, B's bias,
    only with ``lora_bias``)."""

    takes_lora_bias = True

    activatable: ClassVar[bool] = True       # aLoRA adapters allowed (``methods/alora.py``)

    def __init__(self, base_layer: nn.Module, adapter_set: AdapterSet | None = None) -> None:
        super().__init__(base_layer, adapter_set)
        self.in_features, self.out_features = registry.features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self._residual_of: set[str] = set()   # adapters whose init left the base weight a residual (PiSSA)
        self._undo_init: dict[str, object] = {}  # adapter -> callable restoring the base its init replaced (LoftQ)
        self._cast: dict[str, tuple] = {}      # name -> (versions, A, B) in an input dtype (inference)

    def per_adapter_tables(self) -> list[dict]:
        return super().per_adapter_tables() + [self._cast]

    def add_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        """LoRA's adapter; with ``use_bdlora`` one factor then becomes block-diagonal (``methods/bdlora.py``)."""
        super().add_adapter(name, config, module_name)
        add_block_diagonal(self, name, config, module_name)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s ``A`` (r, in) and ``B`` (out, r) as full matrices (BD-LoRA's expanded)."""
        return dense_weight(self.lora_A[name]), dense_weight(self.lora_B[name])

    def init_factors(self, name: str, init, module_name: str) -> None:
        if isinstance(init, str) and init.startswith("pissa"):
            with torch.no_grad():
                self._init_pissa(name, init)
            return
        init_pair(self.lora_A[name].weight, self.lora_B[name].weight, init, self.r[name])

    def _init_pissa(self, name: str, init: str) -> None:
        """PiSSA (Meng et al. 2024, arXiv:2404.02948): factors from the top-r singular triplets.

        The base weight keeps the residual ``W - s * B @ A`` so the wrapped layer is unchanged.
        """
        r, s = self.r[name], self.scaling[name]
        W = registry.get_weight(self.base_layer).float()        # (out, in)
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:
            niter = int(init[len("pissa_niter_"):])
            U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
            Vh = V.T
        root = torch.sqrt(S / s)                               # (r,)
        self.lora_A[name].weight.copy_(root[:, None] * Vh)     # (r, in)
        self.lora_B[name].weight.copy_(U * root[None, :])      # (out, r)
        registry.set_weight(self.base_layer, W - s * self.lora_B[name].weight @ self.lora_A[name].weight)
        self._residual_of.add(name)

    def undo_init(self, name: str) -> None:
        """Give the base weight back what PiSSA's initialisation took from it, or the base layer
        LoftQ's replaced (a failed add)."""
        restore = self._undo_init.pop(name, None)
        if restore is not None:
            restore()
        if name in self._residual_of:
            with torch.no_grad():
                W = registry.get_weight(self.base_layer).float()
                registry.set_weight(self.base_layer, W + self.delta_weight(name))
            self._residual_of.discard(name)

    def keep_init(self, name: str) -> None:
        """The adapter was added: drop what ``undo_init`` would have needed (LoftQ's dense base)."""
        self._undo_init.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        return lora_delta(*self.factors(name), self.scaling[name])  # (out, in)

    def _one(self, name: str, x: torch.Tensor, out: torch.Tensor | None, dropout: bool) -> torch.Tensor:
        """One adapter: ``s·x Aᵀ Bᵀ`` (..., in) -> (..., out).

        In place (``out``) the factors run in the input's dtype: fp32 factors on a 16-bit base (as
        peft keeps them) through a copy cached until they change (the GEMMs still accumulate in
        fp32; no per-call casts of input and result). Out of place, the input is cast to the
        factors' dtype, except under autocast (the GEMMs cast it themselves: a cast to fp32 here
        would be cast straight back).
        """
        A, B = self.factors(name)                                          # (r, in), (out, r)
        s, b = self.scaling[name], self.B_bias(name)                         # b: (out,) or None
        if out is not None:
            if (dropout and self.training and _dropout_p(self.lora_dropout[name]) > 0) or not (
                    A.dtype == x.dtype or cast_factors_on(x.device)):
                return out + self._one(name, x, None, dropout).to(out.dtype)
            if A.dtype != x.dtype:
                A, B = self._factors_in(name, A, B, x.dtype)
            return add_bias(lora_matmul(x, A.T, B.T, s, out), b, s, in_place=True)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(A.dtype)
        return add_bias(lora_matmul(self.lora_dropout[name](x) if dropout else x, A.T, B.T, s), b, s)

    def _factors_in(self, name: str, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype):
        a, b = self.lora_A[name].weight, self.lora_B[name].weight   # the stored parameters: BD-LoRA's dense A, B
        key = (a._version, b._version, a.data_ptr(), b.data_ptr(), dtype)   # are new tensors on every call
        hit = self._cast.get(name)
        if hit is None or hit[0] != key:
            hit = self._cast[name] = (key, A.to(dtype), B.to(dtype))
        return hit[1], hit[2]

    def _rows(self, route: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """Each row's own adapter delta, gathered from the bank (in the input's dtype in place)."""
        n = x.shape[0]
        if out is not None:
            if self.training or not (self.lora_A[self.held[0]].weight.dtype == x.dtype or cast_factors_on(x.device)):
                return out + self._rows(route, x, None).to(out.dtype)
            A, B, _ = self.gathered(route, n, gather_lora_as(x.dtype))    # (n, in, r), (n, r, out)
            return add_row_bias(lora_matmul(x, A, B, out=out), self.gathered(route, n, gather_bias), in_place=True)
        if self.training:  # each run of rows through its adapter's own _one (lora_kernel.by_runs)
            names = {slot: name for name, slot in self.adapter_set.slots.items() if name in self.lora_A}
            return by_runs(x, row_runs(route, n), self.out_features,
                           lambda slot, rows: self._one(names[slot], rows, None, True) if slot in names else None)
        A, B, p = self.gathered(route, n, gather_lora)          # (n, in, r), (n, r, out), (n,)
        h = x.reshape(n, -1, x.shape[-1]).to(A.dtype)           # (n, T, in)
        if self.training and bool((p > 0).any()):
            h = row_dropout(h, p)
        y = add_row_bias(lora_matmul(h, A, B), self.gathered(route, n, gather_bias))    # (n, T, out)
        return y.reshape(*x.shape[:-1], -1)                     # (..., out)

    def build_bank(self) -> dict[str, torch.Tensor]:
        """``A (slots, r_max, in)``, ``B (slots, out, r_max)`` with the scaling folded into B,
        dropout ``p (slots,)`` and, with DoRA adapters, their gains ``g``; zeros where an adapter
        does not reach (slot 0, smaller ranks)."""
        S, r_max = self.adapter_set.num_slots, max(self.r[n] for n in self.held)
        like = self.lora_A[self.held[0]].weight
        A = like.new_zeros(S, r_max, self.in_features)
        B = like.new_zeros(S, self.out_features, r_max)
        p = torch.zeros(S, device=like.device)
        for name in self.held:
            slot, r = self.adapter_set.slots[name], self.r[name]
            A_n, B_n = self.factors(name)                            # (r, in), (out, r)
            A[slot, :r] = A_n.to(A.dtype)
            B[slot, :, :r] = B_n.to(B.dtype) * self.scaling[name]
            p[slot] = _dropout_p(self.lora_dropout[name])
        bank = {"A": A, "B": B, "p": p}
        b = bank_bias(self, like, self.out_features)
        if b is not None:
            bank["b"] = b                                       # (slots, out), scaled
        if self.lora_magnitude_vector:
            bank["g"] = self.dora_gains(A)
        return bank


class LoraEmbedding(LoraLayer):
    """LoRA (and DoRA) on ``nn.Embedding``: the row lookup goes through ``A`` (r, vocab), then
    ``B`` (dim, r). No dropout (as in peft); DoRA norms run over the vocabulary, per dimension."""

    adapter_containers = ("lora_embedding_A", "lora_embedding_B", MAGNITUDE)
    adds_in_place = False                    # ids in: the output has another dtype

    def __init__(self, base_layer: nn.Embedding, adapter_set: AdapterSet | None = None) -> None:
        super().__init__(base_layer, adapter_set)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def create_factors(self, name: str, r: int) -> None:
        base, device = self.base_layer, self._factor_device()
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, base.num_embeddings, device=device))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(base.embedding_dim, r, device=device))

    def init_factors(self, name: str, init, module_name: str) -> None:
        if init is False:
            return
        if isinstance(init, str) and init.startswith("pissa"):
            raise ConfigError(f"init_lora_weights={init!r} is only for linear layers, not {module_name} (Embedding)")
        with torch.no_grad():
            nn.init.zeros_(self.lora_embedding_A[name])
            nn.init.normal_(self.lora_embedding_B[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        # A (r, vocab), B (dim, r): the delta of the (vocab, dim) table is (B A)ᵀ
        return lora_delta(self.lora_embedding_A[name], self.lora_embedding_B[name], self.scaling[name]).T

    def _dropout_active(self, name: str) -> bool:
        return False

    def _one(self, name: str, x: torch.Tensor, out: torch.Tensor | None, dropout: bool) -> torch.Tensor:
        """``s·B A[:, x]``: the adapter's change to the embeddings of ids ``x`` -> (..., dim)."""
        base = self.base_layer
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        h = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type,
                        base.scale_grad_by_freq, base.sparse)                      # (..., r)
        return lora_matmul(h, None, B.T, self.scaling[name])

    def _rows(self, route: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        n = x.shape[0]
        rows, A, B = self.gathered(route, n, gather_embedding)
        h = A[rows[:, None], x.reshape(n, -1)]                                       # (n, T, r)
        return lora_matmul(h, None, B).reshape(*x.shape, -1)                         # (..., dim)

    def build_bank(self) -> dict[str, torch.Tensor]:
        """``A (slots, vocab, r_max)`` (transposed for row lookup) and ``B (slots, r_max, dim)``
        with the scaling folded in (and DoRA gains ``g``); zeros for slot 0 and beyond each rank."""
        S, r_max = self.adapter_set.num_slots, max(self.r[n] for n in self.held)
        base, like = self.base_layer, self.lora_embedding_A[self.held[0]]
        A = like.new_zeros(S, base.num_embeddings, r_max)
        B = like.new_zeros(S, r_max, base.embedding_dim)
        for name in self.held:
            slot, r = self.adapter_set.slots[name], self.r[name]
            A[slot, :, :r] = self.lora_embedding_A[name].T.to(A.dtype)
            B[slot, :r] = self.lora_embedding_B[name].T.to(B.dtype) * self.scaling[name]
        bank = {"A": A, "B": B}
        if self.lora_magnitude_vector:
            bank["g"] = self.dora_gains(A)
        return bank

    # DoRA's row layout: one norm per embedding dimension, over the vocabulary.
    def _as_rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T                                                      # (dim, vocab)

    def _from_rows(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return rows.T

    def _factor_rows(self, name: str):
        return self.lora_embedding_A[name], self.lora_embedding_B[name]      # (r, vocab), (dim, r)


def _register() -> None:
    from transformers.pytorch_utils import Conv1D

    key = PeftType.LORA.value
    registry.register_method(key, LoraConfig, cli_names=("lora",), complete_config=complete_targets)
    registry.register_method(key, LoraConfig, cli_names=("dora",), overrides={"use_dora": True})
    for base_type in (nn.Linear, Conv1D):
        registry.register_layer(key, base_type, LoraLinear)
    registry.register_layer(key, nn.Embedding, LoraEmbedding)
    # nn.Conv1d/2d/3d: methods/lora_conv.py; nn.MultiheadAttention: methods/lora_mha.py (registry.METHOD_MODULES)


_register()
