"""Training data: JSONL in three shapes, tokenized with loss masks.

Each line is one of::

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}
    {"prompt": "...", "completion": "..."}
    {"text": "..."}

``messages`` are rendered with the tokenizer's chat template; only the assistant turns (their
content and the template's end-of-turn tokens) carry labels. ``prompt``/``completion`` are plain
text joined as ``prompt + completion + eos``; only the completion and eos carry labels. ``text``
is trained on every token. ``train_on_prompt=True`` labels every token in all shapes.

Errors name the file and 1-based line number (``DataError``). With ``skip_bad_lines`` a malformed
line is skipped and counted in the dataset's ``report`` instead.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

IGNORE = -100  # label of a position that carries no loss (the value HF uses, too)
SHAPES = ("messages", "prompt_completion", "text")


class DataError(ValueError):
    """A data file is missing, malformed or empty; the message names the file (and line)."""


@dataclass
class Example:
    """One tokenized example.

    Attributes:
        input_ids: token ids.
        labels: same length as ``input_ids``; the token itself where it carries loss, else -100
            (aligned with ``input_ids``: the model predicts ``labels[i]`` from positions ``< i``).
        prompt_len: tokens before the last assistant/completion span (the generation prompt), or
            None for ``text`` lines.
        reference: the last assistant/completion text (for exact match), or None.
        line: 1-based line number in the source file.
    """

    input_ids: list[int]
    labels: list[int]
    prompt_len: int | None = None
    reference: str | None = None
    line: int = 0
    prompt_ids: list[int] | None = None  # untruncated generation prompt (set when truncated)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_labels(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)

    def generation_prompt(self) -> list[int] | None:
        """Token ids of the prompt to generate the reference from (None for ``text`` lines)."""
        if self.prompt_ids is not None:
            return self.prompt_ids
        return None if self.prompt_len is None else self.input_ids[: self.prompt_len]


@dataclass
class DataReport:
    """What loading a file did: counts of lines, examples, skips and truncations."""

    path: str
    lines: int = 0
    examples: int = 0
    skipped: list[str] = field(default_factory=list)   # "line N: reason"
    truncated: int = 0
    dropped: int = 0  # truncated so far that no label token was left
    shapes: dict[str, int] = field(default_factory=dict)
    max_length: int = 0

    def summary(self) -> str:
        parts = [f"{self.path}: {self.examples} examples"]
        if self.shapes:
            parts.append("(" + ", ".join(f"{k} {v}" for k, v in sorted(self.shapes.items())) + ")")
        if self.skipped:
            parts.append(f"; skipped {len(self.skipped)} malformed line(s) [{self.skipped[0]}"
                         + (", ..." if len(self.skipped) > 1 else "") + "]")
        if self.truncated:
            parts.append(f"; truncated {self.truncated} example(s) longer than max_length={self.max_length}")
        if self.dropped:
            parts.append(f"; dropped {self.dropped} with no label token left after truncation")
        return " ".join(parts)


class Dataset:
    """A list of ``Example`` with the ``DataReport`` of the file it came from."""

    def __init__(self, examples: list[Example], report: DataReport) -> None:
        self.examples = examples
        self.report = report

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        return [len(e) for e in self.examples]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)


# -- reading -------------------------------------------------------------------------------------

def read_jsonl(path: str | Path, skip_bad_lines: bool = False) -> tuple[list[tuple[int, dict]], list[str]]:
    """Parse a JSONL file into ``[(line number, object)]``, skipping blank lines.

    Returns the records and the skipped lines' reasons (empty unless ``skip_bad_lines``).

    Raises:
        DataError: missing file, or (without ``skip_bad_lines``) a line that is not a JSON object;
            the message is ``"<file>:<line>: ..."``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    records, skipped = [], []
    with open(path, encoding="utf-8") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
                if not isinstance(obj, dict):
                    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            except ValueError as exc:
                reason = f"line {lineno}: {exc}"
                if not skip_bad_lines:
                    raise DataError(f"{path}:{lineno}: malformed JSON line ({exc}); "
                                    "fix it or pass --skip-bad-lines to skip such lines") from None
                skipped.append(reason)
                continue
            records.append((lineno, obj))
    return records, skipped


def detect_shape(record: dict) -> str:
    """``messages`` | ``prompt_completion`` | ``text``; ValueError naming the missing field."""
    if "messages" in record:
        return "messages"
    if "prompt" in record or "completion" in record:
        missing = [k for k in ("prompt", "completion") if k not in record]
        if missing:
            raise ValueError(f"missing field {missing[0]!r} (a prompt/completion line needs both)")
        return "prompt_completion"
    if "text" in record:
        return "text"
    raise ValueError(f"missing field: expected 'messages', 'prompt'+'completion' or 'text', "
                     f"got keys {sorted(record)}")


# -- tokenizing ----------------------------------------------------------------------------------

def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] needs 'role' and 'content'")
        if not isinstance(m["content"], str):
            raise ValueError(f"messages[{i}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to learn from this line")


