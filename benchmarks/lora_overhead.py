"""deltatune vs HF peft on the default model, same LoRA config, one run, interleaved timings.

Measures: forward time (base, unmerged adapter, merged), wrap time (get_peft_model), adapter
load time (from_pretrained onto a fresh base), adapter file size. Prints a markdown table and
writes benchmarks/results/lora_overhead.json.

    .venv/bin/python benchmarks/lora_overhead.py [--batch 4 --seq 128 --reps 7]
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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def timed(fn, reps: int) -> float:
    """Median wall time of ``fn()`` over ``reps`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--r", type=int, default=16)
    args = ap.parse_args()
    import peft

    torch.manual_seed(0)
    base = deltatune.models.load_default()
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))
    ours_cfg = deltatune.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, init_lora_weights=False)
    peft_cfg = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, init_lora_weights=False)

    wrap = {}
    ours_base, theirs_base = copy.deepcopy(base), copy.deepcopy(base)
    t = time.perf_counter(); ours = deltatune.get_peft_model(ours_base, ours_cfg); wrap["deltatune"] = time.perf_counter() - t
    t = time.perf_counter(); theirs = peft.get_peft_model(theirs_base, peft_cfg); wrap["peft"] = time.perf_counter() - t
    merged_model = copy.deepcopy(ours)
    merged_model.merge_adapter()
    for m in (base, ours, theirs, merged_model):
        m.eval()

    def fwd(model):
        return lambda: model(input_ids=ids)

    models = {"base": base, "deltatune": ours, "peft": theirs, "merged": merged_model}
    fwd_times = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(args.reps):  # interleave so machine noise hits all four alike
            for key, model in models.items():
                fwd_times[key].append(timed(fwd(model), 1))
    fwd_med = {k: statistics.median(v) for k, v in fwd_times.items()}
    merged = fwd_med.pop("merged")

    tmp = Path(tempfile.mkdtemp())
    ours.save_pretrained(tmp / "ours")
    theirs.save_pretrained(tmp / "peft")
    size = {k: (tmp / k / "adapter_model.safetensors").stat().st_size for k in ("ours", "peft")}

    loads = {"deltatune": [], "peft": []}
    for _ in range(3):
        fresh = copy.deepcopy(base)
        t = time.perf_counter(); deltatune.PeftModel.from_pretrained(fresh, tmp / "ours"); loads["deltatune"].append(time.perf_counter() - t)
        fresh = copy.deepcopy(base)
        t = time.perf_counter(); peft.PeftModel.from_pretrained(fresh, tmp / "peft"); loads["peft"].append(time.perf_counter() - t)
    load_med = {k: statistics.median(v) for k, v in loads.items()}

    result = {
        "model": "SmolLM2-135M-Instruct", "batch": args.batch, "seq": args.seq, "r": args.r, "targets": TARGETS,
        "torch_threads": torch.get_num_threads(),
        "forward_s": fwd_med, "forward_merged_deltatune_s": merged,
        "forward_ratio_vs_base": {k: fwd_med[k] / fwd_med["base"] for k in ("deltatune", "peft")},
        "wrap_s": wrap, "load_s": load_med, "file_bytes": {"deltatune": size["ours"], "peft": size["peft"]},
    }
    out = Path(__file__).parent / "results" / "lora_overhead.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"SmolLM2-135M-Instruct, LoRA r={args.r} on q/k/v/o, batch {args.batch}x{args.seq}, "
          f"{torch.get_num_threads()} threads, median of {args.reps}\n")
    print("| measure | base | deltatune | peft | deltatune / peft |")
    print("|---|---|---|---|---|")
    print(f"| forward, unmerged (s) | {fwd_med['base']:.3f} | {fwd_med['deltatune']:.3f} "
          f"({fwd_med['deltatune'] / fwd_med['base']:.3f}x base) | {fwd_med['peft']:.3f} "
          f"({fwd_med['peft'] / fwd_med['base']:.3f}x base) | {fwd_med['deltatune'] / fwd_med['peft']:.2f} |")
    print(f"| forward, merged (s) | | {merged:.3f} ({merged / fwd_med['base']:.3f}x base) | | |")
    print(f"| wrap (get_peft_model, s) | | {wrap['deltatune']:.3f} | {wrap['peft']:.3f} | {wrap['deltatune'] / wrap['peft']:.2f} |")
    print(f"| adapter load (s) | | {load_med['deltatune']:.3f} | {load_med['peft']:.3f} | {load_med['deltatune'] / load_med['peft']:.2f} |")
    print(f"| adapter file (bytes) | | {size['ours']:,d} | {size['peft']:,d} | {size['ours'] / size['peft']:.2f} |")


if __name__ == "__main__":
    main()
