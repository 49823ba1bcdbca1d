"""CLI verbs ``train``, ``eval``, ``chat``: flags in, one call into the training modules.

(``generate``, with one adapter per prompt in a mixed batch, lives in ``deltatune.cli.generate``.)

``register(subparsers)`` adds them to the ``deltatune`` parser (``deltatune.cli``). Every ``train``
flag defaults to None so that only flags actually given override the ``--config`` file.
"""
from __future__ import annotations

import argparse
import json
import sys

_FLAG = dict(action="store_const", const=True, default=None)
_NOT = dict(action="store_const", const=False, default=None)


def register(subparsers) -> None:
    """Add ``train``, ``eval`` and ``chat`` to an argparse subparsers object."""
    _add_train(subparsers)
    _add_eval(subparsers)
    _add_chat(subparsers)


# -- train ---------------------------------------------------------------------------------------

def _default_lrs() -> str:
    """``--lr``'s help: each method's default learning rate, from the registry (e.g. ``lora 0.0002``)."""
    from deltatune import registry

    return ", ".join(f"{m} {registry.default_lr(m):g}" for m in ("lora", "dora", "ia3", "adapter", "prompt", "prefix", "ptuning")
                     if m in registry.method_names())


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune an adapter on JSONL data (also under torchrun)",
                       description="Fine-tune an adapter. Flags override --config (YAML/JSON with the same keys).")
    p.add_argument("--config", help="YAML or JSON file of options (keys as the flags, with underscores)")
    _adapter_flags(p.add_argument_group("model and adapter"))
    _data_flags(p.add_argument_group("data"))
    _optimisation_flags(p.add_argument_group("optimisation"))
    _run_flags(p.add_argument_group("run"))
    p.set_defaults(func=cmd_train)


def _adapter_flags(g) -> None:
    g.add_argument("--model", help="'default' (SmolLM2-135M-Instruct), a transformers directory or a .gguf file")
    g.add_argument("--method", help="adapter method (lora, dora, ia3, adapter, ...); default lora")
    g.add_argument("--r", "--rank", type=int, dest="r",
                   help="rank (default 16); under torchrun write --rank (torchrun's parser takes --r as its own)")
    g.add_argument("--alpha", type=float, help="scaling numerator (default 32)")
    g.add_argument("--dropout", type=float, help="adapter dropout (default 0)")
    g.add_argument("--target", help="'all-linear' (default), comma-separated module names, or a regex")
    g.add_argument("--method-arg", action="append", metavar="KEY=VALUE", dest="method_arg",
                   help="extra field of the method's config (VALUE parsed as JSON if it can be); repeatable")
    g.add_argument("--quantize", choices=["nf4", "fp4"],
                   help="QLoRA: store the base's linear layers in 4 bits (bitsandbytes layout) before training")
    g.add_argument("--no-double-quant", dest="double_quant", **_NOT,
                   help="with --quantize: keep the block scales in fp32 (4.5 instead of 4.127 bits per weight)")
    g.add_argument("--init", metavar="INIT",
                   help="LoRA init: loftq[:N] (with --quantize nf4: LoftQ, N iterations, default 1), gaussian, "
                        "pissa, pissa_niter_N, false")


def _data_flags(g) -> None:
    g.add_argument("--data", help="training JSONL (messages | prompt+completion | text lines)")
    g.add_argument("--eval", dest="eval_data", help="held-out JSONL for eval loss and exact match")
    g.add_argument("--task", action="append", metavar="NAME=PATH", dest="task",
                   help="train one adapter per task in one run (train_many) instead of --data: task NAME's "
                        "JSONL at PATH, its adapter in OUT/NAME/adapter; repeatable")
    g.add_argument("--task-eval", action="append", metavar="NAME=PATH|FRACTION", dest="task_eval",
                   help="with --task: task NAME's eval JSONL, or the share of its data held out for eval "
                        "(e.g. 0.1); evaluated at the end and every --eval-every steps; repeatable")
    g.add_argument("--max-length", type=int, help="tokens per example (default 1024)")
    g.add_argument("--overlong", choices=["truncate", "error"], help="over-long examples: truncate (reported) or error")
    g.add_argument("--skip-bad-lines", **_FLAG, help="skip and count malformed lines instead of failing")
    g.add_argument("--train-on-prompt", **_FLAG, help="also put loss on prompt/user tokens")
    g.add_argument("--no-packing", dest="packing", **_NOT, help="one sequence per row")
    g.add_argument("--no-group-by-length", dest="group_by_length", **_NOT,
                   help="plain random batches instead of near-equal lengths (more padding)")


def _optimisation_flags(g) -> None:
    g.add_argument("--lr", type=float, help=f"peak learning rate (default: the method's own; {_default_lrs()})")
    g.add_argument("--schedule", choices=["cosine", "linear", "constant"])
    g.add_argument("--warmup-steps", type=int)
    g.add_argument("--warmup-ratio", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--batch-size", type=int, help="sequences per micro-batch per process (default 8)")
    g.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--max-batch-tokens", type=int,
                   help="tokens per forward pass; bigger micro-batches run in pieces (default 1024 in bf16, 600 in fp32; 0 = no limit)")
    g.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--max-grad-norm", type=float, help="clip threshold, 0 = off (default 1)")
    g.add_argument("--seed", type=int)
    g.add_argument("--grad-checkpointing", **_FLAG,
                   help="recompute activations in backward (less memory); default: on with --quantize, else off")
    g.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", **_NOT,
                   help="keep activations even with --quantize (faster, more memory)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], help="compute dtype (default auto)")
    g.add_argument("--compile", **_FLAG,
                   help="torch.compile the decoder layers for training (first step compiles; eager fallback)")


