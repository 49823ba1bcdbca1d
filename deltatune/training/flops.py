"""Model FLOPs of a training step, and the machine's measured matmul peak: MFU.

Model FLOPs utilisation (MFU) = the FLOPs a step *needs* (counted from the architecture, not from
what the kernels happen to do) / its wall time / the peak matmul rate of this device and dtype.

A PEFT step differs from full fine-tuning: frozen weights get no weight gradient. Per training
token, with P_frozen = multiply-accumulate weights of the frozen matmuls of the body (every linear
layer except the output head; 4-bit layers count their unpacked ``in x out``):

- frozen matmuls: ``4 * P_frozen`` (a multiply-add in the forward pass, one for the input gradient);
- adapter: ``6 * P_trainable`` (forward, input gradient and weight gradient, as in full training);
- attention: per layer and per (query, key) pair a causal sequence of ``n`` tokens has
  ``n (n + 1) / 2`` pairs; ``Q K^T`` and ``P V`` cost ``2 * 2 * d_attn`` forward and twice that
  backward, so ``12 * d_attn * n_layers`` per pair (``d_attn`` = heads x head_dim);
- output head, on label positions only (deltatune's loss skips the others): ``4 * V * d``
  (``6 * V * d`` when the head itself is trained).

Embedding lookups, norms, activations and the optimizer are not counted (they are not matmuls).
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from deltatune.registry import is_linear


@dataclass(frozen=True)
class StepFlops:
    """FLOPs one training step needs, by part (see the module notes for the formula)."""

    frozen: float
    adapter: float
    attention: float
    head: float

    @property
    def total(self) -> float:
        return self.frozen + self.adapter + self.attention + self.head

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _matmul_weights(module: nn.Module) -> int:
    """Multiply-accumulate weights of one linear-like module (``in x out``, unpacked)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features) * int(module.out_features)
    return int(module.weight.numel())  # transformers' Conv1D: weight (in, out)


class FlopCounter:
    """Counts the model FLOPs of training steps of ``model`` (a PeftModel or a plain causal LM).

    Reads the architecture once: frozen and trainable matmul weights, attention width and depth
    (from the transformers config), and the output head.
    """

    def __init__(self, model: nn.Module) -> None:
        from deltatune.training.loss import unwrap

        hf = unwrap(model)
        head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        frozen = 0
        for module in hf.modules():
            if module is head or not is_linear(module):
                continue
            weight = getattr(module, "weight", None)
            if weight is not None and not weight.requires_grad:
                frozen += _matmul_weights(module)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in head_ids)
        cfg = getattr(hf, "config", None)
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 0) or 0
        heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 0) or 0
        hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0) or 0
        head_dim = getattr(text, "head_dim", None) or (hidden // heads if heads else 0)
        self.frozen_per_token = 4.0 * frozen
        self.adapter_per_token = 6.0 * trainable
        self.attention_per_pair = 12.0 * heads * head_dim * layers
        if head is not None and getattr(head, "weight", None) is not None:
            vocab_x_d = _matmul_weights(head)
            self.head_per_label = (6.0 if head.weight.requires_grad else 4.0) * vocab_x_d
        else:
            self.head_per_label = 0.0

    def step(self, lengths: list[int], label_tokens: int) -> StepFlops:
        """FLOPs of a step over sequences of ``lengths`` tokens with ``label_tokens`` labels."""
        tokens = sum(lengths)
        pairs = sum(n * (n + 1) // 2 for n in lengths)
        return StepFlops(frozen=self.frozen_per_token * tokens, adapter=self.adapter_per_token * tokens,
                         attention=self.attention_per_pair * pairs, head=self.head_per_label * label_tokens)


# -- the peak: measured once per machine, thread count, dtype and torch version, then cached --------

# Shapes of the measurement: the default model's MLP (1024 tokens x 576 -> 1536) and a square one;
# the peak is the best rate either reaches.
_CPU_SHAPES = ((1024, 576, 1536), (2048, 2048, 2048))
_CUDA_SHAPES = ((8192, 8192, 8192), (4096, 4096, 4096))


def _cache_file() -> Path:
    base = os.environ.get("DELTATUNE_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "deltatune"
    return root / "peak_flops.json"


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} x{torch.get_num_threads()} threads"


def _peak_key(device: torch.device, dtype: torch.dtype) -> str:
    return f"{_device_label(device)} | {str(dtype).removeprefix('torch.')} | torch {torch.__version__}"


def measure_peak_flops(device: torch.device | str, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Best matmul rate (FLOP/s) of ``device`` in ``dtype``, measured now (~``seconds`` per shape)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    for m, k, n in (_CUDA_SHAPES if device.type == "cuda" else _CPU_SHAPES):
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        out = torch.empty(m, n, device=device, dtype=dtype)
        torch.matmul(a, b, out=out)  # warm-up: kernel selection, packing buffers
        sync()
        reps, start = 0, time.perf_counter()
        while True:
            t0 = time.perf_counter()
            torch.matmul(a, b, out=out)
            sync()
            dt = time.perf_counter() - t0
            best = max(best, 2.0 * m * k * n / max(dt, 1e-9))
            reps += 1
            if time.perf_counter() - start > seconds and reps >= 3:
                break
    return best


def peak_flops(device: torch.device | str, dtype: torch.dtype, refresh: bool = False) -> float:
    """This machine's matmul peak for ``dtype`` (FLOP/s): cached in ``$DELTATUNE_CACHE/peak_flops.json``.

    The first call on a machine (or with ``refresh``) measures it (~2 s). A measurement taken while
    other work loads the CPU (``machine_busy``) is low: it is used for that run but not cached, so
    a later quiet run measures again. ``DELTATUNE_PEAK_GFLOPS`` overrides both.
    """
    override = os.environ.get("DELTATUNE_PEAK_GFLOPS")
    if override:
        return float(override) * 1e9
    import json

    from deltatune.checkpoint.io import atomic_write_json

    device = torch.device(device)
    path, key = _cache_file(), _peak_key(device, dtype)
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if not refresh and isinstance(cached.get(key), (int, float)) and cached[key] > 0:
        return float(cached[key])
    busy = device.type == "cpu" and machine_busy()
    value = measure_peak_flops(device, dtype)
    if not busy:  # a peak measured while other work loads the CPU is low: use it, do not keep it
        cached[key] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, cached)
    return value


def machine_busy() -> bool:
    """True when the last minute's load average is at least the number of CPUs."""
    try:
        return os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:
        return False
