"""Who may use what: API keys, the models each key may use, and where runtime adapters may come from.

``--api-keys FILE`` is a JSON object ``{"KEY": ["model", ...], ...}``; ``"*"`` in a list grants every
model plus the load/unload endpoints (an operator key). A model a key may not use is answered exactly
as a model that does not exist, so one tenant cannot learn another's adapter names. The single
``--api-key`` is an operator key. Keys are compared in constant time (``hmac.compare_digest``).
"""
from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from pathlib import Path

ALL = "*"


@dataclass(frozen=True)
class Grant:
    """What one client may do: ``models`` it may name (``ALL`` = every one) and ``client`` (the key
    that identifies it for per-client limits; the peer address when the server has no keys)."""

    models: frozenset
    client: str

    @property
    def operator(self) -> bool:
        """May load and unload adapters (and use every model)."""
        return ALL in self.models

    def allows(self, model: str) -> bool:
        return self.operator or model in self.models


class Access:
    """The server's keys: ``keys`` maps each key to the model names it may use; empty = no keys asked."""

    def __init__(self, keys: dict[str, frozenset] | None = None) -> None:
        self.keys = dict(keys or {})

    @classmethod
    def build(cls, api_key: str | None = None, api_keys_file: str | Path | None = None) -> "Access":
        """Keys from ``--api-key`` (an operator key) and ``--api-keys FILE`` together."""
        keys = load_api_keys(api_keys_file) if api_keys_file else {}
        if api_key:
            keys[api_key] = frozenset({ALL})
        return cls(keys)

    def grant(self, authorization: str, peer: str) -> Grant | None:
        """The grant of the ``Authorization`` header, None if the key is missing or wrong. Every key is
        compared (no early exit), each in constant time, so timing does not tell how close a guess was."""
        if not self.keys:
            return Grant(frozenset({ALL}), f"peer:{peer}")
        given = authorization.encode()
        found = None
        for key, models in self.keys.items():
            if hmac.compare_digest(given, f"Bearer {key}".encode()):
                found = Grant(models, f"key:{key}")
        return found


def load_api_keys(path: str | Path) -> dict[str, frozenset]:
    """Read ``--api-keys FILE``: ``{"KEY": ["model", ...]}``.

    Raises:
        ValueError: naming the file and the line (bad JSON) or the key (bad entry).
    """
    where = f"--api-keys {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{where}: must be a non-empty JSON object mapping each key to a list of model names")
    keys = {}
    for key, models in data.items():
        shown = _mask(key)
        if not key.strip() or any(c.isspace() for c in key):
            raise ValueError(f"{where}: key {shown!r} is empty or contains whitespace")
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise ValueError(f"{where}: key {shown!r}: the value must be a non-empty list of model names "
                             f"(strings; \"*\" for every model), got {json.dumps(models)[:80]}")
        keys[key] = frozenset(models)
    return keys


def _mask(key: str) -> str:
    """A key as error messages show it: its first characters only (logs are read by more people)."""
    return key[:4] + "..." if len(key) > 8 else key


class LoraRoot:
    """``--lora-root DIR``: runtime ``lora_path`` values must resolve (symlinks and ``..`` followed) to a
    directory inside it. Outside the root and missing give the same words, so the endpoint cannot be
    used to probe the server's filesystem."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"--lora-root {root}: not a directory")

    def confine(self, lora_path: str) -> Path:
        """The resolved adapter directory; ValueError (one message for every refusal) otherwise."""
        try:
            resolved = (self.root / lora_path).resolve()
            inside = resolved.is_relative_to(self.root) and resolved != self.root and resolved.is_dir()
        except (OSError, RuntimeError, ValueError):  # symlink loops, NUL bytes
            inside = False
        if not inside:
            raise ValueError(f"lora_path: adapter directory {lora_path!r} not found under the server's --lora-root")
        return resolved
