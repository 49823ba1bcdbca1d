"""Atomic file writes and checked safetensors reads.

Every file deltatune writes goes through here: the bytes land in a temporary file in the target
directory, are flushed to disk, and only then renamed over the destination, so a crash leaves
either the old file or the new one, never half of one.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    The caller writes the whole file to the yielded path. If the body raises, the temporary
    file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _new_file_mode(path))  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _new_file_mode(path: Path) -> int:
    """An existing file's mode, else 0666 minus the process umask (what ``open`` would give)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


@contextmanager
def atomic_directory(path: str | os.PathLike, owned: Iterable[str]) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it replaces ``path`` whole.

    The caller writes every entry named in ``owned`` (files or subdirectories) into the yielded
    directory. Entries of an existing ``path`` that are not ``owned`` (a user's README, another
    adapter's folder) are carried into the new directory first. The switch is one atomic
    exchange of the two directories (Linux ``renameat2(RENAME_EXCHANGE)``); elsewhere two
    renames. A crash or an error leaves ``path`` as it was: old files with old files, never new
    weights beside an old config.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    moved: list[str] = []
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())
        if not path.exists():
            os.rename(tmp, path)
            return
        owned = set(owned)
        for entry in sorted(os.listdir(path)):
            if entry not in owned and not (tmp / entry).exists():
                os.rename(path / entry, tmp / entry)
                moved.append(entry)
        _exchange(tmp, path)        # now ``tmp`` holds the old directory
        moved = []
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        for entry in moved:         # give back what was carried before the switch failed
            os.rename(tmp / entry, path / entry)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> None:
    """Swap two directories atomically where the OS can (Linux), else rename ``b`` aside first."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        if ctypes.get_errno() not in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: fall back
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(b))
    aside = b.with_name(f".{b.name}.old-{os.getpid()}")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


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
