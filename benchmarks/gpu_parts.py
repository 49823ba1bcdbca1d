"""The in-process parts of ``gpu_check.py``: the serving engine against HF generate, and QLoRA on
bitsandbytes' kernels. Each takes a device and dtype, so the dry run (no CUDA) runs the very same
code on the CPU with a tiny random model and a few tokens: the check cannot rot unnoticed.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

import mixed_adapters as mixed  # the adapters and prompts of the serving benchmarks
from deltatune.serving import Engine, SamplingParams

REPO = Path(__file__).resolve().parents[1]
QLORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(call, device: torch.device, reps: int) -> tuple[list[float], object]:
    """Median-ready wall times of ``reps`` calls (device synchronized), and the last call's result."""
    times, out = [], None
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        out = call()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, out


# -- the engine against HF generate -----------------------------------------------------------------

def engine_vs_generate(device: str, dtype: torch.dtype, workdir: Path, *, quick: bool, prompts: int = 32,
                       new_tokens: int = 32, adapters: int = 8, reps: int = 3) -> dict:
    """deltatune's ``Engine`` and HF ``generate`` (peft with ``adapter_names`` for adapters) on the
    same chat prompts, exactly ``new_tokens`` greedy tokens per row, base and ``adapters`` distinct
    adapters (row j on ``a{j % adapters}``, the random LoRA factors of ``mixed_adapters``).

    Returns tokens/s per configuration and library, rows equal per configuration, the adapter
    directories and the prompts (token ids), so vLLM can be run on exactly the same work.
    """
    dev = torch.device(device)
    base, tok = mixed.load_base(quick, torch.float32)
    batch = mixed.make_batch(tok, prompts)
    prompt_ids = [[t for t, m in zip(r.tolist(), k.tolist()) if m] for r, k in zip(batch["input_ids"], batch["attention_mask"])]
    dirs = mixed.make_adapters(base, adapters, 16, workdir / "adapters", mixed.B_STD["quick" if quick else "default"])
    base_path = "default"
    if quick:  # the tiny model must be on disk for the engine
        base_path = str(workdir / "base")
        base.save_pretrained(base_path)
        tok.save_pretrained(base_path)
    engine = Engine(base_path, max_loras=adapters, max_num_seqs=prompts, dtype=dtype, device=device, max_model_len=512)
    for i, d in enumerate(dirs):
        engine.add_adapter(f"a{i}", d)
    hf = base.to(device=dev, dtype=dtype)
    peft_model = mixed.load_models(hf, dirs, ["peft"])["peft"]
    batch = {k: v.to(dev) for k, v in batch.items()}
    names = mixed.row_names(adapters, prompts)
    sampling = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens)

    def ours(rows, n):
        outs = engine.generate(prompt_ids, adapter=rows, sampling=dataclasses.replace(sampling, max_tokens=n, min_tokens=n))
        return torch.tensor([o.outputs[0].token_ids for o in outs])

    calls = {("base", "deltatune"): lambda n: ours(None, n),
             ("base", "hf"): lambda n: mixed.generate(hf, batch, n, None, tok.pad_token_id).cpu(),
             (str(adapters), "deltatune"): lambda n: ours(names, n),
             (str(adapters), "hf"): lambda n: mixed.generate(peft_model, batch, n, names, tok.pad_token_id).cpu()}
    for call in calls.values():       # warm-up: every path once, 2 tokens
        call(2)
    times, tokens = {}, {}
    for key, call in calls.items():
        times[key], tokens[key] = _timed(lambda: call(new_tokens), dev, reps)
    engine.shutdown()
    tps = {f"{k}|{lib}": prompts * new_tokens / statistics.median(t) for (k, lib), t in times.items()}
    configs = ["base", str(adapters)]
    return {"prompts": prompts, "new_tokens": new_tokens, "adapters": adapters, "dtype": str(dtype)[6:],
            "tokens_per_s": tps,
            "engine_over_hf": {k: tps[f"{k}|deltatune"] / tps[f"{k}|hf"] for k in configs},
            "rows_equal_hf": {k: int((tokens[(k, "deltatune")] == tokens[(k, "hf")]).all(dim=1).sum()) for k in configs},
            "adapter_dirs": [str(d) for d in dirs], "prompt_ids": prompt_ids,
            "engine_token_ids": {k: tokens[(k, "deltatune")].tolist() for k in configs}}


