"""``PeftModel`` and its parts, one responsibility per module:

- ``model``: ``PeftModel`` (named adapters, enable/disable, merge/unload), ``get_peft_model``,
  ``mark_trainable``;
- ``call``: the one call entry (``PeftModel.applying``): route, mixing rule, trained biases and
  input preparation;
- ``files``: save and load in peft's format;
- ``signature``: the forward signature tools such as transformers' ``Trainer`` read;
- ``surface``: peft's attributes and switches (``modules_to_save``, ``disable_adapter_layers``...);
- ``tasks``: peft's task classes (``PeftModelForCausalLM``...) and ``get_peft_model``;
- ``card``: the ``README.md`` model card.
"""
from deltatune.peft_model.call import NO_ADAPTERS, Call, mixing_problem
from deltatune.peft_model.model import PeftModel, mark_trainable
from deltatune.peft_model.tasks import (PeftModelForCausalLM, PeftModelForFeatureExtraction,
                                        PeftModelForQuestionAnswering, PeftModelForSeq2SeqLM,
                                        PeftModelForSequenceClassification, PeftModelForTokenClassification,
                                        get_peft_model)
from deltatune.peft_model.signature import new_signed

_new_signed = new_signed  # the name pickles written before the split refer to

__all__ = ["NO_ADAPTERS", "Call", "PeftModel", "PeftModelForCausalLM", "PeftModelForFeatureExtraction",
           "PeftModelForQuestionAnswering", "PeftModelForSeq2SeqLM", "PeftModelForSequenceClassification",
           "PeftModelForTokenClassification", "get_peft_model", "mark_trainable", "mixing_problem"]
