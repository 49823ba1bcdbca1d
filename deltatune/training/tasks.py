"""One task of a ``train_many`` run, and the mixed batch its rows join.

A ``TaskRun`` is what a solo ``Trainer`` keeps for its one adapter - batch order, step, epoch,
optimizer, schedule, metrics log - kept per task, so several adapters advance in one loop. Its
batch order is ``Trainer``'s (``batching.epoch_batches`` with the same seed, batch size and
window), so a task sees the very batches a solo run of it would see.

``mixed_batch`` joins each task's collated rows into one ``Batch`` (rows padded at their ends,
where causal attention hides padding from real tokens), with each row's adapter name and each
position's loss weight: ``1 / n_k`` for the label tokens of task ``k`` (``n_k`` its label count
in this step). The summed loss is then ``sum_k mean_k``; each adapter touches only its own rows,
so its gradient is exactly the one a solo step on its rows gives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltatune.training.batching import Batch, collate, count_label_tokens, epoch_batches
from deltatune.training.config import TrainConfig
from deltatune.training.data import IGNORE, Dataset, Example
from deltatune.training.loop import lr_factor, make_optimizer
from deltatune.training.metrics import MetricsLog


@dataclass
class TaskRun:
    """The state of one task in a ``train_many`` run.

    Attributes:
        name: the task's (and its adapter's) name.
        config: the task's ``TrainConfig`` (its data, lr, schedule, epochs, ``out``).
        train_data, eval_data: tokenized sets.
        packing: whether its rows are packed (its config and its method's ``packable``).
        step, epoch, batch_in_epoch: where it is, as in ``checkpoints.TrainState``.
        params, optimizer: its adapter's parameters and their own AdamW.
        result: its final metrics once finished (None while it trains).
    """

    name: str
    config: TrainConfig
    train_data: Dataset
    eval_data: Dataset | None = None
    packing: bool = True
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    params: list = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    log: MetricsLog | None = None
    result: dict | None = None

    def __post_init__(self) -> None:
        cfg = self.config
        self.global_batch = cfg.batch_size * cfg.grad_accum  # one process; accumulation is one pass here
        self.steps_per_epoch = len(self._epoch_batches(0))
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.warmup = cfg.warmup_steps or round(cfg.warmup_ratio * self.total_steps)

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def done(self) -> bool:
        return self.step >= self.total_steps

    def start(self, params: list, device: torch.device, log: bool) -> None:
        """Take the adapter's parameters: trainable, with their own optimizer and metrics log."""
        self.params = params
        for p in params:
            p.requires_grad_(True)
        self.optimizer = make_optimizer(params, self.config, device)
        self.log = MetricsLog(self.out, enabled=log)

    def lr(self) -> float:
        """This step's learning rate (``Trainer``'s schedule, on this task's own step count)."""
        cfg = self.config
        return cfg.lr * lr_factor(self.step, self.total_steps, self.warmup, cfg.schedule, cfg.min_lr_ratio)

    def next_examples(self) -> list[Example]:
        """The examples of this task's next step (the batch a solo run takes at this step)."""
        batches = self._epoch_batches(self.epoch)
        if self.batch_in_epoch >= len(batches):
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            batches = self._epoch_batches(self.epoch)
        ids = batches[self.batch_in_epoch]
        self.batch_in_epoch += 1
        return [self.train_data[i] for i in ids]

    def stop_training(self) -> None:
        """Freeze the finished adapter and drop its optimizer state."""
        for p in self.params:
            p.requires_grad_(False)
            p.grad = None
        self.optimizer = None

    def epoch_float(self) -> float:
        return self.epoch + self.batch_in_epoch / max(1, self.steps_per_epoch)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        cfg = self.config
        window = cfg.group_window if cfg.group_by_length else 1
        return epoch_batches(self.train_data.lengths, self.global_batch, cfg.seed, epoch, window=window)


@dataclass
class MixedBatch:
    """One step's rows from several tasks.

    Attributes:
        batch: the joined ``Batch`` (R, L).
        names: each row's adapter name (R,).
        weights: (R, L) fp32 loss weight of each position (``1 / n_k`` on task ``k``'s rows).
        rows: task name -> ``slice`` of its rows.
        labels: task name -> its label-token count ``n_k`` (at least 1).
        tokens: task name -> its real tokens.
    """

    batch: Batch
    names: list[str]
    weights: torch.Tensor
    rows: dict[str, slice]
    labels: dict[str, int]
    tokens: dict[str, int]


def mixed_batch(parts: list[tuple[str, list[Example], bool]], pad_id: int = 0) -> MixedBatch:
    """Collate each task's examples (``(name, examples, packing)``; packing never crosses tasks)
    and stack their rows into one batch padded to the longest row."""
    collated = [(name, collate(examples, packing, pad_id), max(1, count_label_tokens(examples)),
                 sum(len(e) for e in examples)) for name, examples, packing in parts]
    width = max(b.input_ids.shape[1] for _, b, _, _ in collated)
    ids, pos, tgt, wts, names, rows = [], [], [], [], [], {}
    start = 0
    for name, b, n_labels, _ in collated:
        extra = width - b.input_ids.shape[1]
        r = b.input_ids.shape[0]
        ids.append(torch.nn.functional.pad(b.input_ids, (0, extra), value=pad_id))       # (r, L)
        # padding continues each row's positions, as collate pads: it sees real tokens, never the reverse
        pos.append(torch.cat([b.position_ids, b.position_ids[:, -1:] + 1 + torch.arange(extra)], dim=1))
        tgt.append(torch.nn.functional.pad(b.targets, (0, extra), value=IGNORE))
        wts.append(torch.full((r, width), 1.0 / n_labels, dtype=torch.float32))
        names += [name] * r
        rows[name] = slice(start, start + r)
        start += r
    targets = torch.cat(tgt)                                                              # (R, L)
    batch = Batch(torch.cat(ids), torch.cat(pos), targets, sum(t for *_, t in collated),
                  int((targets != IGNORE).sum()))
    return MixedBatch(batch, names, torch.cat(wts), rows, {n: k for n, _, k, _ in collated},
                      {n: t for n, _, _, t in collated})