# -- QLoRA on bitsandbytes' kernels -------------------------------------------------------------------

def nf4_layer(device: str, dtype: torch.dtype, *, quick: bool, reps: int = 20) -> dict:
    """One NF4 (double-quantized) linear layer of the default model's MLP shape (576 -> 1536),
    quantized on ``device`` by ``deltatune.quantize``: forward + backward time for 8 x 128 tokens,
    and its output's error against the dense fp32 layer (relative Frobenius norm)."""
    import deltatune

    dev = torch.device(device)
    d_in, d_out, rows = (64, 128, 16) if quick else (576, 1536, 8 * 128)
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(d_in, d_out, bias=False)).to(dev)
    dense = layer[0].weight.detach().clone().float()
    deltatune.quantize(layer, compute_dtype=dtype if dev.type == "cuda" else None)
    x = torch.randn(rows, d_in, device=dev, dtype=dtype if dev.type == "cuda" else torch.float32, requires_grad=True)

    def step():
        y = layer(x)
        y.float().square().mean().backward()
        return y

    step()                                                   # warm-up
    times, y = _timed(step, dev, reps)
    ref = x.detach().float() @ dense.T                       # (rows, d_out)
    return {"shape": [d_in, d_out], "rows": rows, "compute_dtype": str(x.dtype)[6:],
            "fwd_bwd_ms": 1e3 * statistics.median(times),
            "rel_error_vs_dense": float((y.detach().float() - ref).norm() / ref.norm()),
            "bnb_layer": type(layer[0]).__module__ + "." + type(layer[0]).__name__}


def qlora_steps(device: str, dtype: torch.dtype, *, quick: bool, steps: int = 6) -> dict:
    """QLoRA training steps as ``benchmarks/qlora.py``'s "qlora" configuration (NF4-DQ base, LoRA
    r=16 on q/k/v/o, AdamW, 8 x 128 random tokens, no checkpointing), quantized on ``device``
    (bitsandbytes' CUDA kernels there), bf16 autocast on CUDA. Median step after one warm-up."""
    import deltatune
    from deltatune.quant import quantized_bits_per_param

    dev = torch.device(device)
    base, _ = mixed.load_base(quick, torch.float32)
    base = deltatune.quantize(base.to(dev), compute_dtype=dtype if dev.type == "cuda" else None)
    base = deltatune.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = deltatune.get_peft_model(base, deltatune.LoraConfig(r=16, lora_alpha=32, target_modules=QLORA_TARGETS))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch, seq = (2, 16) if quick else (8, 128)
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(dev)
    autocast = torch.autocast(dev.type, dtype=dtype) if dev.type == "cuda" and dtype != torch.float32 else None
    losses = []

    def step():
        with autocast or torch.autocast(dev.type, enabled=False):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    step()                                                   # warm-up
    times, _ = _timed(step, dev, steps)
    out = {"batch": [batch, seq], "step_s": statistics.median(times), "losses": losses,
           "loss_fell": losses[-1] < losses[0], "bits_per_param": quantized_bits_per_param(base)}
    if dev.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return out


def cpu_qlora_reference() -> dict | None:
    """deltatune's CPU NF4 figures from benchmarks/results/qlora.json (the "qlora" configuration)."""
    path = REPO / "benchmarks" / "results" / "qlora.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    row = next((r for r in data.get("results", []) if r.get("config") == "qlora"), None)
    return None if row is None else {"step_s": row["step_s"], "torch_threads": row.get("torch_threads"),
                                     "batch": [data.get("batch"), data.get("seq_len")], "file": str(path.relative_to(REPO))}
