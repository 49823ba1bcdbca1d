"""LoRA (Hu et al. 2021, arXiv:2106.09685): ``h = W x + s * B A x`` with rank-r factors.

``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (Kalajdzievic 2023,
arXiv:2312.03732). ``B`` starts at zero so a new adapter leaves the model unchanged.
Layers: linear-likes (``nn.Linear``, transformers' ``Conv1D``, registered 4-bit layers),
``nn.Conv2d`` and ``nn.Embedding``. Factors are ``nn.Linear``/``nn.Conv2d`` children so FSDP and
``torch.compile`` see ordinary modules.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from deltatune import registry
from deltatune.adapter_set import AdapterSet
from deltatune.config import ConfigError, LoraConfig, PeftType
from deltatune.merging import lora_delta
from deltatune.methods.base import AdapterLayer


def _dropout_p(module: nn.Module) -> float:
    return module.p if isinstance(module, nn.Dropout) else 0.0


def gather_lora(bank: dict[str, torch.Tensor], rows: torch.Tensor):
    """Each row's factors from a linear layer's bank: ``A (N, in, r)``, ``B (N, r, out)`` (scale
    folded in), dropout probability ``p (N,)``."""
    return bank["A"][rows].transpose(1, 2), bank["B"][rows].transpose(1, 2), bank["p"][rows]


_GATHER_IN: dict = {}


def cast_factors_on(device: torch.device) -> bool:
    """Whether inference on a 16-bit input should run fp32 LoRA factors as 16-bit copies.

    Not on the CPU: there small bf16 GEMMs cost more than the fp32 ones plus the casts (measured
    on this machine, (32, 576) x (576, 16) then x (16, 576): 68 us in bf16, 37 us casting to fp32),
    so the plain path, which computes the delta in the factors' fp32, is kept. On accelerators
    16-bit GEMMs are the fast ones.
    """
    return device.type != "cpu"


def _gather_lora_in(dtype: torch.dtype):
    """``gather_lora`` returning the factors in ``dtype`` (one function object per dtype, so the
    per-route cache in ``AdapterLayer.gathered`` keeps one entry per dtype)."""
    if dtype not in _GATHER_IN:
        def gather(bank, rows):
            A, B, p = gather_lora(bank, rows)
            return A.to(dtype), B.to(dtype), p
        _GATHER_IN[dtype] = gather
    return _GATHER_IN[dtype]


def gather_embedding(bank: dict[str, torch.Tensor], rows: torch.Tensor):
    """Rows' slots, the whole lookup bank ``A (slots, vocab, r)`` and each row's ``B (N, r, dim)``."""
    return rows, bank["A"], bank["B"][rows]


def lora_bmm(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The mixed-batch LoRA delta: row ``i`` of ``x`` (N, T, in) times its own ``A[i]`` (in, r) then
    ``B[i]`` (r, out) -> (N, T, out). The one place a fused gather-matmul kernel would replace."""
    return torch.bmm(torch.bmm(x, A), B)