def chat_pieces(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split a rendered conversation into ``(text, is_assistant)`` pieces.

    Each assistant span is the difference between the conversation rendered up to and including
    that turn and the one rendered up to it with ``add_generation_prompt=True``: the reply plus the
    template's end-of-turn text, exactly what the model must produce.

    Raises:
        ValueError: no chat template, or a template whose renderings are not prefixes of each other.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; use prompt/completion or text lines")
    _check_messages(messages)
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True) if i else ""
        full = _render(tokenizer, messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the chat template does not render conversations as prefixes of each "
                             "other, so assistant tokens cannot be located; use prompt/completion lines")
        pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = _render(tokenizer, messages, False)[len(done):]
    if rest:
        pieces.append((rest, False))
    return [(t, a) for t, a in pieces if t]


def tokenize_record(tokenizer, record: dict, shape: str, train_on_prompt: bool = False) -> Example:
    """Tokenize one record of a known shape into an ``Example`` (untruncated)."""
    ids: list[int] = []
    labels: list[int] = []
    prompt_len = reference = None

    def add(tokens: list[int], trained: bool) -> None:
        ids.extend(tokens)
        labels.extend(tokens if (trained or train_on_prompt) else [IGNORE] * len(tokens))

    if shape == "messages":
        pieces = chat_pieces(tokenizer, record["messages"])
        for text, is_assistant in pieces:
            if is_assistant:
                prompt_len = len(ids)
            add(_ids(tokenizer, text), is_assistant)
        reference = [m for m in record["messages"] if m["role"] == "assistant"][-1]["content"]
    elif shape == "prompt_completion":
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError("'prompt' and 'completion' must be strings")
        add(_special_prefix(tokenizer) + _ids(tokenizer, prompt), False)
        prompt_len, reference = len(ids), completion
        add(_ids(tokenizer, completion) + _eos(tokenizer), True)
    else:
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise ValueError("'text' must be a non-empty string")
        add(_special_prefix(tokenizer) + _ids(tokenizer, text) + _eos(tokenizer), True)
    return Example(ids, labels, prompt_len, reference)


def _special_prefix(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before any text (e.g. BOS), or []."""
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    return [t for t in ids if t != eos]


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def truncate(example: Example, max_length: int) -> Example:
    """Keep the first ``max_length`` tokens (the generation prompt is kept whole)."""
    prompt = example.generation_prompt()
    return Example(example.input_ids[:max_length], example.labels[:max_length], example.prompt_len,
                   example.reference, example.line, prompt)


def load_dataset(path: str | Path, tokenizer, max_length: int = 1024, *, skip_bad_lines: bool = False,
                 overlong: str = "truncate", train_on_prompt: bool = False) -> Dataset:
    """Read and tokenize a JSONL file.

    Args:
        path: the file.
        tokenizer: a transformers tokenizer (with a chat template for ``messages`` lines).
        max_length: longest example in tokens; longer ones are truncated (counted in the report,
            and dropped if no label token is left) or, with ``overlong="error"``, rejected.
        skip_bad_lines: skip and count malformed lines (bad JSON, missing fields) instead of raising.
        train_on_prompt: label prompt tokens too.

    Raises:
        DataError: the file is missing or empty, a line is malformed (without ``skip_bad_lines``),
            or an example is too long with ``overlong="error"``. Messages name file and line.
    """
    path = Path(path)
    records, skipped = read_jsonl(path, skip_bad_lines)
    report = DataReport(str(path), lines=len(records) + len(skipped), skipped=skipped, max_length=max_length)
    examples = []
    for lineno, record in records:
        try:
            shape = detect_shape(record)
            ex = tokenize_record(tokenizer, record, shape, train_on_prompt)
        except ValueError as exc:
            if not skip_bad_lines:
                raise DataError(f"{path}:{lineno}: {exc}") from None
            report.skipped.append(f"line {lineno}: {exc}")
            continue
        ex.line = lineno
        report.shapes[shape] = report.shapes.get(shape, 0) + 1
        if len(ex) > max_length:
            if overlong == "error":
                raise DataError(f"{path}:{lineno}: example has {len(ex)} tokens, more than "
                                f"max_length={max_length} (raise --max-length or use --overlong truncate)")
            ex = truncate(ex, max_length)
            report.truncated += 1
            if ex.num_labels == 0:
                report.dropped += 1
                continue
        if ex.num_labels == 0:
            if not skip_bad_lines:
                raise DataError(f"{path}:{lineno}: no token carries a label (empty completion?)")
            report.skipped.append(f"line {lineno}: no label tokens")
            continue
        examples.append(ex)
    report.examples = len(examples)
    if not examples:
        why = f" ({len(report.skipped)} line(s) skipped as malformed)" if report.skipped else ""
        raise DataError(f"{path}: no usable examples{why}; the data set is empty")
    return Dataset(examples, report)
