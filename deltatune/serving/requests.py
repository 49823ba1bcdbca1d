"""The engine's bookkeeping of a submitted request and of each of its ``n`` sequences (completions)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from deltatune.adapter_set import BASE_NAME
from deltatune.serving.adapters import Version
from deltatune.serving.outputs import RequestHandle
from deltatune.serving.sampling import SamplingParams


@dataclass(eq=False)
class Request:
    """One submitted prompt with its ``n`` sequences, pinned to an adapter version (None: the base)."""

    id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    version: Version | None
    handle: RequestHandle
    arrival: float = field(default_factory=time.perf_counter)
    seqs: list = field(default_factory=list)
    aborted: bool = False
    done: bool = False


@dataclass(eq=False)
class Seq:
    """One completion of a request: its tokens, its row (and cache slot) and what was streamed."""

    req: Request
    index: int
    generator: torch.Generator | None
    max_new: int
    tokens: list[int] = field(default_factory=list)
    pos: int = 0                       # cache position the last token goes to (prompt + tokens - 1)
    row: int = -1
    text: str = ""                     # decoded completion so far (cut at a stop string once found)
    sent_chars: int = 0
    sent_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def adapter(self) -> str:
        return self.req.version.internal if self.req.version is not None else BASE_NAME
