"""``deltatune.training.train(...)``: model + adapter + data + ``Trainer`` in one call.

    from deltatune.training import train
    result = train(data="data/demo_train.jsonl", eval_data="data/demo_eval.jsonl",
                   method="lora", r=16, alpha=32, target="all-linear", out="runs/demo")
    result.model      # the PeftModel (an nn.Module), trained
    result.metrics    # steps, tokens/s, final loss, eval loss, exact match

The same options as ``deltatune train`` flags and ``--config`` file keys (``TrainConfig``).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from deltatune.training.config import TrainConfig
from deltatune.training.data import Dataset, load_dataset


@dataclass
class TrainResult:
    """What ``train`` returns: the trained model, its tokenizer, the trainer and its metrics."""

    model: torch.nn.Module
    tokenizer: object
    trainer: object
    metrics: dict

    @property
    def adapter_dir(self) -> Path:
        return Path(self.trainer.config.out) / "adapter"


def make_config(config: TrainConfig | dict | str | os.PathLike | None = None, **overrides) -> TrainConfig:
    """A ``TrainConfig`` from a config object, a mapping or a YAML/JSON path, plus overrides (None ignored)."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if config is None:
        return TrainConfig.from_dict(overrides, source="arguments")
    if isinstance(config, TrainConfig):
        return dataclasses.replace(config, **overrides)
    if isinstance(config, dict):
        return TrainConfig.from_dict({**config, **overrides}, source="config")
    return TrainConfig.from_file(config, **overrides)


def adapter_config(config: TrainConfig):
    """The method's config (via ``deltatune.registry.make_config``) from the generic flags.

    ``r``, ``alpha``, ``dropout`` and ``target`` go to the fields the method has (``r``,
    ``lora_alpha``, ``lora_dropout``, ``target_modules``); ``method_args`` are passed as given.
    """
    from deltatune import registry, targeting

    target = targeting.parse_target_arg(config.target) if isinstance(config.target, str) else config.target
    generic = {"r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
               "target_modules": target}
    try:
        fields = {f.name for f in dataclasses.fields(type(registry.make_config(config.method)))}
    except TypeError:  # a method whose config has required fields: pass everything through
        fields = set(generic)
    kwargs = {k: v for k, v in generic.items() if k in fields}
    init = config.lora_init()
    if init and "init_lora_weights" not in fields:
        raise ValueError(f"init={config.init!r}: method {config.method!r} has no init_lora_weights (use a LoRA method)")
    kwargs.update(init)
    kwargs.update(config.method_args or {})
    return registry.make_config(config.method, **kwargs)


def load_model(config: TrainConfig, device: torch.device):
    """Base model + tokenizer (``deltatune.models``), wrapped with a new adapter, on ``device``.

    In bf16 compute the frozen base is loaded in bf16 (adapter parameters stay fp32). With
    ``config.quantize`` the base's linear layers are stored in 4 bits (``deltatune.quantize``)
    on ``device`` first: QLoRA. With ``init="loftq[:N]"`` LoftQ makes the 4-bit base instead,
    while the adapter goes on (``deltatune.quant.loftq``).
    """
    from deltatune import models
    from deltatune.peft_model import get_peft_model
    from deltatune.training.precision import bound_cpu_kernel_caches, resolve_dtype

    dtype = resolve_dtype(config.dtype, device)
    if device.type == "cpu" and dtype == torch.bfloat16:
        bound_cpu_kernel_caches()
    tokenizer = models.load_tokenizer(config.model)
    base = models.load(config.model, dtype=dtype).to(device)
    adapter = adapter_config(config)
    if config.quantize:
        from deltatune import targeting
        from deltatune.quant import quantize

        # LoftQ quantizes the layers it targets itself (while the adapter goes on); the rest here.
        loftq = getattr(adapter, "init_lora_weights", None) == "loftq"
        # On CPUs the 4-bit layers pick their own fast matmul dtype (resolve_compute_dtype);
        # elsewhere they compute in the run's dtype.
        quantize(base, quant_type=config.quantize, double_quant=config.double_quant,
                 compute_dtype=None if device.type == "cpu" else dtype,
                 skip_modules=targeting.select(base, adapter) if loftq else None)
    torch.manual_seed(config.seed)  # adapter initialisation is part of the run's seed
    return get_peft_model(base, adapter), tokenizer


def load_data(config: TrainConfig, tokenizer) -> tuple[Dataset, Dataset | None]:
    """Tokenized train (and eval) sets, with their reports printed."""
    if not config.data:
        raise ValueError("no training data: pass data= / --data FILE.jsonl")
    kw = dict(max_length=config.max_length, skip_bad_lines=config.skip_bad_lines, overlong=config.overlong,
              train_on_prompt=config.train_on_prompt)
    train_set = load_dataset(config.data, tokenizer, **kw)
    eval_set = load_dataset(config.eval_data, tokenizer, **kw) if config.eval_data else None
    return train_set, eval_set


