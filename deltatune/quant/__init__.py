"""4-bit bases for QLoRA: quantize a loaded model, prepare it for training, merge back to dense.

The adapter layers never import this package: they reach a 4-bit layer through the base layer
they wrap and through ``deltatune.registry``'s weight access, which ``layers._register`` fills in
for ``Linear4bit`` (ours) and ``bitsandbytes.nn.Linear4bit`` (a model loaded by transformers with
``BitsAndBytesConfig(load_in_4bit=True)``).

Modules: ``nf4`` (the 4-bit layer and bitsandbytes' kernels), ``layers`` (what counts as 4-bit,
registration with the core), ``conversion`` (quantize / requantize / dequantize_model),
``memory`` (footprint, dense copies, checkpoint mappings), ``kbit``
(``prepare_model_for_kbit_training``), ``loftq`` (LoftQ initialisation). Every public name is
re-exported here.

Typical use::

    model = deltatune.quantize(model)                  # or transformers' load_in_4bit=True
    model = deltatune.prepare_model_for_kbit_training(model)
    model = deltatune.get_peft_model(model, LoraConfig(r=16, target_modules=[...]))
    ...
    deltatune.dequantize_model(model)                  # 4-bit bases -> fp32 nn.Linear
    merged = model.merge_and_unload()                  # full precision, delta on dequantized W
"""
from __future__ import annotations

from deltatune.quant.conversion import QuantReport, dequantize_model, quantize, requantize
from deltatune.quant.kbit import prepare_model_for_kbit_training
from deltatune.quant.layers import dense_weight, is_4bit, prepare_4bit_layers
from deltatune.quant.memory import _file_mappings, _leave_checkpoint_mapping, check_dense_copies, \
    quantization_footprint, quantized_bits_per_param  # noqa: F401 - the private two: tests and benchmarks
from deltatune.quant.nf4 import Linear4bit, resolve_compute_dtype

__all__ = ["Linear4bit", "quantize", "prepare_model_for_kbit_training", "dequantize_model", "requantize",
           "quantized_bits_per_param", "quantization_footprint", "QuantReport", "is_4bit",
           "resolve_compute_dtype", "check_dense_copies", "prepare_4bit_layers", "dense_weight"]
