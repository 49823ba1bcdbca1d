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
``<out>/<task>/adapter`` as soon as its task finishes.

Not yet: resume after a kill (``save_every``/``resume`` are ignored), distributed runs,
``max_batch_tokens`` (each step is one forward pass).
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from deltatune.training.api import adapter_config, make_config
from deltatune.training.config import TrainConfig
from deltatune.training.data import DataError, load_dataset
from deltatune.training.loss import lm_loss_sum
from deltatune.training.metrics import Progress, fmt_duration
from deltatune.training.tasks import MixedBatch, TaskRun, mixed_batch


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
        eval_data: its evaluation JSONL (eval loss when the task finishes).
        options: other ``TrainConfig`` fields for this task only (``max_steps``, ``schedule``,
            ``warmup_steps``, ``batch_size``, ``seed``, ...).
    """

    name: str
    data: str | os.PathLike
    config: object | None = None
    lr: float | None = None
    epochs: float = 1.0
    eval_data: str | os.PathLike | None = None
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
               config: TrainConfig | dict | str | os.PathLike | None = None, **options) -> TrainManyResult:
    """Train one adapter per task on one base in one loop; returns a ``TrainManyResult``.

    Args:
        base_model: a transformers causal LM (not wrapped yet), or a model name/path for
            ``deltatune.models.load`` (then ``tokenizer`` may be omitted).
        tasks: the ``TaskSpec``s; names unique.
        tokenizer: the base's tokenizer.
        config, **options: ``TrainConfig`` fields shared by every task (``out``, ``batch_size``,
            ``max_length``, ``schedule``, ``dtype``, ``seed``, ...); a task's own fields win.

    Raises:
        ValueError: no tasks, a repeated or unusable name.
        DataError: a task's data is missing or has a bad line (file:line), before any training.
        MixingError: two tasks whose methods cannot share a batch (named), before any training.
    """
    from deltatune.training.distributed import resolve_device
    from deltatune.training.precision import autocast_for, resolve_dtype

    shared = make_config(config, **options)
    _check_supported(shared)
    _check_names(tasks)
    device = resolve_device(shared.device)
    dtype = resolve_dtype(shared.dtype, device)
    if isinstance(base_model, (str, os.PathLike)):
        from deltatune import models

        tokenizer = tokenizer or models.load_tokenizer(str(base_model))
        base_model = models.load(str(base_model), dtype=dtype)
    if tokenizer is None:
        raise ValueError("train_many(base_model=<module>, ...) needs tokenizer=")
    configs = [_adapter_config(spec, shared) for spec in tasks]
    _check_mixable(tasks, configs)
    runs = [_plan(spec, cfg, shared, tokenizer) for spec, cfg in zip(tasks, configs)]  # bad data stops here
    peft = _build(base_model.to(device), tasks, configs, runs, shared.seed)
    trainer = ManyTrainer(peft, tokenizer, runs, shared, device, autocast_for(dtype, device))
    return TrainManyResult(peft, tokenizer, trainer.fit(), Path(shared.out))


# Options of a solo run that train_many does not do yet, with the value that means "off".
_NOT_YET = {"quantize": None, "fsdp": False, "compile": False, "resume": False, "save_every": 0, "init": None,
            "grad_checkpointing": False}


def _check_supported(shared: TrainConfig) -> None:
    given = [k for k, off in _NOT_YET.items() if getattr(shared, k) not in (off, None)]
    if given:
        raise ValueError(f"train_many does not support {', '.join(given)} yet; train such tasks one by one")


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

    fields = {**shared.to_dict(), "data": str(spec.data), "eval_data": spec.eval_data and str(spec.eval_data),
              "epochs": spec.epochs, "out": str(Path(shared.out) / spec.name), **spec.options}
    fields["lr"] = spec.lr or spec.options.get("lr")
    # TrainConfig fills an unset lr with its method's default: a shared lr equal to that default
    # counts as unset, so each task gets its own method's default (IA3's is not LoRA's).
    if fields["lr"] is None and (adapter is None or shared.lr != registry.default_lr(shared.method)):
        fields["lr"] = shared.lr
    elif fields["lr"] is None:
        fields["lr"] = registry.method_of(adapter).default_lr
    return TrainConfig.from_dict(fields, source=f"task {spec.name!r}")


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


def _plan(spec: TaskSpec, adapter, shared: TrainConfig, tokenizer) -> TaskRun:
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
    packing = cfg.packing and registry.method_of(adapter).packable
    return TaskRun(spec.name, cfg, train_set, eval_set, packing=packing)


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


class ManyTrainer:
    """The loop of ``train_many``: one mixed step at a time until every task has finished."""

    def __init__(self, peft, tokenizer, runs: list[TaskRun], shared: TrainConfig, device, autocast) -> None:
        self.peft, self.tokenizer, self.runs, self.shared = peft, tokenizer, runs, shared
        self.device, self.autocast = device, autocast
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        for run in runs:
            run.start(peft.base_model.adapter_parameters(run.name), device, log=True)
        self.step = 0
        self.total_steps = max(run.total_steps for run in runs)

    def fit(self) -> dict[str, dict]:
        """Step until every task is done; each task's adapter is saved when it finishes."""
        self.peft.train()
        self.started = time.perf_counter()
        progress = Progress(self.total_steps, 0, self.shared.progress, desc="train many")
        while any(not run.done for run in self.runs):
            t0 = time.perf_counter()
            losses, tokens = self._step()
            dt = time.perf_counter() - t0
            self.step += 1
            _show(progress, losses, tokens / max(dt, 1e-9))
            for run in self.runs:
                if run.done and run.result is None:
                    self._finish(run, progress)
        progress.close()
        return {run.name: run.result for run in self.runs}

    def _step(self) -> tuple[dict[str, float], int]:
        """One forward/backward over every unfinished task's next batch; one optimizer step each."""
        active = [run for run in self.runs if not run.done]
        mixed = mixed_batch([(run.name, run.next_examples(), run.packing) for run in active], self.pad_id)
        lrs = {run.name: run.lr() for run in active}
        for run in active:
            for group in run.optimizer.param_groups:
                group["lr"] = lrs[run.name]
        torch.manual_seed(self.shared.seed * 1_000_003 + self.step * 4099)  # dropout masks: (seed, step)
        batch = mixed.batch.to(self.device)
        token_losses = torch.zeros(batch.targets.shape, dtype=torch.float32, device=self.device)  # (R, L)
        with self.peft.applying(mixed.names), self.autocast():
            total = lm_loss_sum(self.peft, batch, mixed.weights.to(self.device), token_losses)
        total.backward()
        losses = {}
        for run in active:
            losses[run.name] = float(token_losses[mixed.rows[run.name]].sum()) / mixed.labels[run.name]
            self._update(run, mixed, losses[run.name], lrs[run.name])
        return losses, batch.tokens

    def _update(self, run: TaskRun, mixed: MixedBatch, loss: float, lr: float) -> None:
        """Clip and step task ``run``'s adapter alone (as its solo run would), then log."""
        max_norm = run.config.max_grad_norm if run.config.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, max_norm))
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        run.tokens_seen += mixed.tokens[run.name]
        if run.step % run.config.log_every == 0 or run.done:
            run.log.log({"step": run.step, "epoch": round(run.epoch_float(), 4), "loss": loss, "lr": lr,
                         "grad_norm": grad_norm, "tokens": mixed.tokens[run.name], "run_step": self.step + 1})

    def _finish(self, run: TaskRun, progress: Progress) -> None:
        """Evaluate (if the task has eval data), write its adapter and summary, free its optimizer."""
        from deltatune.checkpoint.io import atomic_write_json

        run.stop_training()
        losses = run.log.series("loss")[1]
        result = {"steps": run.step, "tokens": run.tokens_seen, "final_loss": losses[-1] if losses else None}
        if run.eval_data is not None:
            from deltatune.training.evaluate import eval_loss

            with self.peft.applying(run.name):
                ev = eval_loss(self.peft, run.eval_data, run.config.eval_batch_size, self.device, run.packing,
                               autocast=self.autocast)
            self.peft.train()
            run.log.log({"step": run.step, "eval_loss": ev["eval_loss"]})
            result.update(ev)
        result["adapter"] = str(save_task_adapter(self.peft, run.name, run.out / "adapter"))
        atomic_write_json(run.out / "summary.json", result)
        run.result = result
        evaluated = f", eval_loss {result['eval_loss']:.4f}" if "eval_loss" in result else ""
        progress.write(f"task {run.name}: done after {run.step} steps (run step {self.step}, "
                       f"{fmt_duration(time.perf_counter() - self.started)}), loss {result['final_loss']:.4f}"
                       f"{evaluated}; adapter -> {result['adapter']}")


def _show(progress: Progress, losses: dict[str, float], tokens_per_s: float) -> None:
    """Advance the one bar with every unfinished task's loss on its line (``sql=1.2345 ...``)."""
    if progress.bar is None:
        return
    tasks = " ".join(f"{name}={loss:.4f}" for name, loss in losses.items())
    progress.bar.set_postfix_str(f"{tasks} tok/s={tokens_per_s:,.0f}", refresh=False)
    progress.bar.update(1)


def save_task_adapter(peft, name: str, directory: str | os.PathLike) -> Path:
    """Write adapter ``name`` alone as an ordinary peft directory at ``directory``.

    ``save_pretrained`` puts an adapter not named ``default`` in a subfolder of its name (peft's
    layout); it is written into a staging folder beside ``directory`` and moved into place.
    """
    directory = Path(directory)
    staging = directory.parent / f".{directory.name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    peft.save_pretrained(staging, selected_adapters=[name])
    written = staging if name == "default" else staging / name
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(written, directory)
    shutil.rmtree(staging, ignore_errors=True)
    return directory
