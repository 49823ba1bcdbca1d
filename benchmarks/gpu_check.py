"""The GPU check (issue 26): every CUDA path of deltatune, run in one go, under 8 minutes on one GPU.

    make gpu-check                       # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --only engine qlora --out /tmp/gpu.json

Parts, in order (each in its own try: one failing part is recorded and the others still run):

- ``cuda_tests``: ``pytest -m cuda tests`` (the tests marked ``cuda``);
- ``train``: ``train_throughput.py``'s children on the GPU, one after the other: HF peft + Trainer
  (``bf16=True``) and deltatune (bf16), same data, LoRA, steps and seed; tokens/s, peak GPU memory,
  eval loss and exact match of each;
- ``engine``: deltatune's serving ``Engine`` against HF ``generate`` (peft ``adapter_names`` for
  the adapters) in bf16: 32 chat prompts x 32 greedy tokens, base and 8 distinct adapters,
  tokens/s and rows equal;
- ``vllm``: where ``import vllm`` works (its CUDA build), ``vllm_probe.py`` in a subprocess on the
  same prompts and adapters, tokens/s against the engine's and rows equal to the engine's;
- ``qlora``: bitsandbytes' CUDA kernels: an NF4 layer's forward + backward and a few QLoRA
  training steps (``benchmarks/qlora.py``'s configuration), against deltatune's CPU NF4 figures
  in ``benchmarks/results/qlora.json``;
- ``fsdp``: with two GPUs, ``torchrun --nproc_per_node 2 -m deltatune train --fsdp`` (NCCL).

Without CUDA (or with ``--dry-run``) it is a dry run: every part is ``skipped`` with its reason,
and each still exercises its own plumbing (the engine and QLoRA parts run their code on the CPU
with a tiny random model; the others build and parse their commands, the tests are collected).
Writes one JSON (default benchmarks/results/gpu_check.json; gpu_check_dry_run.json for a dry run)
and prints a short table. The exit status is 1 if a part failed, else 0: a dry run exits 0 when
every part's plumbing worked (a part whose dry-run code raises is ``failed``, as on a GPU).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
RESULTS = REPO / "benchmarks" / "results"
PARTS = ("cuda_tests", "train", "engine", "vllm", "qlora", "fsdp")

import torch  # noqa: E402


class Skip(Exception):
    """A part that cannot run here; the message is the reason. ``dry_run``: what was checked instead."""

    def __init__(self, reason: str, dry_run: dict | None = None) -> None:
        super().__init__(reason)
        self.dry_run = dry_run


class Check:
    """What the parts share: where to run, the scratch directory, results earlier parts left."""

    def __init__(self, args, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self.dry = args.dry_run or self.gpus == 0
        self.device = "cpu" if self.dry else "cuda"
        self.dtype = torch.float32 if self.dry else torch.bfloat16
        self.no_cuda = ("--dry-run given" if args.dry_run else
                        f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}: "
                        "torch.cuda.is_available() is False)")
        self.shared: dict = {}
        self.hard_stop = time.perf_counter() + args.budget + 60   # a part started late still ends in time

    def timeout(self, most: float) -> float:
        """Seconds a subprocess may take: ``most``, less if the check's time is nearly spent."""
        return max(10.0, min(most, self.hard_stop - time.perf_counter()))

    def skip_if_dry(self, dry_run: dict) -> None:
        if self.dry:
            raise Skip(self.no_cuda, dry_run)


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})))


# -- the parts ------------------------------------------------------------------------------------------

def part_cuda_tests(c: Check) -> dict:
    if c.dry:  # the marker is registered and selects tests/test_cuda.py's tests
        proc = _run([sys.executable, "-m", "pytest", "tests/test_cuda.py", "-m", "cuda", "--collect-only", "-q",
                     "-p", "no:cacheprovider"], timeout=120)
        raise Skip(c.no_cuda, {"collected_cuda_tests": _collected(proc.stdout), "pytest_rc": proc.returncode})
    proc = _run([sys.executable, "-m", "pytest", "tests", "-m", "cuda", "-q", "-rfs", "-p", "no:cacheprovider"],
                timeout=c.timeout(300))
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", proc.stdout)}
    return {"status": "ok" if proc.returncode == 0 else "failed", "counts": counts, "pytest_rc": proc.returncode,
            "output_tail": proc.stdout[-3000:]}


def _collected(stdout: str) -> int:
    """Tests pytest's ``--collect-only`` listed: node ids (``-q``) or ``path: N`` lines (``-qq``)."""
    ids = [ln for ln in stdout.splitlines() if "::" in ln]
    return len(ids) or sum(int(n) for n in re.findall(r"^\S+\.py: (\d+)$", stdout, flags=re.M))


