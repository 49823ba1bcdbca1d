"""Peak training memory of one method on one base, split into the parts that make it up.

Every figure is bytes on one device. The terms, per trainable/frozen parameter and per token:

* base weights: full precision 4 B, 16-bit 2 B; NF4 with double quantization 4.127 bits per weight
  of the blocks' linear layers (blocksize 64, second level 256: QLoRA, Dettmers et al. 2023,
  arXiv:2305.14314, section 3), 4.5 bits without; embeddings, head and norms stay 16-bit.
* trainable parameters (adapters, or the whole model in full fine-tuning): weights, gradients and
  optimizer state. Adapters train in fp32 (4 + 4 B) whatever the base; AdamW keeps two fp32 moments
  (8 B), 8-bit AdamW two 1-byte moments plus block scales (~2 B), plain SGD none. 16-bit mixed
  full fine-tuning is ZeRO's accounting (Rajbhandari et al. 2020, arXiv:1910.02054, section 3.1):
  2 B weights + 2 B gradients + 12 B fp32 master copy and moments = 16 B per parameter.
* activations kept for backward, per token and decoder layer (a Llama block, counted tensor by
  tensor in ``_layer_bytes``), times tokens per forward pass; with gradient checkpointing only each
  block's input is kept, plus one block recomputed during backward (on a CPU, what glibc's heap
  holds of the recomputes, measured: ``CPU_CKPT_BLOCKS``).
* the output head's loss as ``deltatune train`` computes it: chunks of at most 2^24 logits.
* framework overhead: the CUDA context and kernels, or on a CPU the process itself (Python, torch,
  transformers), measured on this project's CI machine (see ``CPU_RUNTIME_BYTES``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from deltatune.advisor.shapes import ModelShape

GiB = 1024 ** 3
MiB = 1024 ** 2

NF4_DQ_BITS = 4 + 0.127   # 4-bit codes + 8-bit scale per 64 weights, double-quantized (arXiv:2305.14314)
NF4_BITS = 4 + 32 / 64    # 4-bit codes + an fp32 scale per block of 64
CUDA_RUNTIME_BYTES = 1 * GiB  # CUDA context + cuBLAS/cuDNN workspaces: ~0.5-1 GiB on recent GPUs (approximate)
# RSS of a Python process that has imported torch + transformers and the tokenizer (measured: 348 MiB
# on this project's 2-core CI machine, torch 2.13 CPU); what the checkpoint load adds sits on top.
CPU_RUNTIME_BYTES = 350 * MiB
# The same process while training: autograd, oneDNN/ideep kernel caches, glibc arenas holding
# freed activation blocks of varying shapes. Calibrated on the default model with `deltatune train`
# (tests/test_advisor_measured.py, LoRA fp32, passes of 600 tokens: 2,398-2,586 MiB over 8 runs,
# AMD EPYC; the plan sits near their middle).
CPU_TRAIN_RUNTIME_BYTES = 1100 * MiB
# A CPU run under gradient checkpointing (QLoRA's default) grows ~4x faster with tokens per pass
# than the tensors it keeps: in backward, glibc's heap holds the recomputed block, its gradients
# and the freed recomputes of the blocks before it (~8 blocks' activations), and the chunked loss
# ~4 chunk-sized buffers (logits, probabilities, their gradient, one freed). Fitted to `deltatune
# train --quantize nf4`'s peak RSS on the default model at 135-1040 tokens per pass (fp32, AMD
# EPYC, 3-4 runs at 520: 1,376-1,677 MiB), with the process's own part fitted with it.
CPU_CKPT_BLOCKS = 8
CPU_CKPT_LOSS_BUFFERS = 4
CPU_CKPT_RUNTIME_BYTES = 750 * MiB
LOSS_CHUNK_LOGITS = 1 << 24  # deltatune.training.loss: ~2^24 logits per chunk

OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0, "sgd": 0.0}

METHODS = ("full", "full-bf16", "lora", "dora", "qlora", "ia3", "prompt", "prefix")
LABELS = {"full": "full fine-tuning (fp32)", "full-bf16": "full fine-tuning (bf16 mixed)", "lora": "LoRA",
          "dora": "DoRA", "qlora": "QLoRA (NF4 + double quant)", "ia3": "IA³", "prompt": "prompt tuning",
          "prefix": "prefix tuning"}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Setup:
    """How the run is configured (per device).

    Attributes:
        seq_len, batch: tokens per sequence and sequences per micro-batch on each device.
        rank: LoRA/DoRA/QLoRA rank. target: ``"all-linear"`` or block-module names.
        grad_checkpointing: None = on for QLoRA (as ``deltatune train`` and peft's
            ``prepare_model_for_kbit_training``), off otherwise.
        optimizer: ``adamw`` | ``adamw8bit`` | ``sgd``.
        devices: data-parallel devices; ``sharding`` ``"fsdp"`` splits weights, gradients and
            optimizer state over them (ZeRO-3), ``"ddp"`` replicates them.
        device: ``"cuda"`` or ``"cpu"`` (CPU: the process's RSS, the checkpoint load counts).
        dtype_bytes: compute dtype of the frozen base and activations (2 = bf16, 4 = fp32).
        max_batch_tokens: tokens in one forward pass (``deltatune train`` splits micro-batches); 0 = all.
        eager_attention: attention probabilities kept for backward ((rows, heads, L, L) in fp32 and
            16-bit), as eager attention does; False = fused attention (SDPA/flash), no L^2 term.
        virtual_tokens: prompt/prefix tuning's learned tokens (peft's default 20).
        checkpoint_bytes: bytes of the checkpoint read at load (CPU only: mapped file pages count in RSS).
    """

    seq_len: int = 2048
    batch: int = 1
    rank: int = 16
    target: tuple = ALL_LINEAR
    grad_checkpointing: bool | None = None
    optimizer: str = "adamw"
    devices: int = 1
    sharding: str = "ddp"
    device: str = "cuda"
    dtype_bytes: int = 2
    max_batch_tokens: int = 0
    eager_attention: bool = False
    virtual_tokens: int = 20
    checkpoint_bytes: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZER_BYTES:
            raise ValueError(f"optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZER_BYTES)}")
        if self.sharding not in ("ddp", "fsdp"):
            raise ValueError(f"sharding {self.sharding!r}: expected ddp or fsdp")
        for name in ("seq_len", "batch", "rank", "devices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    def checkpointing(self, method: str) -> bool:
        return (method == "qlora") if self.grad_checkpointing is None else bool(self.grad_checkpointing)

    @property
    def tokens_per_forward(self) -> int:
        tokens = self.seq_len * self.batch
        if not self.max_batch_tokens:
            return tokens
        # deltatune train splits a micro-batch into whole sequences of at most max_batch_tokens (at least one)
        return min(tokens, max(1, self.max_batch_tokens // self.seq_len) * self.seq_len)


@dataclass
class Estimate:
    """Planned peak memory of one method (bytes, one device) and what it trains."""

    method: str
    label: str
    base_weights: int
    adapter_weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    overhead: int
    grad_checkpointing: bool
    trainable_params: int
    adapter_file_bytes: int
    load_peak: int = 0
    notes: list = field(default_factory=list)

    @property
    def training_peak(self) -> int:
        return (self.base_weights + self.adapter_weights + self.gradients + self.optimizer + self.activations
                + self.overhead)

    @property
    def peak(self) -> int:
        """The larger of the training peak and, on a CPU, the checkpoint-loading peak."""
        return max(self.training_peak, self.load_peak)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(peak=self.peak, training_peak=self.training_peak)
        return d


def targeted(shape: ModelShape, target) -> dict[str, tuple[int, int]]:
    """The block linears ``target`` selects: ``"all-linear"``/None = all; names = those present.

    Raises:
        ValueError: names that match no block linear of the shape.
    """
    linears = shape.block_linears()
    if target in (None, "all-linear") or target == ALL_LINEAR:
        return linears
    names = [target] if isinstance(target, str) else list(target)
    unknown = [n for n in names if n not in linears]
    if unknown:
        raise ValueError(f"target {unknown} matches no block linear of {shape.name} (has {', '.join(linears)})")
    return {n: linears[n] for n in names}


def trainable_params(method: str, shape: ModelShape, setup: Setup) -> int:
    """Parameters trained by ``method`` (exact for Llama-family blocks; biases ignored)."""
    L = shape.layers
    if method in ("full", "full-bf16"):
        return shape.params
    if method in ("lora", "qlora", "dora"):
        mods = targeted(shape, setup.target).values()
        n = L * sum(setup.rank * (i + o) for i, o in mods)
        return n + (L * sum(o for _, o in mods) if method == "dora" else 0)  # DoRA: a magnitude per output
    if method == "ia3":  # peft's Llama default: scale k and v outputs and down_proj's input
        kv = shape.kv_heads * shape.head_dim
        return L * (2 * kv + shape.intermediate)
    if method == "prompt":
        return setup.virtual_tokens * shape.hidden
    if method == "prefix":  # a key and a value vector per layer and virtual token (peft, no projection)
        return setup.virtual_tokens * L * 2 * shape.kv_heads * shape.head_dim
    raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")


def _layer_bytes(shape: ModelShape, setup: Setup, method: str) -> float:
    """Bytes kept for backward per token in one decoder block, gradients flowing through it.

    Counted tensor by tensor for a transformers Llama block, b = compute dtype bytes:
    two RMSNorms, each keeping its input upcast to fp32 (4d) and its output (b*d) that the next
    linears keep; attention keeps rotated q (d), k and v (2 kv), its output (d) and the contiguous
    copy o_proj reads (d); the gated MLP keeps gate, silu(gate), up and their product (4 i).
    In fp32 the norm's upcast is the input itself, so it costs b*d, not 4d more.
    Adapters add their rank-r intermediate per targeted module.
    """
    b, d, i = setup.dtype_bytes, shape.hidden, shape.intermediate
    kv = shape.kv_heads * shape.head_dim
    norms = 2 * (4 * d + b * d) if b < 4 else 2 * (2 * b * d)
    attention = b * (3 * d + 2 * kv)
    mlp = b * (4 * i if shape.gated_mlp else 2 * i)
    adapters = b * setup.rank * len(targeted(shape, setup.target)) if method in ("lora", "qlora", "dora") else 0
    eager = 0.0
    if setup.eager_attention:  # softmax output in fp32 + its 16-bit copy per (head, query, key)
        eager = shape.heads * setup.seq_len * (4 + b) + b * 2 * (shape.heads * shape.head_dim - kv)
    return norms + attention + mlp + adapters + eager


def _activations(shape: ModelShape, setup: Setup, method: str, checkpointing: bool) -> int:
    """Activation memory of one forward + backward at ``tokens_per_forward`` tokens."""
    T = setup.tokens_per_forward
    if checkpointing and setup.eager_attention:
        # deltatune.training.loss uses eager attention only without checkpointing (cpu_bf16_attention)
        setup = replace(setup, eager_attention=False)
    if method == "prompt":
        T += setup.batch * setup.virtual_tokens if setup.max_batch_tokens == 0 else setup.virtual_tokens
    per_layer = _layer_bytes(shape, setup, method) * T
    b, d = setup.dtype_bytes, shape.hidden
    cpu_ckpt = checkpointing and setup.device == "cpu"  # the heap's share: see CPU_CKPT_BLOCKS
    if checkpointing:  # each block's input, plus one block recomputed and its gradients
        kept = shape.layers * b * d * T + (CPU_CKPT_BLOCKS if cpu_ckpt else 2) * per_layer
    else:  # every block, plus the gradients flowing through one of them
        kept = shape.layers * per_layer + per_layer
    chunk = min(T, max(16, LOSS_CHUNK_LOGITS // shape.vocab))
    logits = chunk * shape.vocab * (4 * CPU_CKPT_LOSS_BUFFERS if cpu_ckpt else 4 + (b if b < 4 else 0))
    loss = logits + 2 * T * d * b  # logits + hidden and its grad
    return int(kept + loss)


def _base_weights(method: str, shape: ModelShape, setup: Setup) -> int:
    b = setup.dtype_bytes
    if method == "full":
        return shape.params * 4
    if method == "full-bf16":
        return shape.params * 2
    if method == "qlora":
        dense = shape.embedding_params + shape.norm_params
        return int(shape.linear_params * NF4_DQ_BITS / 8) + dense * b
    return shape.params * b


def _fsdp_base_weights(method: str, shape: ModelShape, setup: Setup, base: int) -> int:
    """One device's base under ``deltatune train --fsdp`` (``deltatune.training.fsdp``): 1/k of it,
    the final norm replicated, plus two decoder blocks gathered in full (the one computing and the
    one being fetched; in backward the same). A frozen embedding and head are split by rows and
    never gathered to train (``vocab_shard``); a trained head (full fine-tuning) stays whole."""
    k = setup.devices
    linear_bytes = NF4_DQ_BITS / 8 if method == "qlora" else (4 if method == "full" else 2 if method == "full-bf16"
                                                               else setup.dtype_bytes)
    dense_bytes = 4 if method == "full" else 2 if method == "full-bf16" else setup.dtype_bytes
    block = sum(i * o for i, o in shape.block_linears().values()) * linear_bytes + 2 * shape.hidden * dense_bytes
    head = shape.vocab * shape.hidden * dense_bytes if method in ("full", "full-bf16") else 0
    root = head + shape.hidden * dense_bytes
    return int((base - root) / k + root + 2 * block)


def estimate(method: str, shape: ModelShape, setup: Setup) -> Estimate:
    """The planned peak memory of training ``method`` on ``shape`` under ``setup`` (one device)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    n = trainable_params(method, shape, setup)
    opt = OPTIMIZER_BYTES[setup.optimizer]
    ckpt = setup.checkpointing(method)
    base = _base_weights(method, shape, setup)
    notes = []
    if method == "full":
        adapter, grads, state = 0, 4 * n, int(opt * n)
    elif method == "full-bf16":  # ZeRO: 16-bit grads; fp32 master weights live with the optimizer state
        adapter, grads, state = 0, 2 * n, int((4 + opt) * n)
    else:
        adapter, grads, state = 4 * n, 4 * n, int(opt * n)
    if setup.devices > 1 and setup.sharding == "fsdp":
        k = setup.devices
        base = _fsdp_base_weights(method, shape, setup, base)
        if method in ("full", "full-bf16"):  # ZeRO-3: the trained weights' state is split too
            adapter, grads, state = adapter // k, grads // k, state // k
            notes.append(f"FSDP over {k} devices: weights, gradients and optimizer state split {k} ways, "
                         "plus two gathered blocks; the head replicated")
        else:
            notes.append(f"FSDP over {k} devices (deltatune train --fsdp): the base split {k} ways (the "
                         "embedding and head too), plus two gathered blocks; the adapter, its gradients and "
                         "optimizer state replicated on every device")
    elif setup.devices > 1:
        notes.append(f"data parallel over {setup.devices} devices: each holds a full copy; "
                     f"{setup.devices}x the sequences per step, the same memory per device")
    act_no = _activations(shape, setup, method, False)
    act_ck = _activations(shape, setup, method, True)
    if method == "dora":
        # The weight norm ||W + s BA|| builds each targeted layer's dense (out, in) matrix in fp32, one at a time.
        largest = max(i * o for i, o in targeted(shape, setup.target).values())
        act_no, act_ck = act_no + 4 * largest, act_ck + 4 * largest
        notes.append("DoRA: one dense fp32 copy of the largest targeted weight while computing its norm")
    if method == "prompt":
        notes.append("prompt tuning: gradients still flow through the whole frozen base, so activations "
                     "are those of LoRA; only the (already small) adapter state shrinks")
    overhead = CUDA_RUNTIME_BYTES if setup.device == "cuda" else \
        CPU_CKPT_RUNTIME_BYTES if ckpt else CPU_TRAIN_RUNTIME_BYTES
    load_peak = _cpu_load_peak(method, shape, setup, base) if setup.device == "cpu" else 0
    file_bytes = 2 * n if method in ("full", "full-bf16") else 4 * n  # a 16-bit model, or fp32 adapter tensors
    return Estimate(method, LABELS[method], base, adapter, grads, state, act_ck if ckpt else act_no, act_no,
                    act_ck, overhead, ckpt, n, file_bytes, load_peak, notes)


