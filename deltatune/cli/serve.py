"""``deltatune serve``: the OpenAI-compatible HTTP server over one engine."""
from __future__ import annotations

import os
from pathlib import Path

from deltatune.cli.common import parse_adapters


def cmd_serve(args) -> int:
    """Serve the base and its adapters over OpenAI's HTTP API until interrupted."""
    from deltatune.serving import ServingError
    from deltatune.serving.access import Access, LoraRoot
    from deltatune.serving.limits import Limits
    from deltatune.serving.server import serve

    # Everything a typo can break is checked before the (slow) model load.
    access = Access.build(args.api_key, args.api_keys)
    limits = Limits(max_request_bytes=args.max_request_bytes, max_n=args.max_n, max_stop=args.max_stop,
                    max_stop_length=args.max_stop_length,
                    max_concurrent=args.max_concurrent_per_key or None)
    if args.enable_lora_loading and not args.lora_root:
        raise ValueError("--enable-lora-loading needs --lora-root DIR: runtime lora_path values are confined to it")
    if args.lora_root and not args.enable_lora_loading:
        raise ValueError("--lora-root is used only with --enable-lora-loading")
    lora_root = str(LoraRoot(args.lora_root).root) if args.enable_lora_loading else None
    adapters = {**adapters_in(args.adapters_dir), **parse_adapters(args.adapter or [])}
    replicated = args.replicas is not None or args.ray_address is not None
    if replicated:
        from deltatune.serving.replicas import check_counts  # no Ray import: before the model load

        check_counts(args.replicas, args.threads_per_replica)
    elif args.threads_per_replica is not None:
        raise ValueError("--threads-per-replica is used only with --replicas N or --ray-address ADDR")
    engine = _replicas(args) if replicated else _engine(args)
    for name, directory in adapters.items():
        try:  # replicas: checked here, loaded into a replica on first use
            (engine.register if replicated else engine.add_adapter)(name, directory)
        except ServingError as exc:
            engine.shutdown()
            raise ValueError(f"--adapter {name}={directory}: {exc.message}") from None
    serve(engine, host=args.host, port=args.port, model_path=args.model, log_level=args.log_level,
          access=access, limits=limits, lora_root=lora_root)
    return 0


def _engine_kwargs(args) -> dict:
    return dict(max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras, max_lora_rank=args.max_lora_rank,
                max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting, max_model_len=args.max_model_len,
                device=None if args.device == "auto" else args.device,
                dtype=None if args.dtype == "auto" else args.dtype, served_name=args.served_model_name)


def _engine(args):
    from deltatune.serving import Engine

    return Engine(args.model, **_engine_kwargs(args))


def _replicas(args):
    """Ray Serve replicas behind the same server (imports Ray: only when asked for)."""
    try:
        from deltatune.serving.replicas import launch
        import ray  # noqa: F401
    except ImportError:
        raise ValueError("--replicas/--ray-address need Ray Serve: pip install 'deltatune[ray]'") from None
    return launch(args.model, replicas=args.replicas or 1, threads=args.threads_per_replica,
                  ray_address=args.ray_address, engine_kwargs=_engine_kwargs(args))


def adapters_in(directory) -> dict[str, str]:
    """``--adapters-dir DIR``: every subdirectory holding an ``adapter_config.json``, served under its name."""
    if directory is None:
        return {}
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"--adapters-dir {directory}: not a directory")
    found = {d.name: str(d) for d in sorted(root.iterdir()) if (d / "adapter_config.json").is_file()}
    if not found:
        raise ValueError(f"--adapters-dir {directory}: no subdirectory holds an adapter_config.json")
    return found


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server: one base, many LoRA adapters, continuous batching",
        description="Serve a base model and LoRA adapters over OpenAI's API (/v1/completions, "
                    "/v1/chat/completions, /v1/models) plus vLLM's /v1/load_lora_adapter and "
                    "/v1/unload_lora_adapter, /health, /metrics and a playground page at /. "
                    "The request's `model` field picks the base or an adapter.")
    p.add_argument("--model", default="default", help="'default', a transformers directory or a .gguf file")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR", help="an adapter served as NAME (repeatable)")
    p.add_argument("--adapters-dir", default=None, metavar="DIR",
                   help="serve every adapter directory inside DIR under its directory name")
    p.add_argument("--served-model-name", default=None,
                   help="the base's `model` name in the API (default: 'default' or the model directory's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on the first line)")
    p.add_argument("--api-key", default=os.environ.get("DELTATUNE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $DELTATUNE_API_KEY)")
    p.add_argument("--api-keys", default=None, metavar="FILE",
                   help='JSON {"KEY": ["model", ...]}: the models each key may use; "*" = every model and '
                        "the load/unload endpoints. Other models answer 404 as if they did not exist")
    p.add_argument("--enable-lora-loading", action="store_true",
                   help="turn on /v1/load_lora_adapter and /v1/unload_lora_adapter (operator keys only)")
    p.add_argument("--lora-root", default=None, metavar="DIR",
                   help="with --enable-lora-loading: runtime lora_path values must resolve inside DIR")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="larger bodies get 413 (default 1 MiB)")
    p.add_argument("--max-n", type=int, default=16, help="completions per request (`n`)")
    p.add_argument("--max-stop", type=int, default=8, help="stop strings per request")
    p.add_argument("--max-stop-length", type=int, default=256, help="characters per stop string")
    p.add_argument("--max-concurrent-per-key", type=int, default=128,
                   help="requests in flight per API key (per client address without keys) before 429; 0 = no bound")
    p.add_argument("--max-loras", type=int, default=8, help="adapters in the ready bank at once")
    p.add_argument("--max-cpu-loras", type=int, default=64,
                   help="more adapters kept in host memory (with --replicas: each replica keeps "
                        "max-loras + max-cpu-loras adapters loaded, its routing LRU)")
    p.add_argument("--max-lora-rank", type=int, default=64, help="adapters of a higher rank are refused")
    p.add_argument("--max-num-seqs", type=int, default=32, help="sequences in the running batch")
    p.add_argument("--max-waiting", type=int, default=256, help="queued requests before 503")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="N engines on Ray Serve behind this server, requests routed by adapter "
                        "(pip install 'deltatune[ray]'; docs/replicas.md)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="run the replicas on this Ray cluster ('auto': the local node's); default: a local one")
    p.add_argument("--threads-per-replica", type=int, default=None, metavar="T",
                   help="torch threads (and Ray CPUs) per replica (default: cores / replicas)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
