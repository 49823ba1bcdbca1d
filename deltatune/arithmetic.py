"""Adapter arithmetic: a weighted combination of adapters as a new adapter, on configs and tensors.

``combine_adapters`` takes the sources as ``(config, tensors)`` pairs (model-relative keys, as
``TunerModel.adapter_state`` gives them and ``checkpoint.peft_format.read_adapter`` reads them)
and returns the combined adapter the same way, so ``PeftModel.add_weighted_adapter`` and
``deltatune combine`` are one implementation; the tensor math is ``deltatune.merging``'s.
No base model is needed except for DoRA sources (their delta depends on the base weight).

What the combined adapter is (``combination_type`` as peft names them):

- LoRA sources: a plain LoRA adapter with ``lora_alpha = r`` and ``use_rslora = False``: each
  source's scaling (rsLoRA's ``alpha/sqrt(r)`` included) is folded into the factors, so the
  adapter applies exactly what the factors say (peft copies ``use_rslora`` from the first source
  and so scales rsLoRA combinations by ``sqrt(r)`` again).
  ``cat`` stacks the factors: exact. ``svd``/``*_svd`` combine the full deltas, then factor at
  ``svd_rank`` (default: the largest source rank): exact when that rank reaches the sum's rank.
  ``linear``/``ties``/``dare_*``/``magnitude_prune`` combine ``A`` and ``B`` separately (peft's
  behaviour, kept for compatibility); their delta is not the weighted sum, and a warning says so
  with the error found.
- DoRA sources (mixed with LoRA ones or not): ``svd`` types only. The delta of a DoRA adapter is
  its merged weight minus the base, ``m·(W+ΔW)/||W+ΔW|| − W``; the weighted sum of those is
  factored by the SVD into a plain LoRA adapter. Magnitudes do not combine factor-wise, so
  ``cat`` and the factor-wise types are refused.
- (IA)³ sources: ``linear`` only: ``l = 1 + Σ wᵢ (lᵢ − 1)`` (a module a source does not target
  counts as ``lᵢ = 1``), whose merged weight ``W ⊙ l`` is the base plus exactly the weighted sum of
  the sources' deltas ``W ⊙ (lᵢ − 1)``. peft computes ``Σ wᵢ lᵢ``: the same when the weights sum
  to 1 and every source targets every module.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from collections import Counter
from typing import Callable, Sequence

import torch

from deltatune import merging
from deltatune.config import LoraConfig, PeftConfig, PeftType
from deltatune.methods.dora import MAGNITUDE

Source = tuple[PeftConfig, dict[str, torch.Tensor]]
# key suffix of a LoRA factor -> (which factor, the dimension holding the rank)
LORA_KEYS = {"lora_A.weight": ("A", 0), "lora_B.weight": ("B", 1),
             "lora_embedding_A": ("A", 0), "lora_embedding_B": ("B", 1)}


class CombineError(ValueError):
    """Adapters cannot be combined as asked; the message names the adapter, module or argument."""


def combine_adapters(sources: Sequence[Source], weights: Sequence[float], combination_type: str = "svd",
                     svd_rank: int | None = None, svd_clamp: float | None = None, svd_full_matrices: bool = True,
                     svd_driver: str | None = None, density: float | None = None,
                     majority_sign_method: str = "total", seed: int | None = None,
                     names: Sequence[str] | None = None, base_weight: Callable[[str], torch.Tensor] | None = None,
                     module_order: Sequence[str] | None = None) -> Source:
    """The weighted combination of ``sources`` as one adapter ``(config, tensors)``.

    Args:
        sources: ``(config, tensors)`` per source adapter; tensors keyed by model-relative names.
        weights: one weight per source (negative weights subtract).
        combination_type: one of ``merging.COMBINATION_TYPES`` (see the module doc). One LoRA
            source is always combined with ``linear`` (peft's rule; exact for one source).
        svd_rank, svd_clamp, svd_full_matrices, svd_driver: for the ``*svd`` types.
        density: fraction of entries kept, for ``ties``/``dare``/``magnitude_prune`` types.
        majority_sign_method: ``"total"`` or ``"frequency"`` (TIES's sign election).
        seed: makes DARE's random pruning reproducible (a private generator); None draws from
            torch's global generator, as peft does.
        names: the sources' names, for messages.
        base_weight: ``module name -> base weight`` in the factors' layout ((out, in); Embedding
            (dim, vocab)), needed for DoRA sources only.
        module_order: the order modules are visited in (the model's; DARE's random draws follow
            it); default: first appearance in the sources.

    Raises:
        CombineError: mismatched weights, methods that cannot combine with this type, different
            ranks for a factor-wise type, trained biases in a source, two sources training a copy
            of the same module (``modules_to_save``), a DoRA source without ``base_weight``.

    Modules-to-save: a fully trained module cannot be weighted. The combination saves each such
    module with the copy of the one source that trains it (peft gives the new adapter a fresh
    copy of the untrained module instead) and lists every source's ``modules_to_save``.
    """
    names = list(names) if names is not None else [f"adapter {i}" for i in range(len(sources))]
    method = _check_sources(sources, weights, names, combination_type, density, majority_sign_method)
    sources, saved, saved_names = _split_saved(sources, names)
    if method == PeftType.IA3:
        config, out = _combine_ia3(sources, weights, combination_type, names, module_order)
    else:
        config, out = _combine_lora(sources, weights, combination_type, svd_rank, names, base_weight, module_order,
                                    density=density, majority_sign_method=majority_sign_method, svd_clamp=svd_clamp,
                                    svd_full_matrices=svd_full_matrices, svd_driver=svd_driver, seed=seed)
    return dataclasses.replace(config, modules_to_save=saved_names or None), {**out, **saved}


def _combine_lora(sources: Sequence[Source], weights, combination_type: str, svd_rank, names, base_weight,
                  module_order, density, majority_sign_method, svd_clamp, svd_full_matrices, svd_driver,
                  seed) -> Source:
    """``combine_adapters`` for LoRA (and DoRA) sources without modules-to-save tensors."""
    kind = "linear" if len(sources) == 1 else combination_type
    rank = _combined_rank(sources, names, kind, svd_rank, base_weight)
    options = dict(density=density, majority_sign_method=majority_sign_method, svd_clamp=svd_clamp,
                   svd_full_matrices=svd_full_matrices, svd_driver=svd_driver, base_weight=base_weight,
                   generator=torch.Generator().manual_seed(seed) if seed is not None else None)
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, float]] = {}
    worst = (0.0, None)
    modules = _lora_modules(sources, module_order)
    for module, present in modules.items():
        keys, A, B, err = _combine_module(kind, [sources[i] for i in present], [weights[i] for i in present],
                                          module, rank, **options)
        out[keys["A"]], out[keys["B"]] = A, B
        shapes[module] = (A.shape[0], 1.0)
        worst = max(worst, (err, module), key=lambda t: t[0])
    if worst[0] > 1e-4:
        _warn_inexact(kind, *worst)
    for _, tensors in sources:  # targeted embeddings' base weights travel unchanged, as in each source
        out.update({k: v for k, v in tensors.items() if k.endswith(".base_layer.weight") and k not in out})
    first = sources[0][0]
    config = lora_config_for(first, shapes, use_rslora=False)
    config = dataclasses.replace(config, use_dora=False, init_lora_weights=True, inference_mode=True,
                                 **_target_fields([c for c, _ in sources], modules))
    return config, out


def _check_sources(sources, weights, names, combination_type, density, majority_sign_method) -> PeftType:
    """The sources' one method (LORA or IA3); CombineError for what cannot combine."""
    if not sources:
        raise CombineError("no adapters to combine")
    if len(weights) != len(sources):
        raise CombineError(f"{len(weights)} weights for {len(sources)} adapters {names}; give one weight each")
    merging.check_combination(combination_type, density, majority_sign_method)
    types = {config.peft_type for config, _ in sources}
    if types == {PeftType.IA3}:
        return PeftType.IA3
    if types != {PeftType.LORA}:
        raise CombineError(f"adapters {names} are {sorted(t.value for t in types)}: only LoRA (and DoRA) adapters "
                           "combine with each other, and (IA)³ adapters with each other")
    for (config, _), name in zip(sources, names):
        _check_lora_source(config, name)
    return PeftType.LORA


def _warn_inexact(kind: str, error: float, module: str) -> None:
    warnings.warn(
        f"add_weighted_adapter(combination_type={kind!r}) combines the A and B factors separately (peft's "
        f"behaviour), so the new adapter's delta is not the weighted sum of the adapters' deltas (relative "
        f"error {error:.2g} at {module}). Exact types: 'cat', and 'svd' with svd_rank at least the sum "
        "of the ranks.", stacklevel=4)


def add_weighted_adapter(model, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         **options) -> None:
    """``PeftModel.add_weighted_adapter``: combine loaded adapters into a new one named ``adapter_name``
    (not activated; ``set_adapter`` it). ``options`` are ``combine_adapters``'s. On error the model
    is unchanged.

    Raises:
        ValueError: ``adapter_name`` exists, an adapter is unknown, or ``combine_adapters``'s errors.
    """
    from deltatune.methods.lora import LoraEmbedding

    if adapter_name in model.adapter_set:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it or choose another name")
    unknown = [a for a in adapters if a not in model.adapter_set]
    if unknown:
        raise ValueError(f"cannot combine unknown adapter(s) {unknown}; have {sorted(model.peft_config)}")
    layers = dict(model.base_model.adapter_layers())

    def base_weight(module: str) -> torch.Tensor:
        if model.adapter_set.merged:
            raise CombineError(f"adapter(s) {model.adapter_set.merged} are merged into the base weights, which a "
                               "DoRA source's delta depends on; unmerge_adapter() first")
        from deltatune import registry

        layer = layers[module]
        W = registry.get_weight(layer.get_base_layer()).detach().float()
        return W.T if isinstance(layer, LoraEmbedding) else W

    sources = [(model.peft_config[a], {k: v.detach() for k, v in model.base_model.adapter_state(a).items()})
               for a in adapters]
    config, tensors = combine_adapters(sources, weights, names=list(adapters), base_weight=base_weight,
                                       module_order=list(layers), **options)
    model.add_adapter(adapter_name, config)
    try:
        model._load_weights(adapter_name, tensors, f"add_weighted_adapter({adapter_name!r})")
    except BaseException:
        model._discard(adapter_name)
        model._refresh()
        raise


def _combined_rank(sources: Sequence[Source], names, kind: str, svd_rank, base_weight) -> int:
    """The combined adapter's rank; raises where the sources cannot be combined with ``kind``."""
    dora = [name for (config, _), name in zip(sources, names) if config.use_dora]
    if dora and not kind.endswith("svd"):
        raise CombineError(f"adapter(s) {dora} use DoRA: their magnitudes do not combine factor-wise; use an svd "
                           f"combination type (their merged deltas are combined, then factored), not {kind!r}")
    if dora and base_weight is None:
        raise CombineError(f"adapter(s) {dora} use DoRA: combining them needs the base model's weights")
    ranks = _source_ranks(sources)
    if kind in merging.FACTORWISE_TYPES:
        if len(set(ranks)) > 1:
            raise CombineError(f"combination_type={kind!r} needs adapters of one rank; {names} have ranks {ranks} "
                               "(use 'cat' or an svd type for different ranks)")
        return ranks[0]
    return sum(ranks) if kind == "cat" else svd_rank or max(ranks)


def _combine_module(kind: str, sources: Sequence[Source], weights, module: str, rank: int, density,
                    majority_sign_method, svd_clamp, svd_full_matrices, svd_driver, base_weight, generator):
    """One module's combined factors: ``(keys, A, B, relative error)`` (the error of the factor-wise
    types against the weighted sum of the deltas; 0 for the others)."""
    factors = [_factors(source, module) for source in sources]
    As, Bs, s = [f[0] for f in factors], [f[1] for f in factors], [f[2] for f in factors]
    err = 0.0
    if kind == "cat":
        A, B = merging.cat_factors(As, Bs, weights, s, rank)
    elif kind.endswith("svd"):
        deltas = [_full_delta(source, module, f, base_weight) for source, f in zip(sources, factors)]
        delta = merging.combine_tensors(kind, deltas, weights, density, majority_sign_method, generator)
        A, B = merging.svd_factors(delta.flatten(1), rank, svd_clamp, svd_full_matrices, svd_driver)
        if As[0].dim() > 2:                    # Conv1d/2d/3d: back to kernels (r, in, *k), (out, r, 1..)
            A, B = A.reshape(A.shape[0], *As[0].shape[1:]), B.reshape(*B.shape, *Bs[0].shape[2:])
    else:
        A, B = merging.factorwise(kind, As, Bs, weights, s, density, majority_sign_method, generator)
        err = _relative_error(A, B, As, Bs, weights, s)
    keys = _factor_keys(sources[0][1], module)
    return keys, A.to(As[0].dtype).contiguous(), B.to(Bs[0].dtype).contiguous(), err


# -- LoRA helpers ------------------------------------------------------------------------------
def _check_lora_source(config: LoraConfig, name: str) -> None:
    from deltatune.checkpoint.convert import is_residual_init

    if is_residual_init(config):
        raise CombineError(f"adapter {name!r} was initialised with {config.init_lora_weights!r}: its factors apply "
                           "to a base PiSSA changed; save it as plain LoRA first (save_pretrained(..., "
                           "path_initial_model_for_weight_conversion=...)) and combine that")
    if getattr(config, "use_bdlora", None) is not None:   # compact block-diagonal factors (methods/bdlora.py)
        raise CombineError(f"adapter {name!r} uses BD-LoRA (use_bdlora): its block-diagonal factors do not combine "
                           "factor-wise; merge it into the base (merge_and_unload) instead")
    if config.target_parameters:  # factors of several experts in one A, nested per parameter: no factor-wise sum
        raise CombineError(f"add_weighted_adapter does not support targeting nn.Parameter (problematic adapter '{name}')")
    if config.bias != "none":
        raise CombineError(f"adapter {name!r} trains biases (bias={config.bias!r}): combining adapters with "
                           "trained biases is not supported")


def _split_saved(sources: Sequence[Source], names) -> tuple[list[Source], dict[str, torch.Tensor], list[str]]:
    """``(sources without their modules-to-save tensors, those tensors, the joined modules_to_save)``;
    CombineError naming the module when two sources train a copy of it (as peft refuses)."""
    stripped, saved, owner = [], {}, {}
    for (config, tensors), name in zip(sources, names):
        entries = getattr(config, "modules_to_save", None) or []
        own = {k: v for k, v in tensors.items() if _saved_module(k, entries) is not None}
        for module in dict.fromkeys(_saved_module(k, entries) for k in own):
            if owner.setdefault(module, name) != name:
                raise CombineError(f"adapters {owner[module]!r} and {name!r} both train their own copy of {module!r} "
                                   "(modules_to_save): a fully trained module cannot be weighted; combine at most "
                                   "one adapter that saves it")
        saved.update(own)
        stripped.append((config, {k: v for k, v in tensors.items() if k not in own}))
    joined = list(dict.fromkeys(e for c, _ in sources for e in (getattr(c, "modules_to_save", None) or [])))
    return stripped, saved, joined


def _saved_module(key: str, entries: Sequence[str]) -> str | None:
    """The module of ``modules_to_save`` entries that tensor ``key`` belongs to, or None."""
    if not entries or _split(key) is not None or key.endswith((".base_layer.weight", ".ia3_l")):
        return None
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:i])
        if any(module == e or module.endswith("." + e) for e in entries):
            return module
    return None


