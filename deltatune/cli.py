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


def cmd_combine(args) -> int:
    """Combine saved adapters into a new adapter directory (``deltatune.arithmetic.combine_adapters``).

    The base model is loaded only for DoRA sources, whose delta depends on the base weights.
    """
    from deltatune.arithmetic import combine_adapters
    from deltatune.checkpoint.peft_format import read_adapter, write_adapters

    adapters = _parse_adapters(args.adapter or [])
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


BASE_ROW = "__base__"  # --use name of a row run on the base model without adapter (peft's name)


def cmd_generate(args) -> int:
    """Completions of several prompts in one batch, each row with its own adapter (or the base)."""
    import torch

    from deltatune import models
    from deltatune.peft_model import PeftModel
    from deltatune.training.distributed import resolve_device
    from deltatune.training.evaluate import stop_token_ids
    from deltatune.training.precision import autocast_for, bound_cpu_kernel_caches, resolve_dtype

    prompts = args.prompt or _stdin_prompts()
    if not prompts:
        raise ValueError("no prompt: pass --prompt TEXT (repeatable) or prompts on stdin, one per line")
    adapters = _parse_adapters(args.adapter or [])
    rows = _rows_adapters(len(prompts), adapters, args.use)
    _check_sampling(args)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu" and dtype == torch.bfloat16:
        bound_cpu_kernel_caches()
    tokenizer = models.load_tokenizer(args.base)
    encoded = _encode_prompts(tokenizer, prompts, args.chat, args.system)
    model = models.load(args.base, dtype=dtype).to(device)
    for i, (name, directory) in enumerate(adapters.items()):
        try:
            if i == 0:
                model = PeftModel.from_pretrained(model, directory, adapter_name=name)
            else:
                model.load_adapter(directory, adapter_name=name)
        except (FileNotFoundError, ValueError) as exc:  # ConfigError, CheckpointError are ValueErrors
            raise ValueError(f"--adapter {name}={directory}: {exc}") from exc
    model.eval()

    stops = stop_token_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for r, ids in enumerate(encoded):  # left padding: every row's last prompt token is aligned
        input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, width - len(ids):] = 1
    kwargs = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                  max_new_tokens=args.max_new_tokens, num_beams=1, use_cache=True,
                  eos_token_id=stops or None, pad_token_id=pad)
    if args.temperature > 0:
        kwargs.update(do_sample=True, temperature=args.temperature,
                      top_p=1.0 if args.top_p is None else args.top_p, top_k=0)  # top_k=0: no top-k cut
        torch.manual_seed(args.seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)

    with torch.no_grad(), autocast_for(dtype, device)():
        distinct = set(rows)
        if not adapters:
            out = model.generate(**kwargs)
        elif len(distinct) > 1:  # a mixed batch: one adapter name per row
            out = model.generate(**kwargs, adapter_names=rows)
        elif distinct == {BASE_ROW}:
            with model.disable_adapter():
                out = model.generate(**kwargs)
        else:  # every row on one adapter: the plain path, which every method supports
            model.set_adapter(rows[0])
            out = model.generate(**kwargs)

    results = []
    for r, (name, prompt) in enumerate(zip(rows, prompts)):
        new = out[r, width:].tolist()
        cut = next((k for k, t in enumerate(new) if t in stops), len(new))
        results.append({"adapter": name, "prompt": prompt,
                        "completion": tokenizer.decode(new[:cut], skip_special_tokens=True)})
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return 0
    for i, row in enumerate(results, 1):
        print(f"[{i}] adapter: {row['adapter']}")
        print(f"prompt:     {row['prompt']}")
        print(f"completion: {row['completion']}")
        print()
    return 0


def _stdin_prompts() -> list[str]:
    """One prompt per non-empty stdin line, when stdin is piped (never waits on a terminal)."""
    try:
        if sys.stdin is None or sys.stdin.isatty():
            return []
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    except (OSError, ValueError):  # closed or unreadable stdin
        return []


def _parse_adapters(specs: list[str]) -> dict[str, str]:
    """``--adapter NAME=DIR`` values -> ``{name: dir}`` in order.

    A bare existing directory (the single-adapter form ``--adapter DIR``) is named ``default``.
    """
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not (sep and name and directory and "/" not in name and os.sep not in name):
            if not Path(spec).expanduser().is_dir():
                raise ValueError(f"--adapter {spec!r}: expected NAME=DIR (e.g. --adapter a=runs/a/adapter)")
            name, directory = "default", spec
        if name == BASE_ROW:
            raise ValueError(f"--adapter {spec!r}: the name {BASE_ROW!r} is reserved for the base model "
                             "without adapter")
        if name in adapters:
            hint = " (a bare --adapter DIR is named 'default')" if name == "default" else ""
            raise ValueError(f"--adapter {spec!r}: duplicate adapter name {name!r}{hint}")
        adapters[name] = directory
    return adapters


