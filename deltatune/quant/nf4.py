"""A frozen 4-bit linear layer (NF4 or FP4, optionally double-quantized) through bitsandbytes.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314): weights are cut into blocks of 64, each stored as
4-bit indices into a 16-value code (NF4: quantiles of N(0, 1)) times the block's absmax. Double
quantization stores those absmax values as 8-bit codes in blocks of 256 plus one fp32 scale per
256 and one fp32 offset per layer: 4 + 8/64 + 32/(64*256) ~= 4.127 bits per weight.

bitsandbytes does all quantizing and dequantizing, so weights dequantize to exactly what it gives.
What this module adds is the compute path (`_Linear4bitFn`): the weight is dequantized once in
forward and once more in backward for the input gradient only; no dense weight is kept alive and
the frozen weight gets no gradient. The compute dtype is chosen for speed on the hardware
(`resolve_compute_dtype`): on CPUs without AMX matrix units bf16/fp16 training is several times
slower than fp32 (HF peft + bnb with bf16 compute: ~134 s/step vs ~7 s fp32 on our reference
machine), so there we compute in fp32 and say so.

bitsandbytes is imported only when a layer is quantized or run (`import_bnb`); this module and
the classes in it load without it.
"""
from __future__ import annotations

import logging
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

BLOCKSIZE = 64          # first-level block (weights per absmax)
BLOCKSIZE2 = 256        # second-level block (absmax values per fp32 scale) with double quantization
QUANT_TYPES = ("nf4", "fp4")
_bnb = None
_CODE_CACHE: dict[tuple[str, str], torch.Tensor] = {}
_WARNED: set = set()


# ---------------------------------------------------------------------------------------------
# bitsandbytes and the hardware

def import_bnb():
    """Import bitsandbytes (once), or raise ImportError saying how to install it.

    bitsandbytes logs a warning at import on AVX512-BF16 CPUs when the optional ``kernels``
    package is missing (it only speeds up bf16 inference); that line is silenced here.
    """
    global _bnb
    if _bnb is None:
        noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
        level = noisy.level
        noisy.setLevel(logging.ERROR)
        try:
            import bitsandbytes
            import bitsandbytes.functional  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "4-bit quantization (QLoRA) needs bitsandbytes >= 0.45, which could not be imported "
                f"({exc}). Fix: pip install bitsandbytes  (or: pip install 'deltatune[qlora]')") from exc
        finally:
            noisy.setLevel(level)
        _bnb = bitsandbytes
    return _bnb


def check_backend(device: torch.device) -> None:
    """Quantize a tiny tensor on ``device``; RuntimeError with the fix if bitsandbytes cannot.

    Old bitsandbytes releases (< 0.45) run 4-bit kernels only on CUDA; a CPU build whose native
    library failed to load still works through bitsandbytes' pure-torch fallback (slower).
    """
    key = ("backend", str(torch.device(device).type))
    if key in _WARNED:
        return
    bnb = import_bnb()
    try:
        q, state = bnb.functional.quantize_4bit(torch.ones(BLOCKSIZE, device=device), blocksize=BLOCKSIZE,
                                                quant_type="nf4", compress_statistics=True)
        bnb.functional.dequantize_4bit(q, state)
    except Exception as exc:  # noqa: BLE001 - any failure here means the backend is unusable
        raise RuntimeError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 4-bit quantization on "
            f"{torch.device(device).type}: {type(exc).__name__}: {exc}. Fix: pip install -U 'bitsandbytes>=0.45' "
            "(0.45+ runs on x86-64 CPUs with AVX2 and on CUDA), or move the model to a CUDA GPU first.") from exc
    _WARNED.add(key)


def _cpu_has(dtype: torch.dtype) -> bool:
    """True if this CPU has matrix units for ``dtype`` (AMX-BF16 / AMX-FP16)."""
    cpu = getattr(torch, "cpu", None)
    probe = {torch.bfloat16: "_is_amx_tile_supported", torch.float16: "_is_amx_fp16_supported"}.get(dtype)
    try:
        return bool(probe and getattr(cpu, probe)())
    except Exception:  # noqa: BLE001 - older torch: assume no
        return False