def _split(key: str) -> tuple[str, str] | None:
    """``(module, suffix)`` of a LoRA tensor key, or None."""
    for suffix in (*LORA_KEYS, MAGNITUDE):
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], suffix
    return None


def _lora_modules(sources: Sequence[Source], order: Sequence[str] | None) -> dict[str, list[int]]:
    """Module -> indices of the sources that adapt it, in ``order`` (else first appearance)."""
    found: dict[str, list[int]] = {}
    for i, (_, tensors) in enumerate(sources):
        for key in tensors:
            split = _split(key)
            if key.endswith(".base_layer.weight"):   # a targeted embedding's base weight (peft saves it)
                continue
            if split is None:
                raise CombineError(f"tensor {key!r} of adapter {i} is not a LoRA factor; cannot combine it")
            if split[1] != MAGNITUDE and i not in found.setdefault(split[0], []):
                found[split[0]].append(i)
    if order is not None:
        rank = {m: k for k, m in enumerate(order)}
        found = dict(sorted(found.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    return found


def _factor_keys(tensors: dict, module: str) -> dict[str, str]:
    keys = {}
    for suffix, (which, _) in LORA_KEYS.items():
        if f"{module}.{suffix}" in tensors:
            keys[which] = f"{module}.{suffix}"
    return keys


def module_scaling(config: LoraConfig, module: str, rank: int) -> float:
    """A LoRA module's scaling from its config: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA),
    ``alpha`` from ``alpha_pattern`` where it names the module; ``rank`` is the module's actual rank."""
    from deltatune.methods.lora import pattern_value

    alpha = pattern_value(config.alpha_pattern, module, config.lora_alpha)
    return merging.lora_scaling(alpha, rank, config.use_rslora)


def _factors(source: Source, module: str):
    """``(A, B, scaling)`` of ``module`` in a source, in the linear layout."""
    config, tensors = source
    keys = _factor_keys(tensors, module)
    A, B = tensors[keys["A"]], tensors[keys["B"]]
    return A, B, module_scaling(config, module, A.shape[0])


def _source_ranks(sources: Sequence[Source]) -> list[int]:
    """Each source's largest module rank (peft: ``r`` and the ``rank_pattern`` values)."""
    out = []
    for config, tensors in sources:
        ranks = [t.shape[0] for k, t in tensors.items() if (_split(k) or ("", ""))[1] in ("lora_A.weight",
                                                                                        "lora_embedding_A")]
        out.append(max(ranks, default=config.r))
    return out


def _full_delta(source: Source, module: str, factors, base_weight) -> torch.Tensor:
    """A source's delta at ``module`` in the factors' layout: ``s·B A`` for LoRA; for DoRA the
    merged weight minus the base, ``m·(W + s·B A)/||W + s·B A|| − W``."""
    A, B, s = factors
    delta = merging.lora_delta(A, B, s)
    config, tensors = source
    if not config.use_dora:
        return delta
    W = base_weight(module).float().to(delta.device)
    rows = W.flatten(1)
    merged, _ = merging.dora_merge(rows, delta.flatten(1), tensors[f"{module}.{MAGNITUDE}"].reshape(-1))
    return (merged - rows).reshape(delta.shape)


def _relative_error(A, B, As, Bs, w, s) -> float:
    """``||B'A' − Σ wᵢ sᵢ Bᵢ Aᵢ|| / ||Σ wᵢ sᵢ Bᵢ Aᵢ||`` of a factor-wise combination."""
    target = sum(merging.lora_delta(a, b, wi * si) for a, b, wi, si in zip(As, Bs, w, s))
    got = merging.lora_delta(A, B, 1.0)
    scale = torch.linalg.vector_norm(target)
    return float(torch.linalg.vector_norm(got - target) / scale) if scale > 0 else float(
        torch.linalg.vector_norm(got))


def lora_config_for(config: LoraConfig, modules: dict[str, tuple[int, float]], use_rslora: bool) -> LoraConfig:
    """``config`` with ``r``/``lora_alpha``/``rank_pattern``/``alpha_pattern`` that give each module
    its ``(rank, scaling)`` (scaling None: any): the most common pair as ``r``/``lora_alpha``, the others as patterns
    keyed by the module's escaped full name (peft's pattern rule matches it and nothing else)."""
    def alpha(rank: int, scaling: float) -> float:
        a = merging.lora_alpha_for(scaling, rank, use_rslora)
        return int(a) if float(a).is_integer() else a

    scaled = {m: v for m, v in modules.items() if v[1] is not None}     # None: any scaling (a zeroed layer)
    r = Counter(rank for rank, _ in modules.values()).most_common(1)[0][0] if modules else config.r
    a = Counter(alpha(*v) for v in scaled.values()).most_common(1)[0][0] if scaled else config.lora_alpha
    rank_pattern = {re.escape(m): rank for m, (rank, _) in modules.items() if rank != r}
    alpha_pattern = {re.escape(m): alpha(*v) for m, v in scaled.items() if alpha(*v) != a}
    return dataclasses.replace(config, r=r, lora_alpha=a, use_rslora=use_rslora,
                               rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def _target_fields(configs: Sequence[PeftConfig], modules) -> dict:
    """``target_modules`` (and the layer filters) selecting exactly ``modules``: the sources' lists
    joined when they are plain lists with the same filters, one spec when all sources share it,
    else the modules' full names."""
    specs = {repr(c.target_modules) for c in configs}
    filters = {repr((getattr(c, "layers_to_transform", None), getattr(c, "layers_pattern", None),
                     c.exclude_modules)) for c in configs}
    first = configs[0]
    keep = dict(layers_to_transform=getattr(first, "layers_to_transform", None),
                layers_pattern=getattr(first, "layers_pattern", None), exclude_modules=first.exclude_modules)
    if len(filters) == 1 and len(specs) == 1:
        return dict(target_modules=first.target_modules, **keep)
    if len(filters) == 1 and all(isinstance(c.target_modules, list) for c in configs):
        joined = list(dict.fromkeys(t for c in configs for t in c.target_modules))
        return dict(target_modules=joined, **keep)
    return dict(target_modules=list(modules), exclude_modules=None,
                **({"layers_to_transform": None, "layers_pattern": None} if hasattr(first, "layers_pattern") else {}))


# -- (IA)³ --------------------------------------------------------------------------------------
def _combine_ia3(sources: Sequence[Source], weights, combination_type: str, names, order) -> Source:
    if combination_type != "linear":
        raise CombineError(f"(IA)³ adapters {names} combine with combination_type='linear' only (a weighted sum "
                           f"of their scaling vectors), not {combination_type!r}")
    found: dict[str, list[int]] = {}
    for i, (_, tensors) in enumerate(sources):
        for key in tensors:
            if not key.endswith(".ia3_l"):
                raise CombineError(f"tensor {key!r} of adapter {names[i]!r} is not an (IA)³ vector")
            found.setdefault(key[:-len(".ia3_l")], []).append(i)
    if order is not None:
        rank = {m: k for k, m in enumerate(order)}
        found = dict(sorted(found.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    out = {}
    for module, present in found.items():
        sides = {sources[i][0].is_feedforward(module) for i in present}
        if len(sides) > 1:
            raise CombineError(f"{module}: the adapters scale different sides (feed-forward input vs output); "
                               "their vectors cannot be added")
        vectors = [sources[i][1][f"{module}.ia3_l"].float() for i in present]
        delta = merging.task_arithmetic([v - 1 for v in vectors], [weights[i] for i in present])
        out[f"{module}.ia3_l"] = (1 + delta).to(vectors[0].dtype)
    configs = [c for c, _ in sources]
    first = configs[0]
    same = len({repr((c.target_modules, c.exclude_modules, c.feedforward_modules)) for c in configs}) == 1
    if same:
        fields = dict(target_modules=first.target_modules, exclude_modules=first.exclude_modules,
                      feedforward_modules=first.feedforward_modules)
    else:  # exactly these modules, and exactly the feed-forward ones among them
        ff = [m for m in found if configs[found[m][0]].is_feedforward(m)]
        fields = dict(target_modules=list(found), exclude_modules=None, feedforward_modules=ff or None)
    return dataclasses.replace(first, init_ia3_weights=True, inference_mode=True, **fields), out
