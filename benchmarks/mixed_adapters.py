"""Generation throughput with many LoRA adapters in one batch: deltatune vs HF peft, one run.

The yardstick of issue 15 ("Figures to reach"). N LoRA adapters (r=16, alpha=32 on
q/k/v/o_proj, random factors from fixed seeds) are made once with deltatune and saved; the SAME
files are loaded into both libraries on copies of the default model (SmolLM2-135M-Instruct, in
``--dtype``: float32 by default, or bfloat16).
Each configuration generates ``--new-tokens`` tokens (greedy, all of them forced) for ``--prompts``
short chat prompts in one left-padded batch:

- ``base``: the base model alone, HF ``generate`` (no PEFT wrapper);
- ``1 (active)``: one adapter, the active one, no ``adapter_names``;
- ``k`` for each k in ``--adapters``: ``generate(..., adapter_names=[...])`` with k distinct
  adapters in the batch (row j uses adapter ``a{j % k}``; k=1 is every row on ``a0``).

Timing: one warm-up generate per configuration and library, then ``--reps`` rounds; within a
round every configuration runs once per library, libraries alternating (so machine noise hits
both alike); the figure is the median. tokens/s = prompts x new tokens / seconds.

Dtypes: ``--dtype`` sets the base model of both libraries. The adapters then take the dtype each
library gives them by default when loaded onto such a base (today both keep LoRA factors in fp32
on a bf16 base: peft through ``autocast_adapter_dtype=True``, deltatune because it creates its
factor layers in torch's default dtype; each library then computes the delta in fp32 and adds it,
cast to bf16, to the bf16 base output). The run records both libraries' adapter and
base dtypes in the JSON (``setup.dtypes``) and exits non-zero if the two libraries' adapter dtypes
differ, since the race would then compare different arithmetic.

Correctness, same run, before timing: per configuration, deltatune's generated token ids are
compared with peft's, row by row, and the largest absolute difference between the two libraries'
first-step logits is recorded per row (``tokens_match`` in the JSON).

- float32: every row must match (the libraries differ at most in summation order, far below the
  gap between greedy candidates short of an exact tie); any mismatch exits non-zero.
- bfloat16: rows may legitimately differ, and do, so matching rows are reported, not required.
  bf16 keeps 8 bits of mantissa: recomputing the bf16 base's first-step logits in fp32 (same
  weights) moves them by ~0.4 (median row's largest change; logits reach ~35). The libraries round
  differently where they do not run the same arithmetic: for the active adapter peft adds the fp32
  delta to the base output in fp32 and rounds once, deltatune rounds the delta to bf16 and then
  the sum. Greedy decoding flips wherever the top two candidates are closer than that noise (even
  one library's prefill and its token-by-token decode disagree on ~3.5% of positions in bf16), and
  a row's text diverges from its first flip, so over 32 tokens most rows can differ (measured: 8 of
  32 rows equal for the active adapter; 32 of 32 with ``adapter_names``, where both libraries round
  the delta before adding). A row count cannot separate that from a bug (the adapters change the
  text of ~97% of the rows, ``rows_changed_by_adapters``, so a bug leaves few rows equal too), so
  the bf16 check is on the first-step logits instead: per row the largest ``|deltatune - peft|``
  and, for scale, the largest change the adapter makes against the base (``adapter_effect``). The
  run fails if, in some configuration, the median row's library difference exceeds half the median
  row's adapter effect. Bugs planted on one side gave 1.0 (delta skipped), 1.48 (each row routed to
  the next adapter) and 1.2 (scaling doubled); bf16 rounding gave 0.32 (0.44 against 1.38, active
  adapter) and 0 in the mixed configurations. 0.5 sits between the two.

Writes benchmarks/results/mixed_adapters.json (figures, ratios against the issue's targets, dtypes,
the token check, machine info, the command) and mixed_adapters.png (tokens/s against the number of
distinct adapters in the batch, one line per library, the base as a dashed line); with ``--dtype
bfloat16`` mixed_adapters_bf16.json and .png. Prints a markdown table.

    .venv/bin/python benchmarks/mixed_adapters.py [--reps 3] [--prompts 32] [--new-tokens 32]
        [--adapters 1,8,32] [--rank 16] [--threads N] [--profile] [--dtype float32|bfloat16]
    .venv/bin/python benchmarks/mixed_adapters.py --quick      # tiny random Llama, seconds
    .venv/bin/python benchmarks/mixed_adapters.py --replot [--dtype bfloat16]  # PNG from the JSON

On a shared CPU (other processes busy) use ``--threads 1``: multi-threaded kernels stall in their
barriers whenever another process takes a core (here 2 threads ran 8x slower than 1 under load).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

import torch  # noqa: E402

import deltatune  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LIBRARIES = ["deltatune", "peft"]
# std of the random B factors: the adapters change the text, generations stay sensible. The tiny
# --quick model needs larger factors before its (random) greedy tokens change at all.
B_STD = {"default": 0.02, "quick": 1.0}
# --dtype -> (torch dtype, short name in the JSON, chart and file names)
DTYPES = {"float32": (torch.float32, "fp32"), "bfloat16": (torch.bfloat16, "bf16")}
# bf16 only: the most the libraries' first-step logits may differ, as a fraction of the adapter's
# effect on them (medians over rows); see the docstring
BF16_MAX_DIFF_OVER_EFFECT = 0.5

PROMPTS = [
    "Give me three tips for a good night's sleep.",
    "What is the capital of Australia?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis to a ten-year-old.",
    "How do I boil an egg?",
    "Translate 'good morning' into French.",
    "Name a famous painting by Vincent van Gogh.",
    "Why is the sky blue?",
    "Suggest a name for a grey cat.",
    "What does a compiler do?",
    "List four fruits that are red.",
    "Write one sentence about the ocean.",
    "How many legs does a spider have?",
    "What is 12 times 7?",
    "Describe a rainy day in two sentences.",
    "Recommend a book for a long train ride.",
    "What is the difference between weather and climate?",
    "Tell me a short joke about computers.",
    "How do plants drink water?",
    "Write a polite email subject line asking for a meeting.",
    "What is the boiling point of water at sea level?",
    "Give an example of a renewable energy source.",
    "Summarise the story of Cinderella in one sentence.",
    "What should I pack for a day of hiking?",
    "Explain what a prime number is.",
    "Who wrote Romeo and Juliet?",
    "How can I improve my handwriting?",
    "What is a good breakfast before running?",
    "Describe the taste of a lemon.",
    "Why do we have seasons?",
    "Write a two-line poem about the moon.",
    "What is the largest planet in our solar system?",
]


# -- setup ---------------------------------------------------------------------------------------
def load_base(quick: bool, dtype: torch.dtype):
    """The default model in ``dtype``, or with ``--quick`` a tiny random Llama with the same vocabulary."""
    tokenizer = deltatune.models.load_default_tokenizer()
    if not quick:
        return deltatune.models.load_default(dtype=dtype), tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval(), tokenizer


def make_batch(tokenizer, n: int) -> dict:
    """``n`` chat prompts (cycling through PROMPTS) through the chat template, left padded."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                           add_generation_prompt=True, tokenize=False) for i in range(n)]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def make_adapters(base, n: int, rank: int, workdir: Path, b_std: float) -> list[Path]:
    """Save ``n`` LoRA adapters with random factors (adapter i from seed i) with deltatune.

    A is uniform in +-1/sqrt(in) (nn.Linear's default range), B normal with std ``b_std``. One wrapped
    copy of the base is reused: its factors are overwritten before each save.
    """
    cfg = deltatune.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = deltatune.get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    factors = [(name, p) for name, p in model.named_parameters()
               if (".lora_A." in name or ".lora_B." in name) and ".a0." in name]
    if not factors:
        sys.exit("mixed_adapters: found no lora_A/lora_B parameters of adapter 'a0' in deltatune's model")
    dirs = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in factors:
                if ".lora_A." in name:
                    bound = 1 / p.shape[-1] ** 0.5
                    p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * b_std)
        model.save_pretrained(workdir / f"a{i}")
        dirs.append(workdir / f"a{i}" / "a0")  # a non-"default" adapter is saved in a subfolder
    from safetensors.torch import load_file

    saved = load_file(dirs[-1] / "adapter_model.safetensors")
    b_norm = sum(float(t.norm()) for k, t in saved.items() if "lora_B" in k)
    if not b_norm:
        sys.exit(f"mixed_adapters: the saved adapter {dirs[-1]} has all-zero B factors")
    del model
    return dirs


