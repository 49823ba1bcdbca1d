"""Batch order and packing: no compute spent on padding.

Order: each epoch's order is a pure function of ``(seed, epoch)``, so a resumed run (and every
DDP rank) sees the same global batches without saving a sampler. Examples are shuffled, cut into
windows of ``window`` global batches, sorted by length inside a window and cut into global batches,
whose order is shuffled again: batches hold near-equal lengths but arrive in random order.

Split: a global batch (sorted by length) is cut into ``grad_accum * world`` contiguous micro-batches
of ``batch_size`` sequences; micro-batch ``j`` goes to rank ``j % world``. Every rank knows the
whole global batch, so the loss is normalised by the global label count without communication,
and one process with the same global batch computes the same sum.

Packing: a micro-batch becomes rows of length ``L`` = its longest sequence; shorter sequences are
packed first-fit-decreasing into the same row. ``position_ids`` restart at 0 for each sequence,
which transformers' ``masking_utils`` turns into a block-diagonal causal mask when no
``attention_mask`` is passed (Llama-family models since transformers 4.53.1, GPT-2 since 4.55.0;
before 5.0 only on torch >= 2.6). Older versions would let packed sequences attend to each other,
so ``collate(packing=True)`` refuses them (``compat.check_packing_support``). Padding sits only at
row ends, where causal attention makes it invisible to real tokens; padded positions carry no label.

Shared prefix (``share_prefix``, ``training.prefix``): where a forward pass's examples start with
the same unlabelled tokens, the batch carries them once and one row per example of what follows.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from deltatune.training.compat import check_packing_support
from deltatune.training.data import IGNORE, Example
from deltatune.training.prefix import MIN_PREFIX, common_prefix


def epoch_batches(lengths: list[int], global_batch: int, seed: int, epoch: int,
                  shuffle: bool = True, window: int = 32) -> list[list[int]]:
    """Global batches (lists of example indices, longest first) for one epoch; the last partial one is dropped.

    Raises:
        ValueError: fewer examples than one global batch.
    """
    n = len(lengths)
    if n < global_batch:
        raise ValueError(f"{n} training examples are fewer than one global batch of {global_batch} "
                         "(batch_size * grad_accum * processes); lower --batch-size or --grad-accum")
    order = list(range(n))
    rng = random.Random(f"{seed}:{epoch}")
    if shuffle:
        rng.shuffle(order)
    batches = []
    span = global_batch * window
    for start in range(0, n - n % global_batch, span):
        chunk = order[start:min(start + span, n - n % global_batch)]
        chunk.sort(key=lambda i: -lengths[i])
        batches += [chunk[i:i + global_batch] for i in range(0, len(chunk), global_batch)]
    if shuffle:
        rng.shuffle(batches)
    return batches


def micro_batches(global_batch: list[int], accum: int, world: int, rank: int) -> list[list[int]]:
    """This rank's ``accum`` micro-batches of a global batch (contiguous slices, round-robin to ranks)."""
    parts = accum * world
    size = len(global_batch) // parts
    chunks = [global_batch[j * size:(j + 1) * size] for j in range(parts)]
    return chunks[rank::world]


