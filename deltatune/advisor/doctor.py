"""``doctor``: known PEFT mistakes in an adapter, a config or a training run, before they cost a run.

Each ``Finding`` has a severity (``error``: the result is wrong or wasted; ``warning``: likely worse
than it could be; ``info``: worth knowing), why it matters and the fix. The checks follow the
anti-patterns of the PEFT overview this project implements (rank too low, q/v-only targets, alpha
far from r..2r, a full model saved as an adapter, a 4-bit base next to a 16-bit copy) plus ones
seen in practice (bf16 on CPUs without bf16 units, learning rates far off, diverged runs).
"""
from __future__ import annotations

import json
import math
import struct
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from deltatune.advisor.shapes import ModelShape
from deltatune.merging import lora_scaling

SEVERITIES = ("error", "warning", "info")
# Usual peak learning rates with AdamW (order of magnitude; outside them runs diverge or barely move):
# LoRA/QLoRA 1e-4..2e-4 in the QLoRA paper (arXiv:2305.14314, appendix), 1e-5..1e-3 in common recipes;
# IA3 3e-3 (Liu et al. 2022, arXiv:2205.05638); prompt tuning 0.3 (Lester et al. 2021, arXiv:2104.08691);
# prefix tuning 5e-5..8e-4 (Li & Liang 2021, arXiv:2101.00190), 3e-2 best measured on the demo task
# with zero-initialised prefixes (README, "Virtual tokens"); P-tuning 1e-3 (peft's examples), 3e-3
# best on the demo task; full 1e-6..1e-4.
LR_RANGES = {"lora": (1e-5, 1e-3), "dora": (1e-5, 1e-3), "qlora": (1e-5, 1e-3), "adapter": (1e-5, 1e-3),
             "ia3": (1e-4, 3e-2), "prompt": (1e-3, 1.0), "prefix": (1e-5, 3e-2),
             "ptuning": (1e-4, 1e-2), "full": (1e-6, 1e-4)}
TINY_DATASET = 1000  # examples
MLP_NAMES = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "mlp")


@dataclass
class Finding:
    code: str
    severity: str
    message: str
    why: str
    fix: str

    def to_dict(self) -> dict:
        return asdict(self)


def render(findings: list[Finding]) -> str:
    if not findings:
        return "no known problems found"
    lines = []
    for f in sorted(findings, key=lambda f: SEVERITIES.index(f.severity)):
        lines += [f"[{f.severity}] {f.code}: {f.message}", f"    why: {f.why}", f"    fix: {f.fix}"]
    n = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
    lines.append(f"{n['error']} error(s), {n['warning']} warning(s), {n['info']} note(s)")
    return "\n".join(lines)


def emit(findings: list[Finding], stacklevel: int = 3) -> None:
    """Raise each error/warning finding as a Python warning (used where a run starts)."""
    for f in findings:
        if f.severity != "info":
            warnings.warn(f"deltatune doctor [{f.severity}] {f.code}: {f.message} Fix: {f.fix}", stacklevel=stacklevel)


# -- adapter config ----------------------------------------------------------------------------------