def load_models(base, dirs: list[Path], libraries: list[str]) -> dict:
    """Each library's PeftModel on its own copy of ``base``, with every adapter a0..a{n-1} loaded."""
    import peft

    models = {}
    for lib in libraries:
        api = deltatune if lib == "deltatune" else peft
        model = api.PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[0]), adapter_name="a0")
        for i, d in enumerate(dirs[1:], start=1):
            model.load_adapter(str(d), adapter_name=f"a{i}")
        model.set_adapter("a0")
        models[lib] = model.eval()
    return models


def model_dtypes(models: dict) -> dict:
    """Per library: the dtypes of its LoRA factors and of the rest of its parameters (the base)."""
    out = {}
    for lib, model in models.items():
        lora, other = set(), set()
        for name, p in model.named_parameters():
            (lora if ".lora_A." in name or ".lora_B." in name else other).add(str(p.dtype).replace("torch.", ""))
        out[lib] = {"adapter": sorted(lora), "base": sorted(other)}
    return out


def configurations(adapters: list[int]) -> list[dict]:
    configs = [{"key": "base", "label": "base (HF generate, no PEFT)", "distinct": 0, "names": False},
               {"key": "1-active", "label": "1 adapter (active, no adapter_names)", "distinct": 1, "names": False}]
    for k in adapters:
        configs.append({"key": str(k), "label": f"{k} distinct adapter{'s' if k > 1 else ''} (adapter_names)",
                        "distinct": k, "names": True})
    return configs


