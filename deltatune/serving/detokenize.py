"""From sampled tokens to text: incremental detokenization, stop tokens and strings, and the deltas
and outputs handed to a request's handle.

A completion's text is decoded whole after each token (so multi-token characters come out right)
and streamed as deltas that never contain part of a stop string nor half a character: what could
still turn into either is held back until it cannot.
"""
from __future__ import annotations

from deltatune.serving.outputs import CompletionOutput, RequestOutput, StreamDelta
from deltatune.serving.requests import Request, Seq


class Detokenizer:
    """Decides when a sequence ends and what text it streams.

    Args:
        tokenizer: the base's tokenizer.
        eos: the token ids that end a completion unless ``ignore_eos`` (``generation.stop_token_ids``).
    """

    def __init__(self, tokenizer, eos: set[int]) -> None:
        self.tokenizer, self.eos = tokenizer, eos

    def append(self, s: Seq, token: int) -> StreamDelta:
        """Add ``token`` to ``s``, decide whether it finished, and return the delta to stream."""
        p = s.req.params
        s.tokens.append(token)
        if token in p.stop_token_ids:
            s.finish_reason, s.stop_reason = "stop", token
        elif token in self.eos and not p.ignore_eos:
            s.finish_reason = "stop"
        text = self.tokenizer.decode(s.tokens, skip_special_tokens=True)
        if s.finish_reason is None and p.stop_list:
            cut, hit = find_stop(text, p.stop_list, max(0, s.sent_chars - max(map(len, p.stop_list))))
            if hit is not None:
                text, s.finish_reason, s.stop_reason = text[:cut], "stop", hit
        if s.finish_reason is None and len(s.tokens) >= s.max_new:
            s.finish_reason = "length"
        s.text = text
        safe = len(text) if s.finish_reason is not None else safe_length(text, p.stop_list)
        delta_text = text[s.sent_chars:safe] if safe > s.sent_chars else ""
        new_tokens = s.tokens[s.sent_tokens:]
        s.sent_chars, s.sent_tokens = max(s.sent_chars, safe), len(s.tokens)
        return StreamDelta(s.index, delta_text, new_tokens, s.finish_reason, len(s.req.prompt_ids), len(s.tokens))


def final_output(req: Request, deltas=()) -> tuple[list[StreamDelta], RequestOutput]:
    """``req``'s last deltas and its whole output. A sequence ended without a token of its own
    (aborted) gets finish_reason "abort" and an empty closing delta."""
    deltas = list(deltas)
    closed = {d.index for d in deltas if d.finish_reason is not None}
    for s in req.seqs:
        if s.finish_reason is None:
            s.finish_reason = "abort"
        if s.finish_reason == "abort" and s.index not in closed:
            deltas.append(StreamDelta(s.index, "", [], "abort", len(req.prompt_ids), len(s.tokens)))
    outputs = [CompletionOutput(s.index, s.text, list(s.tokens), s.finish_reason, stop_reason=s.stop_reason)
               for s in req.seqs]
    return deltas, RequestOutput(req.id, req.prompt, req.prompt_ids, outputs)


def find_stop(text: str, stops: list[str], start: int) -> tuple[int, str | None]:
    """Earliest stop string in ``text`` at or after ``start``: (its index, it), or (len, None)."""
    best, hit = len(text), None
    for stop in stops:
        i = text.find(stop, start)
        if i != -1 and i < best:
            best, hit = i, stop
    return best, hit


def safe_length(text: str, stops: list[str]) -> int:
    """How much of ``text`` may be streamed: not a trailing partial character (U+FFFD from an
    incomplete byte sequence) nor a trailing prefix of a stop string, which may yet complete."""
    end = len(text.rstrip("\ufffd"))
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), 0, -1):
            if text[:end].endswith(stop[:k]):
                held = max(held, k)
                break
    return end - held
