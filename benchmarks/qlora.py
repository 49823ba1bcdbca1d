"""QLoRA vs fp32 LoRA on the default model, side by side in one run.

Each configuration runs in its own subprocess (so peak RSS is its own): load the default model
(SmolLM2-135M-Instruct), set it up, then time training steps (batch 8 x 128 tokens, LoRA r=16 on
q/k/v/o, AdamW). Reported per configuration:

- step_s: median seconds per training step after one warm-up step;
- train_peak_mib: peak RSS during training only (the kernel's high-water mark is reset after
  setup through /proc/self/clear_refs), and process_peak_mib: ru_maxrss over the whole process,
  loading included;
- weights_mib: bytes of all parameters and buffers of the model (each tensor once);
- bits_per_param: of the 4-bit linear weights, counted from the stored tensors.

Configurations: fp32 LoRA and deltatune QLoRA (``deltatune.quantize`` + ``prepare_model_for_kbit_training``
+ LoRA), each with and without gradient checkpointing; the peft-docs snippet with deltatune's import
(transformers ``BitsAndBytesConfig(load_in_4bit=True, compute bf16)`` + deltatune); optionally
(``--peft-bnb``, ~2-3 min for one step) HF peft + bitsandbytes with bf16 compute.

Usage: python benchmarks/qlora.py [--steps 3] [--threads N] [--peft-bnb] [--only qlora,fp32_lora] [--loss chunked]
       [--random-init]   (the default model's config with random weights: same shapes, so the same
                          time and memory, for machines without the model files)
Writes benchmarks/results/qlora.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "qlora.json"
BATCH, SEQ, RANK, TARGETS = 8, 128, 16, ["q_proj", "k_proj", "v_proj", "o_proj"]

CONFIGS = {
    "fp32_lora": "fp32 base + deltatune LoRA",
    "fp32_lora_gc": "fp32 base + deltatune LoRA, gradient checkpointing",
    "qlora": "deltatune.quantize NF4-DQ + LoRA (fp32 compute), no checkpointing",
    "qlora_gc": "deltatune.quantize NF4-DQ + prepare_model_for_kbit_training (checkpointing) + LoRA",
    "bnb_load_deltatune": "transformers load_in_4bit (compute bf16 asked) + deltatune prepare + LoRA",
    "peft_bnb_bf16": "transformers load_in_4bit (compute bf16) + HF peft prepare + LoRA",
}
DEFAULT_RUN = ["fp32_lora", "fp32_lora_gc", "qlora", "qlora_gc", "bnb_load_deltatune"]


# ---------------------------------------------------------------------------------------------
# Child: one configuration

def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _weights_mib(model) -> float:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total / 2**20


def _bnb_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _enable_checkpointing(model) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.enable_input_require_grads()


def _model_dir() -> str:
    from deltatune import models

    return os.environ.get("DELTATUNE_BENCH_MODEL_DIR") or str(models.default_model_path())


def _load_dense():
    import torch
    from transformers import AutoModelForCausalLM

    if os.environ.get("DELTATUNE_BENCH_MODEL_DIR"):
        return AutoModelForCausalLM.from_pretrained(_model_dir(), dtype=torch.float32).eval()
    from deltatune import models

    return models.load_default()


def _setup(name: str):
    """Build the model for configuration ``name``; returns (model, extra info)."""
    import deltatune

    lora = dict(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS)
    info = {}
    if name.startswith("fp32_lora"):
        model = _load_dense()
        if name.endswith("_gc"):
            _enable_checkpointing(model)
        return deltatune.get_peft_model(model, deltatune.LoraConfig(**lora)), info
    if name in ("qlora", "qlora_gc"):
        import deltatune.quant as quant

        model = quant.quantize(_load_dense(), quant_type="nf4", double_quant=True)
        model = quant.prepare_model_for_kbit_training(model, use_gradient_checkpointing=name.endswith("_gc"))
        info["bits_per_param"] = quant.quantized_bits_per_param(model)
        return deltatune.get_peft_model(model, deltatune.LoraConfig(**lora)), info
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_model_dir(), quantization_config=_bnb_config(),
                                                 device_map="cpu")
    if name == "bnb_load_deltatune":
        import deltatune.quant as quant

        model = quant.prepare_model_for_kbit_training(model)
        info["bits_per_param"] = quant.quantized_bits_per_param(model)
        return deltatune.get_peft_model(model, deltatune.LoraConfig(**lora)), info
    import peft

    model = peft.prepare_model_for_kbit_training(model)
    return peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lora)), info


def _step_loss(model, ids, loss_kind: str):
    """HF's loss over full logits (``hf``), or deltatune's trainer path (``chunked``): the decoder,
    then label positions through the head in chunks (``deltatune.training.loss``)."""
    if loss_kind == "hf":
        return model(input_ids=ids, labels=ids).loss
    from deltatune.training.loss import linear_cross_entropy, unwrap

    hf = unwrap(model)
    hidden = hf.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state      # (B, T, d)
    targets = ids[:, 1:].reshape(-1)
    return linear_cross_entropy(hidden[:, :-1].reshape(-1, hidden.shape[-1]), hf.get_output_embeddings(),
                                targets) / targets.numel()


def run_child(name: str, steps: int, threads: int, loss_kind: str = "hf") -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, info = _setup(name)
    setup_s = time.perf_counter() - t0
    weights = _weights_mib(model)
    after_setup = _rss_mib("VmRSS")
    reset = _reset_peak()
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times, losses = [], []
    for _ in range(steps + 1):
        t = time.perf_counter()
        loss = _step_loss(model, ids, loss_kind)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    timed = times[1:] or times
    return {"config": name, "description": CONFIGS[name], "step_s": statistics.median(timed),
            "step_times_s": [round(t, 3) for t in times], "losses": [round(x, 4) for x in losses],
            "setup_s": round(setup_s, 1), "weights_mib": round(weights, 1),
            "rss_after_setup_mib": round(after_setup, 1),
            "train_peak_mib": round(_rss_mib("VmHWM"), 1) if reset else None,
            "process_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "trainable_params": sum(p.numel() for p in params), "torch_threads": torch.get_num_threads(),
            "loss_kind": loss_kind, **info}


# ---------------------------------------------------------------------------------------------
# Parent: all configurations, table, JSON

def _spawn(name: str, steps: int, threads: int, timeout: float, loss_kind: str = "hf") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--steps", str(steps),
           "--threads", str(threads), "--loss", loss_kind]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"[{name}] running ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            print(f"[{name}] {result['step_s']:.2f} s/step, train peak {result['train_peak_mib']} MiB",
                  file=sys.stderr, flush=True)
            return result
    tail = (proc.stderr or "").strip().splitlines()[-5:]
    return {"config": name, "description": CONFIGS[name], "error": " | ".join(tail) or f"exit {proc.returncode}"}


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(results: list[dict]) -> str:
    base = next((r for r in results if r["config"] == "fp32_lora" and "error" not in r), None)
    rows = ["| config | s/step | x fp32 LoRA | train peak RSS MiB | x fp32 LoRA | process peak MiB | weights MiB "
            "| bits/param |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['config']} | error: {r['error'][:80]} | | | | | | |")
            continue
        speed = r["step_s"] / base["step_s"] if base else None
        peak, base_peak = r.get("train_peak_mib"), base and base.get("train_peak_mib")
        mem = peak / base_peak if peak and base_peak else None
        rows.append(f"| {r['config']} | {r['step_s']:.2f} | {_fmt(speed, '.2f')} | {_fmt(peak, '.0f')} | "
                    f"{_fmt(mem, '.2f')} | {r['process_peak_mib']:.0f} | {r['weights_mib']:.0f} | "
                    f"{_fmt(r.get('bits_per_param'), '.3f')} |")
    return "\n".join(rows)


def _random_model(config_path: str) -> str:
    """Save a randomly initialised model with the default model's config; returns its directory."""
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(config_path) if config_path else Path(_model_dir()) / "config.json"
    config = AutoConfig.from_pretrained(path.parent if path.name == "config.json" else path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = tempfile.mkdtemp(prefix="qlora_bench_")
    model.save_pretrained(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per config (after 1 warm-up)")
    parser.add_argument("--peft-bnb", action="store_true", help="also run HF peft + bnb with bf16 compute (1 step)")
    parser.add_argument("--only", default="", help="comma-separated configs to run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per config (0: torch's default)")
    parser.add_argument("--random-init", action="store_true",
                        help="default model's config (--config) with random weights, saved to a temp dir")
    parser.add_argument("--config", default="", help="config.json for --random-init (default: the default model's)")
    parser.add_argument("--loss", choices=["hf", "chunked"], default="hf",
                        help="hf: model(labels=...) over full logits (what peft + Trainer run); chunked: "
                             "deltatune's trainer path, label positions through the head in chunks")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(args.child, args.steps, args.threads, args.loss)), flush=True)
        return 0

    if args.random_init:
        os.environ["DELTATUNE_BENCH_MODEL_DIR"] = _random_model(args.config)
    else:
        _model_dir()                     # build the model cache once, outside the timed children
    names = [n for n in args.only.split(",") if n] or DEFAULT_RUN + (["peft_bnb_bf16"] if args.peft_bnb else [])
    results = []
    for name in names:
        steps = 1 if name == "peft_bnb_bf16" else args.steps
        results.append(_spawn(name, steps, args.threads, timeout=1800, loss_kind=args.loss))
    import torch

    source = "config, random weights" if args.random_init else "(deltatune.models.load_default)"
    report = {"model": f"SmolLM2-135M-Instruct {source}", "batch": BATCH, "seq_len": SEQ,
              "lora": {"r": RANK, "target_modules": TARGETS}, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "torch_threads": args.threads or torch.get_num_threads(),
              "torch": torch.__version__, "random_init": args.random_init, "loss": args.loss, "results": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
