"""CLI verbs ``plan`` and ``doctor``: flags in, one call into the advisor, a table or JSON out."""
from __future__ import annotations

import json


def register(sub) -> None:
    """Add ``plan`` and ``doctor`` to an argparse subparsers object."""
    _add_plan(sub)
    _add_doctor(sub)


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="which adapter method fits a base and a memory budget, and how much memory each takes",
        description="Planned peak memory per device of full fine-tuning, LoRA, DoRA, QLoRA, IA3, prompt and "
                    "prefix tuning, split into its parts, and a recommendation with reasons.")
    p.add_argument("--model", default="default",
                   help="'default', a transformers directory, a .gguf file, or a known name/size (7b, 8b, 13b, 70b, ...)")
    p.add_argument("--memory", default="24GB", help="memory of one device, e.g. 24GB, 80GB (GB read as GiB)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch per device")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--target", default="all-linear", help="'all-linear' or comma-separated block modules")
    ck = p.add_mutually_exclusive_group()
    ck.add_argument("--grad-checkpointing", dest="grad_checkpointing", action="store_const", const=True, default=None,
                    help="force gradient checkpointing on (default: on for QLoRA and wherever it is needed to fit)")
    ck.add_argument("--no-grad-checkpointing", dest="grad_checkpointing", action="store_const", const=False)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "sgd"])
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--sharding", default=None, choices=["ddp", "fsdp"],
                   help="with --devices N: fsdp (default; deltatune train --fsdp) splits the base over the "
                        "devices, ddp keeps a full copy on each")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: plan this machine's `deltatune train` (its dtype, token budget, RSS)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                   help="compute dtype (default bf16 on cuda; on cpu what `deltatune train` picks)")
    p.add_argument("--tasks", type=int, default=1, help="how many tasks (adapters) will share the base")
    p.add_argument("--goal", default="balanced", choices=["balanced", "accuracy", "quality", "memory"])
    p.add_argument("--no-frozen-base", dest="frozen_base_ok", action="store_false",
                   help="rule out prompt/prefix tuning as the low-memory choice")
    p.add_argument("--no-4bit", dest="allow_4bit", action="store_false",
                   help="rule out QLoRA (no 4-bit kernels on the device)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    from deltatune.advisor.plan import plan, train_settings

    target = "all-linear" if args.target == "all-linear" else [t.strip() for t in args.target.split(",") if t.strip()]
    kw = dict(seq_len=args.seq_len, batch=args.batch, rank=args.rank, target=target,
              grad_checkpointing=args.grad_checkpointing, optimizer=args.optimizer, devices=args.devices,
              sharding=args.sharding or ("fsdp" if args.devices > 1 else "ddp"), device=args.device, tasks=args.tasks, goal=args.goal,
              frozen_base_ok=args.frozen_base_ok, allow_4bit=args.allow_4bit)
    if args.device == "cpu":
        kw.update(train_settings(args.dtype, args.seq_len))
    else:
        kw["dtype"] = args.dtype or "bf16"
    result = plan(args.model, args.memory, **kw)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.render())
    return 0


def _add_doctor(sub) -> None:
    p = sub.add_parser(
        "doctor", help="check an adapter, adapter_config.json, training config or run directory for known mistakes",
        description="Known PEFT mistakes, each with its severity, why it matters and the fix. Exit code 1 when "
                    "an error is found, 0 for warnings only.")
    p.add_argument("path", nargs="?", default=None,
                   help="adapter directory, adapter_config.json, training config (YAML/JSON) or run directory")
    p.add_argument("--model", default=None, help="base model to check targets against (default: the config's)")
    p.add_argument("--json", action="store_true")
    from deltatune.advisor.peft_compat import add_peft_compat_arguments

    add_peft_compat_arguments(p)
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args) -> int:
    """``deltatune doctor PATH`` (a setup's known mistakes) or ``--peft-compat FILE`` (what a peft
    script uses that deltatune lacks); exit code 1 when an error is found."""
    from deltatune.advisor.doctor import diagnose_path, render

    if args.peft_compat:
        from deltatune.advisor.peft_compat import run_peft_compat

        return run_peft_compat(args)
    if args.path is None:
        raise ValueError("doctor needs a PATH (adapter, config or run directory) or --peft-compat FILE")

    findings = diagnose_path(args.path, model=args.model)
    print(json.dumps([f.to_dict() for f in findings], indent=2) if args.json else render(findings))
    return 1 if any(f.severity == "error" for f in findings) else 0
