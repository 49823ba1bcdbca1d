"""``deltatune generate``: completions of several prompts in one batch, each row with its own adapter."""
from __future__ import annotations

import argparse
import json
import sys

from deltatune.cli.common import BASE_ROW, parse_adapters


def register(sub) -> None:
    """Add ``generate`` to the ``deltatune`` subparsers."""
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


def cmd_generate(args) -> int:
    """Completions of several prompts in one batch, each row with its own adapter (or the base)."""
    import torch

    from deltatune import models
    from deltatune.training.distributed import resolve_device
    from deltatune.training.precision import autocast_for, bound_cpu_kernel_caches, resolve_dtype

    prompts = args.prompt or _stdin_prompts()
    if not prompts:
        raise ValueError("no prompt: pass --prompt TEXT (repeatable) or prompts on stdin, one per line")
    adapters = parse_adapters(args.adapter or [])
    rows = _rows_adapters(len(prompts), adapters, args.use)
    _check_sampling(args)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu" and dtype == torch.bfloat16:
        bound_cpu_kernel_caches()
    tokenizer = models.load_tokenizer(args.base)
    encoded = _encode_prompts(tokenizer, prompts, args.chat, args.system)
    model = _load_model(args.base, adapters, dtype, device)
    completions = _complete_rows(model, tokenizer, encoded, rows, bool(adapters), args, device=device,
                                 autocast=autocast_for(dtype, device))
    results = [{"adapter": name, "prompt": prompt, "completion": text}
               for name, prompt, text in zip(rows, prompts, completions)]
    _print_results(results, args.json)
    return 0


def _load_model(base: str, adapters: dict[str, str], dtype, device):
    """The base with every ``--adapter`` loaded under its name (a PeftModel when there is one), in eval mode."""
    from deltatune import models
    from deltatune.peft_model import PeftModel

    model = models.load(base, dtype=dtype).to(device)
    for i, (name, directory) in enumerate(adapters.items()):
        try:
            if i == 0:
                model = PeftModel.from_pretrained(model, directory, adapter_name=name)
            else:
                model.load_adapter(directory, adapter_name=name)
        except (FileNotFoundError, ValueError) as exc:  # ConfigError, CheckpointError are ValueErrors
            raise ValueError(f"--adapter {name}={directory}: {exc}") from exc
    return model.eval()


def _complete_rows(model, tokenizer, encoded: list[list[int]], rows: list[str], has_adapters: bool, args,
                   **kw) -> list[str]:
    """Each row's completion, routed to its adapter: one batch (``generation.complete``)."""
    from deltatune.generation import complete

    kw.update(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    distinct = set(rows)
    if not has_adapters:
        return complete(model, tokenizer, encoded, args.max_new_tokens, **kw)
    if len(distinct) > 1:  # a mixed batch: one adapter name per row
        return complete(model, tokenizer, encoded, args.max_new_tokens, adapter_names=rows, **kw)
    if distinct == {BASE_ROW}:
        with model.disable_adapter():
            return complete(model, tokenizer, encoded, args.max_new_tokens, **kw)
    model.set_adapter(rows[0])  # every row on one adapter: the plain path, which every method supports
    return complete(model, tokenizer, encoded, args.max_new_tokens, **kw)


def _print_results(results: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return
    for i, row in enumerate(results, 1):
        print(f"[{i}] adapter: {row['adapter']}")
        print(f"prompt:     {row['prompt']}")
        print(f"completion: {row['completion']}")
        print()


def _stdin_prompts() -> list[str]:
    """One prompt per non-empty stdin line, when stdin is piped (never waits on a terminal)."""
    try:
        if sys.stdin is None or sys.stdin.isatty():
            return []
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    except (OSError, ValueError):  # closed or unreadable stdin
        return []


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
