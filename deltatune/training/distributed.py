"""Process-group plumbing for ``torchrun``: gloo on CPU, NCCL on GPUs; rank 0 writes files."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on the process that writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    if not launched_by_torchrun():
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: this process's GPU (``cuda:LOCAL_RANK``) if CUDA is available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over ranks in place (identity for one process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(synchronize: bool = False) -> None:
    """Destroy the process group. ``synchronize`` (after a run every rank finished) waits for all
    ranks first: a rank that tears gloo down while a peer still works (rank 0 saving the adapter)
    can make that peer abort ("terminate called without an active exception"). Not after a
    failure, where a dead peer would leave the barrier waiting."""
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(module: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel`` over the trainable parameters only.

    Frozen base weights are identical on every rank by construction (same file, same dtype), so
    they are excluded from DDP's start-up broadcast: only the adapter travels.
    """
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    DDP._set_params_and_buffers_to_ignore_for_model(module, frozen)
    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids, broadcast_buffers=False)