def row_dropout(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Inverted dropout with a probability per row: ``x`` (N, T, d), ``p`` (N,)."""
    keep = (1.0 - p).to(x.dtype)[:, None, None]                        # (N, 1, 1)
    mask = torch.rand_like(x) < keep
    return torch.where(mask, x / keep.clamp_min(1e-12), torch.zeros_like(x))


def _inference(x: torch.Tensor, result: torch.Tensor) -> bool:
    """True when the delta may be added into the base output in place: no autograd, same dtype,
    and an output whose memory is its own layout (a fresh, contiguous tensor)."""
    return not torch.is_grad_enabled() and x.dtype == result.dtype and result.is_contiguous()


def pattern_value(patterns: dict, module_name: str, default):
    """peft's per-module override: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


class LoraLayer(AdapterLayer):
    """Shared LoRA bookkeeping: rank, alpha, scaling and dropout per adapter."""

    def __init__(self, base_layer: nn.Module, adapter_set: AdapterSet | None = None) -> None:
        super().__init__(base_layer, adapter_set)
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    def hyper_key(self) -> tuple:
        """Scalings enter the bank (folded into B); dropout is read only while training, when the
        bank is rebuilt on every call anyway."""
        return tuple(s if not isinstance(s, torch.Tensor) else (s.data_ptr(), s._version)
                     for s in self.scaling.values())

    def per_adapter_tables(self) -> list[dict]:
        return [self.r, self.lora_alpha, self.scaling]

    def delete_adapter(self, name: str) -> None:
        """Also drop the adapter's dropout module (a ModuleDict, not a per-adapter table)."""
        super().delete_adapter(name)
        if name in self.lora_dropout:
            del self.lora_dropout[name]

    def add_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        """Create adapter ``name`` for this layer from ``config`` (``module_name`` picks patterns)."""
        if config.use_dora:
            raise ConfigError("use_dora=True: DoRA is not available for "
                              f"{type(self.base_layer).__name__} ({module_name})")
        r = int(pattern_value(config.rank_pattern, module_name, config.r))
        alpha = pattern_value(config.alpha_pattern, module_name, config.lora_alpha)
        self.r[name], self.lora_alpha[name] = r, alpha
        self.scaling[name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.lora_dropout[name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.create_factors(name, r)
        init = registry.init_for(config.init_lora_weights)   # e.g. LoftQ (deltatune.quant.loftq)
        if init is not None:
            init(self, name, config, module_name)
        else:
            self.init_factors(name, config.init_lora_weights, module_name)
        self._register(name)

    def create_factors(self, name: str, r: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def init_factors(self, name: str, init, module_name: str) -> None:  # pragma: no cover
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:  # pragma: no cover
        """``s * B @ A`` in the base weight's layout, fp32."""
        raise NotImplementedError

    def merged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        return weight + self.delta_weight(name).to(weight.device)

    def unmerged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        return weight - self.delta_weight(name).to(weight.device)

    def _factor_device(self) -> torch.device:
        for t in self.base_layer.parameters():
            return t.device
        for t in self.base_layer.buffers():
            return t.device
        return torch.device("cpu")


class LoraLinear(LoraLayer):
    """LoRA on a linear-like layer: ``y = base(x) + B(A(dropout(x))) * s``."""

    adapter_containers = ("lora_A", "lora_B")

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

    def create_factors(self, name: str, r: int) -> None:
        device = self._factor_device()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device)

    def init_factors(self, name: str, init, module_name: str) -> None:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        with torch.no_grad():
            if init is False:
                return
            if isinstance(init, str) and init.startswith("pissa"):
                self._init_pissa(name, init)
                return
            if init == "gaussian":
                nn.init.normal_(A, std=1 / self.r[name])
            else:
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)

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
        return lora_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])  # (out, in)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + B(A(dropout(x)) * s)`` for this call's adapter, or each row's in a mixed batch."""
        result = self.base_layer(x, *args, **kwargs)            # (..., out) or (N, out, H', W')
        route = self.route()
        if route is None:
            return result
        if _inference(x, result):
            if isinstance(route, str) and self._add_delta_(result, route, x):
                return result
            if not isinstance(route, str) and self._add_mixed_delta_(result, route, x):
                return result
        if isinstance(route, str):
            return result + self.delta(route, x).to(result.dtype)
        return result + self.mixed_delta(x, route).to(result.dtype)

    def _add_delta_(self, result: torch.Tensor, name: str, x: torch.Tensor) -> bool:
        """Inference: add ``s·B(A x)`` into ``result`` in place with two GEMMs (no dropout, no
        autograd); False where that does not apply (then ``delta`` runs).

        Factors kept in fp32 on a 16-bit base (as peft keeps them) are used, where
        ``cast_factors_on`` says so, through a copy in the input's dtype cached until they change
        (the GEMMs still accumulate in fp32; no per-call casts of input and result).
        """
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        if A.dim() != 2 or (self.training and _dropout_p(self.lora_dropout[name]) > 0):
            return False
        if A.dtype != x.dtype:
            if not cast_factors_on(x.device):
                return False
            A, B = self._factors_in(name, A, B, x.dtype)
        flat = result.view(-1, result.shape[-1])                                      # (M, out)
        h, s = x.reshape(-1, x.shape[-1]) @ A.T, self.scaling[name]                  # (M, r)
        if isinstance(s, torch.Tensor):  # a tensor scaling (compiled hot-swap): no recompile when it changes
            flat.addmm_(h * s.to(h.dtype), B.T)
        else:
            flat.addmm_(h, B.T, alpha=s)                                              # (M, r) @ (r, out)
        return True

    def _factors_in(self, name: str, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype):
        key = (A._version, B._version, A.data_ptr(), B.data_ptr(), dtype)
        hit = self._cast.get(name)
        if hit is None or hit[0] != key:
            hit = self._cast[name] = (key, A.to(dtype), B.to(dtype))
        return hit[1], hit[2]

    def _add_mixed_delta_(self, result: torch.Tensor, route: torch.Tensor, x: torch.Tensor) -> bool:
        """Inference, mixed batch: ``result[i] += x[i] A[i] B[i]`` in place (gathered factors,
        in the input's dtype: see ``_add_delta_``)."""
        if self.training or (self.lora_A[self.held[0]].weight.dtype != x.dtype and not cast_factors_on(x.device)):
            return False
        n = x.shape[0]
        A, B, _ = self.gathered(route, n, _gather_lora_in(x.dtype))       # (n, in, r), (n, r, out)
        rows = result.view(n, -1, result.shape[-1])                        # (n, T, out)
        rows.baddbmm_(torch.bmm(x.reshape(n, -1, x.shape[-1]), A), B)
        return True

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One adapter's ``s * B(A(dropout(x)))`` through the ordinary factor modules."""
        A, B = self.lora_A[name], self.lora_B[name]
        if not torch.is_autocast_enabled(x.device.type):  # under autocast the GEMMs cast x themselves:
            x = x.to(A.weight.dtype)                        # a cast to fp32 here would be cast straight back
        h = self.lora_dropout[name](x)
        return B(A(h) * self.scaling[name])                     # (..., r) -> (..., out)

    def build_bank(self) -> dict[str, torch.Tensor]:
        """``A (slots, r_max, in)``, ``B (slots, out, r_max)`` with the scaling folded into B, and
        dropout ``p (slots,)``; zeros where an adapter does not reach (slot 0, smaller ranks)."""
        S, r_max = self.adapter_set.num_slots, max(self.r[n] for n in self.held)
        like = self.lora_A[self.held[0]].weight
        A = like.new_zeros(S, r_max, self.in_features)
        B = like.new_zeros(S, self.out_features, r_max)
        p = torch.zeros(S, device=like.device)
        for name in self.held:
            slot, r = self.adapter_set.slots[name], self.r[name]
            A[slot, :r] = self.lora_A[name].weight.to(A.dtype)
            B[slot, :, :r] = self.lora_B[name].weight.to(B.dtype) * self.scaling[name]
            p[slot] = _dropout_p(self.lora_dropout[name])
        return {"A": A, "B": B, "p": p}

    def mixed_delta(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        """Each row's own adapter delta (slot 0 rows get zeros): gathered factors, batched matmuls."""
        n = x.shape[0]
        A, B, p = self.gathered(route, n, gather_lora)          # (n, in, r), (n, r, out), (n,)
        h = x.reshape(n, -1, x.shape[-1]).to(A.dtype)           # (n, T, in)
        if self.training and bool((p > 0).any()):
            h = row_dropout(h, p)
        return lora_bmm(h, A, B).reshape(*x.shape[:-1], -1)     # (..., out)


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: the row lookup goes through ``A`` (r, vocab), then ``B`` (dim, r)."""

    adapter_containers = ("lora_embedding_A", "lora_embedding_B")

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

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)             # (..., dim)
        route = self.route()
        if route is None:
            return result
        if isinstance(route, str):
            return result + (self.lookup(route, x) * self.scaling[route]).to(result.dtype)
        return result + self.mixed_delta(x, route).to(result.dtype)

    def lookup(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``B A[:, x]``: the adapter's (unscaled) change to the embeddings of ids ``x`` -> (..., dim)."""
        base = self.base_layer
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        h = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type,
                        base.scale_grad_by_freq, base.sparse)                      # (..., r)
        return h @ B.T

    def build_bank(self) -> dict[str, torch.Tensor]:
        """``A (slots, vocab, r_max)`` (transposed for row lookup) and ``B (slots, r_max, dim)``
        with the scaling folded in; zeros for slot 0 and beyond each adapter's rank."""
        S, r_max = self.adapter_set.num_slots, max(self.r[n] for n in self.held)
        base, like = self.base_layer, self.lora_embedding_A[self.held[0]]
        A = like.new_zeros(S, base.num_embeddings, r_max)
        B = like.new_zeros(S, r_max, base.embedding_dim)
        for name in self.held:
            slot, r = self.adapter_set.slots[name], self.r[name]
            A[slot, :, :r] = self.lora_embedding_A[name].T.to(A.dtype)
            B[slot, :r] = self.lora_embedding_B[name].T.to(B.dtype) * self.scaling[name]
        return {"A": A, "B": B}

    def mixed_delta(self, x: torch.Tensor, route: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        rows, A, B = self.gathered(route, n, gather_embedding)
        ids = x.reshape(n, -1)                                                       # (n, T)
        h = A[rows[:, None], ids]                                                    # (n, T, r)
        return torch.bmm(h, B).reshape(*x.shape, -1)                                 # (..., dim)


class LoraConv2d(LoraLayer):
    """LoRA on ``nn.Conv2d``: ``A`` has the base's kernel, stride and padding, ``B`` is 1x1."""

    adapter_containers = ("lora_A", "lora_B")
    mixable = False

    def __init__(self, base_layer: nn.Conv2d, adapter_set: AdapterSet | None = None) -> None:
        if base_layer.groups != 1:
            raise ConfigError(f"LoRA on grouped Conv2d (groups={base_layer.groups}) is not supported")
        super().__init__(base_layer, adapter_set)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def create_factors(self, name: str, r: int) -> None:
        base, device = self.base_layer, self._factor_device()
        self.lora_A[name] = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                                      base.dilation, bias=False, device=device)
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, 1, 1, bias=False, device=device)

    init_factors = LoraLinear.init_factors

    def _init_pissa(self, name: str, init: str) -> None:
        raise ConfigError(f"init_lora_weights={init!r} is only for linear layers, not Conv2d")

    def delta_weight(self, name: str) -> torch.Tensor:
        return lora_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])  # (out, in, kh, kw)

    def cannot_mix_reason(self) -> str:
        return ("LoRA on Conv2d has no per-row path yet; run rows for different adapters in "
                "separate calls (or merge one adapter)")

    # Same as LoraLinear's: A and B are modules, so ``B(A(h) * s)`` holds for convolutions too.
    forward = LoraLinear.forward
    delta = LoraLinear.delta

    def _add_delta_(self, result: torch.Tensor, name: str, x: torch.Tensor) -> bool:
        """No in-place GEMM path for convolutions (``forward`` then runs ``delta``); without this
        inference under ``no_grad`` failed on Conv2d LoRA (a diffusion UNet's resnets)."""
        return False


def _register() -> None:
    from transformers.pytorch_utils import Conv1D

    key = PeftType.LORA.value
    registry.register_method(key, LoraConfig, cli_names=("lora",))
    for base_type in (nn.Linear, Conv1D):
        registry.register_layer(key, base_type, LoraLinear)
    registry.register_layer(key, nn.Embedding, LoraEmbedding)
    registry.register_layer(key, nn.Conv2d, LoraConv2d)


_register()