def row_names(k: int, rows: int) -> list[str]:
    return [f"a{j % k}" for j in range(rows)]


def generate(model, batch: dict, new_tokens: int, names: list[str] | None, pad_id: int) -> torch.Tensor:
    """Greedy generate of exactly ``new_tokens`` tokens per row; returns only the new ids."""
    kwargs = {} if names is None else {"adapter_names": names}
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad_id, **kwargs)
    new = out[:, batch["input_ids"].shape[1]:]
    if new.shape[1] != new_tokens:
        raise RuntimeError(f"generate returned {new.shape[1]} new tokens, expected {new_tokens}")
    return new


def first_step_logits(model, batch: dict, names: list[str] | None, pad_id: int) -> torch.Tensor:
    """The logits of generate's first step (the prompt's last position), fp32, (rows, vocab)."""
    kwargs = {} if names is None else {"adapter_names": names}
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=pad_id,
                             return_dict_in_generate=True, output_logits=True, **kwargs)
    return out.logits[0].float()


def check_adapter_names(model, batch: dict, pad_id: int) -> None:
    """Exit with a clear message if deltatune's generate refuses ``adapter_names``."""
    small = {k: v[:2] for k, v in batch.items()}
    try:
        generate(model, small, 1, ["a0", "a1" if "a1" in model.peft_config else "a0"], pad_id)
    except Exception as exc:  # noqa: BLE001 - any refusal ends the run with its message
        sys.exit("mixed_adapters: deltatune's generate(..., adapter_names=[...]) failed, so mixed-adapter "
                 f"batches are not supported by this checkout yet:\n  {type(exc).__name__}: {exc}\n"
                 "Run with --libraries peft to measure the peft side alone.")


# -- measuring -----------------------------------------------------------------------------------
def runners(configs: list[dict], models: dict, base, batch: dict, new_tokens: int, pad_id: int) -> dict:
    """(config key, library) -> a zero-argument generate call."""
    rows = batch["input_ids"].shape[0]
    calls = {("base", "base"): lambda: generate(base, batch, new_tokens, None, pad_id)}
    for c in configs[1:]:
        names = row_names(c["distinct"], rows) if c["names"] else None
        for lib, model in models.items():
            calls[(c["key"], lib)] = (lambda m=model, n=names: generate(m, batch, new_tokens, n, pad_id))
    return calls


