"""Sharded training with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``), LoRA and QLoRA.

``deltatune train --fsdp`` under ``torchrun --nproc_per_node N``: every process holds 1/N of the
frozen base and gathers one decoder layer at a time, so a base N times larger than one device's
memory trains. What is sharded and what is replicated:

- **The frozen base is sharded, block by block.** Each decoder layer is one FSDP unit. A unit's
  parameters are split along dim 0 across ranks; FSDP all-gathers the unit just before its
  forward, frees the full copy after it, and gathers it again for backward (the input gradient
  needs the weights, also through 4-bit layers and gradient checkpointing's recompute). Frozen
  weights get no gradient, hence no reduce-scatter and no optimizer state.
- **The input embedding and the output head are split by rows, never gathered whole to train**
  (``deltatune.training.vocab_shard``; one matrix when tied). They are no FSDP unit: FSDP would
  gather the head for the loss, at the end of the forward when the stored activations peak.
  Activations move instead: the lookup fetches only the rows of the batch's token ids, and the
  loss computes each rank's slice of the logits for every rank's label positions and combines
  the log-sum-exp across ranks. Generation gathers the head for each call, outside training.
- **The final norm is replicated** (a vector; ``ignored_params``, like the adapter).
- **4-bit layers shard too, statistics with the codes.** FSDP shards parameters, never buffers,
  so ``Linear4bit.stats_as_parameters_`` turns the block statistics (absmax codes, second-level
  scales, offset) into frozen parameters: they are cut and all-gathered together with the
  packed codes, in the same collective. The packed codes stay ``uint8``: FSDP2 all-gathers a
  unit of mixed dtypes as bytes, so the float "quant storage" dtype answer.ai needed for FSDP1's
  single flat parameter (``bnb_4bit_quant_storage``) is not needed here; the (n/2, 1) byte
  layout splits anywhere along dim 0 and re-assembles exactly.
- **The adapter is replicated** (``ignored_params``): its parameters stay ordinary tensors, equal
  on every rank, and their gradients are averaged with one all-reduce per step
  (``average_gradients``), exactly what DDP does. The adapter is a small fraction of the base
  (SmolLM2-135M, r=16 all-linear: 3.6%; 70B: 0.3%), so sharding it would save
  ``(1 - 1/N) x 16 bytes`` per adapter parameter (weights, gradients, AdamW moments); in exchange
  the optimizer, gradient clipping, checkpoints, resume and the saved adapter are the DDP path's
  unchanged, and rank 0 writes the peft-format adapter from the full tensors it already has.

The same code runs NCCL on GPUs and gloo on CPUs (``distributed.init``). Every rank must run the
same number of forward passes (each is a sequence of collectives): the trainer pads a step's
micro-batches with zero-weighted passes to the most any rank has, evaluation runs equal batch
counts, and every rank generates the whole exact-match set (``Trainer``).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from deltatune.training.distributed import DistInfo


class FSDPError(ValueError):
    """The model cannot be sharded as asked (the message says why and what to do)."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model: the FSDP units below the root.

    transformers lists them in ``_no_split_modules`` (the class names accelerate also wraps);
    otherwise the longest ``nn.ModuleList`` of same-typed modules is taken.

    Raises:
        FSDPError: no repeated block found.
    """
    from deltatune.training.loss import unwrap

    hf = unwrap(model)
    names = set(getattr(hf, "_no_split_modules", None) or [])
    layers = [m for m in hf.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in hf.modules() if isinstance(m, nn.ModuleList) and len(m) > 1
             and len({type(c) for c in m}) == 1]
    if not lists:
        raise FSDPError(f"{type(hf).__name__}: no repeated decoder block to shard (no _no_split_modules, "
                        "no ModuleList of same-typed layers)")
    return list(max(lists, key=len))


def prepare_4bit_for_sharding(model: nn.Module) -> int:
    """Make every 4-bit layer's statistics parameters, so FSDP shards them with the codes; returns
    how many layers. ``bitsandbytes.nn.Linear4bit`` (transformers' ``load_in_4bit``) keeps its
    statistics in a Python object FSDP cannot shard: refused with the fix.
    """
    from deltatune.quant.nf4 import Linear4bit

    count = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            module.stats_as_parameters_()
            count += 1
        elif type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes"):
            raise FSDPError(f"{name}: a bitsandbytes Linear4bit keeps its quantization state outside the "
                            "parameters, which FSDP cannot shard; load the base dense and quantize it with "
                            "deltatune (deltatune train --quantize nf4, or deltatune.quantize(model))")
    return count


def shard(root: nn.Module, model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """Apply FSDP2 to ``root`` (the module whose ``forward`` runs a step) around ``model``.

    One ``fully_shard`` unit per decoder layer of ``model`` (``decoder_layers``), the input
    embedding and output head split by rows (``vocab_shard.shard_vocabulary``), then ``root``,
    which shards nothing: its remaining parameters (the final norm) and every trainable parameter
    are left out (``ignored_params``), replicated; the trainable ones are synchronised by
    ``average_gradients``. Returns ``root``, now an ``FSDPModule``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from deltatune.training.vocab_shard import shard_vocabulary

    prepare_4bit_for_sharding(model)
    mesh = init_device_mesh(device.type, (info.world,))
    units = decoder_layers(model)
    shard_vocabulary(model, mesh)
    in_units = {id(p) for unit in units for p in unit.parameters()}
    ignored = {p for p in root.parameters() if p.requires_grad or id(p) not in in_units}
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=ignored)
    fully_shard(root, mesh=mesh, ignored_params=ignored)
    _own_memory([p for p in ignored if not p.requires_grad] + list(root.buffers()))
    return root


def _own_memory(tensors: list[torch.Tensor]) -> None:
    """Give the frozen tensors left whole (the final norm, ...) memory of their own.

    A base loaded from safetensors views the memory-mapped file; sharding copies the split tensors
    out of it, and one small tensor still viewing the file keeps the whole mapping, with every page
    sharding read, in the process's RSS next to the shards (measured on SmolLM2-135M, fp32: 270 MiB
    of file pages per process, what made FSDP's RSS no lower than DDP's).
    """
    for t in tensors:
        if not hasattr(t, "to_local"):
            t.data = t.data.clone()


def is_sharded(module: nn.Module) -> bool:
    """True for a module ``shard`` (``fully_shard``) was applied to."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def average_gradients(params: list[torch.Tensor], info: DistInfo) -> None:
    """Average the replicated parameters' gradients over ranks: one flat all-reduce (as DDP does).

    A parameter without a gradient on this rank counts as zeros (every rank must send the same
    layout).
    """
    if not info.enabled or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])               # (sum numel,)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


@contextmanager
def as_root(root: nn.Module):
    """Evaluation and generation call the decoder directly, past the root's ``forward``: make sure
    FSDP has set ``root`` up as the root first (it does so lazily at the root's first forward;
    otherwise the first decoder layer called would take that role and the next training step
    would fail). A no-op for an unsharded module."""
    if is_sharded(root):
        root._get_fsdp_state()._lazy_init()
    yield


def local_bytes(model: nn.Module, trainable: bool = False) -> int:
    """Bytes this process holds of ``model``'s frozen (or, with ``trainable``, trainable) parameters
    and buffers: the local shards under FSDP, the full tensors otherwise."""
    total, seen = 0, set()
    tensors = [p for p in model.parameters() if p.requires_grad == trainable]
    if not trainable:
        tensors += list(model.buffers())
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        key = (local.untyped_storage().data_ptr(), local.nbytes)
        if local.numel() and key not in seen:
            seen.add(key)
            total += local.nbytes
    return total
