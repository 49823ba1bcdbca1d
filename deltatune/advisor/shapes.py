"""Architecture of a base model, enough to count its parameters and size its activations.

Read offline from a transformers ``config.json`` (``default``, a model directory, a GGUF file via
``deltatune.models``' cache), or taken from the built-in table of common open model families for
a named size (``7b``, ``70b``, ``llama-3.1-8b``, ...) when no local config is at hand.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer (Llama-style: attention q/k/v/o, gated MLP gate/up/down).

    Attributes:
        name: what the user asked for (``"70b"``, a path, ``"default"``).
        layers, hidden, heads, kv_heads, head_dim, intermediate, vocab: the config's
            ``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
            ``head_dim`` (default hidden // heads), ``intermediate_size``, ``vocab_size``.
        tied: input embedding and output head share one matrix (``tie_word_embeddings``).
        gated_mlp: MLP is gate/up/down (Llama, Mistral, Qwen); False: up/down (GPT-2-like fc1/fc2).
        source: where the numbers come from (a file path or a published config).
        kind: ``"causal-lm"`` or ``"diffusion"`` (a diffusion model's denoiser: only advice, no sizing).
    """

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False
    head_dim: int = 0
    gated_mlp: bool = True
    source: str = ""
    kind: str = "causal-lm"

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    # -- linear layers of one decoder block: name -> (in_features, out_features) ---------------------
    def block_linears(self) -> dict[str, tuple[int, int]]:
        d, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        linears = {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)}
        if self.gated_mlp:
            linears.update(gate_proj=(d, self.intermediate), up_proj=(d, self.intermediate),
                           down_proj=(self.intermediate, d))
        else:
            linears.update(up_proj=(d, self.intermediate), down_proj=(self.intermediate, d))
        return linears

    @property
    def linear_params(self) -> int:
        """Weights of the decoder blocks' linear layers (what QLoRA stores in 4 bits)."""
        return self.layers * sum(i * o for i, o in self.block_linears().values())

    @property
    def embedding_params(self) -> int:
        """Input embedding plus, when untied, the output head."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def norm_params(self) -> int:
        """RMSNorm weights: two per block and the final norm."""
        return (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        """All parameters (biases, if any, are ignored: < 0.1% for these families)."""
        return self.linear_params + self.embedding_params + self.norm_params


def _shape(name, layers, hidden, heads, kv_heads, intermediate, vocab, source, tied=False, **kw) -> ModelShape:
    return ModelShape(name, layers, hidden, heads, kv_heads, intermediate, vocab, tied=tied, source=source, **kw)


# Published configs (config.json of each model on the Hugging Face hub; LLaMA-1 also its paper,
# Touvron et al. 2023, arXiv:2302.13971, Table 2). Numbers copied by hand, not fetched at run time.
KNOWN: dict[str, ModelShape] = {s.name: s for s in [
    _shape("llama-7b", 32, 4096, 32, 32, 11008, 32000, "huggyllama/llama-7b config.json; arXiv:2302.13971"),
    _shape("llama-13b", 40, 5120, 40, 40, 13824, 32000, "huggyllama/llama-13b config.json; arXiv:2302.13971"),
    _shape("llama-33b", 60, 6656, 52, 52, 17920, 32000, "huggyllama/llama-30b config.json; arXiv:2302.13971"),
    _shape("llama-65b", 80, 8192, 64, 64, 22016, 32000, "huggyllama/llama-65b config.json; arXiv:2302.13971"),
    _shape("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, "meta-llama/Llama-2-7b-hf config.json"),
    _shape("llama-2-13b", 40, 5120, 40, 40, 13824, 32000, "meta-llama/Llama-2-13b-hf config.json"),
    _shape("llama-2-70b", 80, 8192, 64, 8, 28672, 32000, "meta-llama/Llama-2-70b-hf config.json"),
    _shape("llama-3.1-8b", 32, 4096, 32, 8, 14336, 128256, "meta-llama/Llama-3.1-8B config.json"),
    _shape("llama-3.1-70b", 80, 8192, 64, 8, 28672, 128256, "meta-llama/Llama-3.1-70B config.json"),
    _shape("mistral-7b", 32, 4096, 32, 8, 14336, 32000, "mistralai/Mistral-7B-v0.1 config.json"),
    _shape("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064, "Qwen/Qwen2.5-7B config.json"),
    _shape("smollm2-135m", 30, 576, 9, 3, 1536, 49152, "HuggingFaceTB/SmolLM2-135M config.json", tied=True),
]}

# A bare size picks the family most people mean by it today.
SIZES = {"135m": "smollm2-135m", "7b": "llama-2-7b", "8b": "llama-3.1-8b", "13b": "llama-2-13b",
         "33b": "llama-33b", "30b": "llama-33b", "65b": "llama-65b", "70b": "llama-3.1-70b"}

# Diffusion denoisers are advised on, not sized (their memory depends on resolution, not tokens).
DIFFUSION_HINTS = ("diffusion", "sdxl", "sd15", "sd-1", "sd2", "flux", "unet")


def known_names() -> list[str]:
    return sorted(KNOWN) + sorted(SIZES)


def from_config_dict(cfg: dict, name: str, source: str) -> ModelShape:
    """Shape from a transformers ``config.json`` mapping (Llama-family and GPT-2-style keys).

    Raises:
        ValueError: a config without the keys a decoder-only transformer has (names the keys).
    """
    if "unet" in str(cfg.get("_class_name", "")).lower():
        return ModelShape(name, 0, 0, 1, 1, 0, 0, source=source, kind="diffusion")
    get = lambda *keys: next((cfg[k] for k in keys if cfg.get(k) is not None), None)  # noqa: E731
    layers, hidden = get("num_hidden_layers", "n_layer"), get("hidden_size", "n_embd")
    heads, vocab = get("num_attention_heads", "n_head"), get("vocab_size")
    missing = [k for k, v in (("num_hidden_layers", layers), ("hidden_size", hidden),
                              ("num_attention_heads", heads), ("vocab_size", vocab)) if v is None]
    if missing:
        raise ValueError(f"{source}: not a decoder-only transformer config (missing {', '.join(missing)})")
    gated = cfg.get("model_type") not in ("gpt2", "gpt_neox", "opt", "gpt_bigcode", "phi")
    inter = get("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    return ModelShape(name, int(layers), int(hidden), int(heads), int(get("num_key_value_heads") or heads),
                      int(inter), int(vocab), tied=bool(cfg.get("tie_word_embeddings", True)),
                      head_dim=int(cfg.get("head_dim") or 0), gated_mlp=gated, source=source)


def resolve(model: str) -> ModelShape:
    """``model`` -> ``ModelShape``: a known name or size, ``default``, a directory or a GGUF file.

    Raises:
        ValueError: neither a path nor a known name (the message lists the known names).
        FileNotFoundError: ``default`` without its package (see ``deltatune.models``).
    """
    key = model.strip().lower()
    if key in SIZES:
        return replace(KNOWN[SIZES[key]], name=model)
    if key in KNOWN:
        return replace(KNOWN[key], name=model)
    path = Path(model).expanduser()
    unet = path / "unet" / "config.json"  # a diffusers pipeline directory
    if path.is_dir() and unet.is_file():
        return from_config_dict(json.loads(unet.read_text(encoding="utf-8")), model, str(unet))
    if model == "default" or path.exists():
        from deltatune import models

        directory = models._resolve_directory(model)
        config_file = directory / "config.json"
        if config_file.is_file():
            return from_config_dict(json.loads(config_file.read_text(encoding="utf-8")), model, str(config_file))
        raise ValueError(f"{directory}: no config.json")
    if any(h in key for h in DIFFUSION_HINTS):
        return ModelShape(model, 0, 0, 1, 1, 0, 0, source="name", kind="diffusion")
    m = re.fullmatch(r"(\d+(?:\.\d+)?)b", key)
    hint = f" (no built-in shape for {m.group(0)}; pass a config directory)" if m else ""
    raise ValueError(f"--model {model!r}: not a file or directory and not a known model{hint}; "
                     f"known: {', '.join(known_names())}")
