"""The vocabulary matrices under FSDP: 1/N of their rows per process, never gathered whole to train.

An input embedding and an output head are (V, d) matrices; on small models they are the largest in
the base (SmolLM2-135M: 49k x 576, one matrix for both since they are tied: 21% of the fp32 base,
68% of the 4-bit one). FSDP would all-gather a unit whole for each use, and the head's use is the
loss at the end of the forward, when stored activations peak. Here each process keeps its 1/N of
the rows (a ``DTensor`` sharded along dim 0, FSDP's own layout, rows split as ``torch.chunk``
does) and activations travel instead of weights:

- **the lookup** (``VocabShard.rows``, a hook on the embedding): every process sends the distinct
  token ids it needs, each answers with the rows it holds, and a reduce-scatter hands each process
  its rows: ``distinct ids x d`` values move, not ``V x d``, and only those rows are ever whole;
- **the loss** (``sharded_linear_cross_entropy``): the hidden states at label positions are
  all-gathered a chunk at a time, each process computes the logits of its slice of the vocabulary
  for all of them, the log-sum-exp and the target logit are combined across processes, and the
  gradient w.r.t. the hidden states is reduce-scattered back to the rows' owners (the
  vocabulary-parallel cross-entropy of Megatron-LM, Shoeybi et al. 2019, with each process's own
  rows, as in data parallelism). Only the hidden states' gradient is computed: a sharded matrix is
  frozen;
- **any other call of the head** (generation, the full forward of models whose logits are
  post-processed): a hook gathers the whole weight for that call and frees it after, outside
  the training step.

Every use is a sequence of collectives, so all processes must make the same calls (they do: the
trainer runs as many forward passes on every rank, and every rank generates the same prompts).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def is_sharded_matrix(weight) -> bool:
    """True for a weight split by rows over processes (what ``shard_vocabulary`` makes: a ``DTensor``)."""
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(weight, DTensor) and weight.dim() == 2 and tuple(weight.placements) == (Shard(0),)


def _split(vocab: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s rows ``[start, stop)`` of ``vocab``: ``torch.chunk``'s split, as ``DTensor``'s
    ``Shard(0)`` cuts (the last ranks may hold fewer rows, or none)."""
    per = -(-vocab // world)
    return min(rank * per, vocab), min((rank + 1) * per, vocab)


class Rows:
    """Where this process's rows of a row-split ``DTensor`` (V, d) sit: ``local`` is ``W[start:start + n]``."""

    def __init__(self, weight) -> None:
        mesh = weight.device_mesh
        self.group, self.world, self.rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
        self.local = weight.to_local()                                        # (n, d)
        self.start = _split(weight.shape[0], self.world, self.rank)[0]

    def gather(self, t: torch.Tensor, fill, rows: int | None = None) -> torch.Tensor:
        """Every process's ``t`` (n_p, ...) padded with ``fill`` to ``rows`` (default: the longest):
        (world, rows, ...)."""
        if rows is None:
            rows = int(self.gather(torch.tensor([t.shape[0]], device=t.device), 0, 1).max())
        padded = t.new_full((rows, *t.shape[1:]), fill)
        padded[:t.shape[0]] = t
        out = t.new_empty((self.world * rows, *t.shape[1:]))
        dist.all_gather_into_tensor(out, padded, group=self.group)
        return out.view(self.world, rows, *t.shape[1:])


def lookup(weight, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of a row-split ``weight`` (V, d) that ``ids`` (any shape) need, from the processes
    that hold them: ``(rows (u, d), index)`` with ``rows[index] == W[ids]``. A collective.

    Raises:
        IndexError: an id outside ``[0, V)`` (as ``nn.Embedding`` does).
    """
    vocab = weight.shape[0]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise IndexError(f"token id {bad} is out of the embedding's range [0, {vocab})")
    at = Rows(weight)
    wanted, index = torch.unique(ids, return_inverse=True)                  # (u,), ids.shape
    every = at.gather(wanted, -1)                                           # (world, m)
    offset = every.reshape(-1) - at.start
    hit = (offset >= 0) & (offset < at.local.shape[0])
    found = at.local.new_zeros(offset.shape[0], at.local.shape[1])          # (world * m, d)
    found[hit] = at.local[offset[hit]]
    mine = at.local.new_empty(every.shape[1], at.local.shape[1])            # each row from its one holder
    dist.reduce_scatter_tensor(mine, found, group=at.group)
    return mine[:wanted.shape[0]], index


class _Hooks:
    """Forward hooks on a module holding a row-split weight: a plain tensor during a call (the rows
    the lookup needs, or, for a head, the whole matrix), the shard again after it."""

    def __init__(self) -> None:
        self.saved = {}

    def before_lookup(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input"]
        rows, index = lookup(module.weight, ids)
        # padding_idx only shapes gradients, and indexes V rows, not these
        self.saved[module] = (module._parameters["weight"], module.padding_idx)
        module.padding_idx = None
        module._parameters["weight"] = nn.Parameter(rows, requires_grad=False)
        return ((index, *args[1:]), kwargs) if args else (args, {**kwargs, "input": index})

    def before_head(self, module, args):
        self.saved[module] = (module._parameters["weight"], None)
        module._parameters["weight"] = nn.Parameter(module.weight.full_tensor(), requires_grad=False)

    def after(self, module, args, output):
        if module in self.saved:
            weight, padding_idx = self.saved.pop(module)
            module._parameters["weight"] = weight
            if isinstance(module, nn.Embedding):
                module.padding_idx = padding_idx


def shard_vocabulary(model: nn.Module, mesh) -> int:
    """Replace the input embedding's and the output head's frozen weights (one matrix when tied) by
    their row shards over ``mesh`` (``DTensor``, ``Shard(0)``); returns how many matrices.

    A matrix is split when it is frozen and every module holding it is an ``nn.Embedding``
    (without ``max_norm``, which rewrites rows) or an ``nn.Linear``; otherwise it stays whole
    (replicated), as a trainable one must.
    """
    from torch.distributed.tensor import DTensor, Shard

    from deltatune.training.wrappers import unwrap

    hf = unwrap(model)
    matrices = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(hf, getter)() if hasattr(hf, getter) else None
        except (AttributeError, NotImplementedError):
            module = None
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 2 and not weight.requires_grad \
                and not isinstance(weight, DTensor):
            matrices[id(weight)] = weight
    owners: dict[int, list[nn.Module]] = {key: [] for key in matrices}
    for module in hf.modules():
        key = id(module._parameters.get("weight"))
        if key in owners:
            owners[key].append(module)
    hooks, count = _Hooks(), 0
    for key, weight in matrices.items():
        if not owners[key] or not all(isinstance(m, nn.Linear) or (isinstance(m, nn.Embedding) and m.max_norm is None)
                                      for m in owners[key]):
            continue
        start, stop = _split(weight.shape[0], mesh.size(), mesh.get_local_rank())
        local = weight.detach()[start:stop].clone()                          # (rows, d): the rest is freed
        shard = nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=weight.shape,
                                                stride=weight.stride()), requires_grad=False)
        for module in owners[key]:
            module._parameters["weight"] = shard
            if isinstance(module, nn.Embedding):
                module.register_forward_pre_hook(hooks.before_lookup, with_kwargs=True)
            else:
                module.register_forward_pre_hook(hooks.before_head)
            module.register_forward_hook(hooks.after, always_call=True)
        count += 1
    return count


class ShardedLinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(h_i @ W^T + b, t_i)`` over this process's rows ``h``, ``W`` split by rows over the
    processes (``Rows``); the gradient w.r.t. ``h`` is computed in forward, as in
    ``LinearCrossEntropy``. Each step takes ``chunk`` rows from every process (the last step: as many
    as the longest remainder, shorter ones padded): (world x chunk, V / world) logits, the size of the
    one-process chunk.
    """

    @staticmethod
    def forward(ctx, hidden, bias, targets, at: Rows, chunk: int):
        local, world = at.local, at.world                                     # (Vl, d)
        need_h = ctx.needs_input_grad[0]
        h_mine = hidden.to(local.dtype)                                       # (n, d)
        most = int(at.gather(torch.tensor([h_mine.shape[0]], device=hidden.device), 0, 1).max())
        b = bias[at.start:at.start + local.shape[0]] if bias is not None else None
        grad_h = torch.empty_like(h_mine) if need_h else torch.empty(0)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, most, chunk):
            c = min(chunk, most - s)                       # rows from every process (fewer: padded)
            h = h_mine[s:s + c]                                               # (<= c, d)
            h_all = at.gather(h, 0, c).view(world * c, -1)                    # (world * c, d)
            t_all = at.gather(targets[s:s + c], -1, c).view(-1) - at.start
            logits = F.linear(h_all, local, b).float()                        # (world * c, Vl)
            rows = ((t_all >= 0) & (t_all < local.shape[0])).nonzero().squeeze(1)   # targets held here
            stats = logits.new_zeros(2, world * c)
            stats[0] = torch.logsumexp(logits, dim=-1)                         # -inf on an empty slice
            stats[1, rows] = logits[rows, t_all[rows]]
            every = at.gather(stats, 0, 2)                                      # (world, 2, world * c)
            lse, target_logit = torch.logsumexp(every[:, 0], dim=0), every[:, 1].sum(0)
            mine = slice(at.rank * c, at.rank * c + h.shape[0])
            total += (lse[mine] - target_logit[mine]).sum()
            if need_h:
                p = logits.sub_(lse[:, None]).exp_()                           # softmax, my slice of it
                p[rows, t_all[rows]] -= 1.0                                    # dCE/dlogits
                part = (p.to(local.dtype) @ local).float()                     # (world * c, d)
                back = part.new_empty(c, part.shape[1])
                dist.reduce_scatter_tensor(back, part, group=at.group)         # summed over the slices
                grad_h[s:s + h.shape[0]] = back[:h.shape[0]].to(local.dtype)
        ctx.save_for_backward(grad_h)
        ctx.flags = (need_h, hidden.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (gh,) = ctx.saved_tensors
        need_h, h_dtype = ctx.flags
        return (gh * grad_out).to(h_dtype) if need_h else None, None, None, None, None


def sharded_linear_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                                 chunk: int) -> torch.Tensor:
    """Summed CE of ``head(hidden)`` (N, d) against ``targets`` (N,) when ``head.weight`` is split by
    rows (``is_sharded_matrix``); a collective: every process calls it with its own rows.
    The head's weight gets no gradient (a split matrix is frozen)."""
    return ShardedLinearCrossEntropy.apply(hidden, head.bias, targets, Rows(head.weight), chunk)