def _run_flags(g) -> None:
    g.add_argument("--out", help="run directory (default runs/deltatune)")
    g.add_argument("--log-every", type=int)
    g.add_argument("--eval-every", type=int, help="eval loss every N steps (0 = only at the end)")
    g.add_argument("--patience", type=int,
                   help="with --task: a task stops after N evaluations in a row without improvement and "
                        "writes its best adapter (needs --task-eval and --eval-every)")
    g.add_argument("--min-delta", type=float, help="with --patience: the smallest eval-loss drop that counts")
    g.add_argument("--save-every", type=int, help="checkpoint every N steps (0 = none)")
    g.add_argument("--keep-checkpoints", type=int)
    g.add_argument("--eval-limit", type=int, help="score at most N eval examples for exact match")
    g.add_argument("--no-exact-match", dest="eval_exact_match", **_NOT, help="skip generation at the end")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in --out (or the one given)")
    g.add_argument("--no-progress", dest="progress", **_NOT)
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--fsdp", **_FLAG,
                   help="under torchrun: shard the frozen base (also 4-bit) across processes with FSDP2 "
                        "instead of a full copy per process; the adapter stays replicated")


_MANY_ONLY = ("task_eval", "patience", "min_delta")   # flags of runs of several tasks only
_NOT_OPTIONS = {"config", "func", "verb", "method_arg", "task", *_MANY_ONLY}


def cmd_train(args) -> int:
    from deltatune.training.api import make_config, train
    from deltatune.training.distributed import shutdown

    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS and v is not None}
    if args.method_arg:
        overrides["method_args"] = dict(_parse_kv(item) for item in args.method_arg)
    config = make_config(args.config, **overrides)
    if args.task:
        return _train_tasks(args.task, config, args)
    given = [f"--{k.replace('_', '-')}" for k in _MANY_ONLY if getattr(args, k) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: only for runs of several tasks (--task NAME=PATH)")
    finished = False
    try:
        train(config)
        finished = True
    finally:
        shutdown(synchronize=finished)
    return 0


def _train_tasks(items: list[str], config, args) -> int:
    """``--task NAME=PATH ...``: one run, one adapter per task (``train_many``), each with the
    adapter and optimisation flags given; the base is loaded once."""
    from deltatune.training.many import TaskSpec, train_many

    if config.data:
        raise ValueError("--task and --data cannot be combined: give the data of every task with --task NAME=PATH")
    if config.eval_data:
        raise ValueError("--eval with --task: give each task's eval set with --task-eval NAME=PATH|FRACTION")
    tasks = [_name_value("--task", item) for item in items]
    evals = dict(_name_value("--task-eval", item) for item in args.task_eval or [])
    unknown = sorted(set(evals) - {name for name, _ in tasks})
    if unknown:
        raise ValueError(f"--task-eval {unknown[0]}=...: no --task named {unknown[0]!r}")
    specs = [TaskSpec(name, path, eval_data=evals.get(name)) for name, path in tasks]
    train_many(config.model, specs, config=config, patience=args.patience, min_delta=args.min_delta or 0.0)
    return 0


def _name_value(flag: str, item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name or not value:
        raise ValueError(f"{flag} {item!r}: expected NAME=PATH (e.g. {flag} sql=data/sql.jsonl)")
    return name, value


def _parse_kv(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--method-arg {item!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


# -- eval / chat ----------------------------------------------------------------------

def _model_flags(p) -> None:
    p.add_argument("--model", default="default", help="'default', a transformers directory or a .gguf file")
    p.add_argument("--adapter", help="adapter directory (peft format); omit to use the base alone")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--max-new-tokens", type=int, default=None)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="eval loss and exact match of a model (+ adapter) on JSONL data")
    _model_flags(p)
    p.add_argument("--data", required=True, help="JSONL file (messages | prompt+completion | text)")
    p.add_argument("--limit", type=int, help="score at most N examples for exact match")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--no-exact-match", dest="exact", action="store_false", help="eval loss only")
    p.add_argument("--samples", type=int, default=3, help="show N example generations")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from deltatune.training.api import evaluate_model, load_inference_model

    model, tokenizer, device, autocast = load_inference_model(args.model, args.adapter, args.dtype, args.device)
    result = evaluate_model(model, tokenizer, args.data, device=device, autocast=autocast, exact=args.exact,
                            limit=args.limit, batch_size=args.batch_size, max_length=args.max_length,
                            max_new_tokens=args.max_new_tokens, samples=0 if args.json else args.samples)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"eval loss   {result['eval_loss']:.4f}  ({result['eval_tokens']} label tokens)")
    if "exact_match" in result:
        print(f"exact match {100 * result['exact_match']:.1f}%  ({result['correct']}/{result['total']})")
    for s in result.get("samples", []):
        print(f"\n[{'ok' if s['correct'] else 'MISS'}] reference:  {s['reference']}\n     prediction: {s['prediction']}")
    return 0


def _add_chat(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat with a model (+ adapter); empty line or Ctrl-D ends")
    _model_flags(p)
    p.add_argument("--system", help="system message")
    p.set_defaults(func=cmd_chat)


def cmd_chat(args) -> int:
    from deltatune.training.api import generate, load_inference_model

    model, tokenizer, device, autocast = load_inference_model(args.model, args.adapter, args.dtype, args.device)
    history = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if not line.strip() or line.strip() in ("/exit", "/quit"):
            break
        history.append({"role": "user", "content": line})
        reply = generate(model, tokenizer, [history], max_new_tokens=args.max_new_tokens or 256,
                         device=device, autocast=autocast)[0]
        history.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}" if interactive else reply, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m deltatune.training VERB ...``: these verbs without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="deltatune")
    register(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
