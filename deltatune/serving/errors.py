"""Errors the engine raises for bad requests and adapters; the HTTP layer maps each to a status.

Every error carries ``message`` (what went wrong, with the values involved) and ``param`` (the
request field at fault, or None), the two things OpenAI's error shape reports.
"""
from __future__ import annotations


class ServingError(Exception):
    """Base of the serving errors: ``.message`` (str) and ``.param`` (field name or None)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class UnknownModel(ServingError):
    """An adapter or model name the engine does not serve (HTTP 404)."""

    def __init__(self, message: str, param: str | None = "model") -> None:
        super().__init__(message, param)


class BadRequest(ServingError):
    """A request field with a bad value; ``param`` names it (HTTP 400)."""


class PromptTooLong(BadRequest):
    """The prompt does not fit the context: ``prompt_tokens`` >= ``max_model_len`` (both in the message)."""

    def __init__(self, prompt_tokens: int, max_model_len: int, param: str = "prompt") -> None:
        super().__init__(f"the prompt has {prompt_tokens} tokens but this model's maximum context length is "
                         f"{max_model_len} tokens (the prompt must leave room for at least one new token)", param)
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len


class QueueFull(ServingError):
    """The waiting queue is at its bound; retry later (HTTP 503)."""


class AdapterLoadError(BadRequest):
    """An adapter that cannot be served: missing, corrupt, made for another base, rank above
    ``max_lora_rank``, or a method/field the mixed batch cannot apply. The message says why."""


class RequestFailed(ServingError):
    """One request the engine could not finish (its row's logits or sampling went non-finite, its
    text could not be decoded); the message says why. The requests beside it in the batch go on."""