def _cpu_load_peak(method: str, shape: ModelShape, setup: Setup, base_weights: int) -> int:
    """RSS while ``deltatune train`` loads (and quantizes) the base on a CPU.

    transformers maps the safetensors file; the pages it reads count in RSS for as long as the
    mapping lives. Loaded in the file's dtype, the weights *are* the mapping; converted (fp32 file,
    bf16 run), each tensor is copied and the mapping goes when loading ends. Quantizing a mapped
    base builds the 4-bit layers and copies the dense rest out of the mapping before it is freed
    (``deltatune.quant._leave_checkpoint_mapping``).
    """
    file_bytes = setup.checkpoint_bytes or shape.params * 2
    weight_bytes = 4 if method == "full" else setup.dtype_bytes
    mapped = abs(file_bytes - shape.params * weight_bytes) < 0.05 * file_bytes
    peak = file_bytes if mapped else file_bytes + shape.params * weight_bytes
    if method == "qlora" and mapped:
        peak = file_bytes + base_weights
    return CPU_RUNTIME_BYTES + peak


def parse_memory(text: str | int | float) -> int:
    """``"24GB"``, ``"24GiB"``, ``"24G"``, ``"512MB"`` or a bare number of GB -> bytes.

    GB is read as GiB: a "24 GB" GPU has 24 GiB (nvidia-smi reports 24564 MiB), and the figures
    this module prints are GiB too.
    """
    if isinstance(text, (int, float)):
        return int(text * GiB)
    s = str(text).strip().lower().replace(" ", "")
    units = {"tib": 1024 * GiB, "tb": 1024 * GiB, "t": 1024 * GiB, "gib": GiB, "gb": GiB, "g": GiB,
             "mib": MiB, "mb": MiB, "m": MiB}
    for unit, scale in units.items():
        if s.endswith(unit):
            s, factor = s[: -len(unit)], scale
            break
    else:
        factor = GiB
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"--memory {text!r}: expected a size such as 24GB, 80GiB or 512MB") from None
    if not value > 0 or math.isinf(value):
        raise ValueError(f"--memory {text!r}: must be positive")
    return int(value * factor)


def gib(n: int | float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"
