"""Where QLoRA's accuracy goes on the default model, and what LoftQ gets back: one run, same seed.

Variants (LoRA r=16 on every linear layer, the demo's settings, same seed, same steps):

- ``dense``: the full-precision base (what ``make demo`` trains);
- ``nf4``: QLoRA, the base's linear layers stored in NF4 with double quantization, LoRA from zero;
- ``loftq1`` / ``loftq5``: QLoRA with LoftQ initialisation (``init_lora_weights="loftq"``,
  ``LoftQConfig(loftq_iter=1 or 5)``): the 4-bit base and the factors chosen together, the
  factors starting from the rank-r part of the rounding error;
- ``nf4-rounded`` (not run by default): a dense base holding the NF4-rounded weights
  (``quantize`` then ``dequantize_model``): if QLoRA is implemented right it scores what ``nf4``
  scores, so the gap to ``dense`` is the rounding itself, not the 4-bit machinery.

Before any training it reports, on the held-out answers, each base's loss and its KL divergence
from the dense model: dense, NF4, and NF4 with each LoftQ initialisation (the adapter's starting
correction included). ``--steps ""`` measures only that.
Then every variant trains for each step count (separate runs, each with its own schedule), one
after another in this process, and scores exact match on the held-out set.

    .venv/bin/python benchmarks/qlora_accuracy.py [--steps 40,120] [--eval-limit 200]
        [--variants dense,nf4,loftq1,loftq5]

Writes benchmarks/results/qlora_accuracy.json (after every run, so a partial run keeps what it
measured) and .png, and prints a markdown table (``--replot`` redraws the PNG from the JSON).
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

VARIANTS = ("dense", "nf4", "loftq1", "loftq5", "nf4-rounded")
DEFAULT_VARIANTS = ("dense", "nf4", "loftq1", "loftq5")
LORA = dict(r=16, alpha=32, target="all-linear")


def _loftq_iter(variant: str) -> int | None:
    return int(variant[len("loftq"):]) if variant.startswith("loftq") else None


_LOFTQ: dict[str, tuple[dict, dict]] = {}   # variant -> (state dict right after LoftQ, its weight errors)


def _model(variant: str, dtype: torch.dtype, adapter) -> tuple[torch.nn.Module, dict]:
    """The variant's base wrapped with ``adapter`` (a LoraConfig), and LoftQ's weight errors.

    LoftQ runs once per variant (on the first call; it is the slow part: full SVDs of every
    layer, ``loftq_iter`` times); later calls rebuild the same 4-bit base and factors from its
    state dict, so every run of a variant starts from the identical initialisation.
    """
    import dataclasses

    base = models.load("default", dtype=dtype)
    iters = _loftq_iter(variant)
    if iters is not None and variant in _LOFTQ:
        state, errors = _LOFTQ[variant]
        model = deltatune.get_peft_model(deltatune.quantize(base), adapter)   # same layers LoftQ made 4-bit
        model.load_state_dict(state)
        return model, errors
    if iters is not None:
        adapter = dataclasses.replace(adapter, init_lora_weights="loftq",
                                      loftq_config=deltatune.LoftQConfig(loftq_bits=4, loftq_iter=iters))
        t = time.perf_counter()
        model = deltatune.get_peft_model(base, adapter)
        errors = {**_weight_error(model), "loftq_init_s": round(time.perf_counter() - t, 1)}
        _LOFTQ[variant] = ({k: v.detach().clone() for k, v in model.state_dict().items()}, errors)
        return model, errors
    if variant != "dense":
        deltatune.quantize(base)
        if variant == "nf4-rounded":
            deltatune.dequantize_model(base, dtype=dtype)
    return deltatune.get_peft_model(base, adapter), {}


def _weight_error(model) -> dict:
    """Relative error ||W - W_eff||_F / ||W||_F over all LoftQ layers (energies summed): NF4 alone
    vs with the LoftQ start, and the share of the rounding error's energy left."""
    quant = loftq = 0.0
    for _, layer in model.base_model.adapter_layers():
        err = getattr(layer.base_layer, "deltatune_loftq_error", None)
        if err is not None:
            quant += err["quant"] ** 2
            loftq += err["loftq"] ** 2
    return {"error_energy_left": loftq / quant} if quant else {}


def _adapter_config():
    cfg = api.make_config(data=str(ROOT / "data" / "demo_train.jsonl"), **LORA)
    return api.adapter_config(cfg)


def _answer_log_probs(model, examples) -> list[torch.Tensor]:
    """Per example, the model's log-probabilities (answer positions x vocabulary, fp32) at the
    positions that carry labels: one plain forward per example, no batching or packing."""
    out = []
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1].float()   # (L-1, V)
            keep = torch.tensor(e.labels[1:]) != -100
            out.append(torch.log_softmax(logits[keep], dim=-1))
    return out


def base_losses(tokenizer, eval_limit: int, variants) -> tuple[dict[str, float], dict[str, float]]:
    """Before any training (fp32 compute), on the first ``eval_limit`` held-out examples' answer
    tokens: each base's cross-entropy against the data (dense, NF4, each LoftQ start, the
    adapter's starting correction included), and its KL divergence from the dense model,
    ``KL(dense || variant)`` per answer token: how far the quantized model's predictions are from
    the full-precision ones, which is what LoftQ's weight fit moves."""
    from deltatune.training.data import load_dataset

    examples = load_dataset(str(ROOT / "data" / "demo_eval.jsonl"), tokenizer, max_length=512).examples[:eval_limit]
    targets = [torch.tensor(e.labels[1:])[torch.tensor(e.labels[1:]) != -100] for e in examples]
    losses, kls, dense = {}, {}, None
    for variant in ["dense", "nf4"] + [v for v in variants if _loftq_iter(v) is not None]:
        torch.manual_seed(0)
        model = _model(variant, torch.float32, _adapter_config())[0].eval()
        logp = _answer_log_probs(model, examples)
        n = sum(t.numel() for t in targets)
        losses[variant] = -sum(lp.gather(1, t[:, None]).sum().item() for lp, t in zip(logp, targets)) / n
        if dense is None:
            dense = logp
        kls[variant] = sum((d.exp() * (d - lp)).sum().item() for d, lp in zip(dense, logp)) / n
        print(f"[base] {variant}: held-out answer loss before tuning {losses[variant]:.4f}, "
              f"KL(dense || {variant}) {kls[variant]:.4f} per answer token", flush=True)
    return losses, kls


