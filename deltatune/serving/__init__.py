"""Serving one base model with many adapters: a continuously batched engine (``Engine``), vLLM's
offline API (``LLM``, ``SamplingParams``, ``LoRARequest``) and, in ``server``, the OpenAI-style
HTTP API. See ``engine`` for how a step runs."""
from deltatune.serving.adapters import AdapterInfo
from deltatune.serving.engine import Engine
from deltatune.serving.errors import AdapterLoadError, BadRequest, PromptTooLong, QueueFull, ServingError, UnknownModel
from deltatune.serving.outputs import CompletionOutput, RequestHandle, RequestOutput, StreamDelta
from deltatune.serving.sampling import SamplingParams
from deltatune.serving.vllm_api import LLM, LoRARequest

__all__ = ["Engine", "SamplingParams", "LLM", "LoRARequest", "RequestOutput", "CompletionOutput", "StreamDelta",
           "RequestHandle", "ServingError", "UnknownModel", "PromptTooLong", "QueueFull", "AdapterLoadError",
           "BadRequest", "AdapterInfo"]
