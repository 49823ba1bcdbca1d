"""Verbs on adapter files: ``info``, ``merge``, ``combine`` and the ``targets`` dry run."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from deltatune.atomic import atomic_directory
from deltatune.cli.common import parse_adapters


def register(sub) -> None:
    """Add ``info``, ``merge``, ``targets`` and ``combine`` to the ``deltatune`` subparsers."""
    p = sub.add_parser("info", help="describe a saved adapter directory or a diffusers/kohya LoRA file")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors), or a "
                                   "diffusers/kohya LoRA .safetensors file (or its directory)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("merge", help="merge an adapter into its base; write a transformers model directory")
    p.add_argument("--base", required=True, help="'default', a transformers directory or a .gguf file")
    p.add_argument("--adapter", required=True, help="adapter directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("targets", help="dry run: list the modules a target spec selects")
    p.add_argument("--model", default="default", help="'default', a transformers directory or a .gguf file")
    p.add_argument("--target", default="all-linear", help="'all-linear', comma-separated names, or a regex")
    p.add_argument("--method", default="lora")
    p.set_defaults(func=cmd_targets)
    _add_combine(sub)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GB"


def cmd_info(args) -> int:
    """Describe a saved adapter directory, or a diffusers/kohya LoRA file."""
    from deltatune.checkpoint.peft_format import adapter_summary
    from deltatune.diffusion import files as diffusion_files

    diffusion = diffusion_files.is_lora_file(args.adapter)
    info = diffusion_files.lora_file_summary(args.adapter) if diffusion else adapter_summary(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if diffusion:
        return _print_rows(diffusion_files.summary_rows(info))
    targets = info["target_modules"]
    rows = [
        ("adapter", info["directory"]),
        ("method", info["peft_type"]),
        ("task type", info["task_type"] or "-"),
        ("base model", info["base_model"] or "(not recorded)"),
        ("targets", ", ".join(targets) if isinstance(targets, list) else str(targets) if targets else "-"),
        ("rank / alpha", f"{info['r']} / {info['lora_alpha']}" if info["r"] is not None else "-"),
        *([("virtual tokens", f"{info['virtual_tokens']} (no layer wrapped; cannot be merged)")]
          if info.get("virtual_tokens") else []),
        ("wrapped modules", str(info["modules"])),
        ("trainable params", f"{info['parameters']:,d} in {info['tensors']} tensors ({', '.join(info['dtypes'])})"),
        ("file size", _human_bytes(info["file_bytes"])),
    ]
    return _print_rows(rows)


def _print_rows(rows: list[tuple[str, str]]) -> int:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_merge(args) -> int:
    """Merge an adapter into its base and write a plain transformers model directory."""
    from deltatune import models
    from deltatune.peft_model import PeftModel

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        print(f"error: {out} exists and is not empty (use --overwrite)", file=sys.stderr)
        return 2
    base = models.load(args.base)
    merged = PeftModel.from_pretrained(base, args.adapter).merge_and_unload(safe_merge=True)
    tokenizer = models.load_tokenizer(args.base)
    with atomic_directory(out) as tmp:  # the one directory swap (deltatune.atomic)
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    print(f"merged {args.adapter} into {args.base} -> {out}")
    return 0


def cmd_combine(args) -> int:
    """Combine saved adapters into a new adapter directory (``deltatune.arithmetic.combine_adapters``).

    The base model is loaded only for DoRA sources, whose delta depends on the base weights.
    """
    from deltatune.arithmetic import combine_adapters
    from deltatune.checkpoint.peft_format import read_adapter, write_adapters

    adapters = parse_adapters(args.adapter or [])
    if not adapters:
        raise ValueError("no --adapter NAME=DIR given")
    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise ValueError(f"--weights {args.weights!r}: expected comma-separated numbers, e.g. 0.7,0.3") from None
    sources = [read_adapter(directory) for directory in adapters.values()]
    base = {}

    def base_weight(module: str):
        from torch import nn

        from deltatune import models, registry

        if "model" not in base:
            base["model"] = models.load(args.base)
        layer = base["model"].get_submodule(module)
        W = registry.get_weight(layer).detach().float()
        return W.T if isinstance(layer, nn.Embedding) else W

    config, tensors = combine_adapters(
        sources, weights, combination_type=args.type, svd_rank=args.svd_rank, svd_clamp=args.svd_clamp,
        density=args.density, majority_sign_method=args.majority_sign_method, seed=args.seed,
        names=list(adapters), base_weight=base_weight)
    write_adapters(args.out, {"": (config, tensors)})
    loaded = " (base loaded for DoRA)" if base else ""
    print(f"combined {', '.join(adapters)} ({args.type}, weights {weights}) -> {args.out}{loaded}")
    return 0


def cmd_targets(args) -> int:
    """Dry run: list the modules a target spec selects in a model."""
    from deltatune import models, targeting
    from deltatune.registry import make_config

    target = targeting.parse_target_arg(args.target)
    config = make_config(args.method, target_modules=target)
    print(targeting.dry_run(models.load(args.model), config))
    return 0


def _add_combine(sub) -> None:
    from deltatune.merging import COMBINATION_TYPES

    p = sub.add_parser("combine", help="combine saved adapters into one (add_weighted_adapter on files)",
                       description="Weighted combination of saved adapters, written as a new adapter directory. "
                                   "The base is loaded only for DoRA sources.")
    p.add_argument("--base", default="default", help="base model, needed for DoRA sources only")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR", help="a source adapter (repeatable)")
    p.add_argument("--weights", required=True, help="comma-separated, one per --adapter (negative subtracts)")
    p.add_argument("--type", default="svd", choices=COMBINATION_TYPES, help="combination type (default svd)")
    p.add_argument("--density", type=float, help="fraction kept, for ties/dare/magnitude_prune types")
    p.add_argument("--svd-rank", type=int, help="rank of the svd types' result (default: the largest source rank)")
    p.add_argument("--svd-clamp", type=float, help="quantile to clamp the svd factors to")
    p.add_argument("--majority-sign-method", default="total", choices=["total", "frequency"])
    p.add_argument("--seed", type=int, help="seed for DARE's random pruning")
    p.add_argument("--out", required=True, help="output adapter directory")
    p.set_defaults(func=cmd_combine)
