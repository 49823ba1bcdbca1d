"""DoRA's training-step cost over LoRA on the default model (SmolLM2-135M), deltatune and HF peft.

Same config for all (r=8, alpha=16, target_modules as given), same batch, AdamW; training steps
interleaved across the variants so machine noise hits them alike; reports the median step time
and DoRA/LoRA ratios. Issue 5 asks deltatune's ratio to be <= 1.3.

    .venv/bin/python benchmarks/dora_overhead.py [--targets all-linear|qv] [--batch 4 --seq 128]
        [--steps 8] [--device cpu|cuda] [--dtype float32|bfloat16] [--random-init] [--no-peft]

``--random-init`` builds the default model's architecture without loading its weights (same
step time; for machines where the weights are not available). Writes
benchmarks/results/dora_overhead[_<device>].json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import deltatune  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# SmolLM2-135M(-Instruct)'s architecture, for --random-init where the weights are not at hand.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu")


def base_model(random_init: bool, dtype: torch.dtype, device: str):
    if random_init:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    else:
        model = deltatune.models.load_default()
    return model.to(device=device, dtype=dtype)


def variants(args, dtype):
    targets = ["q_proj", "v_proj"] if args.targets == "qv" else "all-linear"
    kw = dict(r=8, lora_alpha=16, target_modules=targets)
    out = {"deltatune lora": lambda m: deltatune.get_peft_model(m, deltatune.LoraConfig(**kw)),
           "deltatune dora": lambda m: deltatune.get_peft_model(m, deltatune.LoraConfig(use_dora=True, **kw))}
    if not args.no_peft:
        try:
            import peft
        except ImportError:
            return out
        out["peft lora"] = lambda m: peft.get_peft_model(m, peft.LoraConfig(**kw))
        out["peft dora"] = lambda m: peft.get_peft_model(m, peft.LoraConfig(use_dora=True, **kw))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", choices=["all-linear", "qv"], default="all-linear")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warm-up)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--random-init", action="store_true")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/dora_overhead[_cuda].json)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    cuda = args.device.startswith("cuda")

    models = {}
    for name, wrap in variants(args, dtype).items():
        model = wrap(base_model(args.random_init, dtype, args.device))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        models[name] = (model, torch.optim.AdamW(params, lr=1e-4))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.seq), generator=g).to(args.device)

    def step(model, opt) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    times = {name: [] for name in models}
    for i in range(args.steps + 2):
        for name, (model, opt) in models.items():
            dt = step(model, opt)
            if i >= 2:
                times[name].append(dt)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    result = {
        "config": vars(args) | {"model": "SmolLM2-135M" + (" (random init)" if args.random_init else ""),
                                "torch": torch.__version__,
                                "device_name": torch.cuda.get_device_name() if cuda else "cpu"},
        "median_step_s": med,
        "step_times_s": times,
        "ratio_deltatune": med["deltatune dora"] / med["deltatune lora"],
    }
    if "peft dora" in med:
        result["ratio_peft"] = med["peft dora"] / med["peft lora"]
        result["deltatune_dora_vs_peft_dora"] = med["deltatune dora"] / med["peft dora"]
    print(f"| variant | median step (ms) |\n|---|---|")
    for name, t in med.items():
        print(f"| {name} | {1000 * t:.1f} |")
    print(f"\nDoRA / LoRA step time: deltatune {result['ratio_deltatune']:.3f}"
          + (f", peft {result['ratio_peft']:.3f}" if "ratio_peft" in result else ""))
    out = Path(args.out) if args.out else RESULTS / f"dora_overhead{'_cuda' if cuda else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
