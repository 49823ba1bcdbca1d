"""`deltatune <verb>`: each verb parses its flags and makes one short call into the library."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GB"


def cmd_info(args) -> int:
    """Describe a saved adapter directory."""
    from deltatune.checkpoint.peft_format import adapter_summary

    info = adapter_summary(args.adapter)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    targets = info["target_modules"]
    rows = [
        ("adapter", info["directory"]),
        ("method", info["peft_type"]),
        ("task type", info["task_type"] or "-"),
        ("base model", info["base_model"] or "(not recorded)"),
        ("targets", ", ".join(targets) if isinstance(targets, list) else str(targets)),
        ("rank / alpha", f"{info['r']} / {info['lora_alpha']}" if info["r"] is not None else "-"),
        ("wrapped modules", str(info["modules"])),
        ("trainable params", f"{info['parameters']:,d} in {info['tensors']} tensors ({', '.join(info['dtypes'])})"),
        ("file size", _human_bytes(info["file_bytes"])),
    ]
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"merged {args.adapter} into {args.base} -> {out}")
    return 0


def _replace_dir(new: Path, target: Path) -> None:
    """Move directory ``new`` to ``target``; an existing ``target`` is swapped out, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cmd_targets(args) -> int:
    """Dry run: list the modules a target spec selects in a model."""
    from deltatune import models, targeting
    from deltatune.registry import make_config

    target = targeting.parse_target_arg(args.target)
    config = make_config(args.method, target_modules=target)
    print(targeting.dry_run(models.load(args.model), config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every verb registered."""
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("info", help="describe a saved adapter directory")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
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

    _register_optional_verbs(sub)
    return parser


def _register_optional_verbs(sub) -> None:
    """Verbs defined next to the code they drive (training adds train/eval/generate/chat)."""
    from deltatune.training import commands

    commands.register(sub)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deltatune`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