def compare(configs: list[dict], tokens: dict, logits: dict, libraries: list[str],
            exact: bool) -> tuple[dict, bool]:
    """Per adapter configuration: rows where deltatune's ids equal peft's, the per-row largest
    first-step logit difference between the libraries and, for scale, the adapter's own effect on
    the first-step logits against the base. ``ok`` is False when a configuration fails the dtype's
    criterion: ``exact`` (fp32) every row's tokens equal; otherwise (bf16) the median row's library
    difference at most BF16_MAX_DIFF_OVER_EFFECT of the median row's adapter effect."""
    match, ok = {}, True
    if len(libraries) < 2:
        return match, ok
    base_logits = logits[("base", "base")]
    for c in configs[1:]:
        a, b = tokens[(c["key"], "deltatune")], tokens[(c["key"], "peft")]
        same = (a == b).all(dim=1)
        diff = (logits[(c["key"], "deltatune")] - logits[(c["key"], "peft")]).abs().amax(dim=1)   # (rows,)
        effect = (logits[(c["key"], "deltatune")] - base_logits).abs().amax(dim=1)               # (rows,)
        ratio = float(diff.median() / effect.median()) if float(effect.median()) > 0 else float("inf")
        bad = [int(j) for j in (~same).nonzero().flatten()]
        entry = {"rows_matching": int(same.sum()), "rows": int(same.numel()),
                 "first_differing_position": {str(j): int((a[j] != b[j]).nonzero()[0]) for j in bad},
                 "first_step_max_abs_logit_diff": {"median": float(diff.median()), "max": float(diff.max()),
                                                   "per_row": [float(f"{v:.3g}") for v in diff.tolist()]},
                 "adapter_effect": {"median": float(effect.median()), "min": float(effect.min()),
                                    "max": float(effect.max())},
                 "diff_over_effect": ratio}
        entry["passed"] = bool(same.all()) if exact else ratio <= BF16_MAX_DIFF_OVER_EFFECT
        match[c["key"]] = entry
        line = (f"[check] {c['label']}: {entry['rows_matching']}/{entry['rows']} rows identical; first-step "
                f"logits, largest |deltatune - peft| per row: median {diff.median():.3g}, max {diff.max():.3g}; "
                f"adapter effect median {effect.median():.3g} (ratio {ratio:.2f})")
        if bad:
            line += f"; differing rows {bad[:10]}{'...' if len(bad) > 10 else ''} from position " + \
                str({j: entry["first_differing_position"][str(j)] for j in bad[:5]})
        if not entry["passed"]:
            ok = False
            line += ("  FAIL: tokens differ (fp32)" if exact else
                     f"  FAIL: ratio above {BF16_MAX_DIFF_OVER_EFFECT}")
        print(line, flush=True)
    return match, ok