def resolve_compute_dtype(requested: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The dtype a 4-bit layer computes in for inputs on ``device``.

    CPU: float32, unless bf16/fp16 was asked for and the CPU has AMX units for it; overriding a
    request warns once. AVX512-BF16 alone speeds up a bare matmul but not training, where the
    casts, the fp32 LoRA branch and the backward pass dominate. Other devices: the requested
    dtype, or ``None`` meaning "the input's dtype" (bitsandbytes' own default).
    """
    if torch.device(device).type != "cpu":
        return requested
    if requested in (None, torch.float32) or _cpu_has(requested):
        return requested or torch.float32
    key = ("dtype", requested)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"4-bit layers: compute_dtype={requested} was requested, but this CPU has no AMX units for it, "
            f"where {requested} training is several times slower than float32; computing in float32 instead "
            "(memory is unchanged: the weights stay 4-bit).", stacklevel=3)
    return torch.float32


def _shared_code(kind: str, device: torch.device) -> torch.Tensor:
    """The constant code books, one tensor per device: 'nf4'/'fp4' (16 values), 'dynamic' (256)."""
    key = (kind, str(device))
    if key not in _CODE_CACHE:
        fn = import_bnb().functional
        code = fn.create_dynamic_map(signed=True) if kind == "dynamic" else fn.get_4bit_type(kind, device="cpu")
        _CODE_CACHE[key] = code.to(device=device, dtype=torch.float32)
    return _CODE_CACHE[key]


# ---------------------------------------------------------------------------------------------
# The layer

class _Linear4bitFn(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` dequantized on the fly; no gradient for ``W``, nothing dense saved."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer = layer
        W = layer.dequantize(x.dtype)                          # (out, in), freed after the matmul
        return F.linear(x, W, bias)                            # (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.layer.dequantize(grad_out.dtype)  # (..., out) @ (out, in)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias


class Linear4bit(nn.Module):
    """A frozen linear layer stored in 4 bits (bitsandbytes' NF4/FP4 layout); computes ``x W^T + b``.

    Storage (``weight`` is a frozen uint8 Parameter, the rest are buffers, all in ``state_dict``):
        weight: (ceil(out*in/2), 1) uint8, two 4-bit codes per byte (bitsandbytes' packing).
        absmax: (ceil(out*in/64),) uint8 codes with double quantization, else fp32 scales.
        absmax2: (ceil(len(absmax)/256),) fp32 second-level scales (double quantization only).
        absmax_offset: () fp32 mean subtracted before the second level (double quantization only).
    The 16-value NF4 code and the 256-value second-level code are constants shared by all layers.

    Args:
        in_features, out_features: as ``nn.Linear``.
        bias: keep a (frozen) bias. Default True.
        quant_type: "nf4" (default) or "fp4".
        double_quant: quantize the absmax values too (default True, saves ~0.37 bit/weight).
        compute_dtype: dtype asked for the matmul (see ``resolve_compute_dtype``); None = input's.

    Build one from a dense layer with ``Linear4bit.from_linear``; turn it back with ``to_linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "nf4",
                 double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type={quant_type!r}: must be one of {QUANT_TYPES}")
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.double_quant, self.compute_dtype = quant_type, double_quant, compute_dtype
        n = in_features * out_features
        blocks = math.ceil(n / BLOCKSIZE)
        packed = torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.weight.deltatune_params_per_element = 2   # counted as out*in parameters, like peft does
        self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8 if double_quant else torch.float32,
                                                   device=device))
        if double_quant:
            self.register_buffer("absmax2", torch.zeros(math.ceil(blocks / BLOCKSIZE2), device=device))
            self.register_buffer("absmax_offset", torch.zeros((), device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        """Quantize ``linear`` (any float dtype, any device bitsandbytes supports) into a new layer."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_type,
                    double_quant, compute_dtype, device="meta")
        layer.quantize_(linear.weight.detach())
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def quantize_(self, W: torch.Tensor) -> None:
        """Replace the stored weight by the quantization of dense ``W`` (out, in)."""
        if tuple(W.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(W.shape)} != (out_features, in_features) "
                             f"= {(self.out_features, self.in_features)}")
        bnb = import_bnb()
        if W.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            W = W.float()
        q, state = bnb.functional.quantize_4bit(W.contiguous(), blocksize=BLOCKSIZE, quant_type=self.quant_type,
                                                compress_statistics=self.double_quant)
        self.load_quant_state(q, state)

    def load_quant_state(self, packed: torch.Tensor, state) -> None:
        """Take bitsandbytes' output ``(packed, QuantState)`` as this layer's storage (no copy)."""
        if state.blocksize != BLOCKSIZE or state.quant_type != self.quant_type or state.nested != self.double_quant:
            raise ValueError(f"quant state (blocksize={state.blocksize}, {state.quant_type}, nested={state.nested}) "
                             f"does not match this layer (64, {self.quant_type}, nested={self.double_quant})")
        self.weight = nn.Parameter(packed.reshape(-1, 1), requires_grad=False)
        self.weight.deltatune_params_per_element = 2
        as_params = "absmax" in self._parameters   # statistics held as parameters stay so
        stats = {"absmax": state.absmax}
        if self.double_quant:
            if state.state2.blocksize != BLOCKSIZE2 or not torch.equal(
                    state.state2.code.float().cpu(), _shared_code("dynamic", torch.device("cpu"))):
                raise ValueError("double quantization with a non-standard second level is not supported")
            stats.update(absmax2=state.state2.absmax.float(), absmax_offset=state.offset.reshape(()).float())
        for name, t in stats.items():
            setattr(self, name, nn.Parameter(t.reshape(-1) if t.dim() == 0 else t, requires_grad=False)
                    if as_params else t)

    STATS = ("absmax", "absmax2", "absmax_offset")

    def stats_as_parameters_(self) -> None:
        """Hold the block statistics as frozen parameters instead of buffers (idempotent).

        FSDP shards and all-gathers parameters only; as parameters, the statistics are cut and
        gathered with the packed codes they describe (``deltatune.training.fsdp``). The 0-dim
        offset becomes shape (1,) (a shard needs a dim 0). Values and dtypes are unchanged.
        """
        for name in self.STATS:
            t = self._buffers.pop(name, None)
            if t is not None:
                self.register_parameter(name, nn.Parameter(t.reshape(-1) if t.dim() == 0 else t,
                                                           requires_grad=False))

    # -- reading -------------------------------------------------------------------------------
    def quant_state(self, dtype: torch.dtype = torch.float32):
        """A bitsandbytes ``QuantState`` over this layer's tensors, dequantizing to ``dtype``."""
        fn = import_bnb().functional
        device = self.weight.device
        state2 = None
        if self.double_quant:
            state2 = fn.QuantState(absmax=self.absmax2, code=_shared_code("dynamic", device),
                                   blocksize=BLOCKSIZE2, dtype=torch.float32)
        return fn.QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                             code=_shared_code(self.quant_type, device), blocksize=BLOCKSIZE,
                             quant_type=self.quant_type, dtype=dtype,
                             offset=self.absmax_offset.reshape(()) if self.double_quant else None, state2=state2)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight (out, in) in ``dtype``, exactly as ``bitsandbytes.functional.dequantize_4bit``."""
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return self.dequantize(torch.float32).to(dtype)
        return import_bnb().functional.dequantize_4bit(self.weight, self.quant_state(dtype))

    def quantized_tensors(self) -> list[torch.Tensor]:
        """The tensors holding the weight: what ``quantized_bits_per_param`` counts."""
        return [t for t in (self.weight, self.absmax, getattr(self, "absmax2", None),
                            getattr(self, "absmax_offset", None)) if t is not None]

    def shared_tensors(self) -> list[torch.Tensor]:
        """Constant code books shared by every layer on the device (counted once per model)."""
        device = self.weight.device
        codes = [_shared_code(self.quant_type, device)]
        return codes + ([_shared_code("dynamic", device)] if self.double_quant else [])

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A dense ``nn.Linear`` holding the dequantized weight (frozen, like this layer)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=dtype)
        linear.weight = nn.Parameter(self.dequantize(dtype), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype).clone(), requires_grad=self.bias.requires_grad)
        return linear

    # -- computing -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # autocast would cast x and the dense weight to its dtype inside F.linear anyway:
            # dequantize straight into it (no fp32 copy of W, no round trip of x), and return
            # that dtype as an nn.Linear under autocast does.
            dtype = torch.get_autocast_dtype(device_type)
            out_dtype = dtype
        else:
            dtype = resolve_compute_dtype(self.compute_dtype, x.device) or x.dtype
            out_dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return _Linear4bitFn.apply(x.to(dtype), self, bias).to(out_dtype)   # (..., out)

    def _apply(self, fn, recurse=True):
        """Move with the model but keep the storage dtypes: ``model.half()`` must not touch scales."""
        before = {name: t for name, t in self._buffers.items() if t is not None}
        stats = {name: self._parameters[name].detach() for name in self.STATS
                 if self._parameters.get(name) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        for name, old in stats.items():   # statistics held as parameters (stats_as_parameters_)
            new = self._parameters[name]
            if new.dtype != old.dtype:
                new.data = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


# ---------------------------------------------------------------------------------------------
# bitsandbytes' own Linear4bit (a model loaded by transformers with load_in_4bit=True)

def bnb_linear4bit_type() -> type | None:
    """``bitsandbytes.nn.Linear4bit`` if bitsandbytes is importable, else None."""
    try:
        return import_bnb().nn.Linear4bit
    except ImportError:
        return None


def bnb_dequantize(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense (out, in) weight of a ``bitsandbytes.nn.Linear4bit`` (undoing its CPU inference packing)."""
    fn = import_bnb().functional
    data, state = module.weight.data, module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        data, state = fn._convert_weight_packed_for_cpu_inverse(data, state)
    return fn.dequantize_4bit(data, state).to(dtype)


def bnb_requantize(module: nn.Module, W: torch.Tensor) -> None:
    """Store dense ``W`` (out, in) into a ``bitsandbytes.nn.Linear4bit`` with its own settings."""
    bnb = import_bnb()
    old = module.weight
    state = old.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        _, state = bnb.functional._convert_weight_packed_for_cpu_inverse(old.data, state)
    q, new_state = bnb.functional.quantize_4bit(
        W.to(device=old.device, dtype=state.dtype).contiguous(), blocksize=state.blocksize,
        compress_statistics=state.nested, quant_type=state.quant_type, quant_storage=old.quant_storage)
    module.weight = bnb.nn.Params4bit(q, requires_grad=False, quant_state=new_state, blocksize=state.blocksize,
                                      compress_statistics=state.nested, quant_type=state.quant_type,
                                      quant_storage=old.quant_storage, module=module, bnb_quantized=True)
    module.quant_state = new_state


def bnb_tensors(module: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(per-layer tensors, code books) holding a ``bitsandbytes.nn.Linear4bit``'s weight."""
    state = module.weight.quant_state
    own = [module.weight.data, state.absmax]
    codes = [state.code]
    if state.nested:
        own += [state.state2.absmax, state.offset]
        codes.append(state.state2.code)
    return [t for t in own if t is not None], [t for t in codes if t is not None]


def use_fast_compute_dtype(module: nn.Module) -> bool:
    """Point a ``bitsandbytes.nn.Linear4bit`` on CPU at the fast compute dtype; True if changed.

    Its forward already dequantizes once per pass (``bnb.matmul_4bit``); only the dtype matters.
    The AVX512-BF16 inference repacking (the first forward in eval mode without grad) is switched
    off on CPU whatever the compute dtype, also where bf16 is kept (AMX): it computes in bf16, and
    it rewrites the stored weight for good and lossily (block scales rounded to bf16, double
    quantization redone when undone: dequantized weights move by ~5e-3 of their largest value, so
    merging, saving or dequantizing afterwards starts from another base), and a layer once
    repacked stays so and no longer gives its input the right gradient when training resumes
    (bitsandbytes 0.50: none, or a wrong one), so one evaluation in the middle of training would
    silently corrupt the gradients of every adapter below it.
    """
    device = module.weight.device
    wanted = resolve_compute_dtype(module.compute_dtype, device)
    changed = wanted is not None and wanted != module.compute_dtype
    if changed:
        module.compute_dtype = wanted
        module.compute_type_is_set = True
    if device.type == "cpu" and getattr(module, "support_avx512bf16_for_cpu", False):
        module.support_avx512bf16_for_cpu = False
    module.weight.deltatune_params_per_element = 2
    return changed
