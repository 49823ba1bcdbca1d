"""Replicas on Ray Serve (issue 28): 2 replicas x 1 thread against 1 replica x 2 threads, and routing by
adapter against routing to any replica, in one run on one machine.

64 client threads send requests over 32 LoRA adapters through the replicated server's request path
(``deltatune.serving.replicas``: the entry point's stand-in engine, Ray Serve deployment handles, one
Engine per replica), each waiting for its answer before sending the next. Each engine has
``--max-loras`` (8) adapters ready and ``--max-cpu-loras`` more in host memory; a replica's multiplexed
LRU holds both tiers (``max_loras + max_cpu_loras``), one deployment per ``--max-cpu-loras`` value.
The adapter of each request is drawn from a Zipf law (``--zipf``, exponent s; 0 = uniform) with a
fixed seed, so every configuration sees the same sequence. Each configuration starts from empty
replicas (every adapter unloaded and registered again); the first third of the requests warms them
up, and the figures are those of the other two thirds: requests/s, generated tokens/s, p50 and p99
latency (submit to last token). Counted from the replicas' reports for both parts: *file loads*
(``cold_loads``, ``steady_loads``: a replica's multiplexed miss reads the adapter's files), the
engines' file reads (``steady_file_reads``: the same plus reloads and re-reads from the disk tier) and
*ready swaps* (``steady_ready_swaps``: an adapter made ready from host memory, no file read), with the
mean wall time of one load.

- ``2x1 affine``: 2 replicas with 1 torch thread each, the request's adapter as Serve's
  ``multiplexed_model_id``, routed by ``AdapterAffinityRouter`` (``--spill-below``: its spill rule);
- ``2x1 any``: the same replicas, no model id: Serve's default power-of-two-choices routing, which
  ignores the adapter (the round-robin-like baseline the issue asks for);
- ``1x2 affine``: 1 replica with 2 torch threads (with the last ``--max-cpu-loras``).

Also measured: the latency of one lone request per generated token (the per-step cost that
``benchmarks/router_sim.py`` takes, with the mean load time, from this file's JSON).

Why Zipf by default: with uniform traffic and replica LRUs of 8 (``--max-cpu-loras 0``), no router can
cut loads 4x: two replicas hold 16 of 32 adapters at once; even a perfect partition misses half the
time (an 8-slot LRU over 16 equally likely adapters), against three quarters for a router that ignores
the adapter (8 slots over 32): 1.5x at most. What makes the difference is the host tier: with
``--max-cpu-loras 8`` each replica keeps 16 and the pair can hold all 32 once, if routing is by
adapter. Real adapter traffic is skewed; ``--zipf 0`` shows the uniform case.

    .venv/bin/python benchmarks/serve_scale.py --skip-1x2 --max-cpu-loras 0 8 16   # ~4 min on 2 cores
    .venv/bin/python benchmarks/serve_scale.py                   # tiny random Llama, host tiers 0 and 8, and 1x2
    .venv/bin/python benchmarks/serve_scale.py --replicas 4 --skip-1x2 --out benchmarks/results/serve_scale_4replicas.json
    .venv/bin/python benchmarks/serve_scale.py --model default   # SmolLM2-135M-Instruct
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])  # Ray's workers

import torch  # noqa: E402

import mixed_adapters as mixed  # noqa: E402  (the tiny base and the random adapters)
from deltatune.serving import SamplingParams  # noqa: E402

RESULTS = HERE / "results"
PROMPT = "Write one sentence about the sea."


def make_world(model: str, n: int, workdir: Path) -> tuple[str, dict[str, Path]]:
    """The base (``"default"`` or a saved tiny Llama) and ``n`` random rank-8 adapters on it."""
    quick = model != "default"
    base, tokenizer = mixed.load_base(quick, torch.float32)
    dirs = mixed.make_adapters(base, n, 8, workdir / "adapters", mixed.B_STD["quick" if quick else "default"])
    if not quick:
        return "default", {f"a{i}": d for i, d in enumerate(dirs)}
    path = workdir / "base"
    base.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path), {f"a{i}": d for i, d in enumerate(dirs)}


def traffic(n_requests: int, names: list[str], s: float, seed: int = 0) -> list[str]:
    """The adapter of each request: Zipf(s) over ``names`` in their order (s=0: uniform)."""
    weights = [1.0 / (rank + 1) ** s for rank in range(len(names))]
    return random.Random(seed).choices(names, weights=weights, k=n_requests)


def drive(engine, adapters: list[str], clients: int, sampling) -> dict:
    """``clients`` threads, each sending the next request of ``adapters`` once its previous one is answered."""
    work: queue.Queue = queue.Queue()
    for name in adapters:
        work.put(name)
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()

    def client() -> None:
        while True:
            try:
                name = work.get_nowait()
            except queue.Empty:
                return
            t0 = time.perf_counter()
            try:
                out = engine.submit(PROMPT, adapter=name, sampling=sampling).result(timeout=600)
            except Exception as exc:  # noqa: BLE001 — counted, shown in the JSON
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens.append(len(out.outputs[0].token_ids))

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None
    return {"requests": len(latencies), "errors": len(errors), "first_errors": errors[:3], "seconds": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 2), "tokens_per_s": round(sum(tokens) / wall, 1),
            "p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "p99_s": round(p99, 3) if p99 is not None else None}


def load_counts(engine) -> dict:
    """Counters summed over the live replicas' reports: ``loads`` (multiplexed misses: the adapter's files
    read into the engine), ``seconds`` spent on them, ``file_reads`` (every read of adapter files by the
    engines, reloads and re-reads from disk included) and ``ready_swaps`` (host memory -> ready)."""
    time.sleep(0.6)  # a report every 0.2 s
    reports = engine.replica_reports()
    return {"loads": sum(sum(r["loads"].values()) for r in reports), "seconds": sum(r["load_seconds"] for r in reports),
            "file_reads": sum(r.get("file_reads", 0) for r in reports),
            "ready_swaps": sum(r.get("ready_swaps", 0) for r in reports),
            "by_adapter": {f"{r['replica']}:{a}": n for r in reports for a, n in r["loads"].items()}}


def first_loads(c1: dict, c2: dict) -> int:
    """Adapters loaded between ``c1`` and ``c2`` that no replica had loaded before ``c1``: their first
    request came after the warm-up (the rare ones of the Zipf tail), a load every router pays."""
    before = {key.split(":", 1)[1] for key in c1["by_adapter"]}
    return len({key.split(":", 1)[1] for key in c2["by_adapter"]} - before)


def reset(engine, dirs: dict[str, Path]) -> None:
    """Every adapter unloaded from every replica, then registered again: the next run starts cold."""
    for name, path in dirs.items():
        engine.remove_adapter(name)
        engine.register(name, path)


def run_config(base: str, dirs: dict, replicas: int, threads: int, modes: list[str], sequence: list[str],
               args, cpu_loras: int) -> list[dict]:
    from deltatune.serving.replicas import launch

    kwargs = dict(max_loras=args.max_loras, max_cpu_loras=cpu_loras, max_num_seqs=args.max_num_seqs, max_waiting=256)
    t0 = time.perf_counter()
    engine = launch(base, replicas=replicas, threads=threads, engine_kwargs=kwargs, spill_below=args.spill_below,
                    name=f"scale-{replicas}x{threads}-{cpu_loras}")
    started = time.perf_counter() - t0
    sampling = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    rows = []
    try:
        for name, path in dirs.items():
            engine.register(name, path)
        lone = drive(engine, [None] * 4, 1, sampling)   # warm-up, then the per-token cost of a lone request
        step_s = lone["p50_s"] / args.new_tokens
        warm = len(sequence) // 3
        for mode in modes:
            reset(engine, dirs)
            engine.affine = mode == "affine"
            c0 = load_counts(engine)
            drive(engine, sequence[:warm], args.clients, sampling)   # from cold: every router loads here
            c1 = load_counts(engine)
            figures = drive(engine, sequence[warm:], args.clients, sampling)
            c2 = load_counts(engine)
            loads = c2["loads"] - c0["loads"]
            rows.append({"config": f"{replicas}x{threads} {mode} cpu{cpu_loras}", "replicas": replicas,
                         "threads_per_replica": threads, "routing": mode, "max_loras": args.max_loras,
                         "max_cpu_loras": cpu_loras, "adapters_per_replica": args.max_loras + cpu_loras,
                         "spill_below": args.spill_below, **figures,
                         "cold_loads": c1["loads"] - c0["loads"], "steady_loads": c2["loads"] - c1["loads"],
                         "steady_file_reads": c2["file_reads"] - c1["file_reads"],
                         "steady_ready_swaps": c2["ready_swaps"] - c1["ready_swaps"],
                         "steady_first_loads": first_loads(c1, c2),
                         "steady_loads_by_replica_adapter": {k: n - c1["by_adapter"].get(k, 0) for k, n in
                                                             sorted(c2["by_adapter"].items())
                                                             if n > c1["by_adapter"].get(k, 0)},
                         "load_cost_s": round((c2["seconds"] - c0["seconds"]) / loads, 4) if loads else None,
                         "lone_request_step_s": round(step_s, 5), "replica_start_s": round(started, 1)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        engine.shutdown()
    return rows


def reloads(row: dict) -> int:
    """Steady-state loads of adapters some replica had loaded before (``steady_first_loads`` taken
    out): the loads a router decides. An adapter whose first request comes after the warm-up (the
    Zipf tail's rare ones) is loaded once under any routing."""
    return row["steady_loads"] - row["steady_first_loads"]


def ratios(rows: list[dict]) -> dict:
    """Per host tier: steady-state file loads (and engine file reads) of any-replica routing over affine."""
    out = {}
    for cpu in sorted({r["max_cpu_loras"] for r in rows if r["replicas"] > 1}):
        pair = {r["routing"]: r for r in rows if r["max_cpu_loras"] == cpu and r["replicas"] > 1}
        if {"affine", "any"} <= set(pair):
            a, b = pair["affine"], pair["any"]
            out[f"cpu{cpu}"] = {"loads_any_over_affine": round(b["steady_loads"] / max(a["steady_loads"], 1), 2),
                                "file_reads_any_over_affine": round(b["steady_file_reads"] /
                                                                    max(a["steady_file_reads"], 1), 2),
                                "reloads_any_over_affine": round(reloads(b) / max(reloads(a), 1), 2),
                                "target_4x_fewer_loads": bool(b["steady_loads"] >= 4 * a["steady_loads"])}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "default"])
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=384, help="requests per configuration")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--max-loras", type=int, default=8, help="each engine's ready tier")
    ap.add_argument("--max-cpu-loras", type=int, nargs="+", default=[0, 8],
                    help="each engine's host-memory tier; one deployment per value (replica LRU: max-loras + this)")
    ap.add_argument("--spill-below", type=float, default=0.5, help="the router's spill rule (1.0: the rule before)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--zipf", type=float, default=1.0, help="exponent s of the adapters' Zipf law (0: uniform)")
    ap.add_argument("--replicas", type=int, default=2, help="replicas (1 thread each) of the routing comparison")
    ap.add_argument("--skip-1x2", action="store_true", help="only the routing comparison")
    ap.add_argument("--out", default=str(RESULTS / "serve_scale.json"))
    args = ap.parse_args(argv)
    import ray

    load_before = os.getloadavg()
    ray.init(num_cpus=max(os.cpu_count() or 1, args.replicas, 2), include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        base, dirs = make_world(args.model, args.adapters, Path(tmp))
        sequence = traffic(args.requests, list(dirs), args.zipf)
        rows = []
        for cpu in args.max_cpu_loras:
            rows += run_config(base, dirs, args.replicas, 1, ["affine", "any"], sequence, args, cpu)
        if not args.skip_1x2:
            rows += run_config(base, dirs, 1, 2, ["affine"], sequence, args, args.max_cpu_loras[-1])
    ray.shutdown()
    result = {
        "what": "replicas on Ray Serve: throughput, p99 latency, adapter file loads and ready swaps (issue 28)",
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "setup": {"model": "tiny random Llama (hidden 64, 2 layers, SmolLM2's tokenizer)" if args.model == "tiny"
                  else "SmolLM2-135M-Instruct", "adapters": args.adapters, "rank": 8, "clients": args.clients,
                  "requests": args.requests, "new_tokens": args.new_tokens, "max_loras": args.max_loras,
                  "zipf_s": args.zipf, "cpu": mixed.cpu_name(), "cores": os.cpu_count(),
                  "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                  "torch": torch.__version__, "ray": ray.__version__},
        "rows": rows,
        "steady_any_over_affine": ratios(rows),
        "load_cost_s": next((r["load_cost_s"] for r in rows if r["load_cost_s"]), None),
        "step_s": rows[0]["lone_request_step_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| config | req/s | tok/s | p50 s | p99 s | loads from cold | file loads after (first ones) "
          "| ready swaps after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['requests_per_s']} | {r['tokens_per_s']} | {r['p50_s']} | {r['p99_s']} | "
              f"{r['cold_loads']} | {r['steady_loads']} ({r['steady_first_loads']}) | {r['steady_ready_swaps']} |")
    print(f"after the first third, any-replica routing / affine: {json.dumps(result['steady_any_over_affine'])}; "
          f"load average {result['setup']['load_average_before_after']}; wrote {args.out}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