def profile(call, label: str, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    text = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    print(f"\n[profile] {label}\n{text}", flush=True)
    return text


# -- output --------------------------------------------------------------------------------------
def ratios(tps: dict, adapters: list[int]) -> dict:
    """The issue's target ratios (deltatune) and peft's own for context (target None)."""
    dt, pf = tps.get("deltatune", {}), tps.get("peft", {})
    top, out = str(max(adapters)), {}

    def add(name, num, den, target=None):
        if num is not None and den is not None:
            out[name] = {"value": num / den, "target": target, "met": None if target is None else num / den >= target}

    add(f"deltatune {top}-adapter / deltatune 1-adapter (adapter_names)", dt.get(top), dt.get("1"), 0.8)
    add(f"deltatune {top}-adapter / deltatune 1-adapter (active)", dt.get(top), dt.get("1-active"), 0.8)
    add(f"deltatune {top}-adapter / peft {top}-adapter", dt.get(top), pf.get(top), 3.0)
    # the most any library can reach against peft without running faster than the base model alone
    add(f"ceiling of the previous: base / peft {top}-adapter", tps.get("base"), pf.get(top))
    add("deltatune 1-adapter (active, unmerged) / base", dt.get("1-active"), tps.get("base"), 0.95)
    add("deltatune 1-adapter (adapter_names) / base", dt.get("1"), tps.get("base"), 0.95)
    add(f"peft {top}-adapter / peft 1-adapter (adapter_names)", pf.get(top), pf.get("1"))
    add("peft 1-adapter (active) / base", pf.get("1-active"), tps.get("base"))
    return out


def table(result: dict) -> str:
    tps, sec, libs = result["tokens_per_s"], result["seconds"], result["setup"]["libraries"]
    head = "| configuration | " + " | ".join(f"{lib} tokens/s (s)" for lib in libs)
    lines = [head + (" | deltatune / peft |" if len(libs) == 2 else " |"),
             "|---|" + "---|" * (len(libs) + (len(libs) == 2))]
    base_cells = [f"{tps['base']:.1f} ({sec['base']:.2f})"] + ["(same base run)"] * (len(libs) - 1)
    end = " | |" if len(libs) == 2 else " |"
    lines.append(f"| {result['configs'][0]['label']} | " + " | ".join(base_cells) + end)
    for c in result["configs"][1:]:
        k = c["key"]
        cells = [f"{tps[lib][k]:.1f} ({sec[lib][k]:.2f})" for lib in libs]
        extra = f" | {tps['deltatune'][k] / tps['peft'][k]:.2f}x |" if len(libs) == 2 else " |"
        lines.append(f"| {c['label']} | " + " | ".join(cells) + extra)
    lines += ["", "| ratio | value | target | met |", "|---|---|---|---|"]
    for name, r in result["ratios"].items():
        target = "" if r["target"] is None else f">= {r['target']}"
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"| {name} | {r['value']:.3f} | {target} | {met} |")
    return "\n".join(lines)


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, tps = result["setup"], result["tokens_per_s"]
    ks = [c["distinct"] for c in result["configs"] if c["names"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors = {"deltatune": "#4c72b0", "peft": "#dd8452"}
    for lib in s["libraries"]:
        ys = [tps[lib][str(k)] for k in ks]
        ax.plot(ks, ys, marker="o", color=colors[lib], label=lib)
        for k, y in zip(ks, ys):
            ax.annotate(f"{y:.0f}", (k, y), textcoords="offset points", ha="center", fontsize=8,  # peft's below
                        xytext=(0, -12) if lib == "peft" else (0, 6))
    ax.axhline(tps["base"], color="grey", linestyle="--", label=f"base, no adapter ({tps['base']:.0f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(0, max([tps["base"]] + [max(v.values()) for lib, v in tps.items() if lib in s["libraries"]]) * 1.15)
    ax.set_xlabel("distinct adapters in the batch (generate(..., adapter_names=...))")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{s['model']}, LoRA r={s['rank']} q/k/v/o, {s['prompts']} prompts x {s['new_tokens']} "
                 f"tokens\ngreedy, {s['dtype']}, {s['device']}, {s['threads']} thread(s), median of {s['reps']}",
                 fontsize=9)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo's 'model name'), for results and captions."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    cpu = cpu_name()
    import peft
    import transformers

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "--short", "HEAD")
    changed = git("status", "--porcelain", "--", "deltatune")  # uncommitted library edits, if any
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "deltatune_commit": commit,
            "deltatune_uncommitted": changed.splitlines() if changed else [],
            "load_average_1min_end": round(os.getloadavg()[0], 2)}


