"""Merging is math on tensors: pure functions shared by the layers' merge, ``merge_and_unload``,
``PeftModel.add_weighted_adapter``, ``deltatune merge`` and ``deltatune combine``.

Nothing here sees a model or a file: weights, factors and vectors in, tensors out.

Deltas (what an adapter adds to a base weight ``W``, Linear layout (out, in[, kh, kw])):

- ``lora_scaling(alpha, r, use_rslora)``: LoRA's ``s``, the one place its rule is written
  (``lora_alpha_for`` is its inverse);
- ``lora_delta(A, B, s)``: ``s · B A`` (LoRA, Hu et al. 2021); a convolution's factors compose
  as two convolutions.
- ``dora_merge(W, delta, m)``: ``m · (W + ΔW) / ||W + ΔW||`` per output row (DoRA, Liu et al.
  2024, arXiv:2402.09353), and ``dora_unmerge`` its exact inverse given the norms it used.
- ``ia3_merge(W, l)``: ``W ⊙ l`` ((IA)³, Liu et al. 2022, arXiv:2205.05638).

Combiners (model-merging literature, as peft implements them in ``peft.utils.merge_utils``), on a
list of same-shape task tensors with one weight each:

- ``task_arithmetic``: ``Σ wᵢ tᵢ`` (Ilharco et al. 2023, arXiv:2212.04089);
- ``magnitude_prune``: each tensor keeps its ``density`` largest entries, then the weighted sum;
- ``ties``: magnitude pruning, a sign elected per entry, the mean of the agreeing weighted entries
  (Yadav et al. 2023, arXiv:2306.01708);
- ``dare_linear`` / ``dare_ties``: random pruning rescaled by ``1 / density`` (Yu et al. 2023,
  arXiv:2311.03099), then the weighted sum / TIES's sign election. A ``torch.Generator`` makes
  them reproducible; without one they draw from the global generator, as peft does.

LoRA factor combinations (``combine_lora_factors``): ``cat`` stacks the factors (exact: the
result's delta is the weighted sum of the deltas); the ``*_svd`` types combine the full deltas and
factor the result with an SVD (exact at full rank); the plain ``linear``/``ties``/``dare_*``/
``magnitude_prune`` types combine ``A`` and ``B`` separately, which is peft's behaviour and is not
the weighted sum of the deltas (``(Σ aᵢ Bᵢ)(Σ bᵢ Aᵢ)`` has cross terms ``Bᵢ Aⱼ``).
"""
from __future__ import annotations

import math
import warnings
from typing import Literal, Sequence

import torch

Tensors = Sequence[torch.Tensor]

COMBINATION_TYPES = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                     "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
# Types that combine the factors A and B separately (peft's way): not the weighted sum of the deltas.
FACTORWISE_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# Types that need ``density``.
PRUNING_TYPES = ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                 "magnitude_prune", "magnitude_prune_svd")


# -- deltas ------------------------------------------------------------------------------------
def _rank_divisor(r: float, use_rslora: bool) -> float:
    """What LoRA divides ``alpha`` by: ``r`` (Hu et al. 2021), or ``sqrt(r)`` with rsLoRA
    (Kalajdzievski 2023, arXiv:2312.03732). Both are powers of ``r``, so doubling the rank
    multiplies it by ``_rank_divisor(2)``."""
    return math.sqrt(r) if use_rslora else r


def lora_scaling(alpha: float, r: float, use_rslora: bool = False) -> float:
    """LoRA's scaling ``s``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.

    Every module that needs the scale of a LoRA adapter (the layers, ``add_weighted_adapter``,
    hot-swapping, file conversion) calls this or ``lora_alpha_for``, so the rule is written once.
    """
    return alpha / _rank_divisor(r, use_rslora)


def lora_alpha_for(scaling: float, r: float, use_rslora: bool = False) -> float:
    """The ``lora_alpha`` giving ``scaling`` at rank ``r`` (the inverse of ``lora_scaling``)."""
    return scaling * _rank_divisor(r, use_rslora)


def lora_delta(A: torch.Tensor, B: torch.Tensor, scaling) -> torch.Tensor:
    """``scaling · B A`` in fp32, in the layout of the weight the factors adapt.

    Args:
        A: (r, in) for linear layers (and Embedding's (r, vocab)), or (r, in, *kernel) for
            Conv1d/2d/3d.
        B: (out, r), or (out, r, 1..) for convolutions (ungrouped).
        scaling: a float or a 0-d tensor.

    Returns:
        (out, in), or (out, in, *kernel): a convolution by ``A`` then the 1x1 convolution by ``B``
        is one convolution whose kernel is ``B`` applied to ``A``'s kernels.
    """
    A, B = A.float(), B.float()
    delta = B.flatten(1) @ A.flatten(1)                                     # (out, in·kernel)
    return delta.view(B.shape[0], *A.shape[1:]) * scaling


