"""vLLM's offline names over ``Engine``: ``LLM``, ``LoRARequest`` (``SamplingParams`` is shared).

Code written for vLLM runs with its import changed to ``deltatune.serving``::

    llm = LLM(model="default", enable_lora=True, max_loras=8)
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32),
                       lora_request=LoRARequest("customer-42", 1, "./customer-42-lora"))
    out[0].outputs[0].text
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from deltatune.serving.engine import Engine
from deltatune.serving.errors import BadRequest
from deltatune.serving.outputs import RequestOutput
from deltatune.serving.sampling import SamplingParams


@dataclass
class LoRARequest:
    """An adapter for a request (vLLM's fields): its name, a unique integer id, its directory."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}")
        self.lora_path = os.fspath(self.lora_path)

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path


class LLM:
    """vLLM's offline engine: one base model, LoRA adapters named per request.

    Args:
        model: ``"default"``, a transformers directory or a GGUF file.
        enable_lora: must be True to pass ``lora_request`` (as in vLLM).
        max_loras, max_lora_rank, max_cpu_loras, max_num_seqs, max_model_len, dtype, device: see
            ``Engine`` (``max_lora_rank`` defaults to vLLM's 16; ``max_cpu_loras`` to ``max_loras``).
        Other vLLM arguments (``tensor_parallel_size``, ``gpu_memory_utilization``, ...) are accepted
        and ignored.
    """

    def __init__(self, model: str = "default", enable_lora: bool = False, max_loras: int = 8,
                 max_lora_rank: int = 16, max_cpu_loras: int | None = None, max_num_seqs: int = 32,
                 max_model_len: int | None = None, dtype="auto", device=None, **_ignored) -> None:
        self.enable_lora = enable_lora
        self.engine = Engine(model, max_loras=max_loras, max_lora_rank=max_lora_rank,
                             max_cpu_loras=max_loras if max_cpu_loras is None else max_cpu_loras,
                             max_num_seqs=max_num_seqs, max_model_len=max_model_len, dtype=dtype, device=device)
        self._paths: dict[str, tuple[int, str]] = {}

    def get_tokenizer(self):
        """The base model's tokenizer."""
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 lora_request: LoRARequest | list[LoRARequest | None] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete ``prompts`` (a string, a list of strings, or ``{"prompt": ...}`` /
        ``{"prompt_token_ids": [...]}`` dicts); ``lora_request``: one for every prompt or one per
        prompt (None = the base). Adapters are loaded on first use and reloaded when a request names
        a known adapter with another path. Returns one ``RequestOutput`` per prompt, in order.

        Raises:
            ValueError: ``lora_request`` without ``enable_lora=True``.
            BadRequest / AdapterLoadError: a bad prompt, sampling parameter or adapter.
        """
        items = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        inputs = [_prompt_of(p) for p in items]
        loras = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * len(inputs)
        if len(loras) != len(inputs):
            raise BadRequest(f"{len(inputs)} prompts but {len(loras)} lora requests", "lora_request")
        if any(r is not None for r in loras) and not self.enable_lora:
            raise ValueError("lora_request given but LoRA is not enabled; create LLM(..., enable_lora=True)")
        adapters = [None if r is None else self._adapter(r) for r in loras]
        return self.engine.generate(inputs, adapter=adapters, sampling=sampling_params, use_tqdm=use_tqdm)

    def _adapter(self, request: LoRARequest) -> str:
        known = self._paths.get(request.lora_name)
        if known != (request.lora_int_id, request.lora_path):
            self.engine.add_adapter(request.lora_name, request.lora_path, replace=known is not None)
            self._paths[request.lora_name] = (request.lora_int_id, request.lora_path)
        return request.lora_name


def _prompt_of(prompt):
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return prompt["prompt"]
        raise BadRequest("a prompt dict needs 'prompt' or 'prompt_token_ids'", "prompts")
    return prompt