def check_adapter_config(cfg: dict, shape: ModelShape | None = None) -> list[Finding]:
    """Rank, alpha, rsLoRA and targets of a LoRA-family ``adapter_config.json`` mapping (peft keys)."""
    out: list[Finding] = []
    if str(cfg.get("peft_type", "LORA")).upper() not in ("LORA", "ADALORA", "LOHA", "LOKR"):
        return out + check_targets(cfg.get("target_modules"), shape)
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    if isinstance(r, (int, float)) and r <= 2:
        out.append(Finding("rank-too-low", "warning", f"r={r}.",
                           "a rank of 1-2 leaves too few directions to learn most tasks: the run underfits",
                           "start at r = 8-32 (16 is a good default) and lower it only if eval says so"))
    if isinstance(r, (int, float)) and isinstance(alpha, (int, float)) and r > 0:
        rslora = bool(cfg.get("use_rslora"))
        scale = lora_scaling(alpha, r, rslora)
        if not rslora and not 0.5 <= alpha / r <= 4:
            out.append(Finding("alpha-off", "warning", f"lora_alpha={alpha} with r={r}: scaling alpha/r = {scale:.3g}.",
                               "the adapter's update is scaled by alpha/r; far from 1-2 (alpha = r..2r) the "
                               "effective learning rate is off by that factor and training is unstable or stalls",
                               f"set lora_alpha to {r}..{2 * r} (2r is the usual convention)"))
        if not rslora and r >= 64:
            out.append(Finding("rslora-advice", "info", f"r={r} without use_rslora.",
                               "with alpha/r scaling, high ranks learn slower (the update shrinks as 1/r); "
                               "rsLoRA's alpha/sqrt(r) keeps it stable (Kalajdzievski 2023, arXiv:2312.03732)",
                               "set use_rslora=true (and keep alpha near sqrt(r)..2*sqrt(r))"))
        if rslora and not 0.5 <= scale <= 8:
            out.append(Finding("alpha-off", "warning", f"rsLoRA scaling alpha/sqrt(r) = {scale:.3g}.",
                               "with rsLoRA the update is scaled by alpha/sqrt(r); far from ~1-4 the effective "
                               "learning rate is off by that factor",
                               f"set lora_alpha near {math.sqrt(r):.0f}..{2 * math.sqrt(r):.0f}"))
    return out + check_targets(cfg.get("target_modules"), shape)


def check_targets(target, shape: ModelShape | None) -> list[Finding]:
    """q/v-only targets, targets including the output head, and (with a base) targets matching nothing."""
    out: list[Finding] = []
    if target is None:
        return out
    names = [target] if isinstance(target, str) else list(target)
    if isinstance(target, (list, tuple, set)) and names and set(names) <= {"q_proj", "v_proj", "q", "v", "query", "value"}:
        out.append(Finding("qv-only", "warning", f"target_modules={sorted(names)}.",
                           "adapting only the query and value projections leaves most of the layer (k, o and "
                           "the MLP, ~80% of the weights) frozen; all attention and MLP projections learn "
                           "better at the same rank (QLoRA paper, arXiv:2305.14314, section 4)",
                           "target_modules='all-linear' (or q,k,v,o,gate,up,down_proj)"))
    heads = {"lm_head", "embed_out", "output", "score"}
    if any(n in heads for n in names) or (isinstance(target, str) and target != "all-linear" and "lm_head" in target):
        out.append(Finding("targets-head", "warning", "the output head is targeted.",
                           "the head maps to the whole vocabulary: a LoRA on it adds many parameters, "
                           "shifts every token's logit and, when tied to the embedding, changes the input too",
                           "leave lm_head out (peft's 'all-linear' excludes it); use modules_to_save if it "
                           "really must train"))
    if shape is not None and shape.kind == "causal-lm":
        matched = _match(target, shape)
        if not matched:
            out.append(Finding("targets-match-nothing", "error",
                               f"target_modules={target!r} matches no module of {shape.name}.",
                               "nothing would be adapted: get_peft_model fails, or an adapter loads and does nothing",
                               f"use names the model has: {', '.join(shape.block_linears())}"))
    return out


def _module_names(shape: ModelShape) -> list[str]:
    """Module names of a transformers Llama-style model with this shape."""
    names = ["model.embed_tokens", "lm_head"]
    for i in range(shape.layers):
        for n in shape.block_linears():
            part = "self_attn" if n in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            names.append(f"model.layers.{i}.{part}.{n}")
    return names


def _match(target, shape: ModelShape) -> list[str]:
    from deltatune.targeting import _matches

    linears = [n for n in _module_names(shape) if n != "model.embed_tokens"]
    if target == "all-linear":
        return [n for n in linears if n != "lm_head"]
    return [n for n in _module_names(shape) if _matches(target, n)]


# -- saved adapter -------------------------------------------------------------------------------------

