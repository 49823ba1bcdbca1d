"""The ``README.md`` model card ``save_pretrained`` writes beside the adapter, as peft does.

The Hub reads the card's YAML header: ``library_name: peft`` (the files are peft's format, and
the Hub's peft loader is what opens them), ``base_model``, ``tags`` (``lora`` for LoRA,
``transformers``, ``base_model:adapter:<base>``, and ``deltatune``) and ``pipeline_tag``
(``text-generation`` for a causal LM). The text says honestly which library wrote it. A card
already in the directory is kept and updated: its text stays, its header gains these keys.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import yaml

_HEADER = re.compile(r"\A---\n(.*?)\n---\n?", re.DOTALL)


def card_header(peft) -> dict:
    """The header keys for PeftModel ``peft`` (its active adapter's method)."""
    model = peft.get_base_model()
    config = peft.peft_config.get(peft.active_adapter)
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    tags = {"deltatune", *(getattr(model, "model_tags", None) or [])}
    if any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel" for c in type(model).__mro__):
        tags.add("transformers")
    if config is not None and config.peft_type.value == "LORA":
        tags.add("lora")
    if base:
        tags.add(f"base_model:adapter:{base}")
    header = {"library_name": "peft", "tags": sorted(tags)}
    if base:
        header["base_model"] = base
    if getattr(type(peft), "task_type", None) == "CAUSAL_LM":  # PeftModelForCausalLM
        header["pipeline_tag"] = "text-generation"
    return header


def model_card(peft, directory: str | os.PathLike) -> str:
    """The card's text: the one in ``directory`` updated, or a new one."""
    version = getattr(sys.modules.get("deltatune"), "__version__", "unknown")  # the package root, loaded
    path = Path(directory) / "README.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    found = _HEADER.match(text)
    header = (yaml.safe_load(found.group(1)) or {}) if found else {}
    body = text[found.end():] if found else text
    new = card_header(peft)
    header["tags"] = sorted(set(header.get("tags") or []) | set(new.pop("tags")))
    header.setdefault("pipeline_tag", new.pop("pipeline_tag", None))
    header.update(new)
    header = {k: v for k, v in header.items() if v is not None}
    if not body.strip():
        config = peft.peft_config.get(peft.active_adapter)
        method = config.peft_type.value if config is not None else "PEFT"
        body = (f"\n# {method} adapter\n\nWritten by deltatune in peft's format (`adapter_config.json` + adapter "
                "weights): `peft.PeftModel.from_pretrained(base, path)` and "
                "`deltatune.PeftModel.from_pretrained(base, path)` both load it.\n")
    versions = f"- deltatune {version}"
    if versions not in body:
        body = body.rstrip("\n") + f"\n\n### Framework versions\n\n{versions}\n"
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n" + body
