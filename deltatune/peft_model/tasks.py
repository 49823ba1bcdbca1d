"""peft's task classes: ``PeftModelForCausalLM`` and friends, picked by ``task_type``.

In peft each task class has its own ``forward`` (virtual tokens, labels, the head). Here one
``PeftModel.forward`` serves every task (its call entry prepares the inputs for any model), so a
task class is a ``PeftModel`` under peft's name, so that ``isinstance`` checks and model cards
(``pipeline_tag``) written against peft hold. ``get_peft_model`` and
``PeftModel.from_pretrained`` pick the class from the config's ``task_type``, as peft does.
"""
from __future__ import annotations

from torch import nn

from deltatune.config import PeftConfig
from deltatune.peft_model.model import PeftModel, warn_at_wrap


class PeftModelForCausalLM(PeftModel):
    """A ``PeftModel`` of a causal language model (``task_type="CAUSAL_LM"``)."""

    task_type = "CAUSAL_LM"


class PeftModelForSeq2SeqLM(PeftModel):
    """A ``PeftModel`` of an encoder-decoder language model (``task_type="SEQ_2_SEQ_LM"``)."""

    task_type = "SEQ_2_SEQ_LM"


class PeftModelForSequenceClassification(PeftModel):
    """A ``PeftModel`` of a sequence classifier (``task_type="SEQ_CLS"``; its head is saved)."""

    task_type = "SEQ_CLS"


class PeftModelForTokenClassification(PeftModel):
    """A ``PeftModel`` of a token classifier (``task_type="TOKEN_CLS"``; its head is saved)."""

    task_type = "TOKEN_CLS"


class PeftModelForQuestionAnswering(PeftModel):
    """A ``PeftModel`` of an extractive question-answering model (``task_type="QUESTION_ANS"``)."""

    task_type = "QUESTION_ANS"


class PeftModelForFeatureExtraction(PeftModel):
    """A ``PeftModel`` of an encoder giving features (``task_type="FEATURE_EXTRACTION"``)."""

    task_type = "FEATURE_EXTRACTION"


TASK_CLASSES: dict[str, type[PeftModel]] = {
    cls.task_type: cls for cls in (PeftModelForCausalLM, PeftModelForSeq2SeqLM, PeftModelForSequenceClassification,
                                   PeftModelForTokenClassification, PeftModelForQuestionAnswering,
                                   PeftModelForFeatureExtraction)}
PeftModel.task_classes.update(TASK_CLASSES)


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False,
                   autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config`` (peft's entry point).

    The result is the task class of ``peft_config.task_type`` (``PeftModelForCausalLM``...), a
    ``PeftModel`` without one. Only the adapter's parameters (and the biases/modules its config
    names) are trainable afterwards. ``autocast_adapter_dtype``: see ``PeftModel.add_adapter``.
    ``revision`` is recorded in the config as peft does; ``low_cpu_mem_usage=True`` warns (not honoured).

    Raises:
        ConfigError: an invalid config (naming the field or module).
        NotImplementedError: ``mixed=True`` (peft's ``PeftMixedModel`` of several methods at once).
    """
    if mixed:
        raise NotImplementedError("get_peft_model(mixed=True): a PeftMixedModel (adapters of different methods "
                                  "active together) is not supported; use one method per PeftModel")
    if revision is not None and getattr(peft_config, "revision", None) is None:
        peft_config.revision = revision
    cls = TASK_CLASSES.get(getattr(peft_config.task_type, "value", peft_config.task_type) or "", PeftModel)
    wrapped = cls(model, peft_config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                  low_cpu_mem_usage=low_cpu_mem_usage)
    warn_at_wrap(peft_config)
    return wrapped