def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, read from a safetensors header only (no tensor data)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def check_adapter_weights(directory: Path, cfg: dict) -> list[Finding]:
    """A full model saved where an adapter was meant: base-sized tensors or a model file in the directory."""
    out: list[Finding] = []
    full_files = [p.name for p in directory.glob("model*.safetensors")] + \
        [p.name for p in directory.glob("pytorch_model*.bin")]
    weights = directory / "adapter_model.safetensors"
    if full_files and not weights.is_file():
        out.append(Finding("full-model-saved", "error", f"{directory} holds {full_files[0]}, no adapter_model.safetensors.",
                           "a merged or full model was saved where an adapter was meant: gigabytes instead of "
                           "megabytes, and it cannot be loaded as an adapter",
                           "save the PeftModel itself (model.save_pretrained(dir)) before merge_and_unload()"))
        return out
    if not weights.is_file():
        return out
    r = cfg.get("r")
    saved = cfg.get("modules_to_save") or []
    big = []
    for name, shp in safetensors_shapes(weights).items():
        if any(f".{m}." in f".{name}" for m in saved):
            continue
        if len(shp) == 2 and isinstance(r, int) and r not in shp and min(shp) > 2 * r:
            big.append((name, shp))
    if big:
        numel = sum(a * b for _, (a, b) in big)
        out.append(Finding("full-model-saved", "error",
                           f"{len(big)} tensor(s) of base size in the adapter file ({big[0][0]} {big[0][1]}; "
                           f"{numel:,} parameters), none of them rank-{r} factors.",
                           "the adapter file carries base weights: it is as large as the model and overwrites "
                           "the base when loaded",
                           "save only the adapter (PeftModel.save_pretrained) or list those modules in "
                           "modules_to_save if they really are trained"))
    return out


# -- training config -------------------------------------------------------------------------------------

def check_training_config(cfg: dict, shape: ModelShape | None = None, n_examples: int | None = None) -> list[Finding]:
    """Checks of a ``deltatune train`` config mapping (TrainConfig keys), adapter checks included."""
    from deltatune.training.precision import cpu_has_native_bf16

    out: list[Finding] = []
    method = str(cfg.get("method", "lora"))
    quant = cfg.get("quantize")
    margs = cfg.get("method_args") or {}
    kind = "qlora" if quant and method == "lora" else ("dora" if margs.get("use_dora") else method)
    adapter = {"peft_type": "LORA" if method in ("lora", "dora") else method.upper(), "r": cfg.get("r", cfg.get("rank", 16)),
               "lora_alpha": cfg.get("alpha", 32), "use_rslora": margs.get("use_rslora", False),
               "target_modules": cfg.get("target", "all-linear")}
    if isinstance(adapter["target_modules"], str) and "," in adapter["target_modules"]:
        adapter["target_modules"] = [t.strip() for t in adapter["target_modules"].split(",")]
    out += check_adapter_config(adapter, shape)
    dtype, device = str(cfg.get("dtype", "auto")), str(cfg.get("device", "auto"))
    if dtype in ("bfloat16", "bf16") and device in ("cpu", "auto") and not cpu_has_native_bf16() and \
            not _cuda_available(device):
        out.append(Finding("bf16-on-cpu", "warning", "dtype bfloat16 on a CPU without native bf16 (no AVX512-BF16/AMX).",
                           "bf16 matmuls are emulated there and several times slower than fp32",
                           "dtype: float32 (or auto, which picks it on such CPUs)"))
    dropout = float(cfg.get("dropout", 0) or 0)
    if dropout > 0 and n_examples is not None and n_examples < TINY_DATASET:
        out.append(Finding("dropout-tiny-data", "warning", f"dropout {dropout} with {n_examples} training examples.",
                           "a run over a few hundred examples is a few dozen steps; adapter dropout then mostly "
                           "adds noise to a short optimisation rather than regularising it",
                           "dropout: 0, and watch eval loss for overfitting instead (stop early or use fewer epochs)"))
    lr = cfg.get("lr")
    if isinstance(lr, (int, float)) and kind in LR_RANGES:
        lo, hi = LR_RANGES[kind]
        if not lo / 3 <= lr <= hi * 3:
            out.append(Finding("lr-off", "warning", f"lr {lr:g} for {kind}; the usual range is {lo:g}..{hi:g}.",
                               "too high diverges (loss jumps or turns NaN), too low barely moves the adapter",
                               f"start near {math.sqrt(lo * hi):.0e} and adjust by watching the loss curve"))
    saved = margs.get("modules_to_save") or []
    if quant and saved:
        linear = [m for m in saved if m not in ("lm_head", "embed_tokens", "score", "classifier")]
        if linear:
            out.append(Finding("4bit-with-dense-copy", "warning",
                               f"quantize {quant} with modules_to_save {linear}.",
                               "each of these keeps a 16-bit trainable copy next to its 4-bit weights: the memory "
                               "QLoRA saves is spent again (the 'QLoRA + bf16 base' mistake)",
                               "adapt those modules with LoRA (target them) instead of saving full copies"))
    return out


