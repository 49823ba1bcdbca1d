"""One task of a ``train_many`` run, and the mixed batch its rows join.

A ``TaskRun`` is what a solo ``Trainer`` keeps for its one adapter - batch order, step, epoch,
optimizer, schedule, metrics log - kept per task, so several adapters advance in one loop. Its
batch order is ``Trainer``'s (``batching.epoch_batches`` with the same seed, batch size and
window), so a task sees the very batches a solo run of it would see.

``mixed_batches`` joins the tasks' collated rows into forward passes of at most
``max_batch_tokens`` tokens (rows padded at their ends, where causal attention hides padding
from real tokens), with each row's adapter name and each position's loss weight: ``1 / n_k`` for
the label tokens of task ``k`` (``n_k`` its label count in the whole step). The summed loss is then ``sum_k mean_k``; each adapter touches only its own rows,
so its gradient is exactly the one a solo step on its rows gives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltatune.training.batching import Batch, collate, count_label_tokens, epoch_batches, split_by_tokens
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
        patience, min_delta: early stopping: after ``patience`` evaluations in a row whose eval
            loss is not below the best minus ``min_delta``, the task stops (None: never).
        best_loss, best_step, bad_evals, best_params, stopped_early: the early-stopping state
            (``best_params``: copies of the adapter's tensors at its best evaluation).
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
    patience: int | None = None
    min_delta: float = 0.0
    best_loss: float | None = None
    best_step: int = 0
    bad_evals: int = 0
    best_params: list | None = None
    stopped_early: bool = False

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
        return self.step >= self.total_steps or self.stopped_early

    def record_eval(self, loss: float) -> None:
        """Note an evaluation at this step: a new best (keep a copy of the adapter when early
        stopping is on), or one more without improvement (stop once ``patience`` is reached)."""
        if self.best_loss is None or loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_step, self.bad_evals = loss, self.step, 0
            if self.patience is not None:
                self.best_params = [p.detach().clone() for p in self.params]
            return
        self.bad_evals += 1
        if self.patience is not None and self.bad_evals >= self.patience:
            self.stopped_early = True

    def restore_best(self) -> None:
        """Put the adapter back to its best evaluated state (when a copy was kept)."""
        if self.best_params is not None:
            with torch.no_grad():
                for p, best in zip(self.params, self.best_params):
                    p.copy_(best)

    def progress_state(self) -> dict:
        """Where this task is, as JSON (a ``train_many`` checkpoint); ``load_progress`` undoes it."""
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "tokens_seen": self.tokens_seen, "best_loss": self.best_loss, "best_step": self.best_step,
                "bad_evals": self.bad_evals, "stopped_early": self.stopped_early, "result": self.result}

    def load_progress(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

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
    """One forward pass of a step: rows from several tasks.

    Attributes:
        batch: the joined ``Batch`` (R, L).
        names: each row's adapter name (R,).
        weights: (R, L) fp32 loss weight of each position (``1 / n_k`` on task ``k``'s rows).
        rows: task name -> ``slice`` of its rows in this pass.
        labels: task name -> its label-token count ``n_k`` in the whole step (at least 1).
        tokens: task name -> its real tokens in this pass.
    """

    batch: Batch
    names: list[str]
    weights: torch.Tensor
    rows: dict[str, slice]
    labels: dict[str, int]
    tokens: dict[str, int]


def mixed_batches(parts: list[tuple[str, list[Example], bool]], pad_id: int = 0,
                  max_tokens: int = 0, share_prefix: bool = False) -> list[MixedBatch]:
    """One step's forward passes over every task's examples (``(name, examples, packing)``).

    Each task's examples are cut into pieces of at most ``max_tokens`` tokens and collated as a
    solo run cuts and collates its micro-batch (packing never crosses tasks); consecutive pieces,
    of one task or several, then share a pass while their tokens fit in ``max_tokens`` (0: one
    pass), each pass padded to its longest row. Every position of task ``k`` weighs ``1 / n_k``,
    ``n_k`` its label tokens in the whole step, so the passes' gradients add up to ``sum_k mean_k``.

    ``share_prefix`` (where ``training.prefix.why_not`` allows it): a piece whose examples share
    an unlabelled prefix is cut and collated as a solo run with sharing does (the prefix once
    per pass) and runs as a pass of its own: the prefix's hidden states depend on
    the task's adapter, so one prefix cannot serve rows of two tasks.
    """
    labels = {name: max(1, count_label_tokens(examples)) for name, examples, _ in parts}
    pieces = [(name, collate(piece, packing, pad_id, share_prefix=share_prefix), sum(len(e) for e in piece))
              for name, examples, packing in parts
              for piece in split_by_tokens(examples, max_tokens, share_prefix=share_prefix)]
    passes: list[list] = []
    used = max_tokens + 1
    for piece in pieces:
        alone = piece[1].prefix is not None or (passes and passes[-1][-1][1].prefix is not None)
        if not alone and (max_tokens <= 0 and passes or 0 < max_tokens and used + piece[2] <= max_tokens):
            passes[-1].append(piece)
            used += piece[2]
        else:
            passes.append([piece])
            used = piece[2]
    return [_join(group, labels, pad_id) for group in passes]


def mixed_batch(parts: list[tuple[str, list[Example], bool]], pad_id: int = 0) -> MixedBatch:
    """Every task's examples in one pass (``mixed_batches`` without a token limit)."""
    return mixed_batches(parts, pad_id, 0)[0]


def _join(pieces: list[tuple[str, Batch, int]], labels: dict[str, int], pad_id: int) -> MixedBatch:
    """Stack collated pieces' rows into one batch padded at the row ends to the longest row."""
    width = max(b.input_ids.shape[1] for _, b, _ in pieces)
    ids, pos, tgt, wts, names, rows, tokens = [], [], [], [], [], {}, {}
    start = 0
    for name, b, n_tokens in pieces:
        extra = width - b.input_ids.shape[1]
        r = b.input_ids.shape[0]
        ids.append(torch.nn.functional.pad(b.input_ids, (0, extra), value=pad_id))       # (r, L)
        # padding continues each row's positions, as collate pads: it sees real tokens, never the reverse
        pos.append(torch.cat([b.position_ids, b.position_ids[:, -1:] + 1 + torch.arange(extra)], dim=1))
        tgt.append(torch.nn.functional.pad(b.targets, (0, extra), value=IGNORE))
        wts.append(torch.full((r, width), 1.0 / labels[name], dtype=torch.float32))
        names += [name] * r
        first = rows[name].start if name in rows else start
        rows[name] = slice(first, start + r)   # a task's pieces in one pass are consecutive
        tokens[name] = tokens.get(name, 0) + n_tokens
        start += r
    targets = torch.cat(tgt)                                                              # (R, L)
    prefix = pieces[0][1].prefix if len(pieces) == 1 else None    # a shared prefix: its piece is a pass alone
    batch = Batch(torch.cat(ids), torch.cat(pos), targets, sum(tokens.values()), int((targets != IGNORE).sum()),
                  prefix)
    return MixedBatch(batch, names, torch.cat(wts), rows, {n: labels[n] for n in rows}, tokens)
