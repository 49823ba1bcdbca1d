"""Request bodies and response shapes of the OpenAI-compatible server (OpenAI's and vLLM's names).

Requests are parsed here into pydantic models (types only); the *ranges* of sampling fields
(``max_tokens >= 1``, ``0 < top_p <= 1``, ...) are checked once, by the engine's ``SamplingParams``,
so the HTTP layer and the Python API refuse the same values with the same words. Every refusal
becomes OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` (see
:func:`error_body`), with ``param`` naming the offending field.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

# HTTP status -> the error ``type`` vLLM's OpenAI server reports (its clients match on these).
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               413: "RequestTooLargeError", 429: "RateLimitError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: HTTP ``status``, ``message``, ``param`` (field or None)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}`` (``code`` = status)."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "BadRequestError"),
                      "param": param, "code": status}}


class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI's and vLLM's servers do (clients send vendor extras).
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    """Fields shared by both generation endpoints (OpenAI's plus vLLM's extras ``top_k``, ``ignore_eos``)."""

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted so clients that always send them work; anything but "off" is refused by name.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    best_of: int | None = None

    def sampling_kwargs(self, max_tokens: int | None) -> dict:
        """Keyword arguments for the engine's ``SamplingParams`` (None = its default)."""
        self._refuse_unsupported()
        kw = dict(n=self.n, max_tokens=max_tokens, stop=self.stop, seed=self.seed)
        for name in ("temperature", "top_p", "top_k"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        if self.stop_token_ids:
            kw["stop_token_ids"] = self.stop_token_ids
        if self.ignore_eos:
            kw["ignore_eos"] = True
        return kw

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _refuse_unsupported(self) -> None:
        off = {"presence_penalty": self.presence_penalty in (None, 0),
               "frequency_penalty": self.frequency_penalty in (None, 0),
               "logit_bias": not self.logit_bias,
               "logprobs": self.logprobs in (None, False, 0),
               "best_of": self.best_of in (None, self.n)}
        for name, ok in off.items():
            if not ok:
                raise ApiError(400, f"{name}: not supported by deltatune serve (leave it unset)", name)
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options: only allowed together with stream: true", "stream_options")


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, token ids, or lists of ids."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: StrictBool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError(400, "prompt: must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    def _refuse_unsupported(self) -> None:
        super()._refuse_unsupported()
        if self.echo:
            raise ApiError(400, "echo: not supported by deltatune serve", "echo")
        if self.suffix:
            raise ApiError(400, "suffix: not supported by deltatune serve", "suffix")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: ``messages`` go through the base's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # None: up to the context length
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict]:
        """Messages as the chat template expects them (``developer`` is OpenAI's new ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


class LoadLoraRequest(_Body):
    """vLLM's ``POST /v1/load_lora_adapter``."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    load_inplace: StrictBool = False


class UnloadLoraRequest(_Body):
    """vLLM's ``POST /v1/unload_lora_adapter`` (``lora_int_id`` is accepted and ignored)."""

    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None


def parse(model: type[BaseModel], raw: bytes) -> BaseModel:
    """Parse a request body: malformed JSON, lone surrogates, nesting deeper than Python's recursion
    limit, or a field of the wrong type -> :class:`ApiError` 400 naming the field (``param`` is its
    dotted path, e.g. ``messages.0.role``)."""
    try:
        data = json.loads(raw)
        # JSON may spell a lone UTF-16 surrogate ("\ud800"): a Python str, but no text a tokenizer takes.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}") from None
    except UnicodeEncodeError:
        raise ApiError(400, "the JSON body holds a lone UTF-16 surrogate escape (such as \\ud800): "
                            "strings must be valid Unicode text") from None
    except RecursionError:
        raise ApiError(400, "the JSON body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(x) for x in first["loc"] if not _is_union_tag(x)]
        param = ".".join(loc) or None
        value = "" if first["type"] == "missing" else f" (got {json.dumps(first.get('input'))[:80]})"
        raise ApiError(400, f"{param}: {first['msg']}{value}", param) from None


def _is_union_tag(part) -> bool:
    # pydantic names the union member it tried in the location (e.g. 'str', 'list[int]'); drop it.
    return isinstance(part, str) and ("[" in part or part in {"str", "int", "float", "bool", "function-after"})


# -- response shapes ----------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    """A request id in OpenAI's style: ``cmpl-...`` or ``chatcmpl-...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(request_id: str, obj: str, model: str, created: int, choices: list, **extra) -> dict:
    """The fields every response and chunk carries: ``id``, ``object``, ``created``, ``model``, ``choices``."""
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": choices, **extra}


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": None, "finish_reason": finish_reason}


def chat_chunk_choice(index: int, delta: dict, finish_reason: str | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def model_card(name: str, root: str, parent: str | None, created: int, max_model_len: int | None) -> dict:
    """One entry of ``GET /v1/models`` (vLLM's fields: ``root`` = path, ``parent`` = base for adapters)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "deltatune",
            "root": root, "parent": parent, "max_model_len": max_model_len}


def now() -> int:
    return int(time.time())


def openapi_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` for a route that parses its raw body with :func:`parse`: the request body's JSON
    schema, so ``/openapi.json`` describes it (clients and fuzzers read it). Inlined: no ``$ref``."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref[len("#/$defs/"):]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}
