"""``Trainer``: the optimisation loop over a wrapped model, whatever adapter method it carries.

One optimizer step = one global batch = ``grad_accum`` micro-batches on each of ``world``
processes. Losses are summed per token and divided by the global batch's label-token count, so
a step's gradient does not depend on how the batch is split across micro-batches or processes
(DDP averages gradients over ranks, hence the extra factor ``world``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from deltatune.training import distributed as D
from deltatune.training import prefix
from deltatune.training.batching import collate, count_label_tokens, epoch_batches, micro_batches, \
    split_by_tokens
from deltatune.training.checkpoints import TrainState, find_checkpoint, load_checkpoint, save_checkpoint, \
    trainable_parameters
from deltatune.training.config import TrainConfig, default_max_batch_tokens
from deltatune.training.data import Dataset
from deltatune.training.evaluate import eval_loss, exact_match
from deltatune.training.flops import FlopCounter, peak_flops
from deltatune.training.loss import LossModule, label_only_parts, packable, unwrap
from deltatune.training.metrics import MetricsLog, Progress, fmt_duration, plot_loss_curve
from deltatune.training.precision import autocast_for, bound_cpu_kernel_caches, resolve_dtype


# Steps between returns of freed heap memory to the OS (CPU training; see ``release_free_heap``).
TRIM_EVERY = 10


def release_free_heap() -> None:
    """Give the memory glibc holds in freed chunks back to the OS (``malloc_trim(0)``).

    Activations change shape from step to step (sequence lengths vary), so freed blocks often
    do not fit the next step's tensors and glibc's heap - the process RSS - creeps up over a
    run (measured on SmolLM2-135M in bf16: ~200 MB above the real peak after 25 steps).
    Trimming every ``TRIM_EVERY`` steps costs ~1% of step time. No-op where there is no glibc.
    """
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            _LIBC = ctypes.CDLL(name) if name else False
        except OSError:
            _LIBC = False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC = None


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for 0-based ``step``: linear warmup, then cosine/linear decay/constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return min_ratio + (1 - min_ratio) * shape


def make_optimizer(params: list[torch.Tensor], config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``params`` with ``config``'s hyper-parameters; its fused kernel where torch has one.

    The fused kernel updates each tensor in one pass. torch's default on the CPU is a Python loop
    of ~10 elementwise ops per tensor (210 pairs of LoRA factors on the default model): measured
    40-70 ms against 0.26-5 s per step for 5.7M parameters on a 2-core CPU (the slow end when
    ``exp_avg_sq`` holds denormals, as it does early in a LoRA run whose ``B`` starts at zero).
    Falls back to the default implementation where fused is not available for ``device``.
    """
    kw = dict(lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    if device.type in ("cpu", "cuda") and all(p.device.type == device.type and p.is_floating_point()
                                              and type(p) in (torch.Tensor, torch.nn.Parameter) for p in params):
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device/dtype in this torch
            pass
    return torch.optim.AdamW(params, **kw)


class Trainer:
    """Train the trainable parameters of ``model`` (e.g. a ``PeftModel``) on ``train_data``.

    Args:
        model: an ``nn.Module`` whose only ``requires_grad`` parameters are the ones to train;
            a transformers causal LM inside (``unwrap`` finds it).
        tokenizer: its tokenizer (generation in exact-match eval).
        config: ``TrainConfig`` (optimiser, schedule, loop and output options).
        train_data, eval_data: tokenized ``Dataset``s (``data.load_dataset``).
        device: where to train (default: ``config.device`` resolved).

    Files (rank 0 only): ``<out>/metrics.jsonl``, ``metrics.csv``, ``loss_curve.png``,
    ``checkpoints/`` and, from ``save_adapter``, ``adapter/``.
    """

    def __init__(self, model, tokenizer, config: TrainConfig, train_data: Dataset,
                 eval_data: Dataset | None = None, device: torch.device | str | None = None) -> None:
        self.config = config
        self.device = torch.device(device) if device is not None else D.resolve_device(config.device)
        self.info = D.init(self.device)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.train_data, self.eval_data = train_data, eval_data
        self.out = Path(config.out)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self._autocast = autocast_for(self.dtype, self.device)
        self.max_batch_tokens = config.max_batch_tokens if config.max_batch_tokens is not None else \
            default_max_batch_tokens(self.dtype == torch.float32)
        if self.device.type == "cpu" and self.dtype == torch.bfloat16:
            bound_cpu_kernel_caches()
        self.params = list(trainable_parameters(model).values())
        if not self.params:
            raise ValueError("the model has no trainable parameters (was it wrapped with get_peft_model?)")
        self.optimizer = make_optimizer(self.params, config, self.device)
        self.global_batch = config.batch_size * config.grad_accum * self.info.world
        self.packing = config.packing and packable(model)
        if config.packing and not self.packing and self.info.main:
            print("packing: off (this adapter method cannot pack sequences; one sequence per row)", flush=True)
        self.steps_per_epoch = len(self._epoch_batches(0))
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * self.steps_per_epoch))
        self.warmup = config.warmup_steps or round(config.warmup_ratio * self.total_steps)
        self.state = TrainState()
        self.padding_passes = 0   # zero-weighted forward passes run only to keep FSDP ranks in step
        self.log = MetricsLog(self.out, enabled=self.info.main)
        self.pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
        if config.use_grad_checkpointing:
            self._enable_grad_checkpointing()
        # MFU: the FLOPs each step needs (FlopCounter) over the peak of every process's device.
        self.flops = FlopCounter(self.model)
        self.peak = peak_flops(self.device, self.dtype) * self.info.world
        self.sharded = bool(config.fsdp) and self.info.enabled
        if config.fsdp and not self.info.enabled:
            print("--fsdp: one process, nothing to shard; training unsharded (launch with torchrun "
                  "--nproc_per_node N to shard the base over N processes)", flush=True)
        if self.sharded:  # the base sharded, the adapter replicated (see deltatune.training.fsdp)
            from deltatune.training import fsdp

            self.loss_module = fsdp.shard(LossModule(self.model), self.model, self.info, self.device)
        else:
            self.loss_module = D.wrap_ddp(LossModule(self.model), self.info, self.device)
        self.compiler = self._layer_compiler() if config.compile else None
        from deltatune.training.cpu_linear import fast_linears_for
        from deltatune.training.fused import fused_mlps_for

        # oneDNN's frozen linears where they apply (fp32 on the CPU, unsharded, eager); fused SwiGLU
        self.fast_linears = fast_linears_for(model, self.device, self.dtype, self.sharded, self.compiler is not None,
                                             config.use_grad_checkpointing)
        self.fused_mlps = fused_mlps_for(model, config.use_grad_checkpointing)
        # why a shared prompt prefix is not run once per forward pass (None: it is; training.prefix)
        parts = label_only_parts(model)
        self.prefix_off = prefix.why_not(model, parts and parts[0], self.packing, self.info.world, self.sharded,
                                         self.compiler is not None, config.use_grad_checkpointing)

    # -- public ----------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Run to ``total_steps`` (resuming first if ``config.resume``); returns final metrics."""
        cfg, info = self.config, self.info
        self._maybe_resume()
        self.model.train()
        progress = Progress(self.total_steps, self.state.step, cfg.progress and info.main)
        window_tokens, window_time, window_flops = 0, 0.0, 0.0
        while self.state.step < self.total_steps:
            batches = self._epoch_batches(self.state.epoch)
            for b in range(self.state.batch_in_epoch, len(batches)):
                t0 = time.perf_counter()
                loss, grad_norm, tokens, lr, flops = self._run_step(batches[b])
                dt = time.perf_counter() - t0
                self.state.step += 1
                self.state.batch_in_epoch = b + 1
                self.state.tokens_seen += tokens
                self.state.elapsed_s += dt
                self.state.model_flops += flops
                window_tokens, window_time = window_tokens + tokens, window_time + dt
                window_flops += flops
                tps = window_tokens / max(window_time, 1e-9)
                mfu = window_flops / max(window_time, 1e-9) / self.peak
                progress.update(loss, tps, lr, mfu)
                if self.state.step % cfg.log_every == 0 or self.state.step == self.total_steps:
                    self.log.log({"step": self.state.step, "epoch": round(self._epoch_float(), 4),
                                  "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                                  "tokens_per_s": round(tps, 1), "mfu": round(mfu, 6),
                                  "elapsed_s": round(self.state.elapsed_s, 3)})
                    window_tokens, window_time, window_flops = 0, 0.0, 0.0
                self._periodic(progress)
                if self.state.step >= self.total_steps:
                    break
            else:
                self.state.epoch += 1
                self.state.batch_in_epoch = 0
        progress.close()
        return self._finish()

    def evaluate(self, exact: bool = False, samples: int = 0, limit: int | None = None) -> dict:
        """Eval loss (and, with ``exact``, exact match) on ``eval_data``."""
        if self.eval_data is None:
            raise ValueError("no eval data: pass eval_data= / --eval")
        cfg = self.config
        with self._unsharded():
            result = eval_loss(self.model, self.eval_data, cfg.eval_batch_size, self.device, self.packing,
                               self.info, self._autocast, lockstep=self.sharded)
            if exact:
                # Under FSDP every generated token is a forward pass all ranks must join, and ranks'
                # generations stop at different lengths: each rank generates the whole set instead.
                info = D.DistInfo() if self.sharded else self.info
                result.update(exact_match(self.model, self.tokenizer, self.eval_data, limit or cfg.eval_limit,
                                          cfg.eval_batch_size, cfg.max_new_tokens, self.device, info,
                                          self._autocast, samples))
        return result

    def save_adapter(self, directory: str | Path | None = None) -> Path:
        """Write the adapter in peft's format (rank 0); default ``<out>/adapter``."""
        directory = Path(directory) if directory is not None else self.out / "adapter"
        if self.info.main:
            self.model.save_pretrained(directory)
        return directory

    # -- one step --------------------------------------------------------------------------------
    def _run_step(self, global_batch: list[int]) -> tuple[float, float, int, float, float]:
        """``_step``; with compiled layers, a step whose compilation fails is re-run eagerly."""
        if self.compiler is None or not self.compiler.enabled:
            return self._step(global_batch)
        try:
            return self._step(global_batch)
        except Exception as exc:  # inductor/dynamo errors have many types; an eager re-run re-raises real ones
            self.compiler.disable(exc)
            self.optimizer.zero_grad(set_to_none=True)
            if self.info.main:
                print(f"compile: failed ({self.compiler.error}); training eagerly from here", flush=True)
            return self._step(global_batch)

    def _step(self, global_batch: list[int]) -> tuple[float, float, int, float, float]:
        cfg, info = self.config, self.info
        examples = [self.train_data[i] for i in global_batch]
        n_labels = max(1, count_label_tokens(examples))
        lr = cfg.lr * lr_factor(self.state.step, self.total_steps, self.warmup, cfg.schedule, cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Dropout randomness is a function of (seed, step, rank): a resumed run draws the same masks.
        torch.manual_seed(cfg.seed * 1_000_003 + self.state.step * 4099 + info.rank)
        pieces = self._pieces(global_batch, info.rank)
        passes = len(pieces)
        if self.sharded:  # each pass is a sequence of collectives: all ranks run as many as the busiest
            passes = max(len(self._pieces(global_batch, r)) for r in range(info.world))
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for k in range(passes):
            extra = k >= len(pieces)  # a zero-weighted repeat, only to join the other ranks' collectives
            batch = collate(pieces[min(k, len(pieces) - 1)], self.packing, self.pad_id,
                            share_prefix=self.prefix_off is None).to(self.device)
            last = k == passes - 1  # DDP all-reduces once per step, on each rank's last backward
            sync = nullcontext() if (last or not info.enabled or self.sharded) else self.loss_module.no_sync()
            with sync:
                with self._autocast(), self._kernels():
                    loss_sum = self.loss_module(batch)
                (loss_sum * (0.0 if extra else info.world / n_labels)).backward()
            if extra:
                self.padding_passes += 1
            else:
                total += loss_sum.detach().float()
        if self.sharded:
            from deltatune.training.fsdp import average_gradients

            average_gradients(self.params, info)
        loss = float(D.all_reduce_sum(total, info)) / n_labels
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cpu" and (self.state.step + 1) % TRIM_EVERY == 0:
            release_free_heap()
        lengths = [len(e) for e in examples]
        return loss, grad_norm, sum(lengths), lr, self.flops.step(lengths, n_labels).total

    def _pieces(self, global_batch: list[int], rank: int) -> list[list]:
        """Rank ``rank``'s forward passes of a step: its micro-batches cut to ``max_batch_tokens``
        (the tokens a pass computes: a prefix shared by its examples counts once)."""
        return [piece for ids in micro_batches(global_batch, self.config.grad_accum, self.info.world, rank)
                for piece in split_by_tokens([self.train_data[i] for i in ids], self.max_batch_tokens,
                                             share_prefix=self.prefix_off is None)]

    def _unsharded(self):
        """Evaluation calls the decoder past the root's ``forward`` (``fsdp.as_root``)."""
        if not self.sharded:
            return nullcontext()
        from deltatune.training.fsdp import as_root

        return as_root(self.loss_module)

    # -- around the steps ------------------------------------------------------------------------
    def _periodic(self, progress: Progress) -> None:
        cfg, step = self.config, self.state.step
        if cfg.eval_every and self.eval_data is not None and step % cfg.eval_every == 0 and step < self.total_steps:
            result = self.evaluate()
            self.log.log({"step": step, "epoch": round(self._epoch_float(), 4), "eval_loss": result["eval_loss"]})
            if self.info.main:
                progress.write(f"step {step}: eval_loss={result['eval_loss']:.4f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < self.total_steps:
            if self.info.main:
                save_checkpoint(self.out, self.state, self.model, self.optimizer, cfg.to_dict(),
                                cfg.keep_checkpoints)
                plot_loss_curve(self.log, self.out / "loss_curve.png")
            D.barrier(self.info)

    def _finish(self) -> dict:
        cfg = self.config
        train_loss = self.log.series("loss")[1]
        result = {"steps": self.state.step, "tokens": self.state.tokens_seen,
                  "train_time_s": round(self.state.elapsed_s, 2),
                  "tokens_per_s": round(self.state.tokens_seen / max(self.state.elapsed_s, 1e-9), 1),
                  "mfu": round(self.state.model_flops / max(self.state.elapsed_s, 1e-9) / self.peak, 6),
                  "model_flops_per_token": round(self.state.model_flops / max(self.state.tokens_seen, 1)),
                  "peak_gflops": round(self.peak / 1e9, 1),
                  "final_loss": train_loss[-1] if train_loss else None,
                  "prefix_sharing": prefix.status(self.prefix_off)}
        if self.compiler is not None:  # compile time is inside train_time_s; this says how much of it
            from deltatune.training.compiling import compile_seconds

            result.update(compiled=self.compiler.enabled, compile_s=round(compile_seconds(), 1))
        if self.eval_data is not None:
            exact = cfg.eval_exact_match and any(e.reference is not None for e in self.eval_data.examples)
            ev = self.evaluate(exact=exact)
            self.log.log({"step": self.state.step, "epoch": round(self._epoch_float(), 4),
                          "eval_loss": ev["eval_loss"], **({"exact_match": ev["exact_match"]} if exact else {})})
            result.update({k: v for k, v in ev.items() if k != "samples"})
        if self.info.main:
            plot_loss_curve(self.log, self.out / "loss_curve.png")
            result["adapter"] = str(self.save_adapter())
            from deltatune.checkpoint.io import atomic_write_json

            atomic_write_json(self.out / "summary.json", result)
            print(f"trained {result['steps']} steps in {fmt_duration(result['train_time_s'])} "
                  f"({result['tokens_per_s']:,.0f} tokens/s, MFU {result['mfu']:.1%} of "
                  f"{result['peak_gflops']:,.0f} GFLOP/s); adapter -> {result['adapter']}", flush=True)
        return result

    def _maybe_resume(self) -> None:
        resume = self.config.resume
        if not resume:
            return
        path = find_checkpoint(self.out if resume is True or resume == "auto" else resume)
        if path is None:
            if self.info.main:
                print(f"resume: no checkpoint under {self.out}; starting from step 0", flush=True)
            return
        fused = [g.get("fused") for g in self.optimizer.param_groups]
        self.state, _ = load_checkpoint(path, self.model, self.optimizer)
        for group, flag in zip(self.optimizer.param_groups, fused):  # this run's kernel, not the saved run's
            group["fused"] = flag
        self.log.resume_from(self.state.step)
        if self.info.main:
            print(f"resumed from {path} (step {self.state.step}/{self.total_steps})", flush=True)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        window = self.config.group_window if self.config.group_by_length else 1
        return epoch_batches(self.train_data.lengths, self.global_batch, self.config.seed, epoch, window=window)

    def _epoch_float(self) -> float:
        return self.state.epoch + self.state.batch_in_epoch / max(1, self.steps_per_epoch)

    def _layer_compiler(self):
        """A ``LayerCompiler`` for ``config.compile``, or None (and why, printed) where it cannot be used."""
        from deltatune.training import compiling

        reason = compiling.why_not(self.model, self.device, self.info.world, self.config.use_grad_checkpointing)
        if reason is not None:
            if self.info.main:
                print(f"compile: off ({reason}); training eagerly", flush=True)
            return None
        return compiling.LayerCompiler(self.model)

    def _kernels(self):
        """The training forward's kernel switches: compiled layers, else oneDNN's frozen linears
        and ``fused.SwiGLU`` MLPs."""
        if self.compiler is not None and self.compiler.enabled:
            return self.compiler.active()
        from deltatune.training.cpu_linear import all_active

        return all_active(self.fast_linears, self.fused_mlps)

    def _enable_grad_checkpointing(self) -> None:
        hf = unwrap(self.model)
        if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.2x
            hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(hf, "gradient_checkpointing_enable"):
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise ValueError(f"{type(hf).__name__} does not support gradient checkpointing")
        if getattr(hf, "config", None) is not None:
            hf.config.use_cache = False
