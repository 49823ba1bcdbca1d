"""Conversions between adapter files, as pure functions on configs and tensors.

PiSSA (Meng et al. 2024, arXiv:2404.02948) starts LoRA's factors from the base weight's top
singular triplets and leaves the base a residual ``W - s·B₀A₀``. Its file is only right for a
loader that redoes that SVD on the original base; a plain-LoRA loader (vLLM, our server) adds
``s·B A`` to the original ``W`` and gets another model. ``pissa_to_lora`` rewrites the trained
factors as the difference from the initial ones, a plain LoRA of rank 2r on the original base:

    W + s·(B A - B₀ A₀) = (W - s·B₀A₀) + s·B A,   with A' = [A; A₀] (2r, in), B' = [B, -B₀] (out, 2r)

and the scaling kept: ``lora_alpha`` doubles with ``r`` (times sqrt 2 with rsLoRA, whose scaling is
``alpha / sqrt(r)``). This is peft's ``path_initial_model_for_weight_conversion``.
"""
from __future__ import annotations

import dataclasses

import torch

from deltatune import merging
from deltatune.checkpoint.io import CheckpointError
from deltatune.config import LoraConfig

# key suffix -> the dimension holding the rank, and the sign of the initial factor's block
_FACTORS = {"lora_A.weight": (0, 1), "lora_embedding_A": (0, 1), "lora_B.weight": (1, -1), "lora_embedding_B": (1, -1)}


def is_residual_init(config) -> bool:
    """True when the adapter's factors assume a base changed at initialisation (PiSSA, OLoRA)."""
    init = getattr(config, "init_lora_weights", True)
    return isinstance(init, str) and (init.startswith("pissa") or init == "olora")


def require_plain_lora(config, source) -> None:
    """Refuse a file that a plain-LoRA loader (``W + s·B A`` on the original base) would apply
    wrongly, naming the way to convert it.

    Raises:
        CheckpointError: ``config`` is a PiSSA adapter.
    """
    if is_residual_init(config):
        raise CheckpointError(
            f"{source}: init_lora_weights={config.init_lora_weights!r}: this adapter's factors apply to a "
            "base whose weights PiSSA changed, not to the original base; load it with "
            "PeftModel.from_pretrained (which redoes the SVD), or save it as plain LoRA with "
            "save_pretrained(..., path_initial_model_for_weight_conversion=<initial adapter dir>)")


def pissa_to_lora(config: LoraConfig, tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
                  source="initial adapter") -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A trained PiSSA adapter as a plain rank-2r LoRA on the original base (see the module doc).

    Args:
        config: the trained adapter's config.
        tensors: its tensors (trained factors; biases and modules-to-save copies pass through).
        initial: the tensors saved right after initialisation, same keys for the factors.

    Raises:
        CheckpointError: a factor missing from ``initial`` or with another shape (named).
    """
    out = {}
    for key, value in tensors.items():
        suffix = next((s for s in _FACTORS if key.endswith(s)), None)
        if suffix is None:
            out[key] = value
            continue
        if key not in initial or initial[key].shape != value.shape:
            raise CheckpointError(f"{source}: no initial factor {key!r} of shape {tuple(value.shape)}; "
                                  "was it saved from this adapter right after initialisation?")
        dim, sign = _FACTORS[suffix]
        out[key] = torch.cat([value, sign * initial[key].to(value.dtype)], dim=dim)
    # the scaling's rank divisor (r, or sqrt(r) with rsLoRA) is a power of r: doubling r
    # multiplies it by its value at 2, and lora_alpha must follow to keep the scaling
    factor = _tidy(merging.lora_alpha_for(1.0, 2, config.use_rslora))
    converted = dataclasses.replace(
        config, r=2 * config.r, lora_alpha=_tidy(config.lora_alpha * factor), init_lora_weights=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: _tidy(v * factor) for k, v in config.alpha_pattern.items()})
    return converted, out


def _tidy(value: float):
    """An integral float as an int (``lora_alpha: 16``, not ``16.0``, in the written config)."""
    return int(value) if float(value).is_integer() else value
