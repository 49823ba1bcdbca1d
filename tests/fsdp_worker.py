"""Run under ``torchrun --nproc_per_node 2`` by tests/test_fsdp.py: several trainings in one launch.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py SPEC.json

SPEC: ``{"runs": {name: {TrainConfig options}}, "report": path, "probe_ids": [[token ids]]}``.
Each run trains with ``deltatune.training.train`` (its adapter under its ``out``); rank 0 collects,
per run, what each rank held of the base (local bytes, full bytes), how a 4-bit layer's tensors and
the vocabulary matrices were sharded, and the trained model's logits on ``probe_ids``, and writes
them to ``report``.
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def sharding_facts(trainer) -> dict:
    from deltatune.quant.nf4 import Linear4bit
    from deltatune.training.fsdp import local_bytes

    model = trainer.model
    facts = {"local_base_bytes": local_bytes(model), "sharded": trainer.sharded,
             "padding_passes": trainer.padding_passes,
             "trainable_dtensors": sum(hasattr(p, "to_local") for p in trainer.params)}
    full = 0
    for p in list(model.parameters()) + list(model.buffers()):
        if not p.requires_grad:
            full += p.numel() * p.element_size()   # DTensor: the global shape
    facts["full_base_bytes"] = full
    facts["replicated_base_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters()
                                         if not p.requires_grad and not hasattr(p, "to_local"))
    hf = model.base_model.model
    facts["norm_bytes"] = hf.model.norm.weight.numel() * hf.model.norm.weight.element_size()
    embedding, head = hf.model.embed_tokens.weight, hf.lm_head.weight
    facts["vocab"] = {"tied": embedding is head, **{name: {"global": list(w.shape), "local": list(w.to_local().shape)
                                                          if hasattr(w, "to_local") else None}
                                                   for name, w in (("embedding", embedding), ("head", head))}}
    layer = next((m for m in model.modules() if isinstance(m, Linear4bit)), None)
    if layer is not None:
        facts["4bit"] = {name: {"global": list(t.shape), "local": list(t.to_local().shape)
                                if hasattr(t, "to_local") else None}
                         for name, t in layer.named_parameters(recurse=False)}
    return facts


def main(spec_path: str) -> None:
    from deltatune.training.api import train
    from deltatune.training.distributed import shutdown

    spec = json.loads(open(spec_path).read())
    report = {}
    for name, options in spec["runs"].items():
        result = train(options)
        facts = sharding_facts(result.trainer)
        with torch.no_grad():  # the model's own forward: the embedding's and the head's hooks
            facts["logits"] = result.model(input_ids=torch.tensor(spec["probe_ids"])).logits.tolist()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, facts)
        report[name] = gathered
        del result
    if dist.get_rank() == 0:
        with open(spec["report"], "w") as fh:
            json.dump(report, fh)
    shutdown(synchronize=True)  # rank 1 must not tear gloo down while rank 0 writes the report


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
