"""Virtual-token methods: prompt tuning, prefix tuning and P-tuning (peft's prompt learning).

They leave every weight alone and wrap no layer. Each adapter is one *component*: a small module
holding ``num_virtual_tokens`` learned rows, kept by the ``TunerModel`` beside the wrapped layers
(saved, loaded, trained, counted, deleted and disabled like them), and a method hook that prepares
a call's inputs (``deltatune.methods.virtual_inputs``).

- Prompt tuning (Lester et al. 2021, arXiv:2104.08691): learned input embeddings (n, d) put
  before the real tokens. ``PromptTuningInit.TEXT`` starts them at the embeddings of a text's
  tokens (repeated or cut to ``n``, as peft does), ``SAMPLE_VOCAB`` at random vocabulary rows,
  ``RANDOM`` at N(0, 1) (peft's default).
- P-tuning (Liu et al. 2021, arXiv:2103.10385): the same virtual inputs, produced while training
  by an encoder (an MLP, or a bidirectional LSTM and an MLP) from a learned table.
- Prefix tuning (Li & Liang 2021, arXiv:2101.00190): a learned key and value per layer, head and
  virtual token, (n, layers * 2 * kv_heads * head_dim), put in front of the KV cache (grouped-query
  attention: the model's KV heads, as peft sizes it); optionally produced through an MLP
  (``prefix_projection``).

Files are peft's: ``peft_type`` ``PROMPT_TUNING`` / ``P_TUNING`` / ``PREFIX_TUNING``, every field
peft writes (the base-dependent ones, ``token_dim``, ``num_layers``, ``num_attention_heads``, ...,
filled from the model when the adapter is added), one tensor ``prompt_embeddings``: the rows the
model sees, i.e. after the encoder. A loaded reparameterised adapter therefore holds that table
directly (as peft does), and further training moves the table itself.

Capabilities: not mergeable (virtual tokens are extra inputs, not a weight change); not mixable
(rows of one batch cannot have different prefix lengths here); not packable (every packed
sequence would need its own copy of the prefix and a mask that shows it; ``deltatune train``
runs one sequence per row for these methods).
"""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch
from torch import nn

from deltatune import registry
from deltatune.config import ConfigError, PeftConfig, PeftType, TaskType