def _rows_adapters(n_prompts: int, adapters: dict[str, str], use: list[str] | None) -> list[str]:
    """The adapter name of each prompt (``__base__``: the base without adapter)."""
    names = list(adapters)
    if use:
        known = names + [BASE_ROW]
        for name in use:
            if name not in known:
                raise ValueError(f"--use {name!r}: no such adapter; known: {', '.join(known)}")
        if len(use) != n_prompts:
            raise ValueError(f"{len(use)} --use for {n_prompts} prompt(s): give one --use NAME per --prompt, "
                             "in order")
        return list(use)
    if not names:
        return [BASE_ROW] * n_prompts
    if len(names) == n_prompts:
        return names
    if len(names) == 1:
        return names * n_prompts
    raise ValueError(f"{n_prompts} prompt(s) and {len(names)} adapters: give one --use NAME per --prompt, "
                     "or as many prompts as adapters (prompt i uses adapter i), or a single adapter")


def _check_sampling(args) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.temperature < 0:
        raise ValueError(f"--temperature {args.temperature}: must be 0 (greedy) or positive")
    if args.top_p is not None:
        if not 0 < args.top_p <= 1:
            raise ValueError(f"--top-p {args.top_p}: must be in (0, 1]")
        if args.temperature == 0:
            raise ValueError("--top-p applies when sampling: give --temperature > 0 too")


def _encode_prompts(tokenizer, prompts: list[str], chat: bool | None, system: str | None) -> list[list[int]]:
    """Token ids of each prompt: through the chat template (one user turn) unless ``chat`` is False;
    ``chat=None`` uses the template when the tokenizer has one."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat is None:
        chat = has_template
    if chat and not has_template:
        raise ValueError("--chat: this tokenizer has no chat template (use --no-chat for raw text)")
    if system and not chat:
        raise ValueError("--system needs the chat template (drop --no-chat/--raw)")
    encoded = []
    for prompt in prompts:
        if not chat:
            ids = tokenizer(prompt)["input_ids"]
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"--prompt {prompt!r}: no tokens")
        encoded.append(ids)
    return encoded


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every verb registered."""
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="verb", required=True)

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
    _add_generate(sub)
    _add_serve(sub)
    _register_optional_verbs(sub)
    return parser


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


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="completions of prompts, each with its own adapter, in one mixed batch",
        description="Generate completions of several prompts in one batch; each prompt (row) uses its own "
                    "adapter, or the base. Default pairing without --use: prompt i uses adapter i when the "
                    "counts match; one adapter serves every prompt; no adapter means the base.")
    p.add_argument("--base", "--model", dest="base", default="default",
                   help="'default', a transformers directory or a .gguf file")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="a named adapter directory (repeatable); a bare DIR is named 'default'")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: one per stdin line")
    p.add_argument("--use", action="append", metavar="NAME",
                   help=f"the adapter of each prompt, in order (repeatable; {BASE_ROW} = the base alone)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="apply the tokenizer's chat template (default: when it has one)")
    p.add_argument("--raw", dest="chat", action="store_false", help="same as --no-chat")
    p.add_argument("--system", help="system message (chat template only)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--json", action="store_true", help="print a JSON list of {adapter, prompt, completion}")
    p.set_defaults(func=cmd_generate)


def cmd_serve(args) -> int:
    """Serve the base and its adapters over OpenAI's HTTP API until interrupted."""
    from deltatune.serving import Engine, ServingError
    from deltatune.serving.server import serve

    adapters = _parse_adapters(args.adapter or [])
    engine = Engine(args.model, max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
                    max_lora_rank=args.max_lora_rank, max_num_seqs=args.max_num_seqs,
                    max_waiting=args.max_waiting, max_model_len=args.max_model_len,
                    device=None if args.device == "auto" else args.device,
                    dtype=None if args.dtype == "auto" else args.dtype, served_name=args.served_model_name)
    for name, directory in adapters.items():
        try:
            engine.add_adapter(name, directory)
        except ServingError as exc:
            raise ValueError(f"--adapter {name}={directory}: {exc.message}") from None
    serve(engine, host=args.host, port=args.port, api_key=args.api_key, model_path=args.model,
          log_level=args.log_level)
    return 0


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server: one base, many LoRA adapters, continuous batching",
        description="Serve a base model and LoRA adapters over OpenAI's API (/v1/completions, "
                    "/v1/chat/completions, /v1/models) plus vLLM's /v1/load_lora_adapter and "
                    "/v1/unload_lora_adapter, /health, /metrics and a playground page at /. "
                    "The request's `model` field picks the base or an adapter.")
    p.add_argument("--model", default="default", help="'default', a transformers directory or a .gguf file")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR", help="an adapter served as NAME (repeatable)")
    p.add_argument("--served-model-name", default=None,
                   help="the base's `model` name in the API (default: 'default' or the model directory's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on the first line)")
    p.add_argument("--api-key", default=os.environ.get("DELTATUNE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $DELTATUNE_API_KEY)")
    p.add_argument("--max-loras", type=int, default=8, help="adapters in the ready bank at once")
    p.add_argument("--max-cpu-loras", type=int, default=64, help="more adapters kept in host memory")
    p.add_argument("--max-lora-rank", type=int, default=64, help="adapters of a higher rank are refused")
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences in the running batch")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before 503")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def _register_optional_verbs(sub) -> None:
    """Verbs defined next to the code they drive (training adds train/eval/chat)."""
    from deltatune.training import commands

    commands.register(sub)

    from deltatune.advisor import commands as advisor_commands  # plan, doctor

    advisor_commands.register(sub)


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