def train(config: TrainConfig | dict | str | os.PathLike | None = None, *, model=None, tokenizer=None,
          **options) -> TrainResult:
    """Fine-tune an adapter and save it; returns a ``TrainResult``.

    Args:
        config: a ``TrainConfig``, a dict of its fields, or a YAML/JSON file path.
        model: an already wrapped model (e.g. from ``get_peft_model``) to train instead of
            loading ``config.model``; then ``tokenizer`` is required too.
        **options: ``TrainConfig`` fields, overriding ``config``.

    Under ``torchrun`` every process calls this; rank 0 alone writes files.
    """
    from deltatune.training import distributed as D
    from deltatune.training.loop import Trainer

    cfg = make_config(config, **options)
    device = D.resolve_device(cfg.device)
    info = D.init(device)
    if device.type == "cpu" and info.enabled and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if model is None:
        model, tokenizer = load_model(cfg, device)
    elif tokenizer is None:
        raise ValueError("train(model=...) needs tokenizer= as well")
    train_set, eval_set = load_data(cfg, tokenizer)
    if info.main:
        from deltatune.advisor.doctor import warn_at_train  # known run mistakes, as warnings (deltatune doctor)

        warn_at_train(cfg, len(train_set.examples))
    if info.main:
        for ds in (train_set, eval_set):
            if ds is not None:
                print(ds.report.summary(), flush=True)
    trainer = Trainer(model, tokenizer, cfg, train_set, eval_set, device=device)
    metrics = trainer.fit()
    if info.main and cfg.lora_init().get("init_lora_weights") == "loftq":
        from deltatune.quant.loftq import BASE_FILE, save_4bit_layers

        # LoftQ's 4-bit base is not NF4 of the dense weights (iterations > 1): keep it with the adapter
        save_4bit_layers(model, Path(cfg.out) / "adapter" / BASE_FILE)
    return TrainResult(model, tokenizer, trainer, metrics)


# -- inference helpers (``deltatune eval`` / ``generate`` / ``chat``) --------------------------------

def load_inference_model(model: str = "default", adapter: str | None = None, dtype: str = "auto",
                         device: str = "auto"):
    """``(model, tokenizer, device, autocast)``: a base (+ saved adapter) in eval mode."""
    from deltatune import models
    from deltatune.peft_model import PeftModel
    from deltatune.training.distributed import resolve_device
    from deltatune.training.precision import autocast_for, bound_cpu_kernel_caches, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cpu" and dt == torch.bfloat16:
        bound_cpu_kernel_caches()
    tokenizer = models.load_tokenizer(model)
    net = models.load(model, dtype=dt).to(dev)
    if adapter:
        from deltatune.quant.loftq import BASE_FILE, load_4bit_layers

        if (Path(adapter) / BASE_FILE).is_file():   # a LoftQ run's 4-bit base (see ``train``)
            load_4bit_layers(net, Path(adapter) / BASE_FILE)
        net = PeftModel.from_pretrained(net, adapter)
    return net.eval(), tokenizer, dev, autocast_for(dt, dev)


def evaluate_model(model, tokenizer, data: str, *, device="cpu", autocast=None, exact: bool = True,
                   limit: int | None = None, batch_size: int = 16, max_length: int = 1024,
                   max_new_tokens: int | None = None, samples: int = 0) -> dict:
    """Eval loss (and exact match where the data has references) of ``model`` on a JSONL file."""
    from contextlib import nullcontext

    from deltatune.training.evaluate import eval_loss, exact_match

    autocast = autocast or nullcontext
    dataset = load_dataset(data, tokenizer, max_length=max_length)
    result = eval_loss(model, dataset, batch_size, device, autocast=autocast)
    if exact and any(e.reference is not None for e in dataset.examples):
        result.update(exact_match(model, tokenizer, dataset, limit, batch_size, max_new_tokens, device,
                                  autocast=autocast, samples=samples))
    return result


def generate(model, tokenizer, prompts: list, *, system: str | None = None, raw: bool = False,
             max_new_tokens: int = 256, batch_size: int = 16, device="cpu", autocast=None) -> list[str]:
    """Greedy replies to ``prompts``: strings (one user turn each) or lists of chat messages.

    Strings go through the tokenizer's chat template unless ``raw`` (or there is no template).
    """
    from contextlib import nullcontext

    from deltatune.training.evaluate import greedy_generate

    ids = []
    for p in prompts:
        if raw or (isinstance(p, str) and not getattr(tokenizer, "chat_template", None)):
            ids.append(tokenizer(p)["input_ids"])
            continue
        messages = p if isinstance(p, list) else [{"role": "user", "content": p}]
        if system and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": system}] + messages
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return greedy_generate(model, tokenizer, ids, max_new_tokens, batch_size, device, autocast or nullcontext)
