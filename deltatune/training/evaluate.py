"""Evaluation: token-level eval loss, and exact match of greedy generations.

Generation is ``deltatune.generation.complete`` (shared with ``deltatune generate``): prompts sorted
by length (little padding), left-padded, greedy with the KV cache, stopping at the tokenizer's
end-of-turn tokens. Under DDP each rank takes every ``world``-th example and counts are summed.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from deltatune.generation import complete, stop_token_ids  # noqa: F401  (stop_token_ids: re-exported)
from deltatune.training.batching import collate
from deltatune.training.data import Dataset
from deltatune.training.distributed import DistInfo, all_reduce_sum
from deltatune.training.loss import lm_loss_sum, packable


@torch.no_grad()
def eval_loss(model, dataset: Dataset, batch_size: int = 16, device="cpu", packing: bool = True,
              info: DistInfo = DistInfo(), autocast=nullcontext, lockstep: bool = False) -> dict:
    """Mean cross-entropy per label token over ``dataset`` (model put in eval mode meanwhile).

    ``lockstep``: every rank runs the same number of forward passes (under FSDP each one is a
    sequence of collectives); a rank with fewer batches repeats one and discards it.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(dataset)), key=lambda i: -len(dataset[i]))[info.rank::info.world]
    starts = list(range(0, len(order), batch_size))
    if lockstep:
        most = -(-len(dataset) // info.world)                     # the largest rank's share
        starts += [None] * (-(-most // batch_size) - len(starts))
    stats = torch.zeros(2, dtype=torch.float64)
    for s in starts:
        rows = [dataset[i] for i in order[s:s + batch_size]] if s is not None else [dataset[0]]
        batch = collate(rows, packing and packable(model)).to(device)
        with autocast():
            loss = float(lm_loss_sum(model, batch))
        if s is not None:
            stats[0] += loss
            stats[1] += batch.label_tokens
    stats = all_reduce_sum(stats.to(device), info).cpu()
    model.train(was_training)
    return {"eval_loss": float(stats[0] / max(stats[1], 1)), "eval_tokens": int(stats[1])}


def greedy_generate(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 64,
                    batch_size: int = 16, device="cpu", autocast=nullcontext) -> list[str]:
    """Greedy completions (decoded, special tokens dropped) of token-id prompts, in input order."""
    return complete(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size, device=device,
                    autocast=autocast)


def exact_match(model, tokenizer, dataset: Dataset, limit: int | None = None, batch_size: int = 16,
                max_new_tokens: int | None = None, device="cpu", info: DistInfo = DistInfo(),
                autocast=nullcontext, samples: int = 0) -> dict:
    """Share of examples whose stripped greedy completion equals the stripped reference.

    Args:
        limit: score only the first ``limit`` examples that have a reference.
        max_new_tokens: default: longest reference in tokens + 16.
        samples: how many ``{prompt, reference, prediction, correct}`` dicts to return (rank 0's).

    Raises:
        ValueError: no example has a reference (``text`` lines cannot be scored).
    """
    scored = [e for e in dataset.examples if e.reference is not None]
    if not scored:
        raise ValueError(f"{dataset.report.path}: no example has a reference answer "
                         "(exact match needs messages or prompt/completion lines)")
    scored = scored[:limit] if limit else scored
    if max_new_tokens is None:
        longest = max(len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in scored)
        max_new_tokens = longest + 16
    mine = scored[info.rank::info.world]
    preds = greedy_generate(model, tokenizer, [e.generation_prompt() for e in mine], max_new_tokens,
                            batch_size, device, autocast)
    hits = [p.strip() == e.reference.strip() for p, e in zip(preds, mine)]
    counts = all_reduce_sum(torch.tensor([sum(hits), len(hits)], dtype=torch.float64, device=device), info).cpu()
    result = {"exact_match": float(counts[0] / max(counts[1], 1)), "correct": int(counts[0]),
              "total": int(counts[1])}
    if samples:
        result["samples"] = [
            {"prompt": tokenizer.decode(e.generation_prompt(), skip_special_tokens=False),
             "reference": e.reference, "prediction": p, "correct": h}
            for e, p, h in list(zip(mine, preds, hits))[:samples]]
    return result