def run(variant: str, steps: int, args, tokenizer) -> dict:
    cfg = api.make_config(data=str(ROOT / "data" / "demo_train.jsonl"), eval_data=str(ROOT / "data" / "demo_eval.jsonl"),
                          max_steps=steps, batch_size=8, seed=0, warmup_steps=3, eval_limit=args.eval_limit,
                          out=str(Path(args.workdir) / f"{variant}-{steps}"), progress=False, lr=1e-3,
                          log_every=10, **LORA)
    dtype = resolve_dtype(cfg.dtype, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    model, errors = _model(variant, dtype, api.adapter_config(cfg))
    row = {"variant": variant, "steps": steps, "compute": str(dtype).replace("torch.", ""), **errors}
    torch.manual_seed(cfg.seed)
    t = time.perf_counter()
    m = api.train(cfg, model=model, tokenizer=tokenizer).metrics
    row.update(exact_match=m.get("exact_match"), correct=m.get("correct"), scored=m.get("total"),
               eval_loss=m.get("eval_loss"), final_loss=m.get("final_loss"), wall_s=round(time.perf_counter() - t, 1))
    print(f"[{variant} {steps} steps] {row}", flush=True)
    return row


def chart(report: dict, path: Path) -> None:
    """Exact match per variant, one group of bars per step count, and the untuned answer losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    steps = sorted({r["steps"] for r in rows})
    colors = dict(zip(VARIANTS, ["#4c72b0", "#dd8452", "#55a868", "#8172b3", "#c44e52"]))
    kls = report.get("base_answer_kl_to_dense", {})
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), gridspec_kw={"width_ratios": [3, 2, 2]})
    width = 0.8 / max(len(variants), 1)
    for i, v in enumerate(variants):
        xs = [j + i * width for j, n in enumerate(steps) if any(r["variant"] == v and r["steps"] == n for r in rows)]
        ys = [100 * r["exact_match"] for n in steps for r in rows if r["variant"] == v and r["steps"] == n]
        bars = axes[0].bar(xs, ys, width, label=v, color=colors.get(v))
        axes[0].bar_label(bars, fmt="%.1f", fontsize=7)
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(steps))], [f"{n} steps" for n in steps])
    axes[0].set_title("held-out exact match (%)", fontsize=10)
    axes[0].legend(fontsize=8, loc="lower right")
    losses = report["base_answer_loss_before_tuning"]
    bars = axes[1].bar(list(losses), list(losses.values()), color=[colors.get(k) for k in losses])
    axes[1].bar_label(bars, fmt="%.3f", fontsize=8)
    axes[1].set_title("answer loss before training", fontsize=10)
    bars = axes[2].bar(list(kls), list(kls.values()), color=[colors.get(k) for k in kls])
    axes[2].bar_label(bars, fmt="%.3f", fontsize=8)
    axes[2].set_title("KL(dense || base) per answer token, before training", fontsize=9)
    fig.suptitle(f"LoRA r=16 on the demo task, {report['eval_examples']} held-out examples: dense vs QLoRA vs "
                 "QLoRA + LoftQ", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="40,120", help="comma-separated step counts, one run each")
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--workdir", default="/tmp/deltatune-qlora-accuracy")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qlora_accuracy.json"))
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from --out's JSON")
    args = ap.parse_args()
    out = Path(args.out)
    if args.replot:
        chart(json.loads(out.read_text()), out.with_suffix(".png"))
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    steps = [int(n) for n in args.steps.split(",") if n]
    bound_cpu_kernel_caches()  # as deltatune train does before its first bf16 matmul
    tokenizer = models.load_tokenizer("default")
    report = {"model": "SmolLM2-135M-Instruct", "steps": steps, "eval_examples": args.eval_limit,
              "lora": {"r": 16, "alpha": 32, "target": "all-linear", "lr": 1e-3, "batch_size": 8},
              "base_loss_examples": min(args.eval_limit, 64), "torch_threads": torch.get_num_threads(),
              "rows": []}
    losses, kls = base_losses(tokenizer, min(args.eval_limit, 64), variants)
    report["base_answer_loss_before_tuning"] = losses
    report["base_answer_kl_to_dense"] = kls
    _write(report, out)
    for n in steps:
        for v in variants:
            report["rows"].append(run(v, n, args, tokenizer))
            _write(report, out)
    chart(report, out.with_suffix(".png"))
    print("\n| base under the adapter | " + " | ".join(f"exact match, {n} steps" for n in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for v in variants:
        cells = [f"{r['correct']}/{r['scored']} ({100 * r['exact_match']:.1f}%)"
                 for n in steps for r in report["rows"] if r["variant"] == v and r["steps"] == n]
        print(f"| {v} | " + " | ".join(cells) + " |")
    print("\nanswer loss before training: " + ", ".join(f"{k} {x:.4f}" for k, x in
                                                      report["base_answer_loss_before_tuning"].items()))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
