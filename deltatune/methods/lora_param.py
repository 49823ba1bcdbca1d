"""LoRA on a bare ``nn.Parameter`` (peft's ``LoraConfig(target_parameters=[...])``).

Some weights are not held by a layer LoRA can wrap: the experts of a mixture-of-experts block keep
all their projections in one 3-d parameter (``gate_up_proj`` of shape (experts, ., .)) that their
``forward`` reads directly. LoRA reaches such a weight by changing the parameter itself for the
duration of a call: ``ParamWrapper`` runs its module with ``W + s·ΔW`` in place of ``W``
(``torch.func.functional_call``: the module is not modified, so gradients reach the factors and
nothing needs restoring), where ``ΔW`` has the parameter's shape.

Factors, as peft lays them out (so files interchange), with ``E`` experts (1 for a 2-d parameter):
``lora_A.weight`` (E·r, in) and ``lora_B.weight`` (out, E·r). Expert ``e`` uses rows
``e·r .. e·r + r`` of A and columns ``e, E + e, 2E + e, ...`` of B (peft reads B as (out, r, E)).
A 2-d parameter (a, b) is a linear weight: out = a, in = b. A 3-d parameter (E, a, b) is
(experts, out, in), unless its module says ``is_transposed = True``: then (experts, in, out).

Several parameters of one module: each gets its own wrapper and the wrappers nest, the first
parameter (in the module's registration order) innermost, as peft nests them; the outermost one
runs the call with every level's weights. The nesting is what says which factors belong to which
parameter in a file (``<module>.base_layer.lora_A.weight`` is the inner one's), so every adapter
of a model that uses ``target_parameters`` must target the same parameters (``check_same_parameters``).

Not supported, as in peft: dropout (there is no input to drop: the delta is on the weight), DoRA,
``fan_in_fan_out``, and mixed-adapter batches (one weight per call); initialisations that read the
base weight as a linear layer's (PiSSA, OLoRA, LoftQ, orthogonal) are refused too.
"""
from __future__ import annotations

import torch
from torch import nn

from deltatune.adapter_set import AdapterSet, MixingError
from deltatune.config import ConfigError, LoraConfig
from deltatune.methods.lora import LoraLayer, init_pair

# init_lora_weights values a parameter's factors can start from (the rest read a linear base weight).
PARAM_INITS = (True, False, "gaussian")


def expert_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, num_experts: int) -> torch.Tensor:
    """``scaling · B_e A_e`` for every expert ``e``, fp32: (E, out, in).

    Args:
        A: (E·r, in); expert ``e``'s factor is rows ``e·r .. e·r + r``.
        B: (out, E·r); expert ``e``'s factor is columns ``e::E`` (B viewed as (out, r, E)).
        scaling: the adapter's LoRA scaling.
        num_experts: E (1 for a 2-d parameter: then ``scaling · B A``).
    """
    E = num_experts
    A_e = A.float().reshape(E, -1, A.shape[-1])                 # (E, r, in)
    B_e = B.float().reshape(B.shape[0], -1, E).permute(2, 0, 1)  # (E, out, r)
    return torch.bmm(B_e, A_e) * scaling                         # (E, out, in)