def part_train(c: Check) -> dict:
    import train_throughput as tt

    names = ["hf-bf16", "deltatune-bf16"]
    args = tt.parse_args(["--steps", str(c.args.train_steps), "--batch", "8", "--eval-n", "50", "--exact-match",
                          "--device", c.device, "--only", *names, "--timeout", str(int(c.timeout(180)))])
    tmp = c.workdir / "train"
    tmp.mkdir()
    tt.write_subsets(args, tmp)
    commands = {n: tt.child_command(n, args, None, tmp)[0] for n in names}
    for argv in commands.values():  # the children's own parser accepts what the parent builds
        tt.parse_args(argv[argv.index(tt.__file__) + 1:])
    c.skip_if_dry({"child_commands_parse": True, "contenders": names})
    results = {n: tt.run_child(n, args, None, tmp) for n in names}
    hf, dt = (results[n] for n in names)
    keep = ("tokens_per_s", "train_s", "peak_gpu_mb", "peak_rss_mb", "eval_loss", "exact_match", "mfu", "dtype")
    return {"status": "ok", "steps": args.steps, "batch": args.batch,
            "results": {n: {k: r.get(k) for k in keep} for n, r in results.items()},
            "speed_ratio": dt["tokens_per_s"] / hf["tokens_per_s"],
            "gpu_memory_ratio": dt["peak_gpu_mb"] / hf["peak_gpu_mb"]}


def part_engine(c: Check) -> dict:
    import gpu_parts

    quick = c.dry
    sizes = dict(prompts=4, new_tokens=4, adapters=2, reps=1) if quick else dict(prompts=32, new_tokens=32, adapters=8)
    out = gpu_parts.engine_vs_generate(c.device, c.dtype, c.workdir, quick=quick, **sizes)
    c.shared["engine"] = out
    summary = {k: out[k] for k in ("tokens_per_s", "engine_over_hf", "rows_equal_hf", "prompts", "new_tokens",
                                   "adapters", "dtype")}
    c.skip_if_dry({"cpu_tiny_model": summary})
    return {"status": "ok", **summary}


def part_vllm(c: Check) -> dict:
    import vllm_probe

    engine = c.shared.get("engine")
    dirs = engine["adapter_dirs"] if engine else []
    probe_args = ["--dtype", "bfloat16", "--cuda-graphs", "--gpu-memory-utilization", "0.5", "--prompts",
                  str(engine["prompts"] if engine else 32), "--new-tokens", str(engine["new_tokens"] if engine else 32),
                  *(["--adapters", *dirs, "--configs", f"0,{len(dirs)}"] if dirs else []), "--out",
                  str(c.workdir / "vllm.json")]
    vllm_probe.parse_args(probe_args)
    importable = importlib.util.find_spec("vllm") is not None
    c.skip_if_dry({"probe_args_parse": True, "vllm_importable": importable})
    if not importable:
        raise Skip("vllm is not importable in this Python (its CUDA build: pip install vllm)")
    if engine is None:
        raise Skip("the engine part did not run, so there is nothing to compare vLLM with")
    from deltatune import models

    torch.cuda.empty_cache()  # vLLM sizes its cache from the free GPU memory
    proc = _run([sys.executable, str(REPO / "benchmarks" / "vllm_probe.py"), "--model", str(models.default_model_path()),
                 *probe_args], timeout=c.timeout(300))
    if proc.returncode != 0:
        raise RuntimeError(f"vllm_probe.py failed:\n{proc.stderr[-3000:]}")
    runs = json.loads((c.workdir / "vllm.json").read_text())["runs"]
    configs = {"base": "base", str(len(dirs)): str(engine["adapters"])}
    return {"status": "ok", "vllm_tokens_per_s": {k: r["tokens_per_s"] for k, r in runs.items()},
            "engine_over_vllm": {k: engine["tokens_per_s"][f"{e}|deltatune"] / runs[k]["tokens_per_s"]
                                 for k, e in configs.items()},
            "rows_equal_engine": {k: sum(a == b for a, b in zip(runs[k]["token_ids"], engine["engine_token_ids"][e]))
                                  for k, e in configs.items()}}


def part_qlora(c: Check) -> dict:
    import gpu_parts

    layer = gpu_parts.nf4_layer(c.device, c.dtype, quick=c.dry, reps=2 if c.dry else 20)
    steps = gpu_parts.qlora_steps(c.device, c.dtype, quick=c.dry, steps=2 if c.dry else 6)
    cpu = gpu_parts.cpu_qlora_reference()
    c.skip_if_dry({"cpu_tiny": {"nf4_layer": layer, "steps": steps}, "cpu_reference_found": cpu is not None})
    return {"status": "ok", "nf4_layer": layer, "steps": steps, "cpu_nf4_reference": cpu,
            "step_speedup_vs_cpu": cpu["step_s"] / steps["step_s"] if cpu else None}


