"""``TrainConfig``: every knob of a training run, readable from YAML/JSON and from CLI flags.

Precedence: dataclass defaults < ``--config`` file < explicit keyword arguments / flags.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


# Keys accepted in config files under their flag names.
_ALIASES = {"eval": "eval_data", "rank": "r"}


class TrainConfigError(ValueError):
    """A training option is unknown or out of range; the message names it."""


@dataclass
class TrainConfig:
    """Options of ``deltatune train`` (field names are the YAML/JSON keys; flags use dashes).

    Model and adapter:
        model: ``"default"`` (SmolLM2-135M-Instruct), a transformers directory or a ``.gguf`` file.
        method: adapter method name (``deltatune.registry.method_names()``), default ``"lora"``.
        r, alpha, dropout, target: rank, scaling numerator, adapter dropout and target modules
            (``"all-linear"``, comma-separated names or a regex); passed to the method's config
            when it has the matching field (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``).
        method_args: further config fields for the method, e.g. ``{"use_rslora": true}``.
        quantize: ``"nf4"`` (QLoRA) or ``"fp4"``: store the base's linear layers (all but the
            output head) in 4 bits with ``deltatune.quantize`` before the adapter goes on;
            ``double_quant`` also quantizes the block scales (4.127 bits per weight). None: dense.
        init: LoRA's ``init_lora_weights`` (None: its default). ``"loftq"`` / ``"loftq:N"``: LoftQ
            with N alternating iterations (default 1; needs ``quantize="nf4"`` with ``double_quant``):
            the 4-bit base and the factors are made together from the dense weights. Other
            values (``gaussian``, ``pissa``, ``pissa_niter_N``, ``false``) pass through as given.
    Data:
        data, eval_data: JSONL files (``messages`` / ``prompt``+``completion`` / ``text`` lines).
        max_length: tokens per example; longer ones are truncated (and reported) or, with
            ``overlong="error"``, rejected.
        skip_bad_lines: skip (and count) malformed JSONL lines instead of failing.
        train_on_prompt: also put loss on prompt/user tokens (default: completion/assistant only).
        packing: pack several short sequences into one row (block-diagonal attention via
            per-sequence ``position_ids``); otherwise one sequence per row.
        group_by_length: build batches of near-equal lengths (little padding) from windows of
            ``group_window`` global batches; off = plain random batches.
    Optimisation:
        lr, weight_decay, betas, eps: AdamW. ``lr`` unset: the method's default
        (``deltatune.registry.default_lr``: 2e-4 for LoRA and the layer methods, larger for the
        virtual-token methods, measured on the demo task). schedule: ``cosine`` | ``linear`` | ``constant``
        (after ``warmup_steps`` or ``warmup_ratio`` of linear warmup); ``min_lr_ratio`` is the floor.
        batch_size: sequences per micro-batch per process; grad_accum: micro-batches per step.
        Global batch = batch_size * grad_accum * processes.
        max_batch_tokens: most tokens in one forward pass; a larger micro-batch is run in pieces
            whose gradients add up to the same step (bounds activation memory; 0 = no limit;
            default ``default_max_batch_tokens``: 1024 in bf16, 600 in fp32).
        epochs / max_steps: length of the run (``max_steps`` wins when set).
        max_grad_norm: clip threshold (0 disables). seed: data order, init and dropout.
        grad_checkpointing: recompute activations in backward (less memory, ~30% slower).
            Default: on with ``quantize`` (as peft's ``prepare_model_for_kbit_training`` does:
            without it activations, not weights, set a QLoRA run's peak), off otherwise.
        dtype: ``float32`` | ``bfloat16`` compute; ``auto`` = bf16 on GPUs and on CPUs with native
            bf16 (AVX512-BF16/AMX), fp32 elsewhere (see ``precision``).
        compile: ``torch.compile`` the decoder layers for the training steps (``training.compiling``:
            fused elementwise work; the first step pays the compilation, reported as ``compile_s``).
    Loop:
        out: run directory (adapter, checkpoints, metrics, loss curve).
        log_every, eval_every, save_every: in optimizer steps (0 disables eval/save).
        keep_checkpoints: how many recent checkpoints to keep.
        eval_exact_match: also score greedy generations at the end of training (needs references).
        eval_limit: score at most this many eval examples for exact match.
        max_new_tokens: generation budget (default: longest reference + 16).
        resume: continue from the latest checkpoint in ``out`` if there is one (or give a path).
        progress: show a progress bar. device: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``.
        fsdp: under ``torchrun``, shard the frozen base across the processes with PyTorch FSDP2
            (one unit per decoder layer, then the root; 4-bit bases too) instead of a full copy
            per process (DDP); the adapter stays replicated (``deltatune.training.fsdp``).
    """

    model: str = "default"
    method: str = "lora"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target: Any = "all-linear"
    method_args: dict = field(default_factory=dict)
    quantize: Optional[str] = None
    double_quant: bool = True
    init: Optional[str] = None

    data: Optional[str] = None
    eval_data: Optional[str] = None
    max_length: int = 1024
    overlong: str = "truncate"
    skip_bad_lines: bool = False
    train_on_prompt: bool = False
    packing: bool = True
    group_by_length: bool = True
    group_window: int = 32

    lr: Optional[float] = None
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    max_batch_tokens: Optional[int] = None
    epochs: float = 1.0
    max_steps: Optional[int] = None
    max_grad_norm: float = 1.0
    seed: int = 0
    grad_checkpointing: Optional[bool] = None
    dtype: str = "auto"
    compile: bool = False

    out: str = "runs/deltatune"
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    eval_exact_match: bool = True
    eval_limit: Optional[int] = None
    eval_batch_size: int = 16
    max_new_tokens: Optional[int] = None
    resume: Any = False
    progress: bool = True
    device: str = "auto"
    fsdp: bool = False

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.lr is None:
            from deltatune.registry import default_lr

            self.lr = default_lr(self.method)
        checks = [
            (self.r > 0, "r must be > 0"),
            (self.quantize in (None, "nf4", "fp4"), "quantize must be nf4 or fp4 (or unset for a dense base)"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.max_length > 1, "max_length must be > 1"),
            (self.overlong in ("truncate", "error"), "overlong must be 'truncate' or 'error'"),
            (self.lr > 0, "lr must be > 0"),
            (self.schedule in ("cosine", "linear", "constant"), "schedule must be cosine, linear or constant"),
            (self.warmup_steps >= 0 and 0 <= self.warmup_ratio < 1, "warmup_steps >= 0, 0 <= warmup_ratio < 1"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.max_batch_tokens is None or self.max_batch_tokens >= 0,
             "max_batch_tokens must be >= 0 (0 = no limit)"),
            (self.epochs > 0, "epochs must be > 0"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.max_grad_norm >= 0, "max_grad_norm must be >= 0"),
            (self.dtype in ("auto", "float32", "fp32", "bfloat16", "bf16"), "dtype must be float32 or bfloat16"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.eval_every >= 0 and self.save_every >= 0, "eval_every and save_every must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainConfigError(message)
        self.lora_init()

    def lora_init(self) -> dict:
        """``init`` as LoraConfig fields: ``{}``, ``{"init_lora_weights": ...}`` and, for LoftQ,
        ``loftq_config``. TrainConfigError for a malformed ``loftq:N`` or LoftQ without nf4."""
        if self.init is None:
            return {}
        init = str(self.init)
        if init.lower() in ("true", "false", "default"):
            return {"init_lora_weights": init.lower() != "false"}
        head, _, count = init.partition(":")
        if head != "loftq":
            return {"init_lora_weights": init}
        if count and not (count.isdigit() and int(count) >= 1):
            raise TrainConfigError(f"init={init!r}: write loftq or loftq:N with N >= 1 iterations")
        if self.quantize != "nf4" or not self.double_quant:
            raise TrainConfigError(f"init={init!r} makes an NF4 base with double quantization: it needs "
                                   "quantize='nf4' (--quantize nf4) and not --no-double-quant")
        return {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4, "loftq_iter": int(count or 1)}}

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        """Build from a mapping; unknown keys are an error naming the key and ``source``.

        Dashes in keys are accepted (``max-steps`` == ``max_steps``), and ``eval``/``rank`` as the
        flags spell ``eval_data``/``r``.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        clean = {}
        for key, value in data.items():
            k = str(key).replace("-", "_")
            k = _ALIASES.get(k, k)
            if k not in names:
                raise TrainConfigError(f"{source}: unknown option {key!r}; known: {', '.join(sorted(names))}")
            clean[k] = value
        try:
            return cls(**clean)
        except TypeError as exc:
            raise TrainConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "TrainConfig":
        """Read a YAML (``.yaml``/``.yml``) or JSON file; ``overrides`` (not None) win over it."""
        data = read_config_file(path)
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, source=str(path))

    @property
    def use_grad_checkpointing(self) -> bool:
        """``grad_checkpointing`` as given, or (unset) on exactly when the base is quantized."""
        return bool(self.quantize) if self.grad_checkpointing is None else bool(self.grad_checkpointing)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def read_config_file(path: str | Path) -> dict:
    """Parse a YAML or JSON config file into a dict (errors name the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise different types
        raise TrainConfigError(f"{path}: cannot parse config ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path}: expected a mapping of options at the top level")
    return data


def default_max_batch_tokens(fp32: bool) -> int:
    """The per-forward token budget when ``max_batch_tokens`` is not given: 1024 in bf16; 600 in
    fp32, the activation bytes 512 fp32 tokens took before the fused SwiGLU (``training.fused``)
    kept 15% less per token. Measured on the demo task (fp32, 1 thread, AMD EPYC without AMX),
    600 against 512: a step's 8 examples run as one pass instead of 7+1, 1.59x peft + Trainer's
    tokens per CPU second against 1.40x, at 0.64x its peak RSS against 0.60x
    (``benchmarks/train_throughput.py --concurrent``). One rule for ``deltatune train``,
    ``train_many`` and the advisor's plan."""
    return 600 if fp32 else 1024