class ParamWrapper(LoraLayer):
    """LoRA on parameter ``parameter_name`` of the module ``base_layer`` (or of the module under
    an inner ``ParamWrapper``); see the module docstring for the layout.

    Attributes:
        parameter_name: the adapted parameter's name in its module (``"gate_up_proj"``).
        num_experts: E, the leading dimension of a 3-d parameter (1 for a 2-d one).
        in_features, out_features: the factors' outer sizes (A is (E·r, in), B is (out, E·r)).
    """

    adds_in_place = False

    def __init__(self, base_layer: nn.Module, adapter_set: AdapterSet | None = None,
                 parameter_name: str = "weight") -> None:
        super().__init__(base_layer, adapter_set)
        self.parameter_name = parameter_name
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        param = self.get_param()
        if not isinstance(param, torch.Tensor) or param.dim() not in (2, 3):
            dims = param.dim() if isinstance(param, torch.Tensor) else 0
            raise ConfigError(f"lora.ParamWrapper was initialized with {dims} dimensional Parameter "
                              f"{parameter_name!r}, but only 2d and 3d are supported.")
        # (E, out, in) unless the module stores its experts as (E, in, out); a 2-d weight is (out, in)
        self.in_out_layout = param.dim() == 3 and getattr(self.get_base_layer(), "is_transposed", False) is True
        shape = param.shape if param.dim() == 3 else (1, *param.shape)
        self.num_experts = shape[0]
        self.out_features, self.in_features = (shape[2], shape[1]) if self.in_out_layout else (shape[1], shape[2])

    def get_base_layer(self) -> nn.Module:
        """The module that holds the parameter (below every nested ``ParamWrapper``)."""
        module = self.base_layer
        while isinstance(module, ParamWrapper):
            module = module.base_layer
        return module

    def get_param(self) -> torch.Tensor:
        """The adapted parameter, as its module holds it (without any adapter)."""
        return getattr(self.get_base_layer(), self.parameter_name)

    def chain(self) -> list["ParamWrapper"]:
        """This wrapper and the ``ParamWrapper``s nested under it, outermost first."""
        out, module = [], self
        while isinstance(module, ParamWrapper):
            out.append(module)
            module = module.base_layer
        return out

    def find(self, parameter_name: str) -> "ParamWrapper | None":
        """The wrapper of ``parameter_name`` in this chain, or None."""
        return next((w for w in self.chain() if w.parameter_name == parameter_name), None)

    # -- adapters ------------------------------------------------------------------------------
    def add_adapter(self, name: str, config: LoraConfig, module_name: str) -> None:
        """Adapter ``name`` on this parameter; ``module_name`` is the parameter's full name
        (``"layers.0.experts.gate_up_proj"``), which ``rank_pattern`` / ``alpha_pattern`` match.

        Raises:
            ConfigError: ``lora_dropout``, ``use_dora`` or ``fan_in_fan_out`` set, or an
                initialisation that needs a linear base weight (the message names the parameter).
        """
        where = f"(parameter {module_name!r})"
        for option, bad in (("lora_dropout != 0", config.lora_dropout), ("use_dora=True", config.use_dora),
                           ("fan_in_fan_out", config.fan_in_fan_out)):
            if bad:
                raise ConfigError(f"lora.ParamWrapper does not work with {option}. {where}")
        if config.init_lora_weights not in PARAM_INITS:
            raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} is not supported for "
                              f"target_parameters {where}: use True, 'gaussian' or False")
        super().add_adapter(name, config, module_name)

    def create_factors(self, name: str, r: int) -> None:
        """``A`` (E·r, in) and ``B`` (out, E·r) as bias-free linears, on the parameter's device."""
        device, E = self.get_param().device, self.num_experts
        self.lora_A[name] = nn.Linear(self.in_features, r * E, bias=False, device=device)
        self.lora_B[name] = nn.Linear(r * E, self.out_features, bias=False, device=device)

    def init_factors(self, name: str, init, module_name: str) -> None:
        init_pair(self.lora_A[name].weight, self.lora_B[name].weight, init, self.r[name])

    def adapter_parameters(self, name: str):
        """Own factors, then each nested wrapper's under peft's ``base_layer.`` keys."""
        yield from super().adapter_parameters(name)
        if isinstance(self.base_layer, ParamWrapper):
            for key, p in self.base_layer.adapter_parameters(name):
                yield f"base_layer.{key}", p

    def delete_adapter(self, name: str) -> None:
        """Drop ``name`` from every parameter of the chain."""
        super().delete_adapter(name)
        if isinstance(self.base_layer, ParamWrapper):
            self.base_layer.delete_adapter(name)

    def unloaded(self, merged: list[str]) -> nn.Module:
        """The plain module (merged adapters are in its parameters already)."""
        return self.get_base_layer()

    def delta_weight(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s change to the parameter, in its shape, fp32."""
        delta = expert_delta(self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                             self.num_experts)                                     # (E, out, in)
        if self.in_out_layout:
            delta = delta.transpose(1, 2)                                          # (E, in, out)
        return delta.reshape(self.get_param().shape)

    # -- forward -------------------------------------------------------------------------------
    def cannot_mix_reason(self) -> str:
        return ("lora.ParamWrapper does not support mixed adapter batches: LoRA on a parameter changes the "
                "weight of a whole call; run rows for different adapters in separate calls")

    def delta(self, x: torch.Tensor, route, out: torch.Tensor | None = None, dropout: bool = True):
        """Not defined: this layer's LoRA acts on the parameter of a call (``call_weights``)."""
        raise TypeError("ParamWrapper has no activation-space delta; it runs its module with call_weights()")

    def call_weights(self) -> dict[str, torch.Tensor]:
        """Parameter name -> ``W + s·ΔW`` (differentiable in the factors) for every level of the
        chain whose adapter applies to this call.

        Raises:
            MixingError: per-row adapters (see ``cannot_mix_reason``).
        """
        weights = {}
        for layer in self.chain():
            route = layer.route()
            if route is None:
                continue
            if not isinstance(route, str):
                raise MixingError(layer.cannot_mix_reason())
            param = layer.get_param()
            weights[layer.parameter_name] = param + layer.delta_weight(route).to(param.dtype)
        return weights

    def forward(self, *args, **kwargs):
        """The module's forward with this call's adapter in its parameters."""
        module, weights = self.get_base_layer(), self.call_weights()
        if not weights:
            return module(*args, **kwargs)
        return torch.func.functional_call(module, weights, args, kwargs)

    # -- merging: the parameter itself ---------------------------------------------------------
    def check_merge(self, name: str) -> None:
        """Raise if merging ``name`` would give a non-finite parameter anywhere in the chain."""
        for layer in self.chain():
            if name in layer.held:
                with torch.no_grad():
                    if not torch.isfinite(layer.get_param().float() + layer.delta_weight(name)).all():
                        raise ValueError(f"merging adapter {name!r} gives non-finite weights in "
                                         f"{layer.parameter_name!r}; not merged")

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        """Fold ``names`` into every parameter of the chain (all checked first with ``safe_merge``)."""
        for name in names:
            if safe_merge:
                self.check_merge(name)
            for layer in self.chain():
                if name in layer.held:
                    layer._add_delta(name, 1.0)

    def unmerge(self, names: list[str]) -> None:
        """Undo the merges of ``names`` (merge order given), last merged first."""
        for name in reversed(names):
            for layer in self.chain():
                if name in layer.held:
                    layer._add_delta(name, -1.0)

    def _add_delta(self, name: str, sign: float) -> None:
        with torch.no_grad():
            param = self.get_param()
            param.copy_((param.float() + sign * self.delta_weight(name)).to(param.dtype))

    def __repr__(self) -> str:
        return "lora." + super().__repr__()

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, {super().extra_repr()}"


def check_same_parameters(config, others: dict, adapter_name: str) -> None:
    """Refuse adapter ``adapter_name``'s ``config`` if it targets parameters and another adapter
    (``others``: name -> config) targets a different set: the nesting of the wrappers, which the
    file keys encode, must be the same for every adapter (as peft requires).

    Raises:
        ConfigError: the two sets, and the other adapter's name.
    """
    mine = set(getattr(config, "target_parameters", None) or [])
    for other_name, other in others.items():
        theirs = set(getattr(other, "target_parameters", None) or [])
        if other_name != adapter_name and mine and theirs and mine != theirs:
            raise ConfigError("When using multiple adapters with `target_parameters`, all adapters must target the "
                              f"same set of parameters, but got {sorted(mine)} for the new adapter and "
                              f"{sorted(theirs)} for adapter '{other_name}'.")


def wrap_parameter(current: nn.Module, parameter_name: str, adapter_set: AdapterSet,
                   module_name: str) -> tuple[ParamWrapper, bool]:
    """The wrapper of ``parameter_name`` for the module at ``module_name`` (``current``: the plain
    module or the ``ParamWrapper`` chain there), and whether it is new (the caller puts a new one
    in the model in place of ``current``).

    Raises:
        ConfigError: ``current`` is another kind of adapter layer (the module is also in
            ``target_modules``), as peft refuses.
    """
    if isinstance(current, ParamWrapper):
        found = current.find(parameter_name)
        if found is not None:
            return found, False
    elif getattr(type(current), "is_adapter_layer", False):
        raise ConfigError(f"Trying to wrap an `nn.Parameter` of layer '{module_name}' of type "
                          f"{type(current.get_base_layer()).__name__}, which is not a valid target. Make sure that "
                          "this layer is not also targeted with `target_modules`.")
    return ParamWrapper(current, adapter_set, parameter_name), True