def part_fsdp(c: Check) -> dict:
    from deltatune.cli import build_parser

    out = c.workdir / "fsdp"
    argv = ["train", "--data", str(REPO / "data" / "demo_train.jsonl"), "--fsdp", "--max-steps", "10",
            "--batch-size", "8", "--dtype", "bfloat16", "--device", "cuda", "--out", str(out),
            "--no-exact-match", "--no-progress", "--save-every", "0"]
    build_parser().parse_args(argv)
    c.skip_if_dry({"train_args_parse": True})
    if c.gpus < 2:
        raise Skip(f"needs 2 GPUs, found {c.gpus}")
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                 "-m", "deltatune", *argv], timeout=c.timeout(300))
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"status": "ok", "backend": "nccl", "processes": 2,
            **{k: summary.get(k) for k in ("steps", "tokens", "train_time_s", "tokens_per_s", "mfu", "final_loss")}}


# -- the runner -----------------------------------------------------------------------------------------

def run_part(name: str, c: Check) -> dict:
    t0 = time.perf_counter()
    try:
        out = globals()[f"part_{name}"](c)
    except Skip as s:
        out = {"status": "skipped", "reason": str(s), **({"dry_run": s.dry_run} if s.dry_run is not None else {})}
    except Exception as exc:  # one failing part must not hide the others
        out = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:3000],
               "traceback": traceback.format_exc()[-3000:]}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"{name}: {out['status']} ({out['seconds']:.0f} s)" + (f": {out['reason']}" if "reason" in out else "")
          + (f": {out['error'][:300]}" if "error" in out else ""), flush=True)
    return out


def headline(name: str, r: dict) -> str:
    """One line of figures for the table."""
    if r["status"] != "ok":
        return r.get("reason") or r.get("error", "")[:120]
    if name == "cuda_tests":
        return ", ".join(f"{n} {k}" for k, n in r["counts"].items())
    if name == "train":
        return f"deltatune / peft+Trainer: {r['speed_ratio']:.2f}x tokens/s, {r['gpu_memory_ratio']:.2f}x peak GPU memory"
    if name == "engine":
        return ", ".join(f"{k}: {v:.2f}x HF generate ({r['rows_equal_hf'][k]}/{r['prompts']} rows equal)"
                         for k, v in r["engine_over_hf"].items())
    if name == "vllm":
        return ", ".join(f"{k}: engine {v:.2f}x vLLM ({r['rows_equal_engine'][k]} rows equal)"
                         for k, v in r["engine_over_vllm"].items())
    if name == "qlora":
        speed = f", {r['step_speedup_vs_cpu']:.1f}x the CPU NF4 step" if r["step_speedup_vs_cpu"] else ""
        return f"NF4 fwd+bwd {r['nf4_layer']['fwd_bwd_ms']:.2f} ms, step {r['steps']['step_s'] * 1e3:.0f} ms{speed}"
    if name == "fsdp":
        return f"{r['tokens_per_s']:,.0f} tokens/s over 2 GPUs"
    return ""


def table(results: dict) -> str:
    lines = ["| part | status | seconds | figures / reason |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['status']} | {r['seconds']:.0f} | {headline(n, r)} |" for n, r in results.items()]
    return "\n".join(lines)


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpus": os.cpu_count(), "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if info["gpus"]:
        info["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(info["gpus"])]
    for lib in ("transformers", "peft", "bitsandbytes", "vllm"):
        spec = importlib.util.find_spec(lib)
        info[lib] = None if spec is None else _version(lib)
    return info


def _version(lib: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(lib)
    except PackageNotFoundError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--dry-run", action="store_true", help="skip every CUDA part even where CUDA is available")
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--budget", type=float, default=420,
                    help="seconds; parts not started by then are skipped (default 420: the check stays under 8 min)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/gpu_check.json, or gpu_check_dry_run.json)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        check = Check(args, Path(tmp))
        print(f"gpu_check: {'DRY RUN, ' + check.no_cuda if check.dry else f'{check.gpus} GPU(s)'}", flush=True)
        results = {}
        for name in args.only:
            spent = time.perf_counter() - t0
            if spent > args.budget:  # keep the whole check inside its 8 minutes
                results[name] = {"status": "skipped", "seconds": 0.0,
                                 "reason": f"time budget spent ({spent:.0f} s of --budget {args.budget:.0f} s)"}
                print(f"{name}: skipped: {results[name]['reason']}", flush=True)
                continue
            results[name] = run_part(name, check)
    md = table(results)
    print("\n" + md)
    out = Path(args.out) if args.out else RESULTS / ("gpu_check_dry_run.json" if check.dry else "gpu_check.json")
    from deltatune.checkpoint.io import atomic_write_json

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, {"dry_run": check.dry, "machine": machine(), "parts": results, "order": list(results),
                            "table": md,
                            "seconds": round(time.perf_counter() - t0, 1),
                            "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)})
    print(f"wrote {out}")
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
