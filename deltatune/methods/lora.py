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
from deltatune.config import ConfigError, LoraConfig, PeftType
from deltatune.methods.base import AdapterLayer


def pattern_value(patterns: dict, module_name: str, default):
    """peft's per-module override: the first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


class LoraLayer(AdapterLayer):
    """Shared LoRA bookkeeping: rank, alpha, scaling and dropout per adapter."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    def per_adapter_tables(self) -> list[dict]:
        return [self.r, self.lora_alpha, self.scaling]

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

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = registry.features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

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

    def delta_weight(self, name: str) -> torch.Tensor:
        A = self.lora_A[name].weight.float()                   # (r, in)
        B = self.lora_B[name].weight.float()                   # (out, r)
        return (B @ A) * self.scaling[name]                    # (out, in)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + B(A(dropout(x)) * s)`` summed over active, unmerged adapters."""
        result = self.base_layer(x, *args, **kwargs)            # (..., out) or (N, out, H', W')
        if self.disabled:
            return result
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            A, B = self.lora_A[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(A.weight.dtype))
            result = result + B(A(h) * self.scaling[name]).to(result.dtype)  # (..., r) -> (..., out)
        return result


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding``: the row lookup goes through ``A`` (r, vocab), then ``B`` (dim, r)."""

    adapter_containers = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
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
        A = self.lora_embedding_A[name].float()                 # (r, vocab)
        B = self.lora_embedding_B[name].float()                 # (dim, r)
        return (B @ A).T * self.scaling[name]                   # (vocab, dim)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)             # (..., dim)
        if self.disabled:
            return result
        base = self.base_layer
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            h = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type,
                            base.scale_grad_by_freq, base.sparse)                     # (..., r)
            result = result + (h @ B.T * self.scaling[name]).to(result.dtype)
        return result


class LoraConv2d(LoraLayer):
    """LoRA on ``nn.Conv2d``: ``A`` has the base's kernel, stride and padding, ``B`` is 1x1."""

    adapter_containers = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Conv2d) -> None:
        if base_layer.groups != 1:
            raise ConfigError(f"LoRA on grouped Conv2d (groups={base_layer.groups}) is not supported")
        super().__init__(base_layer)
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
        A = self.lora_A[name].weight.float()                   # (r, in, kh, kw)
        B = self.lora_B[name].weight.float()                   # (out, r, 1, 1)
        delta = F.conv2d(A.transpose(0, 1), B).transpose(0, 1)  # (out, in, kh, kw)
        return delta * self.scaling[name]

    # Same as LoraLinear's: A and B are modules, so ``B(A(h) * s)`` holds for convolutions too.
    forward = LoraLinear.forward


def _register() -> None:
    from transformers.pytorch_utils import Conv1D

    key = PeftType.LORA.value
    registry.register_method(key, LoraConfig, cli_names=("lora",))
    for base_type in (nn.Linear, Conv1D):
        registry.register_layer(key, base_type, LoraLinear)
    registry.register_layer(key, nn.Embedding, LoraEmbedding)
    registry.register_layer(key, nn.Conv2d, LoraConv2d)


_register()
