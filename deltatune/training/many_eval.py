"""Evaluation of several tasks' adapters together (``train_many``).

A solo run evaluates its one adapter: eval loss in batches of ``eval_batch_size`` examples, then
exact match in greedy ``generate`` calls of ``eval_batch_size`` prompts. ``train_many`` has every
task's adapter on one base and its tasks usually finish at the same run step, so it evaluates
them together: no-grad passes of more tokens and ``generate`` calls of more prompts, each row
stopped at its own task's token budget. With ``mix_tasks`` a pass or call holds several tasks'
rows, each routed to its own adapter (``PeftModel.applying`` / ``generate(adapter_names=...)``,
the per-row path of mixed-batch inference); that path copies each row's factors for every
adapted layer, so it trades memory for time (measured in ``many_loop``; ``train_many`` keeps one
task per pass and call).

Each task's result is what ``evaluate.eval_loss`` / ``evaluate.exact_match`` give it alone: the
same examples, the same token-level cross-entropies and label count, the same greedy tokens.
Only float rounding of differently shaped batches can differ (tests check each task's results
against evaluating it alone, with and without ``mix_tasks``).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from deltatune.training.batching import count_label_tokens
from deltatune.training.data import Dataset
from deltatune.training.loss import lm_loss_sum, packable
from deltatune.training.tasks import mixed_batches


@dataclass
class EvalTask:
    """One task's evaluation: its adapter ``name``, its eval set and its options."""

    name: str
    data: Dataset
    packing: bool = True
    limit: int | None = None                # exact match: the first ``limit`` scored examples
    max_new_tokens: int | None = None       # exact match: None = longest reference + 16


@torch.no_grad()
def eval_losses(peft, tasks: list[EvalTask], pad_id: int, max_tokens: int, device="cpu",
                autocast=nullcontext, mix_tasks: bool = False) -> dict[str, dict]:
    """``{name: {"eval_loss", "eval_tokens"}}`` of every task, its rows in no-grad forward passes
    of at most ``max_tokens`` tokens (0: one pass per task, or one for all with ``mix_tasks``).

    ``mix_tasks``: a pass may hold several tasks' rows, each through its own adapter (the gathered
    per-row path: each row's factors are copied for every adapted layer); otherwise each pass
    holds one task's rows (its adapter applied as in a solo run, nothing gathered)."""
    was_training = peft.training
    peft.eval()
    pack = packable(peft)
    parts = [(t.name, sorted(t.data.examples, key=lambda e: -len(e)), t.packing and pack) for t in tasks]
    sums = {t.name: torch.zeros((), dtype=torch.float64) for t in tasks}
    passes = mixed_batches(parts, pad_id, max_tokens) if mix_tasks else \
        [p for part in parts for p in mixed_batches([part], pad_id, max_tokens)]
    for mixed in passes:
        batch = mixed.batch.to(device)
        token_losses = torch.zeros(batch.targets.shape, dtype=torch.float32, device=device)  # (R, L)
        with peft.applying(mixed.names), autocast():
            lm_loss_sum(peft, batch, None, token_losses)
        for name, rows in mixed.rows.items():
            sums[name] += token_losses[rows].double().sum().cpu()
    peft.train(was_training)
    out = {}
    for t in tasks:
        n = count_label_tokens(t.data.examples)
        out[t.name] = {"eval_loss": float(sums[t.name] / max(n, 1)), "eval_tokens": n}
    return out


class _RowBudget:
    """A ``generate`` stopping criterion: row ``i`` is done after ``budgets[i]`` new tokens."""

    def __init__(self, budgets: list[int], width: int, device) -> None:
        self.budgets = torch.tensor(budgets, dtype=torch.long, device=device)   # (B,)
        self.width = width                                                      # prompt columns

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return (input_ids.shape[1] - self.width) >= self.budgets                  # (B,) bool


def exact_matches(peft, tokenizer, tasks: list[EvalTask], rows_per_batch: int, device="cpu",
                  autocast=nullcontext, mix_tasks: bool = False) -> dict[str, dict]:
    """``{name: {"exact_match", "correct", "total"}}`` of every task that has references, its
    prompts in greedy ``generate`` calls of up to ``rows_per_batch`` rows (longest prompts first),
    each row stopped at its task's token budget.

    ``mix_tasks``: a call may hold several tasks' prompts, each row through its own adapter
    (``generate(adapter_names=...)``: the gathered per-row path, which keeps a copy of each row's
    factors for every adapted layer during the call: ~20 MB per row in fp32 on the default model with
    LoRA r=16 on all linear layers); otherwise each call holds one task's prompts."""
    from transformers import StoppingCriteriaList

    from deltatune.generation import complete, left_pad, pad_id, stop_token_ids

    rows = []                                                      # (task, example, budget)
    for t in tasks:
        scored = [e for e in t.data.examples if e.reference is not None]
        scored = scored[:t.limit] if t.limit else scored
        if not scored:
            continue
        budget = t.max_new_tokens or max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"])
                                         for e in scored) + 16
        rows += [(t.name, e, budget) for e in scored]
    stops = stop_token_ids(tokenizer, peft)
    pad = pad_id(tokenizer, stops)
    # a row stopped at its budget is filled with ``pad`` up to the batch's end: decoding drops it
    # when it is a stop or special token; otherwise each batch holds rows of one budget only.
    # Rows are sorted by budget, then longest prompt first: a batch decodes until its longest
    # budget (or every row's stop token), so rows of short-answer tasks share batches.
    mixed_budgets = pad in stops or pad in getattr(tokenizer, "all_special_ids", [])
    rows.sort(key=lambda row: (row[2], "" if mix_tasks else row[0], -len(row[1].generation_prompt())))
    hits = {t.name: [0, 0] for t in tasks}
    for chunk in _chunks(rows, rows_per_batch, mixed_budgets, mix_tasks):
        prompts = [e.generation_prompt() for _, e, _ in chunk]
        stop = _RowBudget([b for _, _, b in chunk], left_pad(prompts, pad)[0].shape[1], device)
        preds = complete(peft, tokenizer, prompts, max(b for _, _, b in chunk), device=device, autocast=autocast,
                         adapter_names=[name for name, _, _ in chunk], stopping_criteria=StoppingCriteriaList([stop]))
        for (name, e, _), pred in zip(chunk, preds):
            hits[name][0] += pred.strip() == e.reference.strip()
            hits[name][1] += 1
    return {name: {"exact_match": c / n, "correct": c, "total": n} for name, (c, n) in hits.items() if n}


def _chunks(rows: list, size: int, mixed_budgets: bool, mix_tasks: bool):
    """Consecutive runs of at most ``size`` rows, of one budget unless ``mixed_budgets``, of one
    task unless ``mix_tasks``."""
    chunk: list = []
    for row in rows:
        if chunk and (len(chunk) >= size or not mixed_budgets and row[2] != chunk[0][2]
                      or not mix_tasks and row[0] != chunk[0][0]):
            yield chunk
            chunk = []
        chunk.append(row)
    if chunk:
        yield chunk