# -- main ----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=None, help="timed rounds, median taken (default 3; --quick 1)")
    ap.add_argument("--prompts", type=int, default=32, help="rows in the batch")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens generated per row (default 32; --quick 8)")
    ap.add_argument("--adapters", default="1,8,32", help="distinct adapters per batch, comma-separated")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32",
                    help="dtype of both libraries' base model (default float32); bfloat16 writes "
                         "mixed_adapters_bf16.{json,png}")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--libraries", default="deltatune,peft",
                    help="'deltatune,peft' (default; tokens compared) or one of them alone")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, few tokens: a smoke check in seconds")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, print CPU profiles of deltatune's largest mixed batch and its 1-adapter run")
    ap.add_argument("--out", default=None, help="path stem for .json/.png (default benchmarks/results/"
                    "mixed_adapters, or mixed_adapters_bf16 with --dtype bfloat16; --quick: a temporary "
                    "directory)")
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON, nothing else")
    args = ap.parse_args()

    dtype, dtype_short = DTYPES[args.dtype]
    name = "mixed_adapters" if dtype == torch.float32 else f"mixed_adapters_{dtype_short}"
    if args.out:
        stem = Path(args.out)
    elif args.quick and not args.replot:
        stem = Path(tempfile.mkdtemp(prefix="mixed-adapters-quick-")) / name
    else:
        stem = RESULTS / name
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png")
    if args.replot:
        chart(json.loads(json_path.read_text()), png_path)
        print(f"wrote {png_path}")
        return

    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    new_tokens = args.new_tokens if args.new_tokens is not None else (8 if args.quick else 32)
    adapters = sorted({int(k) for k in args.adapters.split(",") if k.strip()})
    libraries = [lib.strip() for lib in args.libraries.split(",") if lib.strip()]
    if not adapters or adapters[0] < 1:
        sys.exit("--adapters: positive integers, e.g. 1,8,32")
    if not libraries or any(lib not in LIBRARIES for lib in libraries):
        sys.exit(f"--libraries: comma-separated, of {LIBRARIES}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from tqdm import tqdm

    started, load_start = time.perf_counter(), round(os.getloadavg()[0], 2)
    b_std = B_STD["quick" if args.quick else "default"]
    base, tokenizer = load_base(args.quick, dtype)
    base.eval()
    batch = make_batch(tokenizer, args.prompts)
    pad_id = tokenizer.pad_token_id
    with tempfile.TemporaryDirectory(prefix="mixed-adapters-") as tmp:
        dirs = make_adapters(base, max(adapters), args.rank, Path(tmp), b_std)
        models = load_models(base, dirs, libraries)
    print(f"[setup] {max(adapters)} adapters saved by deltatune and loaded into {', '.join(libraries)} "
          f"in {time.perf_counter() - started:.0f} s", flush=True)
    dtypes = model_dtypes(models)
    print("[setup] dtypes (adapter factors / base): "
          + "; ".join(f"{lib} {'+'.join(d['adapter'])} / {'+'.join(d['base'])}" for lib, d in dtypes.items()),
          flush=True)
    if len({tuple(d["adapter"]) for d in dtypes.values()}) > 1:
        sys.exit(f"mixed_adapters: the libraries hold the adapters in different dtypes ({dtypes}); the race "
                 "would compare different arithmetic")
    if "deltatune" in libraries:
        check_adapter_names(models["deltatune"], batch, pad_id)

    configs = configurations(adapters)
    calls = runners(configs, models, base, batch, new_tokens, pad_id)

    tokens = {}  # the warm-up's ids, compared across libraries
    for key, call in tqdm(calls.items(), desc="warm-up + check", leave=False):
        tokens[key] = call()
    rows = batch["input_ids"].shape[0]
    logits = {("base", "base"): first_step_logits(base, batch, None, pad_id)}
    for c in configs[1:]:
        for lib, model in models.items():
            names = row_names(c["distinct"], rows) if c["names"] else None
            logits[(c["key"], lib)] = first_step_logits(model, batch, names, pad_id)
    exact = dtype == torch.float32
    match, ok = compare(configs, tokens, logits, libraries, exact)
    if not ok:
        sys.exit("mixed_adapters: deltatune's generated tokens differ from peft's (greedy, fp32); see above" if exact
                 else "mixed_adapters: deltatune's first-step logits differ from peft's by more than "
                      f"{BF16_MAX_DIFF_OVER_EFFECT} of the adapter's effect (bf16); see above")
    active_vs_names = {lib: bool((tokens[("1-active", lib)] == tokens[("1", lib)]).all())
                       for lib in libraries if ("1", lib) in tokens}
    differs_from_base = float((tokens[(str(max(adapters)), libraries[0])] != tokens[("base", "base")]).any(1)
                              .float().mean())

    times = {key: [] for key in calls}
    order = list(calls)
    with tqdm(total=reps * len(order), desc="timing") as bar:
        for rep in range(reps):
            for c in configs:  # each configuration once per library, library order alternating per round
                keys = [k for k in order if k[0] == c["key"]]
                for key in (keys if rep % 2 == 0 else keys[::-1]):
                    t = time.perf_counter()
                    calls[key]()
                    times[key].append(time.perf_counter() - t)
                    bar.update(1)

    n_tok = args.prompts * new_tokens
    med = {key: statistics.median(ts) for key, ts in times.items()}
    seconds = {"base": med[("base", "base")]}
    seconds.update({lib: {c["key"]: med[(c["key"], lib)] for c in configs[1:]} for lib in libraries})
    tps = {"base": n_tok / seconds["base"]}
    tps.update({lib: {k: n_tok / s for k, s in seconds[lib].items()} for lib in libraries})

    profiles = {}
    if args.profile and "deltatune" in libraries:
        top = str(max(adapters))
        profiles[top] = profile(calls[(top, "deltatune")], f"deltatune, {top} distinct adapters")
        profiles["1-active"] = profile(calls[("1-active", "deltatune")], "deltatune, 1 adapter (active)")

    command = shlex.join([".venv/bin/python", os.path.relpath(__file__, ROOT)] + sys.argv[1:])
    result = {
        "setup": {"model": "tiny random Llama (--quick)" if args.quick else "SmolLM2-135M-Instruct",
                  "dtype": dtype_short, "dtypes": dtypes, "device": "cpu", "rank": args.rank,
                  "lora_alpha": 2 * args.rank,
                  "targets": TARGETS, "b_std": b_std, "prompts": args.prompts, "new_tokens": new_tokens,
                  "prompt_tokens_padded": int(batch["input_ids"].shape[1]), "adapters": adapters,
                  "reps": reps, "libraries": libraries, "threads": torch.get_num_threads(),
                  "timing": "median over reps of one generate per configuration and library, after one warm-up; "
                            "libraries interleaved within each round, order alternating",
                  "command": command, "load_average_1min_start": load_start, **machine_info(),
                  "total_runtime_s": round(time.perf_counter() - started, 1)},
        "configs": configs,
        "tokens_per_s": tps,
        "seconds": seconds,
        "all_seconds": {f"{k[1]}/{k[0]}": [round(t, 4) for t in ts] for k, ts in times.items()},
        "ratios": ratios(tps, adapters),
        "tokens_check": ("fp32: every row's generated ids equal between the libraries" if exact else
                         "bf16: rows reported, not required; per configuration the median row's largest "
                         "|deltatune - peft| first-step logit difference <= "
                         f"{BF16_MAX_DIFF_OVER_EFFECT} x the median row's largest adapter effect (adapter vs base)"),
        "tokens_match": match,
        "one_adapter_active_equals_adapter_names": active_vs_names,
        "rows_changed_by_adapters": differs_from_base,
        "sample": {"prompt": PROMPTS[0],
                   "base": tokenizer.decode(tokens[("base", "base")][0], skip_special_tokens=True),
                   "a0": tokenizer.decode(tokens[("1-active", libraries[0])][0], skip_special_tokens=True)},
    }
    if profiles:
        result["profiles"] = profiles
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    chart(result, png_path)
    s = result["setup"]
    print(f"\n{s['model']}, LoRA r={args.rank} on q/k/v/o, {args.prompts} prompts x {new_tokens} new tokens, "
          f"greedy {dtype_short}, {s['threads']} thread(s), median of {reps}; tokens/s (seconds per generate)\n")
    print(table(result))
    if match:
        print("\ntokens, rows where deltatune == peft: "
              + ", ".join(f"{k}: {v['rows_matching']}/{v['rows']}" for k, v in match.items())
              + "; first-step logits |deltatune - peft| max: "
              + ", ".join(f"{k}: {v['first_step_max_abs_logit_diff']['max']:.3g}" for k, v in match.items()))
    print(f"rows whose text the adapters change: {100 * differs_from_base:.0f}%")
    print(f"\nwrote {json_path} and {png_path.name} in {s['total_runtime_s']:.0f} s\n{command}")


if __name__ == "__main__":
    main()
