"""What each contender of ``train_throughput.py`` runs in its child process (``--child NAME``).

A child trains, then reports one JSON line: real tokens and the training loop's wall time (and
its CPU time: with one thread, the core time the process actually got), peak
memory (RSS; on CUDA also peak allocated device memory), the per-step losses, MFU, the final eval
loss and (``--exact-match``) the exact match of greedy completions on the eval rows. Every figure
after training is computed by the same deltatune function for every contender.
"""
from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def start_together(args, timeout: float = 900) -> None:
    """With ``--barrier DIR`` (``--concurrent``): say this child is ready to train, then wait until
    ``--barrier-n`` children are, so that their training clocks start at the same moment."""
    if not args.barrier:
        return
    folder = Path(args.barrier)
    (folder / f"{os.getpid()}.ready").touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.glob("*.ready"))) < args.barrier_n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{folder}: the other contenders did not get ready to train within {timeout:.0f} s")
        time.sleep(0.05)


def load_data(args):
    from deltatune import models
    from deltatune.training.data import load_dataset

    tok = models.load_default_tokenizer()
    return tok, load_dataset(args.train_file, tok), load_dataset(args.eval_file, tok)


def final_exact_match(model, tok, eval_ds, args, autocast=None) -> float | None:
    """Exact match of greedy completions on ``eval_ds`` (with ``--exact-match``; else None)."""
    from contextlib import nullcontext

    from deltatune.training.evaluate import exact_match

    if not args.exact_match:
        return None
    return exact_match(model, tok, eval_ds, batch_size=16, device=args.device,
                       autocast=autocast or nullcontext)["exact_match"]


def peak_memory(args) -> dict:
    """Peak RSS (MB), and on CUDA the peak of allocated device memory (MB)."""
    import torch

    out = {"peak_rss_mb": peak_rss_mb()}
    if args.device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return out


def final_eval_loss(model, eval_ds, args, autocast=None) -> float:
    from contextlib import nullcontext

    from deltatune.training.evaluate import eval_loss

    return eval_loss(model, eval_ds, batch_size=16, device=args.device, autocast=autocast or nullcontext)["eval_loss"]


def child_hf(args, bf16: bool = False) -> dict:
    """peft + transformers' Trainer with its defaults (fp32 weights; ``bf16``: its bf16 autocast)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainerCallback, \
        TrainingArguments

    from deltatune import models
    from deltatune.training.precision import autocast_for

    tok, train_ds, eval_ds = load_data(args)
    model = AutoModelForCausalLM.from_pretrained(str(models.default_model_path()), dtype=torch.float32)
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e)} for e in train_ds]
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    seen = {"tokens": 0, "padded": 0}

    def counting_collator(features):
        batch = collate(features)
        seen["tokens"] += int(batch["attention_mask"].sum())
        seen["padded"] += batch["attention_mask"].numel()
        return batch

    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["t0"], clock["c0"] = time.perf_counter(), time.process_time()

        def on_train_end(self, *a, **k):
            clock["t1"], clock["c1"] = time.perf_counter(), time.process_time()

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps,
                                  learning_rate=args.lr, seed=args.seed, report_to="none", save_strategy="no",
                                  logging_steps=1, disable_tqdm=True, bf16=bf16, use_cpu=args.device == "cpu")
        trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=counting_collator,
                          callbacks=[Clock()])
        start_together(args)
        trainer.train()
    memory, train_end = peak_memory(args), time.time()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    train_s = clock["t1"] - clock["t0"]
    dtype = torch.bfloat16 if bf16 else torch.float32
    autocast = autocast_for(dtype, torch.device(args.device))
    return {"tokens": seen["tokens"], "padded_tokens": seen["padded"], "train_s": train_s,
            "train_cpu_s": clock["c1"] - clock["c0"],
            "tokens_per_s": seen["tokens"] / train_s, **memory, "losses": losses,
            "mfu": mfu(model, train_ds, args, train_s, dtype), "train_end_unix": train_end,
            "eval_loss": final_eval_loss(model, eval_ds, args, autocast),
            "exact_match": final_exact_match(model, tok, eval_ds, args, autocast), "dtype": str(dtype)[6:]}


def mfu(model, train_ds, args, train_s: float, dtype) -> float:
    """Model FLOPs of the ``steps x batch`` examples trained on, per second, over the cached peak."""
    from deltatune.training.flops import FlopCounter, peak_flops

    examples = [train_ds[i] for i in range(min(len(train_ds), args.steps * args.batch))]
    labels = sum(sum(1 for t in e.labels if t != -100) for e in examples)
    flops = FlopCounter(model).step([len(e) for e in examples], labels).total
    return flops / train_s / peak_flops(torch_device(args), dtype)


def torch_device(args):
    import torch

    return torch.device(args.device)


def child_deltatune(args, dtype: str, compile: bool = False) -> dict:
    import torch

    from deltatune.training import TrainConfig, Trainer
    from deltatune.training.api import load_model
    from deltatune.training.precision import autocast_for

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data=args.train_file, batch_size=args.batch, max_steps=args.steps, lr=args.lr,
                          schedule="linear", warmup_steps=0, seed=args.seed, dtype=dtype, out=out,
                          progress=False, r=16, alpha=32, target="all-linear", device=args.device,
                          **({"compile": True} if compile else {}),
                          **({"max_batch_tokens": args.max_batch_tokens} if getattr(args, "max_batch_tokens", None) else {}))
        device = torch_device(args)
        model, tok = load_model(cfg, device)
        tok, train_ds, eval_ds = load_data(args)
        trainer = Trainer(model, tok, cfg, train_ds, device=device)
        start_together(args)
        cpu0 = time.process_time()
        result = trainer.fit()  # its CPU time also counts saving the adapter and the loss plot
        cpu_s = time.process_time() - cpu0
        memory, train_end = peak_memory(args), time.time()
        losses = [r["loss"] for r in trainer.log.records if "loss" in r]
        steps = [r for r in trainer.log.records if "loss" in r]  # after the first 2: compilation is done
        late = steps[2:]
        late_s = late[-1]["elapsed_s"] - steps[1]["elapsed_s"] if late else 0.0
    return {"tokens": result["tokens"], "padded_tokens": None, "train_s": result["train_time_s"], "train_cpu_s": cpu_s,
            "tokens_per_s": result["tokens_per_s"], **memory, "losses": losses,
            "mfu": result["mfu"], "eval_loss": final_eval_loss(model, eval_ds, args, autocast_for(trainer.dtype, device)),
            "exact_match": final_exact_match(model, tok, eval_ds, args, autocast_for(trainer.dtype, device)),
            "train_end_unix": train_end,
            "dtype": str(trainer.dtype).replace("torch.", ""), "compile_s": result.get("compile_s"),
            "tokens_per_s_after_2": sum(r["tokens"] for r in late) / late_s if late_s > 0 else None,
            "compiled": result.get("compiled")}