class PromptTuningInit(str, enum.Enum):
    """How prompt tuning's virtual tokens start (peft's names)."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


class PromptEncoderReparameterizationType(str, enum.Enum):
    """P-tuning's encoder (peft's names)."""

    MLP = "MLP"
    LSTM = "LSTM"


def _enum_value(name: str, value, kind: type[enum.Enum]):
    value = value.value if isinstance(value, kind) else value
    if value not in kind._value2member_map_:
        raise ConfigError(f"{name}={value!r} must be one of {sorted(kind._value2member_map_)}")
    return value


def _positive_or_none(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ConfigError(f"{name}={value!r} must be a positive integer")


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields of peft's three virtual-token methods.

    Attributes:
        num_virtual_tokens: learned tokens (default 20).
        token_dim, num_layers, num_attention_heads, num_transformer_submodules: the base's
            sizes as peft records them; filled from the model when the adapter is added (leave
            them None). For prefix tuning on grouped-query attention, ``num_attention_heads`` is
            the number of KV heads and ``token_dim`` their total width, as in peft.
        modules_to_save: modules trained in full and saved with the adapter (a new head).
    """

    file_key_prefix: ClassVar[str] = "base_model."

    num_virtual_tokens: int = 20
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int) \
                or self.num_virtual_tokens <= 0:
            raise ConfigError(f"num_virtual_tokens={self.num_virtual_tokens!r} must be a positive integer")
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            _positive_or_none(name, getattr(self, name))
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` learned input embeddings before the real tokens.

    Attributes:
        prompt_tuning_init: ``PromptTuningInit.TEXT`` | ``SAMPLE_VOCAB`` | ``RANDOM`` (default).
        prompt_tuning_init_text: the text whose token embeddings start the virtual tokens (TEXT).
        tokenizer_name_or_path: the tokenizer for TEXT: a local directory, a ``.gguf`` file or
            ``"default"`` (read offline through ``deltatune.models.load_tokenizer``).
        tokenizer_kwargs: kept for peft's files; only valid with TEXT, and unused here.

    Raises:
        ConfigError: TEXT without a text or tokenizer; an unknown init.
    """

    peft_type: ClassVar[PeftType] = PeftType.PROMPT_TUNING

    prompt_tuning_init: Union[PromptTuningInit, str] = PromptTuningInit.RANDOM
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[dict] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = _enum_value("prompt_tuning_init", self.prompt_tuning_init, PromptTuningInit)
        text = self.prompt_tuning_init == PromptTuningInit.TEXT.value
        if text and not self.tokenizer_name_or_path:
            raise ConfigError("prompt_tuning_init='TEXT' needs tokenizer_name_or_path (a directory or 'default')")
        if text and not self.prompt_tuning_init_text:
            raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text")
        if self.tokenizer_kwargs and not text:
            raise ConfigError("tokenizer_kwargs only applies with prompt_tuning_init='TEXT'")


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: virtual input embeddings produced by an encoder while training (peft's ``P_TUNING``).

    Attributes:
        encoder_reparameterization_type: ``"MLP"`` (default: three linear layers with ReLU) or
            ``"LSTM"`` (a bidirectional LSTM, then two linear layers).
        encoder_hidden_size: the encoder's width (default: the model's hidden size).
        encoder_num_layers: LSTM layers (the MLP always has peft's three).
        encoder_dropout: dropout between LSTM layers.
    """

    peft_type: ClassVar[PeftType] = PeftType.P_TUNING

    encoder_reparameterization_type: Union[PromptEncoderReparameterizationType, str] = \
        PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_reparameterization_type = _enum_value(
            "encoder_reparameterization_type", self.encoder_reparameterization_type,
            PromptEncoderReparameterizationType)
        _positive_or_none("encoder_hidden_size", self.encoder_hidden_size)
        _positive_or_none("encoder_num_layers", self.encoder_num_layers)
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"encoder_dropout={self.encoder_dropout!r} must be in [0, 1)")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: a learned key and value per layer and virtual token, before the KV cache.

    Attributes:
        prefix_projection: produce the prefix through a two-layer MLP (tanh) from a (n, token_dim)
            table while training; the file holds the resulting prefix.
        encoder_hidden_size: the MLP's width (default: ``token_dim``).
        init_weights: None (random, peft's default) or ``"zero"`` (the prefix starts at zero keys
            and values, which still shift attention: the model is not unchanged).
    """

    peft_type: ClassVar[PeftType] = PeftType.PREFIX_TUNING

    init_weights: Optional[str] = None
    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights={self.init_weights!r} must be None or 'zero'")
        _positive_or_none("encoder_hidden_size", self.encoder_hidden_size)


# -- sizes from the base ---------------------------------------------------------------------------

def complete_config(config: PromptLearningConfig, model: nn.Module) -> PromptLearningConfig:
    """``config`` with the base-dependent fields peft writes filled from ``model.config``.

    Raises:
        ConfigError: a sequence-to-sequence task (not supported), or a model config without the
            sizes (the message names the field to set).
    """
    if config.task_type == TaskType.SEQ_2_SEQ_LM.value:
        raise ConfigError(f"{config.peft_type.value}: task_type SEQ_2_SEQ_LM is not supported by deltatune; "
                          "decoder-only and encoder models are")
    mc = getattr(model, "config", None)
    mc = mc.get_text_config() if hasattr(mc, "get_text_config") else mc

    def size(field: str, *names: str) -> int:
        if getattr(config, field) is not None:
            return getattr(config, field)
        for name in names:
            if getattr(mc, name, None) is not None:
                return getattr(mc, name)
        raise ConfigError(f"{config.peft_type.value}: cannot read {field} from the model's config; set {field}=")

    changes: dict[str, Any] = dict(
        num_layers=size("num_layers", "num_hidden_layers", "n_layer", "num_layers"),
        token_dim=size("token_dim", "hidden_size", "n_embd", "d_model"),
        num_attention_heads=size("num_attention_heads", "num_attention_heads", "n_head", "num_heads"),
        num_transformer_submodules=config.num_transformer_submodules or 1)
    kv_heads = getattr(mc, "num_key_value_heads", None)
    if isinstance(config, PrefixTuningConfig) and config.token_dim is None and kv_heads:
        # Grouped-query attention: the cache holds the KV heads only (peft's rule, issue #1901).
        head_dim = getattr(mc, "head_dim", None) or changes["token_dim"] // changes["num_attention_heads"]
        changes.update(token_dim=head_dim * kv_heads, num_attention_heads=kv_heads)
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        changes["encoder_hidden_size"] = changes["token_dim"]
    return dataclasses.replace(config, **changes)


# -- components ------------------------------------------------------------------------------------

class VirtualTokens(nn.Module):
    """One adapter's virtual tokens: a (n, width) table, optionally through an encoder.

    ``forward()`` returns the rows the model sees, (n, width); that is what is saved (peft's
    ``prompt_embeddings``). ``resolve()`` replaces table + encoder by the plain result (loading
    does this first, so a saved adapter loads into its table). Subclasses say how the rows are
    used: ``kind`` is ``"inputs"`` (embeddings before the real tokens) or ``"kv"`` (a cache prefix).

    Attributes:
        embedding: the learned table (``nn.Embedding``, as in peft).
        encoder: the reparameterisation (None once resolved, or for plain prompt tuning).
    """

    is_adapter_component: ClassVar[bool] = True
    kind: ClassVar[str] = "inputs"

    def __init__(self, config: PromptLearningConfig, width: int, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.num_virtual_tokens = config.num_virtual_tokens
        self.embedding = nn.Embedding(config.num_virtual_tokens, width)
        self.encoder = encoder

    @property
    def reparameterized(self) -> bool:
        """True while the saved rows are computed (encoder present), not stored."""
        return self.encoder is not None

    def forward(self) -> torch.Tensor:
        table = self.embedding.weight                                        # (n, width)
        return table if self.encoder is None else self.encoder(table)        # (n, out)

    def state(self) -> dict[str, torch.Tensor]:
        """What the adapter saves: ``{"prompt_embeddings": (n, out)}``; the live table when there is
        no encoder (loading copies into it), else the encoder's detached result."""
        if self.encoder is None:
            return {"prompt_embeddings": self.embedding.weight}
        with torch.no_grad():
            return {"prompt_embeddings": self().detach()}

    def resolve(self) -> None:
        """Keep only the rows the encoder produces, as the table (trainability kept)."""
        if self.encoder is None:
            return
        grad = self.embedding.weight.requires_grad
        with torch.no_grad():
            rows = self().detach().clone()
        self.encoder = None
        self.embedding = nn.Embedding.from_pretrained(rows, freeze=not grad)

    # The method's input hook (the component protocol ``TunerModel`` and ``PeftModel`` call).
    def prepare(self, model: nn.Module, kwargs: dict, callee: nn.Module | None = None) -> dict:
        """A call's keyword arguments with these virtual tokens in (``virtual_inputs.prepare``)."""
        from deltatune.methods.virtual_inputs import prepare

        return prepare(self, model, kwargs, callee)

    def generation_kwargs(self, model: nn.Module, kwargs: dict) -> dict:
        """``generate``'s keyword arguments with these virtual tokens in the cache."""
        from deltatune.methods.virtual_inputs import generation_kwargs

        return generation_kwargs(self, model, kwargs)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, kind={self.kind!r}"


class _LSTMHead(nn.Module):
    """P-tuning's LSTM encoder: bidirectional LSTM over the table, then Linear-ReLU-Linear."""

    def __init__(self, dim: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm_head = nn.LSTM(dim, hidden, num_layers=layers, dropout=dropout, bidirectional=True,
                                 batch_first=True)
        self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))

    def forward(self, table: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(self.lstm_head(table[None])[0])[0]              # (n, dim)


def _input_embeddings(model: nn.Module) -> nn.Embedding:
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embed, nn.Embedding):
        raise ConfigError(f"{type(model).__name__} has no input embedding layer (get_input_embeddings); "
                          "virtual-token methods need one")
    return embed


def build_prompt_tuning(config: PromptTuningConfig, model: nn.Module) -> VirtualTokens:
    """Prompt tuning's component, initialised as ``config.prompt_tuning_init`` says (peft's rules)."""
    embed = _input_embeddings(model)
    n = config.num_virtual_tokens * config.num_transformer_submodules
    tokens = VirtualTokens(config, config.token_dim)
    ids = None
    if config.inference_mode:  # loading: the file's values replace any start (peft skips it too)
        pass
    elif config.prompt_tuning_init == PromptTuningInit.SAMPLE_VOCAB.value:
        ids = torch.randint(0, embed.num_embeddings, (n,), dtype=torch.long)
    elif config.prompt_tuning_init == PromptTuningInit.TEXT.value:
        from deltatune import models

        text_ids = models.load_tokenizer(config.tokenizer_name_or_path)(config.prompt_tuning_init_text)["input_ids"]
        if not text_ids:
            raise ConfigError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} has no tokens")
        ids = torch.tensor((text_ids * math.ceil(n / len(text_ids)))[:n], dtype=torch.long)
    if ids is not None:
        with torch.no_grad():
            tokens.embedding.weight.copy_(embed.weight[ids.to(embed.weight.device)].float())
    return tokens


def build_p_tuning(config: PromptEncoderConfig, model: nn.Module) -> VirtualTokens:
    """P-tuning's component: the table plus its MLP or LSTM encoder."""
    _input_embeddings(model)
    d, h = config.token_dim, config.encoder_hidden_size
    if config.encoder_reparameterization_type == PromptEncoderReparameterizationType.LSTM.value:
        encoder = _LSTMHead(d, h, config.encoder_num_layers, config.encoder_dropout)
    else:
        encoder = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))
    return VirtualTokens(config, d, encoder)


class PrefixTokens(VirtualTokens):
    """Prefix tuning's component: rows of ``layers * 2 * token_dim`` (keys and values per layer)."""

    kind = "kv"

    def __init__(self, config: PrefixTuningConfig) -> None:
        width = config.num_layers * 2 * config.token_dim
        encoder = None
        if config.prefix_projection:
            encoder = nn.Sequential(nn.Linear(config.token_dim, config.encoder_hidden_size), nn.Tanh(),
                                    nn.Linear(config.encoder_hidden_size, width))
        super().__init__(config, config.token_dim if config.prefix_projection else width, encoder)
        self.num_layers, self.num_heads = config.num_layers, config.num_attention_heads
        self.head_dim = config.token_dim // config.num_attention_heads
        if config.init_weights == "zero":
            with torch.no_grad():
                last = encoder[-1] if encoder is not None else self.embedding
                for p in last.parameters():
                    p.zero_()

    def key_values(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(keys, values)``, each (1, heads, n, head_dim), in peft's layout."""
        rows = self().view(self.num_virtual_tokens, self.num_layers * 2, self.num_heads, self.head_dim)
        kv = rows.permute(1, 2, 0, 3)                                        # (2L, H, n, hd)
        return [(kv[2 * i][None], kv[2 * i + 1][None]) for i in range(self.num_layers)]


def build_prefix_tuning(config: PrefixTuningConfig, model: nn.Module) -> PrefixTokens:
    """Prefix tuning's component; a model whose forward takes no KV cache is refused."""
    from deltatune.methods.virtual_inputs import cache_argument

    if cache_argument(model) is None:
        raise ConfigError(f"PREFIX_TUNING needs a model whose forward takes a KV cache; {type(model).__name__} "
                          "does not (encoder models such as BERT: use prompt tuning or P-tuning)")
    if config.token_dim % config.num_attention_heads:
        raise ConfigError(f"token_dim={config.token_dim} is not a multiple of num_attention_heads="
                          f"{config.num_attention_heads}")
    return PrefixTokens(config)


def _register() -> None:
    # servable: the engine runs the virtual tokens per row (serving.virtual_rows) beside any other rows.
    common = dict(mergeable=False, mixable=False, packable=False, servable=True, complete_config=complete_config,
                  why_not_mergeable="its virtual tokens are extra inputs, not a weight change")
    # Learning rates: the best of a sweep on the demo task at 40 steps x 8 (README, "Virtual tokens";
    # exact match of 50): prompt tuning 3e-2 46 (1e-1 46, 3e-1 overshoots); prefix tuning (zero init)
    # 3e-2 42 (1e-2 38, 1e-1 34); P-tuning 3e-3 41 (1e-3 33, 5e-3 34, 1e-2 25).
    registry.register_method(PeftType.PROMPT_TUNING.value, PromptTuningConfig, ("prompt", "prompt-tuning"),
                             component=build_prompt_tuning, default_lr=3e-2, **common)
    registry.register_method(PeftType.P_TUNING.value, PromptEncoderConfig, ("ptuning", "p-tuning"),
                             component=build_p_tuning, default_lr=3e-3, **common)
    registry.register_method(PeftType.PREFIX_TUNING.value, PrefixTuningConfig, ("prefix", "prefix-tuning"),
                             component=build_prefix_tuning, default_lr=3e-2, **common)


_register()
