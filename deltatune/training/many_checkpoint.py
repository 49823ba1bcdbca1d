"""Checkpoints of a ``train_many`` run: every task's state, written by ``checkpoints.write_checkpoint``.

Layout of ``<out>/checkpoints/step-N`` (N: the run's step), beside a solo run's files::

    adapters.safetensors    every task's adapter tensors, "<task>/<index>" (index: in
                            ``adapter_parameters`` order, the order of its optimizer's params)
    optimizer.safetensors   each unfinished task's AdamW moments and steps, "<task>/<param>.<key>"
    best.safetensors        each early-stopping task's best adapter tensors, "<task>/<index>"
    rng.safetensors         torch RNG states
    state.json              "kind": "train_many", the run step, each task's place (step, epoch,
                            batch in the epoch, early-stopping state, result once finished) and
                            optimizer scalars, the python RNG and the shared config

The data order of each task is a function of (its seed, epoch) and dropout masks of (seed, run
step), so the positions are all the sampler state there is: a run resumed from step N takes the
very steps an uninterrupted run takes after N.
"""
from __future__ import annotations

from pathlib import Path

import torch

from deltatune.checkpoint.io import CheckpointError, load_tensors
from deltatune.training.checkpoints import load_optimizer_state, optimizer_state, read_meta, restore_rng, \
    write_checkpoint
from deltatune.training.tasks import TaskRun

KIND = "train_many"


def save_many(out: str | Path, step: int, runs: list[TaskRun], extra: dict, keep: int) -> Path:
    """Checkpoint run step ``step`` of ``runs``; ``extra`` (JSON) is kept in ``state.json``."""
    adapters, optim, best, tasks = {}, {}, {}, {}
    for run in runs:
        adapters.update({f"{run.name}/{i}": p.detach() for i, p in enumerate(run.params)})
        if run.best_params is not None:
            best.update({f"{run.name}/{i}": t for i, t in enumerate(run.best_params)})
        entry = {"progress": run.progress_state(), "shapes": [list(p.shape) for p in run.params]}
        if run.optimizer is not None:
            tensors, meta = optimizer_state(run.optimizer)
            optim.update({f"{run.name}/{k}": v for k, v in tensors.items()})
            entry["optimizer"] = meta
        tasks[run.name] = entry
    return write_checkpoint(out, step, {"adapters": adapters, "optimizer": optim, "best": best},
                            {"kind": KIND, "step": step, "tasks": tasks, **extra}, keep)


def load_many(path: str | Path, runs: list[TaskRun]) -> dict:
    """Restore every task of ``runs`` from checkpoint ``path``; returns its ``state.json``.

    Raises:
        CheckpointError: not a ``train_many`` checkpoint, other task names, or an adapter whose
            tensors differ in number or shape (another method, rank or target); the message
            names the task.
    """
    path = Path(path)
    meta = read_meta(path)
    if meta.get("kind") != KIND:
        raise CheckpointError(f"{path}: not a train_many checkpoint (a solo run's?); resume it with --data")
    names = sorted(run.name for run in runs)
    if sorted(meta["tasks"]) != names:
        raise CheckpointError(f"{path}: holds tasks {sorted(meta['tasks'])}, this run has {names}")
    adapters, optim, best = (load_tensors(path / f"{g}.safetensors") for g in ("adapters", "optimizer", "best"))
    for run in runs:
        _restore_task(path, run, meta["tasks"][run.name], adapters, optim, best)
    restore_rng(path, meta)
    return meta


def _restore_task(path: Path, run: TaskRun, entry: dict, adapters: dict, optim: dict, best: dict) -> None:
    shapes = [list(p.shape) for p in run.params]
    if entry["shapes"] != shapes:
        raise CheckpointError(f"{path}: task {run.name!r}'s adapter has tensors {entry['shapes']}, this run's "
                              f"has {shapes}; was it written with another method, rank or target?")
    with torch.no_grad():
        for i, p in enumerate(run.params):
            p.copy_(adapters[f"{run.name}/{i}"])
    run.load_progress(entry["progress"])
    prefix = f"{run.name}/"
    if f"{prefix}0" in best:
        run.best_params = [best[f"{prefix}{i}"].clone() for i in range(len(run.params))]
    if run.result is not None or run.stopped_early:
        run.stop_training()
        return
    mine = {k[len(prefix):]: v for k, v in optim.items() if k.startswith(prefix)}
    load_optimizer_state(run.optimizer, mine, entry["optimizer"])
