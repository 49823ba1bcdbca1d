"""Atomic writes of files and whole directories; the bottom of the import layers.

Every file and directory deltatune writes goes through here: the bytes land in a temporary
entry beside the destination, are flushed to disk, and only then renamed over it, so a crash
leaves either the old content or the new, never half of it. This module imports nothing from
deltatune (only the standard library), so every other module may use it: ``config`` for
``adapter_config.json``, ``models`` for the GGUF cache, ``checkpoint`` for adapters and
training checkpoints.
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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_directory(path: str | os.PathLike, owned: Iterable[str] | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``path``; on success it replaces ``path`` whole.

    The one directory swap in deltatune (adapters, training checkpoints, merged models, the GGUF
    cache). The caller writes the new content into the yielded directory.

    Args:
        path: the directory to create or replace (its parent is created if missing).
        owned: the entries (files or subdirectories) the caller writes. Entries of an existing
            ``path`` that are not ``owned`` (a user's README, another adapter's folder) are
            carried into the new directory first. None: the caller owns everything; nothing of
            the old directory survives.

    Every file in the new directory is flushed to disk before the switch, which is one atomic
    exchange of the two directories (Linux ``renameat2(RENAME_EXCHANGE)``); elsewhere three
    renames. Readers that open files by path see the old tree or the new one. A crash or an
    error in the body leaves ``path`` as it was: old files with old files, never new weights
    beside an old config.

    Raises:
        NotADirectoryError: ``path`` exists and is a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: exists and is not a directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    moved: list[str] = []
    try:
        yield tmp
        _flush_tree(tmp)
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; give what mkdir would
        if not path.exists():
            os.rename(tmp, path)
            return
        keep = set() if owned is None else set(owned)
        for entry in sorted(os.listdir(path)) if owned is not None else ():
            if entry not in keep and not (tmp / entry).exists():
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


def _flush_tree(root: Path) -> None:
    """fsync every regular file under ``root``: a crash after the switch cannot leave truncated files."""
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _new_file_mode(path: Path) -> int:
    """An existing file's mode, else 0666 minus the process umask (what ``open`` would give)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~_umask()


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
