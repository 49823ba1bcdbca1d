"""Where a profiled training step's op time comes from: each op attributed to the module that ran it.

``tag_modules(model)`` wraps every module's forward in a profiler range named after the part of
the model it is (``source_of``). After profiling, ``by_source(prof)`` gives each aten/mkldnn op's
self time to the innermost tagged range around it; a backward op (run by the autograd engine
outside any module) goes to the range of the forward op that created its autograd node (same
``sequence_nr``), or, for nodes with no such op (custom autograd Functions), to the node's name.
Used by ``profile_step.py --by-source``.
"""
from __future__ import annotations

import re
from collections import defaultdict

PREFIX = "src::"
OPS = ("aten::", "mkldnn::")
# node name (prefix) -> source, for backward nodes whose forward op carries no sequence number
NODES = (("FrozenLinear", "frozen linear (base weights)"), ("LinearCrossEntropy", "head + loss (label rows)"),
         ("SwiGLU", "MLP activation (silu * up)"))


def source_of(name: str, module) -> str | None:
    """The part of the model a module is, from its qualified ``name`` and class (None: untagged)."""
    cls = type(module).__name__
    leaf = name.rsplit(".", 1)[-1]
    if re.search(r"\.lora_[AB](\.|$)", name):
        return "LoRA path (A/B matmuls, scaling, add)"
    if leaf == "base_layer" or (cls == "Linear" and leaf.endswith("_proj")):
        return "frozen linear (base weights)"
    if cls.startswith("Lora"):
        return "LoRA path (A/B matmuls, scaling, add)"
    if "RMSNorm" in cls or "LayerNorm" in cls:
        return "RMSNorm"
    if "Rotary" in cls:
        return "rotary cos/sin tables"
    if cls.endswith("Attention"):
        return "attention (rotary, SDPA, reshapes)"
    if cls.endswith("MLP"):
        return "MLP activation (silu * up)"
    if cls.endswith("DecoderLayer"):
        return "decoder layer (residual adds)"
    if cls == "Embedding":
        return "embedding"
    if cls.endswith("Model"):
        return "decoder (mask, cache, positions)"
    if leaf == "lm_head":
        return "head + loss (label rows)"
    return None


def tag_modules(model) -> list:
    """Wrap the forward of every tagged module of ``model`` in a ``src::<source>`` profiler range."""
    import torch

    handles = []
    for name, module in model.named_modules():
        source = source_of(name, module)
        if source is None:
            continue
        label = PREFIX + source

        def pre(mod, args, label=label):
            mod._src_range = torch.ops.profiler._record_function_enter_new(label, None)

        def post(mod, args, out):
            torch.ops.profiler._record_function_exit._RecordFunction(mod.__dict__.pop("_src_range"))

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def _enclosing(ev, test):
    parent = ev.cpu_parent
    while parent is not None and not test(parent.name):
        parent = parent.cpu_parent
    return parent


def by_source(prof) -> dict[str, float]:
    """Self CPU seconds of the profiled ops, summed by source (forward and backward alike)."""
    events = prof.events()
    forward_source: dict[int, str] = {}
    for ev in events:
        if ev.name.startswith(OPS) and getattr(ev, "sequence_nr", -1) >= 0:
            tag = _enclosing(ev, lambda n: n.startswith(PREFIX))
            if tag is not None and ev.sequence_nr not in forward_source:
                forward_source[ev.sequence_nr] = tag.name[len(PREFIX):]
    totals: dict[str, float] = defaultdict(float)
    for ev in events:
        if not ev.name.startswith(OPS):
            continue
        totals[_source(ev, forward_source)] += ev.self_cpu_time_total / 1e6
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def _source(ev, forward_source: dict[int, str]) -> str:
    node = _enclosing(ev, lambda n: n.startswith("autograd::engine::evaluate_function"))
    if node is not None:
        name = node.name.split(":")[-1].strip()
        for prefix, source in NODES:
            if name.startswith(prefix):
                return source + " [backward]"
        seq = getattr(node, "sequence_nr", -1)
        if seq in forward_source:
            return forward_source[seq] + " [backward]"
        return "backward: " + re.sub(r"\d+$", "", name)
    tag = _enclosing(ev, lambda n: n.startswith(PREFIX))
    if tag is not None:
        return tag.name[len(PREFIX):] + " [forward]"
    if _enclosing(ev, lambda n: n.startswith("Optimizer.step")) is not None:
        return "optimizer (AdamW)"
    if _enclosing(ev, lambda n: n.startswith("Optimizer.zero_grad")) is not None:
        return "zero_grad"
    return "outside modules (head + loss, clipping, collate, grad accumulation)"
