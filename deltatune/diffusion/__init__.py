"""LoRA for diffusion models (diffusers' UNets and transformers) in the files diffusers and
kohya-style tools read and write: ``save_lora_weights``, ``load_lora_weights``."""
from deltatune.diffusion.files import is_lora_file, load_lora_weights, lora_file_summary, save_lora_weights
from deltatune.diffusion.formats import METADATA_KEY, WEIGHT_NAME

__all__ = ["METADATA_KEY", "WEIGHT_NAME", "is_lora_file", "load_lora_weights", "lora_file_summary",
           "save_lora_weights"]
