"""``plan``: every method's planned memory on one base, which fit, and which to pick and why.

The recommendation follows the decision table of the PEFT overview this project implements
(one device + large base -> QLoRA; many tasks -> LoRA adapters served together; tiny memory with a
frozen base -> prompt tuning; best quality -> DoRA; diffusion -> LoRA on attention, rank 4-32;
accuracy-critical and it fits -> full fine-tuning), but checked against the numbers: a rule never
recommends a method that does not fit, and when nothing fits the plan says what would.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from deltatune.advisor import memory as M
from deltatune.advisor.shapes import KNOWN, ModelShape, resolve

GOALS = ("balanced", "accuracy", "quality", "memory")
LARGE_BASE = 20e9  # parameters above which one 16-bit copy fills most single devices (40 GB)


@dataclass
class Plan:
    model: str
    shape: dict
    memory: int
    setup: dict
    estimates: list
    recommendation: str | None
    reasons: list = field(default_factory=list)
    suggestions: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def fits(self, method: str) -> bool:
        return self.estimate(method).peak <= self.memory

    def estimate(self, method: str) -> M.Estimate:
        return next(e for e in self.estimates if e.method == method)

    def to_dict(self) -> dict:
        return {"model": self.model, "shape": self.shape, "memory_bytes": self.memory, "setup": self.setup,
                "methods": [{**e.to_dict(), "fits": e.peak <= self.memory} for e in self.estimates],
                "recommendation": self.recommendation, "reasons": self.reasons,
                "suggestions": self.suggestions, "notes": self.notes}

    def render(self) -> str:
        s = self.shape
        if s.get("kind") == "diffusion":
            return "\n".join([f"model   {self.model}: a diffusion model [{s['source']}]",
                              f"recommend  {M.LABELS['lora']}"] + [f"  - {r}" for r in self.reasons]
                             + [f"note: {n}" for n in self.notes])
        lines = [f"model   {self.model}: {s['params'] / 1e9:.2f}B parameters, {s['layers']} layers, hidden "
                 f"{s['hidden']}, {s['heads']}/{s['kv_heads']} heads (q/kv), vocab {s['vocab']}"
                 f"{', tied embeddings' if s['tied'] else ''}  [{s['source']}]",
                 f"budget  {M.gib(self.memory)} per device x {self.setup['devices']} ({self.setup['device']}); "
                 f"seq {self.setup['seq_len']} x batch {self.setup['batch']}, rank {self.setup['rank']}, "
                 f"optimizer {self.setup['optimizer']}", ""]
        head = ("method", "peak", "fits", "base", "adapter", "grads", "optim", "activ.", "(ckpt on/off)",
                "overhead", "trainable", "file")
        rows = [head]
        for e in self.estimates:
            rows.append((e.label, M.gib(e.peak), "yes" if e.peak <= self.memory else "NO", M.gib(e.base_weights),
                         M.gib(e.adapter_weights), M.gib(e.gradients), M.gib(e.optimizer), M.gib(e.activations),
                         f"{M.gib(e.activations_with_checkpointing)} / {M.gib(e.activations_without_checkpointing)}",
                         M.gib(e.overhead), f"{e.trainable_params:,}", M.gib(e.adapter_file_bytes)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        for r in rows:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        lines.append("")
        if self.recommendation:
            lines.append(f"recommend  {M.LABELS.get(self.recommendation, self.recommendation)}")
        else:
            lines.append("recommend  nothing fits this budget as configured")
        lines += [f"  - {r}" for r in self.reasons]
        if self.suggestions:
            lines.append("what would fit")
            lines += [f"  - {r}" for r in self.suggestions]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def plan(model: str | ModelShape = "default", memory="24GB", *, seq_len: int = 2048, batch: int = 1,
         rank: int = 16, target="all-linear", grad_checkpointing: bool | None = None, optimizer: str = "adamw",
         devices: int = 1, sharding: str = "ddp", device: str = "cuda", dtype: str = "bf16",
         max_batch_tokens: int = 0, eager_attention: bool = False, tasks: int = 1, goal: str = "balanced",
         frozen_base_ok: bool = True, allow_4bit: bool = True, checkpoint_bytes: int | None = None) -> Plan:
    """Plan a fine-tuning run: each method's peak memory per device and a recommendation.

    Args:
        model: ``"default"``, a transformers directory, a GGUF file, a known name or size
            (``7b``, ``13b``, ``70b``, ``llama-3.1-8b``, ...; ``shapes.known_names()``) or a ``ModelShape``.
        memory: memory of one device: ``"24GB"`` (read as GiB), bytes as int, or a float of GiB.
        seq_len, batch, rank, target, grad_checkpointing, optimizer, devices, sharding, device,
            max_batch_tokens, eager_attention: see ``memory.Setup``. ``dtype``: ``bf16`` | ``fp32``
            compute for the frozen base and activations.
        tasks: how many tasks (adapters) will share this base. goal: ``balanced`` | ``accuracy``
            (full fine-tuning if it fits) | ``quality`` (DoRA) | ``memory`` (the smallest).
        frozen_base_ok: False rules out prompt/prefix tuning as the memory choice.
        checkpoint_bytes: bytes of the checkpoint file (CPU load peak); default: the model's
            safetensors files, else 2 bytes per parameter.

    Raises:
        ValueError: an unknown model, option or malformed size (the message says which).
    """
    if goal not in GOALS:
        raise ValueError(f"goal {goal!r}: expected one of {', '.join(GOALS)}")
    if dtype not in ("bf16", "bfloat16", "fp32", "float32", "fp16", "float16"):
        raise ValueError(f"dtype {dtype!r}: expected bf16 or fp32")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device {device!r}: expected cuda or cpu")
    shape = model if isinstance(model, ModelShape) else resolve(model)
    budget = M.parse_memory(memory)
    if shape.kind == "diffusion":
        return _diffusion_plan(shape, budget, rank)
    if checkpoint_bytes is None:
        checkpoint_bytes = _checkpoint_bytes(shape)
    tgt = M.ALL_LINEAR if target in (None, "all-linear") else tuple([target] if isinstance(target, str) else target)
    setup = M.Setup(seq_len=seq_len, batch=batch, rank=rank, target=tgt, grad_checkpointing=grad_checkpointing,
                    optimizer=optimizer, devices=devices, sharding=sharding, device=device,
                    dtype_bytes=4 if dtype in ("fp32", "float32") else 2, max_batch_tokens=max_batch_tokens,
                    eager_attention=eager_attention, checkpoint_bytes=checkpoint_bytes)
    M.targeted(shape, setup.target)  # unknown target names fail here, with the names the model has
    estimates = [_estimate(m, shape, setup, budget) for m in M.METHODS]
    p = Plan(shape.name, _shape_dict(shape), budget, {**dataclasses.asdict(setup), "target": list(tgt),
                                                       "goal": goal, "tasks": tasks}, estimates, None)
    _recommend(p, shape, setup, tasks, goal, frozen_base_ok, allow_4bit)
    if p.recommendation is None or not p.fits(p.recommendation):
        p.suggestions = _what_would_fit(shape, setup, budget)
    p.notes = sorted({n for e in estimates for n in e.notes})
    if devices > 1 and sharding == "ddp" and p.recommendation is None:
        p.notes.append("data parallelism replicates the model; try --sharding fsdp to split it over devices")
    return p


def _estimate(method: str, shape: ModelShape, setup: M.Setup, budget: int) -> M.Estimate:
    """``memory.estimate``; with checkpointing left to us (None), it goes on only where it makes the run fit."""
    e = M.estimate(method, shape, setup)
    if setup.grad_checkpointing is None and not e.grad_checkpointing and e.peak > budget:
        on = M.estimate(method, shape, dataclasses.replace(setup, grad_checkpointing=True))
        if on.peak <= budget:
            on.notes.append("gradient checkpointing turned on where a method fits only with it")
            return on
    return e


def _shape_dict(shape: ModelShape) -> dict:
    d = dataclasses.asdict(shape)
    d["params"] = shape.params
    return d


def _checkpoint_bytes(shape: ModelShape) -> int:
    from pathlib import Path

    src = Path(shape.source)
    if src.name == "config.json" and src.is_file():
        files = list(src.parent.glob("*.safetensors")) + list(src.parent.glob("*.bin"))
        if files:
            return sum(f.stat().st_size for f in files)
    return shape.params * 2


def _recommend(p: Plan, shape: ModelShape, setup: M.Setup, tasks: int, goal: str, frozen_ok: bool,
               allow_4bit: bool) -> None:
    """Set ``p.recommendation`` and its reasons: the goal's pick, then the decision table's, if it fits."""
    fits = {e.method: e.peak <= p.memory for e in p.estimates}
    fits["qlora"] = fits["qlora"] and allow_4bit
    peak = {e.method: e.peak for e in p.estimates}
    g = M.gib
    reasons = p.reasons
    large = shape.params >= LARGE_BASE or not fits["lora"]
    if goal == "accuracy" and (fits["full-bf16"] or fits["full"]):
        p.recommendation = "full-bf16" if fits["full-bf16"] else "full"
        reasons.append(f"accuracy-critical and full fine-tuning fits ({g(peak[p.recommendation])} of "
                       f"{g(p.memory)}): every weight can move, nothing is approximated")
    elif goal == "accuracy":
        reasons.append(f"full fine-tuning does not fit ({g(peak['full-bf16'])} needed, {g(p.memory)} available)")
    if p.recommendation is None and goal == "quality" and fits["dora"]:
        p.recommendation = "dora"
        reasons.append("best quality for some extra compute: DoRA learns magnitude and direction separately "
                       f"(Liu et al. 2024, arXiv:2402.09353) and fits ({g(peak['dora'])})")
    if p.recommendation is None and goal == "memory":
        order = [m for m in ("prompt", "prefix", "ia3", "qlora") if fits[m] and (frozen_ok or m in ("ia3", "qlora"))]
        if order:
            least = min(peak[m] for m in order)  # the table's order breaks near-ties (within 5%)
            p.recommendation = next(m for m in order if peak[m] <= 1.05 * least)
            reasons.append(f"least memory: {M.LABELS[p.recommendation]} needs {g(peak[p.recommendation])}")
            if p.recommendation == "qlora" and frozen_ok:
                reasons.append(f"prompt tuning, the usual pick for tiny memory, needs {g(peak['prompt'])}: it "
                               "keeps the base in 16 bits and back-propagates through all of it, so the base "
                               "weights and activations, not the few trainable vectors, set its peak")
            if p.recommendation == "prompt" and fits["lora"]:
                reasons.append(f"but LoRA needs only {g(peak['lora'] - peak['prompt'])} more and usually learns "
                               "more: with a 16-bit base the weights and activations, not the adapter, set the peak")
    if p.recommendation is None and large and fits["qlora"]:
        p.recommendation = "qlora"
        why = (f"a large base ({shape.params / 1e9:.0f}B parameters)" if shape.params >= LARGE_BASE else
               f"16-bit LoRA does not fit ({g(peak['lora'])} needed)")
        reasons.append(f"one device and {why}: QLoRA keeps the base in 4-bit NF4 "
                       f"({g(p.estimate('qlora').base_weights)} of weights) and fits in {g(peak['qlora'])}")
    if p.recommendation is None:
        _fallback(p, fits, peak, frozen_ok)
    _advise(p, setup, tasks)


def _fallback(p: Plan, fits: dict, peak: dict, frozen_ok: bool) -> None:
    """Recommend what fits when the goal's and the table's first choices do not: LoRA, QLoRA, else the
    smallest frozen-base method."""
    g, reasons = M.gib, p.reasons
    if p.recommendation is None and fits["lora"]:
        p.recommendation = "lora"
        reasons.append(f"LoRA fits ({g(peak['lora'])} of {g(p.memory)}) with a 16-bit base, faster and a little "
                       "more accurate than QLoRA; its adapter is small to store and merges into the base for "
                       "zero-overhead inference")
    if p.recommendation is None and fits["qlora"]:
        p.recommendation = "qlora"
        reasons.append(f"only the 4-bit base fits: QLoRA needs {g(peak['qlora'])}")
    if p.recommendation is None:
        small = [m for m in ("prompt", "prefix", "ia3") if fits[m] and frozen_ok]
        if small:
            p.recommendation = min(small, key=lambda m: peak[m])
            reasons.append(f"only {M.LABELS[p.recommendation]} fits ({g(peak[p.recommendation])}); the base "
                           "stays frozen and untouched")


def _advise(p: Plan, setup: M.Setup, tasks: int) -> None:
    """Advice on the recommended method: serving many tasks, a low rank, gradient checkpointing."""
    g, reasons = M.gib, p.reasons
    if tasks > 1 and p.recommendation in ("lora", "qlora", "dora"):
        reasons.append(f"{tasks} tasks on one base: train one adapter per task and serve them together "
                       "(one base in memory, a different adapter per request in the same batch: "
                       "`deltatune generate --adapter NAME=DIR ...`)")
    if p.recommendation in ("lora", "qlora", "dora") and setup.rank < 4:
        reasons.append(f"rank {setup.rank} is low; r = 8-32 is the usual starting point")
    if p.recommendation and p.estimate(p.recommendation).grad_checkpointing:
        e = p.estimate(p.recommendation)
        reasons.append(f"gradient checkpointing on: activations {g(e.activations_with_checkpointing)} instead of "
                       f"{g(e.activations_without_checkpointing)}, ~30% more compute")
    elif p.recommendation:
        e = p.estimate(p.recommendation)
        if e.activations_without_checkpointing > e.activations_with_checkpointing * 2:
            reasons.append(f"activations are {g(e.activations)}; --grad-checkpointing would cut them to "
                           f"{g(e.activations_with_checkpointing)} for ~30% more compute")


def _what_would_fit(shape: ModelShape, setup: M.Setup, budget: int) -> list[str]:
    """Concrete changes, with numbers, that make QLoRA (the smallest adapter method with a real delta) fit."""
    g, out = M.gib, []
    method = "qlora"
    base = M.estimate(method, shape, setup)
    if not setup.checkpointing(method):
        on = M.estimate(method, shape, dataclasses.replace(setup, grad_checkpointing=True))
        if on.peak <= budget:
            out.append(f"gradient checkpointing: QLoRA {g(base.peak)} -> {g(on.peak)}")
    seq = setup.seq_len
    while seq > 64:
        seq //= 2
        e = M.estimate(method, shape, dataclasses.replace(setup, seq_len=seq))
        if e.peak <= budget:
            out.append(f"sequence length {seq} (from {setup.seq_len}): QLoRA needs {g(e.peak)}")
            break
    for k in (2, 4, 8, 16, 32, 64):
        if k <= setup.devices:
            continue
        fsdp = dataclasses.replace(setup, devices=k, sharding="fsdp")
        for m in ("lora", "qlora"):
            e = M.estimate(m, shape, fsdp)
            if e.peak <= budget:
                out.append(f"{k} devices with FSDP: {M.LABELS[m]} needs {g(e.peak)} per device")
                break
        else:
            continue
        break
    fits_small = [s for s in KNOWN.values() if s.params < shape.params
                  and M.estimate(method, s, setup).peak <= budget]
    if fits_small:
        best = max(fits_small, key=lambda s: s.params)
        out.append(f"a smaller base: {best.name} ({best.params / 1e9:.1f}B) with QLoRA needs "
                   f"{g(M.estimate(method, best, setup).peak)}")
    if not out:
        out.append(f"no change tried here fits {g(budget)}: the 4-bit weights alone take "
                   f"{g(base.base_weights)}")
    weights = M.estimate(method, shape, setup).base_weights
    if weights > budget:
        out.insert(0, f"the 4-bit weights alone take {g(weights)}, more than {g(budget)}: no sequence length "
                      "or checkpointing setting can fit this base on one such device")
    return out


def _diffusion_plan(shape: ModelShape, budget: int, rank: int) -> Plan:
    p = Plan(shape.name, {"kind": "diffusion", "source": shape.source}, budget,
             {"rank": rank, "devices": 1, "device": "cuda"}, [], "lora")
    p.reasons = ["diffusion model (style, subject): LoRA on the attention projections (to_q, to_k, to_v, "
                 "to_out.0) with rank 4-32",
                 f"rank {rank}" + (" is in that range" if 4 <= rank <= 32 else " is outside 4-32; use 4-32")]
    p.notes = ["memory of diffusion fine-tuning depends on resolution, not tokens: not sized here"]
    return p


def train_settings(dtype: str | None = None, seq_len: int = 2048) -> dict:
    """``plan`` keywords that mirror ``deltatune train`` on this machine's CPU.

    The compute dtype ``auto`` resolves to (bf16 on CPUs with AMX and bf16 GPUs, else fp32), its per-forward token
    budget (``training.config.default_max_batch_tokens``), and eager attention for bf16 rows up to
    ``loss.EAGER_MAX_LEN`` tokens.
    """
    import torch

    from deltatune.devices import resolve_dtype
    from deltatune.training.config import default_max_batch_tokens
    from deltatune.training.loss import EAGER_MAX_LEN

    resolved = resolve_dtype(dtype or "auto", torch.device("cpu"))
    bf16 = resolved == torch.bfloat16
    return {"device": "cpu", "dtype": "bf16" if bf16 else "fp32", "max_batch_tokens": default_max_batch_tokens(not bf16),
            "eager_attention": bf16 and seq_len <= EAGER_MAX_LEN}
