"""deltatune: parameter-efficient fine-tuning with peft-compatible names and adapter files."""
from deltatune import models  # noqa: F401
from deltatune.advisor import plan
from deltatune.config import LoftQConfig, LoraConfig, PeftConfig, PeftType, TaskType
from deltatune.functional import (_get_submodules, get_base_model_state_dict, get_peft_model_state_dict,  # noqa: F401
                                  inject_adapter_in_model, set_base_model_state_dict, set_peft_model_state_dict)
from deltatune.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from deltatune.methods.bdlora import BdLoraConfig
from deltatune.methods.bottleneck import AdapterConfig, BottleneckConfig
from deltatune.methods.ia3 import IA3Config
from deltatune.methods.prompt import (PrefixTuningConfig, PromptEncoderConfig, PromptEncoderReparameterizationType,
                                      PromptTuningConfig, PromptTuningInit)
from deltatune.peft_model import (PeftModel, PeftModelForCausalLM, PeftModelForFeatureExtraction,
                                  PeftModelForQuestionAnswering, PeftModelForSeq2SeqLM,
                                  PeftModelForSequenceClassification, PeftModelForTokenClassification, get_peft_model)
from deltatune.quant import dequantize_model, prepare_model_for_kbit_training, quantize
from deltatune.quant.loftq import replace_lora_weights_loftq
from deltatune.training import train

__version__ = "0.1.0"

__all__ = ["AdapterConfig", "BdLoraConfig", "BottleneckConfig", "IA3Config", "LoftQConfig", "LoraConfig", "PeftConfig", "PeftModel",
           "PeftModelForCausalLM", "PeftModelForFeatureExtraction", "PeftModelForQuestionAnswering",
           "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification", "PeftModelForTokenClassification",
           "PeftType", "PrefixTuningConfig", "PromptEncoderConfig", "PromptEncoderReparameterizationType",
           "PromptTuningConfig", "PromptTuningInit", "TaskType", "dequantize_model", "get_peft_model",
           "get_base_model_state_dict", "get_peft_model_state_dict", "hotswap_adapter", "inject_adapter_in_model",
           "models", "plan",
           "prepare_model_for_compiled_hotswap", "prepare_model_for_kbit_training", "quantize",
           "replace_lora_weights_loftq", "set_base_model_state_dict", "set_peft_model_state_dict", "train"]
