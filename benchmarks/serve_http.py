"""`deltatune serve` under load against a naive server (peft's generate, one request after another).

Issue 14's server figure: 64 clients x 8 adapters, each asking for 32 tokens. Eight LoRA adapters
(r=16, alpha 32 on q/k/v/o, random factors from fixed seeds; ``mixed_adapters.make_adapters``) are
saved once for the default model (SmolLM2-135M-Instruct, fp32). Request i is one of the chat
prompts of ``mixed_adapters.PROMPTS`` through the chat template, on adapter ``a{i % 8}``, greedy,
exactly 32 new tokens (``ignore_eos``; peft: ``min_new_tokens``).

- deltatune: ``deltatune serve --model default --adapter a0=.. .. a7=..`` in a subprocess; for each
  client count C in ``--clients``, C concurrent streaming clients (httpx) send ``--requests``
  requests between them (each client sends its next request when the previous one ends). Measured
  at the client: total generated tokens / wall time, requests/s, time to first token (TTFT: request
  sent -> first content chunk) and inter-token latency (ITL: gap between chunks / tokens in the
  chunk), p50 and p99.
- naive: the same requests one after another through HF peft (``PeftModel`` with the same 8 adapter
  files, ``set_adapter`` then ``generate``), in this process: throughput from the sum of the
  per-request times. Its latency with C concurrent clients is not measured but follows from
  serving one at a time: a request waits for the C-1 ahead of it, so its latency is about
  C x the mean request time (reported as such, ``latency_p99_s_computed``).

Writes benchmarks/results/serve_http.json (figures, ratio against the issue's 4x target, machine
info, the command) and serve_http.png (throughput and p99 latency against concurrent clients).

    .venv/bin/python benchmarks/serve_http.py [--clients 1,8,32,64] [--requests 64] [--new-tokens 32]
        [--max-num-seqs 64] [--threads N] [--naive-requests 64]
    .venv/bin/python benchmarks/serve_http.py --replot
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mixed_adapters  # noqa: E402  (PROMPTS, make_adapters, machine_info)

import deltatune  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET = 4.0  # issue 14: at least 4x the naive server's throughput


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def plan(n: int, adapters: int) -> list[dict]:
    return [{"model": f"a{i % adapters}", "prompt": mixed_adapters.PROMPTS[i % len(mixed_adapters.PROMPTS)]}
            for i in range(n)]


# -- deltatune serve ------------------------------------------------------------------------------
def start_server(adapter_dirs: list[Path], max_num_seqs: int, threads: int, log: Path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    args = [a for i, d in enumerate(adapter_dirs) for a in ("--adapter", f"a{i}={d}")]
    proc = subprocess.Popen([sys.executable, "-m", "deltatune", "serve", "--model", "default", "--port", "0",
                             "--log-level", "warning", "--max-num-seqs", str(max_num_seqs),
                             "--max-waiting", "1024", "--dtype", "float32", *args],
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env)
    line = proc.stdout.readline()
    match = re.search(r"listening on (http://\S+)", line)
    if not match:
        proc.kill()
        sys.exit(f"serve_http: the server did not start:\n{log.read_text()}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, match.group(1)


async def one_request(http, url: str, req: dict, new_tokens: int) -> dict:
    body = {"model": req["model"], "messages": [{"role": "user", "content": req["prompt"]}],
            "max_tokens": new_tokens, "ignore_eos": True, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if not chunk["choices"] or not chunk["choices"][0]["delta"].get("content"):
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
    done = time.perf_counter()
    return {"ttft": first - sent, "gaps": gaps, "tokens": tokens, "latency": done - sent}


async def run_load(url: str, requests: list[dict], clients: int, new_tokens: int) -> dict:
    import httpx

    todo = list(requests)
    results = []

    async def client(http):
        while todo:
            results.append(await one_request(http, url, todo.pop(0), new_tokens))

    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in results)
    # ITL: gaps between content chunks (one token each, unless a stop-string check held text back)
    itl = [g for r in results for g in r["gaps"]]
    assert all(r["tokens"] == new_tokens for r in results), [r["tokens"] for r in results]
    ttft = [r["ttft"] for r in results]
    latency = [r["latency"] for r in results]
    return {"clients": clients, "requests": len(results), "seconds": round(wall, 3),
            "tokens": tokens, "tokens_per_s": round(tokens / wall, 2), "requests_per_s": round(len(results) / wall, 3),
            "ttft_p50_s": round(percentile(ttft, 50), 4), "ttft_p99_s": round(percentile(ttft, 99), 4),
            "itl_p50_s": round(percentile(itl, 50), 4), "itl_p99_s": round(percentile(itl, 99), 4),
            "latency_p50_s": round(percentile(latency, 50), 3), "latency_p99_s": round(percentile(latency, 99), 3)}


def scrape(url: str) -> dict:
    import httpx

    from deltatune.serving.metrics import parse_text

    return parse_text(httpx.get(f"{url}/metrics", timeout=30).text)


# -- naive: peft generate, one request after another --------------------------------------------
def run_naive(adapter_dirs: list[Path], requests: list[dict], new_tokens: int) -> dict:
    import peft

    base = deltatune.models.load_default(dtype=torch.float32)
    tokenizer = deltatune.models.load_default_tokenizer()
    model = peft.PeftModel.from_pretrained(base, str(adapter_dirs[0]), adapter_name="a0")
    for i, d in enumerate(adapter_dirs[1:], 1):
        model.load_adapter(str(d), adapter_name=f"a{i}")
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    times = []
    for req in requests:
        text = tokenizer.apply_chat_template([{"role": "user", "content": req["prompt"]}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        start = time.perf_counter()
        model.set_adapter(req["model"])
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        times.append(time.perf_counter() - start)
        assert out.shape[1] - ids["input_ids"].shape[1] == new_tokens
    total = sum(times)
    mean = total / len(times)
    return {"requests": len(times), "seconds": round(total, 3), "tokens": new_tokens * len(times),
            "tokens_per_s": round(new_tokens * len(times) / total, 2), "requests_per_s": round(len(times) / total, 3),
            "request_mean_s": round(mean, 3), "request_p99_s": round(percentile(times, 99), 3)}


# -- report ----------------------------------------------------------------------------------------
def table(result: dict) -> str:
    rows = ["| clients | tokens/s | requests/s | TTFT p50 / p99 (s) | ITL p50 / p99 (s) | latency p99 (s) | vs naive |",
            "|---|---|---|---|---|---|---|"]
    naive = result["naive"]
    for r in result["server"]:
        rows.append(f"| {r['clients']} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                    f"{r['ttft_p50_s']:.3f} / {r['ttft_p99_s']:.3f} | {r['itl_p50_s']:.3f} / {r['itl_p99_s']:.3f} | "
                    f"{r['latency_p99_s']:.2f} | {r['tokens_per_s'] / naive['tokens_per_s']:.2f}x |")
    rows.append(f"| naive (peft generate, one at a time) | {naive['tokens_per_s']:.1f} | {naive['requests_per_s']:.2f} "
                f"| | | {naive['request_mean_s']:.2f} x clients | 1x |")
    return "\n".join(rows)


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    server, naive = result["server"], result["naive"]
    clients = [r["clients"] for r in server]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(clients, [r["tokens_per_s"] for r in server], "o-", label="deltatune serve")
    left.axhline(naive["tokens_per_s"], color="tab:red", ls="--", label="naive: peft generate, one at a time")
    left.axhline(TARGET * naive["tokens_per_s"], color="grey", ls=":", label=f"{TARGET:g}x naive (issue 14)")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="generated tokens/s", title="throughput")
    left.set_xticks(clients, [str(c) for c in clients])
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    right.plot(clients, [r["latency_p99_s"] for r in server], "o-", label="deltatune serve: request p99")
    right.plot(clients, [r["ttft_p99_s"] for r in server], "s--", label="deltatune serve: TTFT p99")
    right.plot(clients, [c * naive["request_mean_s"] for c in clients], "x:", color="tab:red",
               label="naive: request p99 (computed: clients x mean request time)")
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="seconds", title="p99 latency")
    right.set_xticks(clients, [str(c) for c in clients])
    right.legend(fontsize=8, loc="upper left")
    setup, machine = result["setup"], result["machine"]
    fig.suptitle(f"{setup['model']}, {setup['adapters']} LoRA adapters, {setup['new_tokens']} tokens per request, "
                 f"fp32 CPU, {setup['threads']} thread(s) each side ({machine['cpu_count']} cores, load average "
                 f"{machine['load_average_1min_end']} at the end)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,8,32,64", help="concurrent client counts, comma-separated")
    ap.add_argument("--requests", type=int, default=64,
                    help="requests at each client count: max(this, clients); the 64-client figure uses 64")
    ap.add_argument("--naive-requests", type=int, default=64, help="requests run through peft one at a time")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64, help="the server's running batch")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, each side")
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON")
    args = ap.parse_args()
    out_json, out_png = RESULTS / "serve_http.json", RESULTS / "serve_http.png"
    if args.replot:
        chart(json.loads(out_json.read_text()), out_png)
        return
    torch.set_num_threads(args.threads)
    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        base = deltatune.models.load_default(dtype=torch.float32)
        dirs = mixed_adapters.make_adapters(base, args.adapters, args.rank, workdir, b_std=0.02)
        del base
        proc, url = start_server(dirs, args.max_num_seqs, args.threads, workdir / "server.log")
        try:
            asyncio.run(run_load(url, plan(4, args.adapters), 4, 4))  # warm-up
            server = []
            for c in clients:
                r = asyncio.run(run_load(url, plan(max(args.requests, c), args.adapters), c, args.new_tokens))
                print(f"deltatune serve, {c:>3} clients: {r['tokens_per_s']:7.1f} tokens/s  "
                      f"TTFT p50 {r['ttft_p50_s']:.3f}s  ITL p50 {r['itl_p50_s']:.3f}s", flush=True)
                server.append(r)
            metrics = scrape(url)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        naive = run_naive(dirs, plan(args.naive_requests, args.adapters), args.new_tokens)
        print(f"naive peft generate: {naive['tokens_per_s']:.1f} tokens/s", flush=True)
    main_row = next((r for r in server if r["clients"] == 64), server[-1])
    ratio = main_row["tokens_per_s"] / naive["tokens_per_s"]
    result = {
        "setup": {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "adapters": args.adapters,
                  "rank": args.rank, "new_tokens": args.new_tokens, "requests": args.requests,
                  "max_num_seqs": args.max_num_seqs, "threads": args.threads, "clients": clients},
        "server": server, "naive": naive,
        "target": {"what": f"{main_row['clients']} clients: >= {TARGET:g}x the naive server's tokens/s",
                   "ratio": round(ratio, 2), "met": ratio >= TARGET},
        "server_metrics_end": {k: v for k, v in metrics.items() if "bucket" not in k},
        "machine": mixed_adapters.machine_info(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    chart(result, out_png)
    print(table(result))
    print(f"\n{result['target']['what']}: {ratio:.2f}x ({'met' if ratio >= TARGET else 'not met'})")


if __name__ == "__main__":
    main()
