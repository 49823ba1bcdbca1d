"""The loop of ``train_many``: one mixed step at a time until every task has finished.

Each step takes every unfinished task's next batch (the batch a solo run of it takes), runs them
as forward passes of at most ``max_batch_tokens`` tokens whose rows are routed per row to their
task's adapter (``PeftModel.applying(names)``), then clips and steps each task's own optimizer.
Around the steps, per task: evaluation every ``eval_every`` of its steps with early stopping, and
the adapter written as soon as the task finishes; for the run: checkpoints every ``save_every``
run steps (``many_checkpoint``) and resume from the latest one.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from deltatune.training import cpu_linear, prefix
from deltatune.training.config import TrainConfig, default_max_batch_tokens
from deltatune.training.fused import fused_mlps_for
from deltatune.training.loop import TRIM_EVERY, release_free_heap
from deltatune.training.loss import label_only_parts, lm_loss_sum
from deltatune.training.many_checkpoint import load_many, save_many
from deltatune.training.many_eval import EvalTask, eval_losses, exact_matches
from deltatune.training.metrics import Progress, fmt_duration, plot_loss_curve
from deltatune.training.tasks import MixedBatch, TaskRun, mixed_batches


# Evaluation batches: a no-grad pass holds no activations for backward, so it may take this many
# times a training pass's tokens; a ``generate`` call takes this many times ``eval_batch_size``
# prompts. Each pass and call holds one task's rows (``EVAL_MIX_TASKS`` False): mixing tasks in a
# call routes each row through the gathered per-row path, which copies each row's factors for
# every adapted layer (~20 MB a row in fp32 on the default model, LoRA r=16 all-linear). Measured
# (8 tasks x 16 eval rows, 1 thread, benchmarks/train_many_eval.py): per task as a solo run 100.6 s
# / 1311 MB peak RSS; one task per call 95.4 s / 1256 MB; tasks mixed 79.1 s / 3229 MB.
EVAL_TOKENS_PER_PASS = 4
EVAL_MIX_TASKS = False
EVAL_ROWS_PER_TASK_BATCH = 4


class ManyTrainer:
    """Train every task of ``runs`` on ``peft`` (which holds one adapter per task, by name).

    Args:
        peft: the ``PeftModel``; every parameter frozen (each task's are thawed here).
        runs: the tasks' ``TaskRun``s.
        shared: the run's ``TrainConfig`` (out, seed, save_every, resume, progress, max_batch_tokens).
        device, dtype, autocast: where and how to compute.
    """

    def __init__(self, peft, tokenizer, runs: list[TaskRun], shared: TrainConfig, device, dtype, autocast) -> None:
        self.peft, self.tokenizer, self.runs, self.shared = peft, tokenizer, runs, shared
        self.device, self.autocast = device, autocast
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.max_tokens = shared.max_batch_tokens if shared.max_batch_tokens is not None else \
            default_max_batch_tokens(dtype == torch.float32)  # a solo run's default
        for run in runs:
            run.start(peft.base_model.adapter_parameters(run.name), device, log=True)
        self.step = 0
        self.elapsed = 0.0
        self.phases = {"train_s": 0.0, "eval_s": 0.0, "save_s": 0.0}   # this process's time in each
        self.total_steps = max(run.total_steps for run in runs)
        # oneDNN's frozen linears as a solo fp32 run has them (train_many refuses FSDP, compile, checkpointing)
        self.fast_linears = cpu_linear.fast_linears_for(peft, device, dtype)
        self.fused_mlps = fused_mlps_for(peft)   # as a solo run: 15% fewer activation bytes per token
        # why a task's shared prompt prefix does not run once per pass, as in a solo run (None: it does)
        parts = label_only_parts(peft)
        self.prefix_off = prefix.why_not(peft, parts and parts[0], all(run.packing for run in runs), 1,
                                         False, False, False)

    def fit(self) -> dict[str, dict]:
        """Step until every task is done (resuming first if ``resume``); returns each task's result."""
        self._maybe_resume()
        self.peft.train()
        self.started = time.perf_counter() - self.elapsed
        progress = Progress(self.total_steps, self.step, self.shared.progress, desc="train many")
        while any(not run.done for run in self.runs):
            t0 = time.perf_counter()
            active = [run for run in self.runs if not run.done]
            losses, tokens = self._step(active)
            dt = time.perf_counter() - t0
            self.step += 1
            self.elapsed += dt
            self.phases["train_s"] += dt
            _show(progress, losses, tokens / max(dt, 1e-9))
            self._maybe_evaluate(active, progress)
            finished = [run for run in active if run.done]
            if finished:
                self._finish(finished, progress)
            self._maybe_save()
        progress.close()
        self._write_run_summary()
        return {run.name: run.result for run in self.runs}

    def _write_run_summary(self) -> None:
        """``<out>/run_summary.json``: run steps and where this process's loop time went."""
        from deltatune.checkpoint.io import atomic_write_json

        phases = {k: round(v, 2) for k, v in self.phases.items()}
        atomic_write_json(Path(self.shared.out) / "run_summary.json",
                          {"run_steps": self.step, **phases, "tasks": sorted(run.name for run in self.runs),
                           "prefix_sharing": prefix.status(self.prefix_off)})
        print(f"train many: {self.step} run steps; train {fmt_duration(phases['train_s'])}, "
              f"eval {fmt_duration(phases['eval_s'])}, save {fmt_duration(phases['save_s'])}", flush=True)

    # -- one step --------------------------------------------------------------------------------
    def _step(self, active: list[TaskRun]) -> tuple[dict[str, float], int]:
        """Forward/backward over every active task's next batch; each task's optimizer steps as
        soon as its last pass is done (its gradient is then complete; its grads are freed)."""
        passes = mixed_batches([(run.name, run.next_examples(), run.packing) for run in active], self.pad_id,
                               self.max_tokens, share_prefix=self.prefix_off is None)
        lrs = {run.name: run.lr() for run in active}
        for run in active:
            for group in run.optimizer.param_groups:
                group["lr"] = lrs[run.name]
        torch.manual_seed(self.shared.seed * 1_000_003 + self.step * 4099)  # dropout masks: (seed, step)
        sums = {run.name: 0.0 for run in active}
        tokens = {run.name: 0 for run in active}
        labels = {name: n for p in passes for name, n in p.labels.items()}
        last = {name: i for i, p in enumerate(passes) for name in p.rows}   # each task's last pass
        losses = {}
        for i, mixed in enumerate(passes):
            self._pass(mixed, sums, tokens)
            for run in active:  # a task whose gradient is complete steps now: one task's grads live at a time
                if last[run.name] == i:
                    losses[run.name] = sums[run.name] / labels[run.name]
                    self._update(run, losses[run.name], lrs[run.name], tokens[run.name])
        if self.device.type == "cpu" and (self.step + 1) % TRIM_EVERY == 0:
            release_free_heap()
        return losses, sum(tokens.values())

    def _pass(self, mixed: MixedBatch, sums: dict[str, float], tokens: dict[str, int]) -> None:
        """One forward/backward; adds each task's summed token loss and tokens to ``sums``/``tokens``."""
        batch = mixed.batch.to(self.device)
        token_losses = torch.zeros(batch.targets.shape, dtype=torch.float32, device=self.device)  # (R, L)
        with self.peft.applying(mixed.names), self.autocast(), \
                cpu_linear.all_active(self.fast_linears, self.fused_mlps):
            total = lm_loss_sum(self.peft, batch, mixed.weights.to(self.device), token_losses)
        total.backward()
        for name, rows in mixed.rows.items():
            sums[name] += float(token_losses[rows].sum())
            tokens[name] += mixed.tokens[name]

    def _update(self, run: TaskRun, loss: float, lr: float, tokens: int) -> None:
        """Clip and step task ``run``'s adapter alone (as its solo run would), then log."""
        max_norm = run.config.max_grad_norm if run.config.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, max_norm))
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        run.tokens_seen += tokens
        if run.step % run.config.log_every == 0 or run.step >= run.total_steps:
            run.log.log({"step": run.step, "epoch": round(run.epoch_float(), 4), "loss": loss, "lr": lr,
                         "grad_norm": grad_norm, "tokens": tokens, "run_step": self.step + 1})

    # -- around the steps ------------------------------------------------------------------------
    def _maybe_evaluate(self, active: list[TaskRun], progress: Progress) -> None:
        """The tasks due an evaluation (every ``eval_every`` of their steps, before their last):
        eval loss, in shared passes, and early stopping."""
        due = [run for run in active if run.config.eval_every and run.eval_data is not None
               and run.step % run.config.eval_every == 0 and run.step < run.total_steps]
        if not due:
            return
        losses = self._eval_losses(due)
        for run in due:
            loss = losses[run.name]["eval_loss"]
            run.record_eval(loss)
            run.log.log({"step": run.step, "epoch": round(run.epoch_float(), 4), "eval_loss": loss})
            stop = f"; no better than {run.best_loss:.4f} (step {run.best_step}) {run.bad_evals} times: stopping" \
                if run.stopped_early else ""
            progress.write(f"task {run.name} step {run.step}: eval_loss={loss:.4f}{stop}")

    def _eval_losses(self, runs: list[TaskRun]) -> dict[str, dict]:
        """Each run's eval loss, every task's rows in shared no-grad passes (``many_eval``)."""
        t0 = time.perf_counter()
        tasks = [EvalTask(run.name, run.eval_data, run.packing) for run in runs]
        result = eval_losses(self.peft, tasks, self.pad_id, EVAL_TOKENS_PER_PASS * self.max_tokens, self.device,
                             self.autocast, mix_tasks=EVAL_MIX_TASKS)
        self.peft.train()
        self.phases["eval_s"] += time.perf_counter() - t0
        return result

    def _finish(self, runs: list[TaskRun], progress: Progress) -> None:
        """Evaluate the finished tasks together (those with eval data), then write each one's
        adapter (its best, with early stopping) and summary; their optimizers are freed."""
        from deltatune.checkpoint.io import atomic_write_json

        results = {}
        for run in runs:
            run.stop_training()
            losses = run.log.series("loss")[1]
            results[run.name] = {"steps": run.step, "run_step": self.step, "tokens": run.tokens_seen,
                                 "final_loss": losses[-1] if losses else None, "stopped_early": run.stopped_early,
                                 "time_s": round(time.perf_counter() - self.started, 2)}
        evals = self._final_evals([run for run in runs if run.eval_data is not None])
        for run in runs:
            t0 = time.perf_counter()
            result = {**results[run.name], **evals.get(run.name, {})}
            result["adapter"] = str(save_task_adapter(self.peft, run.name, run.out / "adapter"))
            plot_loss_curve(run.log, run.out / "loss_curve.png", title=f"task {run.name}")
            atomic_write_json(run.out / "summary.json", result)
            self.phases["save_s"] += time.perf_counter() - t0
            run.result, run.best_params = result, None
            evaluated = f", eval_loss {result['eval_loss']:.4f}" if "eval_loss" in result else ""
            if "exact_match" in result:
                evaluated += f", exact match {result['exact_match']:.1%}"
            progress.write(f"task {run.name}: done after {run.step} steps (run step {self.step}, "
                           f"{fmt_duration(result['time_s'])}), loss {result['final_loss']:.4f}"
                           f"{evaluated}; adapter -> {result['adapter']}")
        if self.device.type == "cpu":
            release_free_heap()  # their optimizer state and grads are free now: give them back

    def _final_evals(self, runs: list[TaskRun]) -> dict[str, dict]:
        """Each run's eval loss of the adapter to write (the last one, or with early stopping the
        best one evaluated), then exact match of it where its eval set has references; every
        task's rows in shared passes and ``generate`` calls."""
        if not runs:
            return {}
        best_step = {run.name: run.step for run in runs}
        for run in runs:
            if run.stopped_early:
                run.restore_best()
                best_step[run.name] = run.best_step
        evals = self._eval_losses(runs)
        for run in runs:
            ev = evals[run.name]
            if not run.stopped_early and run.patience is not None and run.best_loss is not None \
                    and run.best_loss < ev["eval_loss"]:
                run.restore_best()
                ev["eval_loss"], best_step[run.name] = run.best_loss, run.best_step
            if run.patience is not None:
                ev["best_step"] = best_step[run.name]
            run.log.log({"step": run.step, "eval_loss": ev["eval_loss"]})
        scored = [EvalTask(run.name, run.eval_data, limit=run.config.eval_limit,
                           max_new_tokens=run.config.max_new_tokens) for run in runs
                  if run.config.eval_exact_match and any(e.reference is not None for e in run.eval_data.examples)]
        if scored:
            t0 = time.perf_counter()
            rows = EVAL_ROWS_PER_TASK_BATCH * max(run.config.eval_batch_size for run in runs)
            for name, em in exact_matches(self.peft, self.tokenizer, scored, rows, self.device, self.autocast,
                                          mix_tasks=EVAL_MIX_TASKS).items():
                evals[name].update(em)
            self.peft.train()
            self.phases["eval_s"] += time.perf_counter() - t0
        return evals

    def _maybe_save(self) -> None:
        every = self.shared.save_every
        if every and self.step % every == 0 and any(not run.done for run in self.runs):
            save_many(self.shared.out, self.step, self.runs,
                      {"elapsed_s": self.elapsed, "config": self.shared.to_dict()}, self.shared.keep_checkpoints)

    def _maybe_resume(self) -> None:
        from deltatune.training.checkpoints import find_checkpoint

        resume, out = self.shared.resume, Path(self.shared.out)
        if not resume:
            return
        path = find_checkpoint(out if resume is True or resume == "auto" else resume)
        if path is None:
            print(f"resume: no checkpoint under {out}; starting from step 0", flush=True)
            return
        meta = load_many(path, self.runs)
        self.step, self.elapsed = meta["step"], meta.get("elapsed_s", 0.0)
        for run in self.runs:
            run.log.resume_from(run.step)
        done = [run.name for run in self.runs if run.result is not None]
        print(f"resumed from {path} (run step {self.step}" + (f"; finished: {', '.join(done)}" if done else "") + ")",
              flush=True)


def _show(progress: Progress, losses: dict[str, float], tokens_per_s: float) -> None:
    """Advance the one bar with every unfinished task's loss on its line (``sql=1.2345 ...``)."""
    if progress.bar is None:
        return
    tasks = " ".join(f"{name}={loss:.4f}" for name, loss in losses.items())
    progress.bar.set_postfix_str(f"{tasks} tok/s={tokens_per_s:,.0f}", refresh=False)
    progress.bar.update(1)


def save_task_adapter(peft, name: str, directory: str | Path) -> Path:
    """Write adapter ``name`` alone as an ordinary peft directory at ``directory``, atomically.

    ``save_pretrained`` puts an adapter not named ``default`` in a subfolder of its name (peft's
    layout): it writes into the new directory's staging folder, whose files are moved up before
    the directory replaces any older one whole (``atomic_directory``).
    """
    import os
    import shutil

    from deltatune.atomic import atomic_directory

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        peft.save_pretrained(tmp / ".staging", selected_adapters=[name])
        written = tmp / ".staging" if name == "default" else tmp / ".staging" / name
        for entry in os.listdir(written):
            os.replace(written / entry, tmp / entry)
        shutil.rmtree(tmp / ".staging")
    return directory