def _cuda_available(device: str) -> bool:
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def check_model(model) -> list[Finding]:
    """Model-level checks: a 4-bit base next to a dense copy of the same weights."""
    from deltatune.quant import check_dense_copies, is_4bit

    if not any(is_4bit(m) for m in model.modules()):
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copies = check_dense_copies(model)
    if not copies:
        return []
    return [Finding("4bit-with-dense-copy", "error",
                    f"{len(copies)} dense parameter(s) duplicate 4-bit weights (e.g. {copies[0][0]} ~ {copies[0][1]}).",
                    "a 4-bit base with a 16-bit copy of the same weights uses more memory than the 16-bit model alone",
                    "keep one: quantize in place, or drop the dense copy (another reference to the original model)")]


# -- training run -------------------------------------------------------------------------------------

def check_losses(losses: list[float]) -> list[Finding]:
    """A loss that diverged (NaN/inf, or ended far above its best) or stopped falling."""
    if len(losses) < 4:
        return []
    if any(not math.isfinite(x) for x in losses):
        first = next(i for i, x in enumerate(losses) if not math.isfinite(x))
        return [Finding("loss-diverged", "error", f"loss became {losses[first]} at logged step {first + 1}.",
                        "the weights are now NaN/inf: everything after that step is wasted",
                        "lower the learning rate (2-10x), keep gradient clipping on (max_grad_norm 1), use warmup")]
    best = min(losses)
    third = max(2, len(losses) // 3)
    head, tail = losses[:third], losses[-third:]
    start = sum(head) / len(head)
    end = sum(tail) / len(tail)
    gained = start - best
    if end > start * 1.05 or (gained > 0 and end - best > 0.5 * gained and end > 1.5 * best):
        return [Finding("loss-diverged", "error", f"loss rose: first third {start:.3g}, last third {end:.3g}, best {best:.3g}.",
                        "the run moved away from its best point: a learning rate too high for this method and data",
                        "lower the learning rate 2-10x, add warmup, or resume from the checkpoint at the best loss")]
    middle = losses[third:-third] or losses[third - 1:third]
    mid = sum(middle) / len(middle)
    if start > 0 and (start - end) < 0.01 * start:
        return [Finding("loss-flat", "warning", f"loss did not fall: first third {start:.3g}, last third {end:.3g}.",
                        "nothing is being learned: a learning rate far too low, labels masked out, or frozen adapters",
                        "check trainable parameters (print_trainable_parameters), the label mask and the lr")]
    if len(losses) >= 12 and start > mid and abs(mid - end) < 0.05 * (start - mid):  # last third gained < 5%
        return [Finding("loss-plateau", "info", f"loss stopped falling: {mid:.3g} in the middle third, {end:.3g} at the end.",
                        "the last third of the run added almost nothing: compute spent for no gain (or overfitting)",
                        "stop earlier (fewer epochs / max_steps) or compare eval loss to decide")]
    return []


def read_losses(run_dir: Path) -> list[float]:
    path = run_dir / "metrics.jsonl"
    losses = []
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses.append(float(rec["loss"]))
    return losses


# -- entry point -----------------------------------------------------------------------------------------

def diagnose_path(path: str | Path, model: str | None = None) -> list[Finding]:
    """Findings for an adapter directory, an adapter_config.json, a training config or a run directory.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a file or directory of none of those kinds.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir() and (path / "metrics.jsonl").is_file():
        return _diagnose_run(path, model)
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
            return check_adapter_config(cfg, _shape(model or cfg.get("base_model_name_or_path"))) + \
                check_adapter_weights(path, cfg)
        if list(path.glob("model*.safetensors")) or list(path.glob("pytorch_model*.bin")):
            return check_adapter_weights(path, {})
        raise ValueError(f"{path}: neither an adapter directory (adapter_config.json) nor a training run "
                         "(metrics.jsonl)")
    if path.name == "adapter_config.json":
        cfg = json.loads(path.read_text(encoding="utf-8"))
        return check_adapter_config(cfg, _shape(model or cfg.get("base_model_name_or_path")))
    from deltatune.training.config import read_config_file

    cfg = read_config_file(path)
    if "peft_type" in cfg:
        return check_adapter_config(cfg, _shape(model or cfg.get("base_model_name_or_path")))
    return check_training_config(cfg, _shape(model or cfg.get("model", "default")), _count_examples(cfg, path.parent))


def _diagnose_run(run: Path, model: str | None) -> list[Finding]:
    findings = check_losses(read_losses(run))
    states = sorted(run.glob("checkpoints/*/state.json"))
    cfg = None
    if states:
        cfg = json.loads(states[-1].read_text(encoding="utf-8")).get("config")
    if cfg:
        findings += check_training_config(cfg, _shape(model or cfg.get("model", "default")), _count_examples(cfg, Path.cwd()))
    elif (run / "adapter" / "adapter_config.json").is_file():
        acfg = json.loads((run / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
        findings += check_adapter_config(acfg, _shape(model or acfg.get("base_model_name_or_path")))
    if (run / "adapter").is_dir() and (run / "adapter" / "adapter_config.json").is_file():
        acfg = json.loads((run / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
        findings += check_adapter_weights(run / "adapter", acfg)
    return findings


def _shape(model: str | None) -> ModelShape | None:
    """The base's shape if it can be read offline, else None (target checks against it are skipped)."""
    if not model:
        return None
    from deltatune.advisor.shapes import resolve

    try:
        return resolve(str(model))
    except (ValueError, FileNotFoundError, OSError):
        return None


def _count_examples(cfg: dict, base: Path) -> int | None:
    data = cfg.get("data")
    if not data:
        return None
    path = Path(data) if Path(data).is_absolute() else (base / data if (base / data).exists() else Path(data))
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


# -- the same checks where a run starts ---------------------------------------------------------------------

ADAPTER_CODES = {"rank-too-low", "alpha-off", "rslora-advice", "qv-only", "targets-head"}


def warn_at_wrap(peft_config) -> list[Finding]:
    """``get_peft_model``'s check: the adapter config's findings, as warnings (targets are matched there)."""
    cfg = peft_config.to_dict() if hasattr(peft_config, "to_dict") else dict(peft_config)
    findings = [f for f in check_adapter_config(cfg) if f.code in ADAPTER_CODES]
    emit(findings, stacklevel=4)
    return findings


def warn_at_train(config, n_examples: int | None) -> list[Finding]:
    """``deltatune train``'s check: run-level findings (the adapter's come from ``get_peft_model``; bf16 on a
    slow CPU from ``precision.resolve_dtype``), as warnings."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    findings = [f for f in check_training_config(cfg, None, n_examples)
                if f.code not in ADAPTER_CODES and f.code != "bf16-on-cpu"]
    emit(findings, stacklevel=4)
    return findings
