"""Where QLoRA's accuracy goes on the default model: the demo task with four bases, one run each.

Variants (LoRA r=16 on every linear layer, the demo's settings, same seed and steps):

- ``dense``: the full-precision base (what ``make demo`` trains);
- ``nf4``: QLoRA, the base's linear layers stored in NF4 with double quantization;
- ``nf4-rounded``: a dense base holding the NF4-rounded weights (``quantize`` then
  ``dequantize_model``): if QLoRA is implemented right, it scores what ``nf4`` scores, and the
  gap to ``dense`` is the rounding itself, not the 4-bit machinery;
- ``nf4-svd``: QLoRA whose LoRA factors start as the rank-r SVD of the rounding error
  ``W - dequant(Q)`` (LoftQ with one iteration): does repairing the error up front help?

Also reports the base model's loss on the held-out answers before any tuning, dense vs NF4.
Each variant trains in this process, one after another (same data order, same init seed).

    .venv/bin/python benchmarks/qlora_accuracy.py [--steps 40] [--eval-limit 200]
        [--variants dense,nf4,nf4-rounded,nf4-svd]

Writes benchmarks/results/qlora_accuracy.json and .png and prints a markdown table
(``--replot`` redraws the PNG from the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import deltatune  # noqa: E402
from deltatune import models  # noqa: E402
from deltatune.training import api  # noqa: E402
from deltatune.training.precision import bound_cpu_kernel_caches, resolve_dtype  # noqa: E402

VARIANTS = ("dense", "nf4", "nf4-rounded", "nf4-svd")


def _base(variant: str, dtype: torch.dtype):
    base = models.load("default", dtype=dtype)
    if variant != "dense":
        deltatune.quantize(base)
    if variant == "nf4-rounded":
        deltatune.dequantize_model(base, dtype=dtype)
    return base


def _svd_init(model, dense_weights: dict[str, torch.Tensor]) -> float:
    """Set each LoRA pair to the rank-r SVD of its layer's rounding error; returns the share of
    the error's energy left after the correction."""
    from deltatune.methods.lora import LoraLinear

    before = after = 0.0
    with torch.no_grad():
        for name, layer in model.base_model.adapter_layers():
            if not isinstance(layer, LoraLinear):
                continue
            R = dense_weights[name] - layer.base_layer.dequantize(torch.float32)       # (out, in)
            s, r = layer.scaling["default"], layer.r["default"]
            U, S, Vh = torch.linalg.svd(R, full_matrices=False)
            root = torch.sqrt(S[:r] / s)
            layer.lora_A["default"].weight.copy_(root[:, None] * Vh[:r])
            layer.lora_B["default"].weight.copy_(U[:, :r] * root[None, :])
            before += R.pow(2).sum().item()
            after += (R - layer.delta_weight("default")).pow(2).sum().item()
    return after / before


def base_losses(tokenizer, eval_limit: int) -> dict[str, float]:
    """Held-out answer loss of the untuned base, dense vs NF4 (fp32 compute)."""
    from deltatune.training.data import Dataset, load_dataset
    from deltatune.training.evaluate import eval_loss

    ds = load_dataset(str(ROOT / "data" / "demo_eval.jsonl"), tokenizer, max_length=512)
    ds = Dataset(ds.examples[:eval_limit], ds.report)
    out = {}
    for variant in ("dense", "nf4"):
        out[variant] = eval_loss(_base(variant, torch.float32).eval(), ds, 16, torch.device("cpu"))["eval_loss"]
    return out


def run(variant: str, args, tokenizer) -> dict:
    cfg = api.make_config(data=str(ROOT / "data" / "demo_train.jsonl"), eval_data=str(ROOT / "data" / "demo_eval.jsonl"),
                          max_steps=args.steps, batch_size=8, seed=0, warmup_steps=3, eval_limit=args.eval_limit,
                          out=str(Path(args.workdir) / variant), progress=False, lr=1e-3, r=16, alpha=32,
                          target="all-linear", log_every=10)
    dtype = resolve_dtype(cfg.dtype, torch.device("cpu"))
    dense = None
    if variant == "nf4-svd":
        dense = {n: m.weight.detach().float().clone() for n, m in models.load("default").named_modules()
                 if isinstance(m, torch.nn.Linear)}
    base = _base(variant, dtype)
    torch.manual_seed(cfg.seed)
    model = deltatune.get_peft_model(base, api.adapter_config(cfg))
    row = {"variant": variant, "compute": str(dtype).replace("torch.", "")}
    if dense is not None:
        row["error_energy_left"] = _svd_init(model, dense)
        del dense
    t = time.perf_counter()
    m = api.train(cfg, model=model, tokenizer=tokenizer).metrics
    row.update(exact_match=m.get("exact_match"), correct=m.get("correct"), scored=m.get("total"),
               eval_loss=m.get("eval_loss"), final_loss=m.get("final_loss"), wall_s=round(time.perf_counter() - t, 1))
    print(f"[{variant}] {row}", flush=True)
    return row


def chart(report: dict, path: Path) -> None:
    """Exact match and eval loss per base variant, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    names = [r["variant"] for r in rows]
    colors = ["#4c72b0", "#dd8452", "#c44e52", "#8172b3"][:len(rows)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (title, value) in zip(axes, [("held-out exact match (%)", lambda r: 100 * r["exact_match"]),
                                         ("held-out eval loss", lambda r: r["eval_loss"])]):
        bars = ax.bar(names, [value(r) for r in rows], color=colors)
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"LoRA r=16 on the demo task, {report['steps']} steps, {report['eval_examples']} held-out: "
                 "which base is underneath", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--workdir", default="/tmp/deltatune-qlora-accuracy")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qlora_accuracy.json"))
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from --out's JSON")
    args = ap.parse_args()
    if args.replot:
        chart(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    bound_cpu_kernel_caches()  # as deltatune train does before its first bf16 matmul
    tokenizer = models.load_tokenizer("default")
    losses = base_losses(tokenizer, min(args.eval_limit, 64))
    print(f"[base] held-out answer loss before tuning: dense {losses['dense']:.3f}, nf4 {losses['nf4']:.3f}", flush=True)
    rows = [run(v, args, tokenizer) for v in variants]
    report = {"model": "SmolLM2-135M-Instruct", "steps": args.steps, "eval_examples": args.eval_limit,
              "lora": {"r": 16, "alpha": 32, "target": "all-linear", "lr": 1e-3, "batch_size": 8},
              "base_answer_loss_before_tuning": losses, "rows": rows, "torch_threads": torch.get_num_threads()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    chart(report, out.with_suffix(".png"))
    print("\n| base under the adapter | exact match | eval loss |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['correct']}/{r['scored']} ({100 * r['exact_match']:.1f}%) | {r['eval_loss']:.4f} |")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
