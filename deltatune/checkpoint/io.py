"""Atomic tensor files and checked safetensors reads.

The atomic primitives (``atomic_path``, ``atomic_write_text``, ``atomic_write_json``,
``atomic_directory``) live in ``deltatune.atomic``, below every other module, and are
re-exported here: checkpoint code keeps one import for all its file IO.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from deltatune.atomic import atomic_directory, atomic_path, atomic_write_json, atomic_write_text

__all__ = ["CheckpointError", "atomic_directory", "atomic_path", "atomic_save_tensors", "atomic_write_json",
           "atomic_write_text", "load_tensors"]


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                        metadata: dict[str, str] | None = None) -> None:
    """Save ``tensors`` as a safetensors file at ``path`` atomically.

    Tensors are made contiguous and detached first; shared storage is copied so safetensors
    accepts tied weights.
    """
    from safetensors.torch import save_file

    flat = {k: v.detach().contiguous().clone() if _shares_storage(v, tensors) else v.detach().contiguous()
            for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata or {"format": "pt"})


def _shares_storage(t: torch.Tensor, tensors: dict[str, torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return sum(1 for v in tensors.values() if v.untyped_storage().data_ptr() == ptr) > 1


class CheckpointError(ValueError):
    """A file on disk is missing, corrupt, or does not fit the model it is loaded into."""


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file fully into CPU memory.

    Raises:
        CheckpointError: the file is missing, truncated or not a safetensors file; the message
            names the file.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises several types for corrupt headers/data
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); "
                              "it may be truncated or corrupt") from exc