def dora_merge(rows: torch.Tensor, delta_rows: torch.Tensor, magnitude: torch.Tensor):
    """DoRA's merged weight ``m · (W + ΔW) / ||W + ΔW||`` (norm per row) and the norms used.

    Args:
        rows: the base weight as (n_norms, k) rows (fp32).
        delta_rows: ``ΔW`` in the same rows.
        magnitude: ``m`` (n_norms,).

    Returns:
        ``(merged rows, norms)``; keep the norms to invert exactly with ``dora_unmerge``.
    """
    direction = rows + delta_rows                                           # (n, k)
    norms = torch.linalg.vector_norm(direction, dim=1)                      # (n,)
    return direction * (magnitude.to(direction) / norms)[:, None], norms


def dora_unmerge(rows: torch.Tensor, delta_rows: torch.Tensor, magnitude: torch.Tensor,
                 norms: torch.Tensor) -> torch.Tensor:
    """Inverse of ``dora_merge``: the base rows back from merged ``rows`` and the ``norms`` it used."""
    return rows / (magnitude.to(rows) / norms.to(rows))[:, None] - delta_rows


def ia3_merge(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``W ⊙ l``: ``scale`` shaped to broadcast over the weight (a row or a column of it)."""
    return weight * scale.to(weight)


def ia3_unmerge(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of ``ia3_merge`` (exact; a zero entry of ``l`` cannot be undone)."""
    return weight / scale.to(weight)


# -- combiners on task tensors -----------------------------------------------------------------
def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``stacked`` (n, ...) times ``weights`` (n,) broadcast over the rest."""
    return stacked * weights.to(stacked).view(-1, *([1] * (stacked.dim() - 1)))


def _as_weights(weights, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(weights, dtype=torch.float32, device=like.device)


def prune(tensor: torch.Tensor, density: float, method: Literal["magnitude", "random"], rescale: bool = False,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep a ``density`` fraction of ``tensor``'s entries (the largest, or random ones).

    ``density >= 1`` keeps everything (with a warning, as peft). Random pruning draws a Bernoulli
    mask from ``generator`` (the global generator when None) and, with ``rescale``, divides the
    kept entries by ``density`` so the expectation is unchanged (DARE).

    Raises:
        ValueError: ``density < 0`` or an unknown method.
    """
    if density >= 1:
        warnings.warn(f"density={density} >= 1: nothing is pruned", stacklevel=3)
        return tensor
    if density < 0:
        raise ValueError(f"density={density} must be in [0, 1]")
    if method == "magnitude":
        k = int(density * tensor.numel())
        mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        mask[torch.topk(tensor.abs().reshape(-1), k=k, largest=True).indices] = 1
        return tensor * mask.view(tensor.shape)
    if method == "random":
        mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
        kept = tensor * mask
        return kept / density if rescale else kept
    raise ValueError(f"prune method={method!r} must be 'magnitude' or 'random'")


def majority_sign_mask(stacked: torch.Tensor, method: Literal["total", "frequency"] = "total") -> torch.Tensor:
    """TIES's sign election over the tensors stacked on dim 0: where each agrees with the majority.

    ``"total"`` elects the sign of the summed values, ``"frequency"`` the more frequent sign; a tie
    elects +.
    """
    sign = stacked.sign()
    if method == "total":
        votes = stacked.sum(dim=0)
    elif method == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method={method!r} must be 'total' or 'frequency'")
    return sign == torch.where(votes >= 0, 1, -1)


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 of the entries ``mask`` keeps (0 where none is kept)."""
    return (weighted * mask).sum(dim=0) / mask.sum(dim=0).clamp(min=1.0)


def task_arithmetic(tensors: Tensors, weights) -> torch.Tensor:
    """``Σ wᵢ tᵢ``."""
    stacked = torch.stack(list(tensors))
    return _weighted(stacked, _as_weights(weights, stacked)).sum(dim=0)


def magnitude_prune(tensors: Tensors, weights, density: float) -> torch.Tensor:
    """Each tensor keeps its ``density`` largest entries; then ``Σ wᵢ tᵢ``."""
    return task_arithmetic([prune(t, density, "magnitude") for t in tensors], weights)


def ties(tensors: Tensors, weights, density: float, majority_sign_method: str = "total") -> torch.Tensor:
    """TIES: magnitude-prune each tensor, elect a sign per entry on the pruned (unweighted) tensors,
    average the weighted entries that agree with it."""
    stacked = torch.stack([prune(t, density, "magnitude") for t in tensors])
    mask = majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(_weighted(stacked, _as_weights(weights, stacked)), mask)


def dare_linear(tensors: Tensors, weights, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: random pruning rescaled by ``1 / density``, then ``Σ wᵢ tᵢ``."""
    return task_arithmetic([prune(t, density, "random", rescale=True, generator=generator) for t in tensors],
                           weights)


def dare_ties(tensors: Tensors, weights, density: float, majority_sign_method: str = "total",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE's random rescaled pruning, then TIES's sign election and disjoint mean."""
    stacked = torch.stack([prune(t, density, "random", rescale=True, generator=generator) for t in tensors])
    mask = majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(_weighted(stacked, _as_weights(weights, stacked)), mask)


def combine_tensors(kind: str, tensors: Tensors, weights, density: float | None = None,
                    majority_sign_method: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """One combiner by name: ``linear``/``svd`` (task arithmetic), ``ties``, ``dare_linear``,
    ``dare_ties``, ``magnitude_prune`` (an ``_svd`` suffix is ignored: it says what happens next)."""
    kind = kind[:-len("_svd")] if kind.endswith("_svd") else kind
    if kind in ("linear", "svd"):
        return task_arithmetic(tensors, weights)
    if kind == "magnitude_prune":
        return magnitude_prune(tensors, weights, density)
    if kind == "ties":
        return ties(tensors, weights, density, majority_sign_method)
    if kind == "dare_linear":
        return dare_linear(tensors, weights, density, generator)
    if kind == "dare_ties":
        return dare_ties(tensors, weights, density, majority_sign_method, generator)
    raise ValueError(f"combination_type={kind!r} is not one of {COMBINATION_TYPES}")


# -- LoRA factor combinations ------------------------------------------------------------------
def check_combination(combination_type: str, density: float | None, majority_sign_method: str = "total") -> None:
    """Raise ValueError naming the argument when a combination cannot run as asked."""
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type={combination_type!r} is not one of {list(COMBINATION_TYPES)}")
    if combination_type in PRUNING_TYPES and (density is None or not 0 <= density <= 1):
        raise ValueError(f"combination_type={combination_type!r} needs density in [0, 1], got {density!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method={majority_sign_method!r} must be 'total' or 'frequency'")


def cat_factors(As: Tensors, Bs: Tensors, weights: Sequence[float], scalings: Sequence[float], rank: int):
    """``cat``: ``A' = [w₁s₁A₁; w₂s₂A₂; ...]``, ``B' = [B₁, B₂, ...]`` zero-padded to ``rank``, so
    ``B' A' = Σ wᵢ sᵢ Bᵢ Aᵢ`` exactly (rank = the sum of the sources' ranks).

    Factors in the linear layout: ``A`` (r, in[, kh, kw]), ``B`` (out, r[, 1, 1]).
    """
    A = torch.cat([a.float() * (w * s) for a, w, s in zip(As, weights, scalings)], dim=0)
    B = torch.cat([b.float() for b in Bs], dim=1)
    return _pad_rank(A, B, rank)


def _pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int):
    """Zero-pad ``A`` (r, ...) and ``B`` (out, r, ...) to ``rank``."""
    r = A.shape[0]
    if r < rank:
        A = torch.cat([A, A.new_zeros(rank - r, *A.shape[1:])], dim=0)
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - r, *B.shape[2:])], dim=1)
    return A, B


def factorwise(kind: str, As: Tensors, Bs: Tensors, weights: Sequence[float], scalings: Sequence[float],
               density: float | None = None, majority_sign_method: str = "total",
               generator: torch.Generator | None = None):
    """peft's ``linear``/``ties``/``dare_*``/``magnitude_prune`` on LoRA: ``A`` and ``B`` combined
    separately, each source weighted by ``±sqrt(|wᵢ sᵢ|)`` (the sign on ``A`` only).

    Not the weighted sum of the deltas (see the module doc); kept for compatibility with peft.
    All sources must have the same rank. ``A``s are combined first, then ``B``s (the order of the
    random draws for DARE, as peft).
    """
    roots = [math.sqrt(abs(w * s)) for w, s in zip(weights, scalings)]
    signs = [1.0 if w * s >= 0 else -1.0 for w, s in zip(weights, scalings)]
    A = combine_tensors(kind, As, [r * g for r, g in zip(roots, signs)], density, majority_sign_method, generator)
    B = combine_tensors(kind, Bs, roots, density, majority_sign_method, generator)
    return A.to(As[0].dtype), B.to(Bs[0].dtype)


def svd_factors(delta: torch.Tensor, rank: int, clamp: float | None = None, full_matrices: bool = True,
                driver: str | None = None):
    """``delta`` (out, in) ≈ ``B A`` with the top-``rank`` singular triplets: ``B = U S`` (out, rank),
    ``A = Vh`` (rank, in); exact when ``rank`` reaches the rank of ``delta``.

    ``clamp`` (a quantile in [0, 1]) clips both factors' entries to ±that quantile of all their
    entries (kohya's svd_merge_lora, as peft).
    """
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.numel())              # a rank above min(out, in) is zero-padded
    B = U[:, :k] @ torch.diag(S[:k])                                        # (out, k)
    A = Vh[:k, :]                                                           # (k, in)
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return _pad_rank(A, B, rank)


def is_exact(combination_type: str, rank: int | None = None, full_rank: int | None = None) -> bool:
    """Whether the combined LoRA's delta is the weighted sum of the sources' deltas by construction:
    ``cat`` always; ``svd`` when ``rank`` is at least the rank ``full_rank`` of that sum (and no
    clamp). The pruning types change the tensors on purpose, and the factor-wise types have cross
    terms."""
    if combination_type == "cat":
        return True
    if combination_type == "svd":
        return rank is not None and full_rank is not None and rank >= full_rank
    return False