@dataclass
class Batch:
    """Model inputs for one micro-batch.

    Attributes:
        input_ids, position_ids: (R, L) long.
        targets: (R, L) long; ``targets[r, t]`` is the token to predict *from* position t
            (already shifted), -100 where there is none.
        tokens: real (non-pad) tokens in the batch.
        label_tokens: positions carrying a target.
        prefix: (P,) long, or None: tokens every row continues (``shared_collate``); the
            rows then hold what follows them, positions from P on.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    tokens: int
    label_tokens: int
    prefix: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device),
                     self.tokens, self.label_tokens, None if self.prefix is None else self.prefix.to(device))


def shifted_targets(example: Example) -> list[int]:
    """``labels[1:] + [-100]``: the target of each position."""
    return example.labels[1:] + [IGNORE]


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing: group sequence indices into rows of at most ``capacity`` tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def collate(examples: list[Example], packing: bool = True, pad_id: int = 0, share_prefix: bool = False) -> Batch:
    """Build a ``Batch`` from examples: packed rows (``packing``) or one sequence per row; with
    ``share_prefix``, their common unlabelled prefix once and one row per example after it
    (``shared_collate``) where they share one of at least ``prefix.MIN_PREFIX`` tokens.

    Raises:
        compat.PackingUnsupportedError: ``packing`` with a transformers/torch whose attention masks
            would let packed sequences see each other.
    """
    if share_prefix:
        shared = shared_collate(examples, pad_id)
        if shared is not None:
            return shared
    if packing:
        check_packing_support()
    lengths = [len(e) for e in examples]
    capacity = max(lengths)
    rows = pack_rows(lengths, capacity) if packing else [[i] for i in range(len(examples))]
    ids = torch.full((len(rows), capacity), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), capacity), dtype=torch.long)
    tgt = torch.full((len(rows), capacity), IGNORE, dtype=torch.long)
    for r, members in enumerate(rows):
        t = 0
        for i in members:
            ex, n = examples[i], lengths[i]
            ids[r, t:t + n] = torch.tensor(ex.input_ids)
            pos[r, t:t + n] = torch.arange(n)
            tgt[r, t:t + n] = torch.tensor(shifted_targets(ex))
            t += n
        # Padding continues the last sequence's positions: it only sees real tokens, never the reverse.
        last = pos[r, t - 1] if t else -1
        pos[r, t:] = torch.arange(capacity - t) + last + 1
    label_tokens = int((tgt != IGNORE).sum())
    return Batch(ids, pos, tgt, sum(lengths), label_tokens)


def split_by_tokens(examples: list[Example], budget: int, share_prefix: bool = False) -> list[list[Example]]:
    """Consecutive groups of at most ``budget`` tokens (at least one example each; 0 = no limit).

    Activation memory scales with the tokens in one forward pass; gradients of the pieces are
    summed, so the step is the same as one pass over all of them. ``share_prefix``: the passes run
    the examples' common prefix once (``collate(share_prefix=True)``), so a group of k examples
    computes ``P + sum(len - P)`` tokens, and that is what ``budget`` bounds.
    """
    if budget <= 0:
        return [examples]
    p = common_prefix(examples) if share_prefix else 0
    p = p if p >= MIN_PREFIX else 0
    groups: list[list[Example]] = []
    used = budget + 1
    for ex in examples:
        if used + len(ex) - p > budget:
            groups.append([])
            used = p
        groups[-1].append(ex)
        used += len(ex) - p
    return groups


def count_label_tokens(examples: list[Example]) -> int:
    """Targets in these examples (labels after the first position)."""
    return sum(sum(1 for t in e.labels[1:] if t != IGNORE) for e in examples)


def shared_collate(examples: list[Example], pad_id: int = 0) -> Batch | None:
    """A ``Batch`` whose ``prefix`` (P,) holds the examples' shared prefix and whose rows hold
    each example's rest (one example a row, positions from P on), or None where no prefix of at
    least ``MIN_PREFIX`` tokens is shared."""
    p = common_prefix(examples)
    if p < MIN_PREFIX:
        return None
    lengths = [len(e) - p for e in examples]
    width = max(lengths)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)              # (R, Ls)
    pos = (torch.arange(width) + p).repeat(len(examples), 1)                       # (R, Ls)
    tgt = torch.full((len(examples), width), IGNORE, dtype=torch.long)             # (R, Ls)
    for r, (ex, n) in enumerate(zip(examples, lengths)):
        ids[r, :n] = torch.tensor(ex.input_ids[p:])
        tgt[r, :n] = torch.tensor(shifted_targets(ex)[p:])
    prefix = torch.tensor(examples[0].input_ids[:p], dtype=torch.long)             # (P,)
    # padding continues each row's positions: causal attention hides it from the real tokens
    return Batch(ids, pos, tgt, sum(len(e) for e in examples), int((tgt != IGNORE).sum()), prefix)
