"""FSDP vs DDP with 2 processes on the default model: memory of the base per process, step time.

Each of {DDP, FSDP} x {LoRA, QLoRA} is one ``torchrun --nproc_per_node 2`` launch of this file
(``--worker``): ``deltatune.training`` loads SmolLM2-135M-Instruct (fp32; QLoRA: NF4 + double
quantization), wraps it as ``deltatune train`` does (``--fsdp`` or not), runs ``--warmup`` steps,
then ``--steps`` timed steps on data/demo_train.jsonl (LoRA r=16, all linear layers). Per process:

* base at rest: bytes of the frozen base's tensors this process holds (its shards under FSDP);
* base at peak: that plus the most bytes of full (gathered) units alive at once, sampled at every
  unit's forward (after FSDP's all-gather; also the recomputes in backward under checkpointing),
  after every unit's pre-backward (its gather and the next one it prefetches) and at every
  lookup of the split embedding (the rows it fetched); under DDP the whole base, always;
* peak RSS: the process's high-water mark over the timed steps (reset after the warm-up via
  ``/proc/self/clear_refs``), everything included: base, activations, adapter, runtime;
* step time: median wall time of a timed step (the same global batch in both modes).

    python benchmarks/fsdp.py                 # ~4 min on 2 CPU cores
    python benchmarks/fsdp.py --steps 3 --only lora

Writes benchmarks/results/fsdp.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
METHODS = ("lora", "qlora")
MODES = ("ddp", "fsdp")


# -- one process of one launch -------------------------------------------------------------------

def _vm(field: str) -> int:
    """A /proc/self/status size in bytes (VmHWM, VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class GatheredPeak:
    """Most bytes of gathered (unsharded) frozen parameters alive at once, sampled at each unit's
    forward, after FSDP's pre-forward all-gather, and at each forward of a module holding a split
    vocabulary matrix, after its hook fetched the rows (or, for a head, the matrix) the call needs
    (hooks run in registration order)."""

    def __init__(self, units, model) -> None:
        self.peak = 0
        self.slots = []            # (module, name) of every sharded parameter (a DTensor between uses)
        inside = {id(m) for unit in units for m in unit.modules()}
        vocab = [m for m in model.modules() if id(m) not in inside and hasattr(m._parameters.get("weight"), "to_local")]
        for unit in [*units, *vocab]:
            for module in unit.modules():
                self.slots += [(module, name) for name, p in module._parameters.items() if hasattr(p, "to_local")]
            unit.register_forward_pre_hook(lambda *_: self.sample())
        self.slots = list(dict.fromkeys(self.slots))
        self._watch_backward()

    def _watch_backward(self) -> None:
        """Sample after each unit's pre-backward too (its gather, plus the one it prefetches).
        FSDP2 has no public hook there: this wraps a private method, benchmark-only."""
        try:
            from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
        except ImportError:
            return
        original = FSDPParamGroup.pre_backward

        def pre_backward(group, *args, **kwargs):
            out = original(group, *args, **kwargs)
            self.sample()
            return out

        FSDPParamGroup.pre_backward = pre_backward

    def sample(self) -> None:
        total, seen = 0, set()
        for module, name in self.slots:
            p = module._parameters[name]
            if p is None or hasattr(p, "to_local"):  # resharded
                continue
            if p.untyped_storage().nbytes() and p.data_ptr() not in seen:  # gathered, not yet freed
                seen.add(p.data_ptr())
                total += p.nbytes
        self.peak = max(self.peak, total)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from deltatune.training import distributed as D
    from deltatune.training.api import load_data, load_model, make_config
    from deltatune.training.fsdp import decoder_layers, is_sharded, local_bytes
    from deltatune.training.loop import Trainer

    torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp(prefix="fsdp_bench_")
    cfg = make_config(model="default", data=str(REPO / "data" / "demo_train.jsonl"), dtype="float32", r=16,
                      alpha=32, lr=1e-4, batch_size=args.batch, max_steps=args.warmup + args.steps,
                      quantize="nf4" if args.method == "qlora" else None, fsdp=args.mode == "fsdp",
                      device="cpu", progress=False, out=out, eval_exact_match=False, seed=0)
    device = torch.device("cpu")
    info = D.init(device)
    model, tokenizer = load_model(cfg, device)
    train_set, _ = load_data(cfg, tokenizer)
    trainer = Trainer(model, tokenizer, cfg, train_set, None, device=device)
    full = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
               if not t.requires_grad)
    at_rest = local_bytes(model)
    units = decoder_layers(model) + [m for m in trainer.loss_module.modules() if is_sharded(m)]
    gathered = GatheredPeak(list(dict.fromkeys(units)), model) if trainer.sharded else None
    batches = trainer._epoch_batches(0)
    model.train()
    for b in batches[:args.warmup]:
        trainer._step(b)
    rss_before = _vm("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
    if gathered is not None:
        gathered.peak = 0
    times = []
    for b in batches[args.warmup:args.warmup + args.steps]:
        t0 = time.perf_counter()
        trainer._step(b)
        times.append(time.perf_counter() - t0)
    row = {"rank": info.rank, "base_full_bytes": full, "base_at_rest_bytes": at_rest,
           "base_peak_bytes": at_rest + (gathered.peak if gathered else 0),
           "peak_rss_bytes": _vm("VmHWM"), "rss_before_steps_bytes": rss_before, "step_s": statistics.median(times), "step_times_s": times,
           "adapter_bytes": local_bytes(model, trainable=True)}
    rows = [None] * info.world
    dist.all_gather_object(rows, row)
    if info.main:
        Path(args.worker_out).write_text(json.dumps(rows))
    dist.destroy_process_group()


# -- the launcher --------------------------------------------------------------------------------

def launch(mode: str, method: str, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               __file__, "--worker", "--mode", mode, "--method", method, "--worker-out", str(out),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
               "--threads", str(args.threads)]
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{mode} {method} failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def table(results: dict) -> str:
    mib = 2 ** 20
    lines = ["| method | mode | base at rest / process | base at peak / process | peak RSS / process | step time |",
             "|---|---|---|---|---|---|"]
    for method in METHODS:
        if method not in results:
            continue
        ddp = results[method]["ddp"]
        for mode in MODES:
            rows = results[method][mode]
            rest = max(r["base_at_rest_bytes"] for r in rows)
            peak = max(r["base_peak_bytes"] for r in rows)
            rss = max(r["peak_rss_bytes"] for r in rows)
            step = max(r["step_s"] for r in rows)
            ref_peak = max(r["base_peak_bytes"] for r in ddp)
            ref_step = max(r["step_s"] for r in ddp)
            lines.append(f"| {method} | {mode.upper()} | {rest / mib:.0f} MiB | {peak / mib:.0f} MiB "
                         f"({peak / ref_peak:.2f}x DDP) | {rss / mib:.0f} MiB | {step:.2f} s ({step / ref_step:.2f}x DDP) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="sequences per process per step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--only", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    results = {"setup": {"model": "SmolLM2-135M-Instruct", "processes": 2, "backend": "gloo (CPU)",
                         "dtype": "float32", "r": 16, "target": "all-linear", "batch_per_process": args.batch,
                         "steps": args.steps, "warmup": args.warmup, "threads_per_process": args.threads,
                         "cpus": os.cpu_count()}}
    for method in args.only:
        results[method] = {}
        for mode in MODES:
            t0 = time.time()
            results[method][mode] = launch(mode, method, args)
            print(f"{method} {mode}: done in {time.time() - t0:.0f}s", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fsdp.json").write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
