"""``train_many``: one base, one pass, one adapter per task.

    from deltatune.training import TaskSpec, train_many
    result = train_many(base, [TaskSpec("sql", "data/sql.jsonl", LoraConfig(r=16)),
                               TaskSpec("support", "data/support.jsonl", LoraConfig(r=8), epochs=3)],
                        tokenizer=tok, out="runs/multi", batch_size=8)
    result.adapter_dir("sql")     # runs/multi/sql/adapter: an ordinary peft directory

One ``PeftModel`` holds every task's adapter. Each step takes every unfinished task's next batch
(the batch a solo run of that task would take), stacks the rows and routes each row to its
task's adapter through the model's one call entry (``PeftModel.applying(names)``: the gathered
per-row path mixed-batch inference uses). The loss is ``sum_k mean_k`` over tasks (weights in
``tasks.mixed_batch``), so each adapter's gradient is what a solo step gives; each adapter has
its own AdamW, learning-rate schedule, gradient clipping and step count, and is written to
``<out>/<task>/adapter`` as soon as its task finishes (``many_loop.ManyTrainer``).

Each task may have an evaluation set (a file, or a share of its data held out), evaluated every
``eval_every`` of its steps; with ``patience`` it stops after that many evaluations without an
improvement of ``min_delta``, writes its best adapter and leaves the batch mix. ``save_every``
checkpoints every task's state (``many_checkpoint``); ``resume`` continues bit-exactly.

Refused (``UNSUPPORTED``, each named): the solo options that change the base or the step
machinery (``quantize``, ``init``, ``fsdp``, ``compile``, ``grad_checkpointing``), the solo
run's ``data``/``eval_data``, and ``torchrun``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltatune.training.api import adapter_config, make_config
from deltatune.training.config import TrainConfig
from deltatune.training.data import DataError, Dataset, load_dataset
from deltatune.training.tasks import TaskRun


@dataclass
class TaskSpec:
    """One task of ``train_many``.

    Attributes:
        name: the task's name: its adapter's name and its folder under ``out``.
        data: its training JSONL (``data.load_dataset``).
        config: its adapter config (``LoraConfig(...)``, any method); None: built from the run's
            generic options (``method``, ``r``, ``alpha``, ``dropout``, ``target``).
        lr: its peak learning rate; None: the run's ``lr``, else its method's default.
        epochs: its epochs.
        eval_data: its evaluation set: a JSONL path, or a fraction in (0, 1) of ``data`` held
            out of training (drawn with the task's seed). Evaluated when the task finishes
            (eval loss; exact match where the lines have answers) and every ``eval_every`` steps.
        eval_every: evaluate every N of its steps (None: the run's ``eval_every``; 0: at the end only).
        patience: early stopping: stop after this many evaluations in a row without an
            improvement, and write the adapter of its best evaluation (None: the run's; never).
        min_delta: how much lower than the best an eval loss must be to count as an improvement.
        options: other ``TrainConfig`` fields for this task only (``max_steps``, ``schedule``,
            ``warmup_steps``, ``batch_size``, ``seed``, ...).
    """

    name: str
    data: str | os.PathLike
    config: object | None = None
    lr: float | None = None
    epochs: float = 1.0
    eval_data: str | os.PathLike | float | None = None
    eval_every: int | None = None
    patience: int | None = None
    min_delta: float | None = None
    options: dict = field(default_factory=dict)


@dataclass
class TrainManyResult:
    """What ``train_many`` returns: the model holding every adapter and each task's metrics."""

    model: torch.nn.Module
    tokenizer: object
    tasks: dict[str, dict]
    out: Path

    def adapter_dir(self, name: str) -> Path:
        """``<out>/<name>/adapter``: task ``name``'s adapter in peft's format."""
        return self.out / name / "adapter"


def train_many(base_model, tasks: list[TaskSpec], *, tokenizer=None,
               config: TrainConfig | dict | str | os.PathLike | None = None, patience: int | None = None,
               min_delta: float = 0.0, **options) -> TrainManyResult:
    """Train one adapter per task on one base in one loop; returns a ``TrainManyResult``.

    Args:
        base_model: a transformers causal LM (not wrapped yet), or a model name/path for
            ``deltatune.models.load`` (then ``tokenizer`` may be omitted).
        tasks: the ``TaskSpec``s; names unique.
        tokenizer: the base's tokenizer.
        config, **options: ``TrainConfig`` fields shared by every task (``out``, ``batch_size``,
            ``max_length``, ``schedule``, ``dtype``, ``seed``, ``eval_every``, ``save_every``,
            ``resume``, ...); a task's own fields win.
        patience, min_delta: early stopping for tasks whose ``TaskSpec`` leaves them None.

    Raises:
        ValueError: no tasks, a repeated or unusable name, an option train_many does not do (named).
        DataError: a task's data is missing or has a bad line (file:line), before any training.
        MixingError: two tasks whose methods cannot share a batch (named), before any training.
        CheckpointError: ``resume`` from a checkpoint of other tasks or adapters.
    """
    from deltatune.training.distributed import resolve_device
    from deltatune.training.many_loop import ManyTrainer
    from deltatune.training.precision import autocast_for, bound_cpu_kernel_caches, resolve_dtype

    shared = make_config(config, **options)
    check_supported(shared)
    _check_names(tasks)
    device = resolve_device(shared.device)
    dtype = resolve_dtype(shared.dtype, device)
    if device.type == "cpu" and dtype == torch.bfloat16:
        bound_cpu_kernel_caches()  # as a solo run does: bf16 kernel caches grow per shape otherwise
    named = isinstance(base_model, (str, os.PathLike))
    if named and tokenizer is None:
        from deltatune import models

        tokenizer = models.load_tokenizer(str(base_model))
    if tokenizer is None:
        raise ValueError("train_many(base_model=<module>, ...) needs tokenizer=")
    configs = [_adapter_config(spec, shared) for spec in tasks]
    _check_mixable(tasks, configs)
    stopping = dict(patience=patience, min_delta=min_delta)
    runs = [_plan(spec, cfg, shared, tokenizer, stopping) for spec, cfg in zip(tasks, configs)]  # bad data stops here
    if patience is not None and not any(run.patience is not None for run in runs):
        raise ValueError(f"patience={patience}: no task has an eval set to stop on (TaskSpec eval_data, --task-eval)")
    if named:  # the base loads once every task's data is known to be good
        from deltatune import models

        base_model = models.load(str(base_model), dtype=dtype)
    peft = _build(base_model.to(device), tasks, configs, runs, shared.seed)
    trainer = ManyTrainer(peft, tokenizer, runs, shared, device, dtype, autocast_for(dtype, device))
    return TrainManyResult(peft, tokenizer, trainer.fit(), Path(shared.out))


# Options of a solo run that train_many does not do, with the value that means "off", and why.
UNSUPPORTED = {
    "quantize": (None, "a 4-bit base for many adapters is not built yet"),
    "init": (None, "LoRA inits other than the default (PiSSA/LoftQ change the shared base) are not built "
                   "for several tasks"),
    "fsdp": (False, "train_many runs in one process"),
    "compile": (False, "compiled layers are not built for per-row routing"),
    "grad_checkpointing": (None, "activation checkpointing is not built for per-row routing"),
    "data": (None, "each task's data is its TaskSpec's (--task NAME=PATH)"),
    "eval_data": (None, "each task's eval set is its TaskSpec's eval_data (--task-eval NAME=PATH|FRACTION)"),
}


# The ``TrainConfig`` fields train_many honours (for every task, or as each task's default). Every
# field is here or in UNSUPPORTED (a test checks it), so no option is ever silently ignored.
HONOURED = frozenset({
    "model", "method", "r", "alpha", "dropout", "target", "method_args", "double_quant",  # double_quant: with quantize
    "max_length", "overlong", "skip_bad_lines", "train_on_prompt", "packing", "group_by_length", "group_window",
    "lr", "weight_decay", "betas", "eps", "schedule", "warmup_steps", "warmup_ratio", "min_lr_ratio",
    "batch_size", "grad_accum", "max_batch_tokens", "epochs", "max_steps", "max_grad_norm", "seed", "dtype",
    "out", "log_every", "eval_every", "save_every", "keep_checkpoints", "eval_exact_match", "eval_limit",
    "eval_batch_size", "max_new_tokens", "resume", "progress", "device"})


def check_supported(shared: TrainConfig) -> None:
    """Refuse, naming it, any option of a solo run that train_many would otherwise ignore."""
    for key, (off, why) in UNSUPPORTED.items():
        value = getattr(shared, key)
        if value not in (off, None) and not (key == "grad_checkpointing" and value is False):
            raise ValueError(f"train_many does not support {key}={value!r} ({why}); train such a task alone")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("train_many does not support torchrun (WORLD_SIZE > 1): run it as one process")


def _check_names(tasks: list[TaskSpec]) -> None:
    if not tasks:
        raise ValueError("train_many needs at least one TaskSpec")
    seen = set()
    for spec in tasks:
        name = spec.name
        if not name or "/" in name or "\\" in name or name.startswith(".") or name != name.strip():
            raise ValueError(f"task name {name!r} cannot name an adapter folder (letters, digits, -, _)")
        if name in seen:
            raise ValueError(f"task name {name!r} given twice; each task needs its own name")
        seen.add(name)


def _adapter_config(spec: TaskSpec, shared: TrainConfig):
    if spec.config is not None:
        return spec.config
    return adapter_config(_task_config(spec, shared, None))


def _task_config(spec: TaskSpec, shared: TrainConfig, adapter) -> TrainConfig:
    """The task's ``TrainConfig``: the shared fields, its own data, lr, epochs, options and folder."""
    from deltatune import registry

    _check_task_options(spec)
    eval_file = None if spec.eval_data is None or _fraction(spec.eval_data) is not None else str(spec.eval_data)
    fields = {**shared.to_dict(), "data": str(spec.data), "eval_data": eval_file, "epochs": spec.epochs,
              "out": str(Path(shared.out) / spec.name), "resume": False, **spec.options}
    if spec.eval_every is not None:
        fields["eval_every"] = spec.eval_every
    fields["lr"] = spec.lr or spec.options.get("lr")
    # TrainConfig fills an unset lr with its method's default: a shared lr equal to that default
    # counts as unset, so each task gets its own method's default (IA3's is not LoRA's).
    if fields["lr"] is None and (adapter is None or shared.lr != registry.default_lr(shared.method)):
        fields["lr"] = shared.lr
    elif fields["lr"] is None:
        fields["lr"] = registry.method_of(adapter).default_lr
    return TrainConfig.from_dict(fields, source=f"task {spec.name!r}")


# Fields one run shares: a task's own value would be ignored, so TaskSpec.options refuses them.
RUN_WIDE = frozenset({"model", "out", "save_every", "keep_checkpoints", "resume", "progress", "device", "dtype",
                      "max_batch_tokens", "data", "eval_data"})
_ADAPTER_FIELDS = frozenset({"method", "r", "alpha", "dropout", "target", "method_args", "double_quant"})


def _check_task_options(spec: TaskSpec) -> None:
    """Refuse a ``TaskSpec.options`` key that the run would not honour for this one task (named)."""
    for key in spec.options:
        k = str(key).replace("-", "_")
        if k in RUN_WIDE:
            raise ValueError(f"task {spec.name!r}: options[{key!r}] is one setting for the whole run; "
                             f"give it to train_many, not to one task")
        if k in UNSUPPORTED:
            raise ValueError(f"task {spec.name!r}: train_many does not support {key}={spec.options[key]!r} "
                             f"({UNSUPPORTED[k][1]})")
        if spec.config is not None and k in _ADAPTER_FIELDS:
            raise ValueError(f"task {spec.name!r}: options[{key!r}] would be ignored next to its config= "
                             f"({type(spec.config).__name__}); set it in the config")


def _check_mixable(tasks: list[TaskSpec], configs: list) -> None:
    """Refuse, before anything loads, two tasks whose methods cannot share a batch (the
    method's declared ``mixable``); ``_build`` asks ``mixing_problem`` about the layers."""
    from deltatune import registry
    from deltatune.adapter_set import MixingError

    if len(tasks) < 2:
        return
    for spec, cfg in zip(tasks, configs):
        if not registry.method_of(cfg).mixable:
            other = next(t for t in tasks if t is not spec)
            raise MixingError(f"tasks {spec.name!r} ({_kind(cfg)}) and {other.name!r} "
                              f"({_kind(configs[tasks.index(other)])}) cannot train in one run: a "
                              f"{_kind(cfg)} adapter cannot share a batch with other adapters' rows; "
                              f"train {spec.name!r} in its own run")


def _kind(config) -> str:
    peft_type = getattr(config, "peft_type", None)
    return getattr(peft_type, "value", str(peft_type)).lower()


def _plan(spec: TaskSpec, adapter, shared: TrainConfig, tokenizer, stopping: dict) -> TaskRun:
    """The task's config and tokenized data (a bad line raises ``DataError`` naming file:line)."""
    from deltatune import registry

    cfg = _task_config(spec, shared, adapter)
    kw = dict(max_length=cfg.max_length, skip_bad_lines=cfg.skip_bad_lines, overlong=cfg.overlong,
              train_on_prompt=cfg.train_on_prompt)
    try:
        train_set = load_dataset(cfg.data, tokenizer, **kw)
        eval_set = load_dataset(cfg.eval_data, tokenizer, **kw) if cfg.eval_data else None
    except DataError as exc:
        raise DataError(f"task {spec.name!r}: {exc}") from exc
    if _fraction(spec.eval_data) is not None:
        train_set, eval_set = hold_out(train_set, _fraction(spec.eval_data), cfg.seed, spec.name)
    # the run's patience applies to the tasks that have an eval set (train_many checks that one has)
    patience = spec.patience if spec.patience is not None else stopping["patience"] if eval_set else None
    min_delta = spec.min_delta if spec.min_delta is not None else stopping["min_delta"]
    if patience is not None and (patience < 1 or not (eval_set and cfg.eval_every)):
        raise ValueError(f"task {spec.name!r}: patience={patience} needs patience >= 1, an eval set "
                         f"(eval_data / --task-eval) and eval_every > 0 (--eval-every)")
    packing = cfg.packing and registry.method_of(adapter).packable
    return TaskRun(spec.name, cfg, train_set, eval_set, packing=packing, patience=patience,
                   min_delta=float(min_delta or 0.0))


def _fraction(eval_data) -> float | None:
    """``eval_data`` as a held-out share, or None when it names a file."""
    if isinstance(eval_data, bool) or not isinstance(eval_data, (int, float, str)):
        return None
    try:
        value = float(eval_data)
    except ValueError:
        return None
    if isinstance(eval_data, str) and not eval_data.replace(".", "", 1).isdigit():
        return None
    return value


def hold_out(data: Dataset, fraction: float, seed: int, name: str) -> tuple[Dataset, Dataset]:
    """Split ``data`` into (train, eval): ``fraction`` of its examples, drawn with ``seed``, held out."""
    if not 0 < fraction < 1:
        raise ValueError(f"task {name!r}: eval fraction {fraction} must be in (0, 1)")
    n = len(data)
    n_eval = max(1, round(fraction * n))
    if n_eval >= n:
        raise ValueError(f"task {name!r}: holding out {fraction} of {n} examples leaves none to train on")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    keep = [e for i, e in enumerate(data.examples) if i not in held]
    return Dataset(keep, data.report), Dataset([data.examples[i] for i in sorted(held)], data.report)


def _build(base, tasks: list[TaskSpec], configs: list, runs: list[TaskRun], seed: int):
    """One ``PeftModel`` with every task's adapter, each initialised right after
    ``torch.manual_seed(task seed)`` (as a solo run initialises its one adapter)."""
    from deltatune.adapter_set import MixingError
    from deltatune.config import ConfigError
    from deltatune.peft_model import get_peft_model, mixing_problem

    peft = None
    for spec, cfg, run in zip(tasks, configs, runs):
        torch.manual_seed(run.config.seed)
        try:
            if peft is None:
                peft = get_peft_model(base, cfg, adapter_name=spec.name)
            else:
                peft.add_adapter(spec.name, cfg)
        except ConfigError as exc:  # e.g. a module that another task's method wraps already
            raise ConfigError(f"task {spec.name!r}: {exc}") from exc
    for p in peft.parameters():
        p.requires_grad_(False)
    if len(tasks) > 1:
        for spec, cfg in zip(tasks, configs):
            problem = mixing_problem(peft, spec.name)
            if problem:
                other = next(t.name for t in tasks if t is not spec)
                raise MixingError(f"tasks {spec.name!r} and {other!r} cannot train in one run: {problem}")
    return peft
