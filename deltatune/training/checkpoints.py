"""Training checkpoints: everything needed to continue a run bit-for-bit, written atomically.

Layout under ``<out>/checkpoints``::

    step-00000040/
        trainable.safetensors   every trainable parameter by name (exact resume, any method)
        optimizer.safetensors   AdamW moments and step counts, keyed "<param index>.<name>"
        rng.safetensors         torch CPU (and CUDA) generator states
        state.json              step, epoch, position in the epoch, param groups, python RNG, config
        adapter/                the adapter in peft's format (usable on its own)
    latest                      name of the newest complete checkpoint

A checkpoint is assembled in a hidden temporary directory, renamed into place whole, and only then
named in ``latest`` (each file itself written atomically). A SIGKILL at any moment leaves ``latest``
naming a complete checkpoint. The data order is a function of (seed, epoch), so "position in the
epoch" is all the sampler state there is.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from deltatune.checkpoint.io import CheckpointError, atomic_directory, atomic_save_tensors, atomic_write_json, \
    atomic_write_text, load_tensors

LATEST = "latest"


@dataclass
class TrainState:
    """Where a run is: optimizer steps done, epoch, global batches consumed in that epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    model_flops: float = 0.0  # FLOPs the steps so far needed (training.flops), for the run's MFU


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by name (the adapter's tensors, whatever the method)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: str | Path, state: TrainState, model, optimizer, config: dict,
                    keep: int = 2) -> Path:
    """Write a checkpoint for ``state.step`` and point ``latest`` at it; prune to ``keep`` newest."""
    params = trainable_parameters(model)
    opt_tensors, opt_meta = optimizer_state(optimizer)
    adapter = (lambda tmp: model.save_pretrained(tmp / "adapter")) if hasattr(model, "save_pretrained") else None
    return write_checkpoint(out, state.step,
                            {"trainable": {n: p.detach() for n, p in params.items()}, "optimizer": opt_tensors},
                            {"state": asdict(state), "optimizer": opt_meta, "trainable": list(params),
                             "config": config}, keep, extra=adapter)


def write_checkpoint(out: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], meta: dict,
                     keep: int = 2, extra: Callable[[Path], None] | None = None) -> Path:
    """The one checkpoint writer (a solo run's and ``train_many``'s): ``<out>/checkpoints/step-N``.

    Each ``tensors`` group is written as ``<group>.safetensors``, the RNG states as
    ``rng.safetensors``, ``meta`` (plus the python RNG) as ``state.json``; ``extra(tmp)`` may add
    files. The folder is assembled aside and renamed into place whole, then named in ``latest``;
    the oldest beyond ``keep`` are removed.
    """
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    with atomic_directory(root / name) as tmp:  # a re-save of this step replaces it whole
        for group, group_tensors in tensors.items():
            atomic_save_tensors(group_tensors, tmp / f"{group}.safetensors")
        atomic_save_tensors(_rng_tensors(), tmp / "rng.safetensors")
        atomic_write_json(tmp / "state.json", {**meta, "python_rng": _python_rng()})
        if extra is not None:
            extra(tmp)
    atomic_write_text(root / LATEST, name + "\n")
    _prune(root, keep, protect=name)
    return root / name


def read_meta(path: str | Path) -> dict:
    """A checkpoint's ``state.json`` (CheckpointError naming the file when unreadable)."""
    path = Path(path)
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'state.json'}: unreadable ({exc})") from None


def restore_rng(path: str | Path, meta: dict) -> None:
    """Put back the torch and python RNG states a checkpoint saved."""
    _restore_rng(load_tensors(Path(path) / "rng.safetensors"), meta.get("python_rng"))


def find_checkpoint(path: str | Path) -> Path | None:
    """Resolve a run directory, its ``checkpoints`` folder or a step folder to a checkpoint (or None)."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = root / LATEST
        if latest.is_file():
            step_dir = root / latest.read_text().strip()
            if (step_dir / "state.json").is_file():
                return step_dir
            raise CheckpointError(f"{latest} names {step_dir.name}, which is missing or incomplete")
    return None


def load_checkpoint(path: str | Path, model, optimizer) -> tuple[TrainState, dict]:
    """Restore trainable weights, optimizer and RNG from checkpoint ``path``; return (state, config).

    Raises:
        CheckpointError: files missing/corrupt, or the checkpoint's trainable parameters do not
            match the model's (names the first difference).
    """
    path = Path(path)
    meta = read_meta(path)
    params = trainable_parameters(model)
    saved = load_tensors(path / "trainable.safetensors")
    if set(saved) != set(params):
        diff = sorted(set(saved) ^ set(params))
        raise CheckpointError(f"{path}: trainable parameters differ from the model's "
                              f"(e.g. {diff[0]}); was it written with another method/rank/target?")
    with torch.no_grad():
        for n, p in params.items():
            if saved[n].shape != p.shape:
                raise CheckpointError(f"{path}: {n} has shape {tuple(saved[n].shape)}, model has {tuple(p.shape)}")
            p.copy_(saved[n])
    load_optimizer_state(optimizer, load_tensors(path / "optimizer.safetensors"), meta["optimizer"])
    restore_rng(path, meta)
    return TrainState(**meta["state"]), meta.get("config", {})


# -- pieces --------------------------------------------------------------------------------------

def optimizer_state(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as (tensors keyed ``"<param index>.<key>"``, JSON-able rest)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_dict(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The ``state_dict`` that ``optimizer_state`` took apart, for ``optimizer.load_state_dict``."""
    state: dict[int, dict] = {}
    for flat, value in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def load_optimizer_state(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Load a saved optimizer state, keeping this run's choice of kernel (``fused``), not the saved run's."""
    fused = [g.get("fused") for g in optimizer.param_groups]
    optimizer.load_state_dict(optimizer_state_dict(tensors, meta))
    for group, flag in zip(optimizer.param_groups, fused):
        group["fused"] = flag


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"torch_cuda_{i}"] = s
    return out


def _python_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _restore_rng(tensors: dict[str, torch.Tensor], python_state) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if python_state:
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))


def _prune(root: Path, keep: int, protect: str) -> None:
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp"):  # leftovers of a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
