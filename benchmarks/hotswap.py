"""Hot-swapping adapters on the default model, deltatune and HF peft side by side in one run.

Measures (median wall time over ``--reps``, the two libraries interleaved):
- ``hotswap_adapter`` into a loaded model vs loading the adapter afresh with
  ``PeftModel.from_pretrained`` onto a fresh copy of the base (the copy is made outside the timing);
- a ``torch.compile``d model prepared with ``prepare_model_for_compiled_hotswap``: ``--swaps``
  swaps between two adapters of different ranks, alphas and target sets, counting compilations
  through a backend that counts the graphs it is given, and checking each swap's logits against
  the adapter loaded uncompiled.

Writes benchmarks/results/hotswap.json and prints a table.

    .venv/bin/python benchmarks/hotswap.py [--reps 7 --swaps 10 --backend inductor]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import deltatune  # noqa: E402

ADAPTERS = {  # name -> (r, alpha, targets)
    "a": (16, 32, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "b": (8, 8, ["q_proj", "v_proj"]),
}
RESULTS = Path(__file__).resolve().parent / "results" / "hotswap.json"


def median_time(fn, reps: int, setup=None) -> float:
    """Median wall time of ``fn(setup())`` over ``reps`` runs (one warm-up); setup is not timed."""
    fn(setup() if setup else None)
    times = []
    for _ in range(reps):
        arg = setup() if setup else None
        t = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class CountingBackend:
    """A ``torch.compile`` backend that counts the graphs it compiles and hands them to ``backend``."""

    def __init__(self, backend: str) -> None:
        self.inner = torch._dynamo.lookup_backend(backend)
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def save_adapters(base, root: Path) -> dict[str, Path]:
    out = {}
    for i, (name, (r, alpha, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(i)
        config = deltatune.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        model = deltatune.get_peft_model(copy.deepcopy(base), config)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def swap_times(lib, hotswap, base, dirs, reps):
    """(hot-swap seconds, from_pretrained seconds) for one library."""
    model = lib.PeftModel.from_pretrained(copy.deepcopy(base), dirs["a"]).eval()
    names = iter(["b", "a"] * (reps + 1))
    swap = median_time(lambda _: hotswap(model, dirs[next(names)]), reps)
    load = median_time(lambda fresh: lib.PeftModel.from_pretrained(fresh, dirs["b"]), reps,
                       setup=lambda: copy.deepcopy(base))
    return swap, load


def compiled_swaps(lib, prepare, hotswap, base, dirs, refs, ids, swaps, backend):
    """Prepare, compile, run, then ``swaps`` swaps: compile counts, times, worst logit difference."""
    torch._dynamo.reset()
    model = lib.PeftModel.from_pretrained(copy.deepcopy(base), dirs["a"]).eval()
    prepare(model, target_rank=max(r for r, _, _ in ADAPTERS.values()))
    counter = CountingBackend(backend)
    compiled = torch.compile(model, backend=counter)
    t = time.perf_counter()
    worst = (logits(compiled, ids) - refs["a"]).abs().max().item()
    first = time.perf_counter() - t
    after_first = counter.graphs
    swap_s, step_s = [], []
    for i in range(swaps):
        name = "b" if i % 2 == 0 else "a"
        t = time.perf_counter()
        hotswap(compiled, dirs[name])
        swap_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        out = logits(compiled, ids)
        step_s.append(time.perf_counter() - t)
        worst = max(worst, (out - refs[name]).abs().max().item())
    return {"first_call_s": first, "graphs_first_call": after_first, "recompiles_during_swaps": counter.graphs -
            after_first, "swap_s_median": statistics.median(swap_s), "forward_after_swap_s_median":
            statistics.median(step_s), "max_abs_logit_diff_vs_uncompiled": worst}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--swaps", type=int, default=10)
    ap.add_argument("--backend", default="inductor", help="torch.compile backend wrapped by the counter")
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args()
    import peft
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap as peft_prepare

    def peft_swap(model, path):
        peft_hotswap(model, str(path), adapter_name="default", torch_device="cpu")

    torch.manual_seed(0)
    base = deltatune.models.load_default().eval()
    ids = torch.randint(0, base.config.vocab_size, (1, args.seq))
    with tempfile.TemporaryDirectory() as tmp:
        dirs = save_adapters(base, Path(tmp))
        refs = {n: logits(deltatune.PeftModel.from_pretrained(copy.deepcopy(base), d).eval(), ids) for n, d in dirs.items()}
        result = {"machine": f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}, peft {peft.__version__}",
                  "model": "SmolLM2-135M-Instruct fp32", "adapters": {n: dict(r=r, lora_alpha=a, target_modules=t)
                                                                     for n, (r, a, t) in ADAPTERS.items()},
                  "reps": args.reps, "backend": args.backend, "swaps": args.swaps, "seq": args.seq}
        ours = swap_times(deltatune, deltatune.hotswap_adapter, base, dirs, args.reps)
        theirs = swap_times(peft, peft_swap, base, dirs, args.reps)
        result["eager"] = {"deltatune": {"hotswap_s": ours[0], "from_pretrained_s": ours[1]},
                           "peft": {"hotswap_s": theirs[0], "from_pretrained_s": theirs[1]}}
        result["compiled"] = {
            "deltatune": compiled_swaps(deltatune, deltatune.prepare_model_for_compiled_hotswap,
                                        deltatune.hotswap_adapter, base, dirs, refs, ids, args.swaps, args.backend),
            "peft": compiled_swaps(peft, peft_prepare, peft_swap, base, dirs, refs, ids, args.swaps, args.backend)}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    e, c = result["eager"], result["compiled"]
    print(f"| | deltatune | peft |\n|---|---|---|")
    for lib_key, label in (("hotswap_s", "hot-swap (ms)"), ("from_pretrained_s", "from_pretrained (ms)")):
        print(f"| {label} | {1e3 * e['deltatune'][lib_key]:.1f} | {1e3 * e['peft'][lib_key]:.1f} |")
    for lib_key, label in (("recompiles_during_swaps", f"recompiles in {args.swaps} swaps"),
                           ("first_call_s", "first compiled call (s)"), ("swap_s_median", "compiled swap (s)"),
                           ("max_abs_logit_diff_vs_uncompiled", "max |logit diff|")):
        print(f"| {label} | {c['deltatune'][lib_key]:.3g} | {c['peft'][lib_key]:.3g} |")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
