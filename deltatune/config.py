"""Adapter configurations, validated on construction, serialised in peft's JSON schema.

Each method's config is a small dataclass. ``to_dict()`` writes every field peft writes to
``adapter_config.json`` (so peft and serving engines read our files) and ``from_dict()`` reads
peft's files, refusing fields whose values we cannot honour instead of silently ignoring them.
``save_pretrained`` / ``from_pretrained`` read and write that file here; ``checkpoint/`` calls
them, never the reverse. The only deltatune module this one uses is ``deltatune.atomic``
(standard library only, imported when a file is written), for its atomic write.
"""
from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

CONFIG_NAME = "adapter_config.json"


class TaskType(str, enum.Enum):
    """The kind of head the base model has; same names and values as peft's ``TaskType``."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """Method identifiers as written in ``adapter_config.json`` under ``peft_type``."""

    LORA = "LORA"
    IA3 = "IA3"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"
    BOTTLENECK = "DELTATUNE_BOTTLENECK"


# Task types whose classification head is new and must be trained and saved with the adapter.
# peft adds these names to ``modules_to_save`` for the same task types.
TASK_HEADS: dict[str, list[str]] = {
    TaskType.SEQ_CLS.value: ["classifier", "score"],
    TaskType.TOKEN_CLS.value: ["classifier", "score"],
    TaskType.QUESTION_ANS.value: ["qa_outputs"],
}


class ConfigError(ValueError):
    """A configuration field has an invalid value; the message names the field."""


class MissingKeyError(ConfigError, TypeError):
    """A file lacks a key every config has (``peft_type``); a TypeError too, as peft raises."""


class _ConfigType(type):
    """Lets a config class be called with ``peft_type=`` as peft's are: accepted when it names the
    class's own type, a ConfigError naming both otherwise (the type is the class, not a field)."""

    def __call__(cls, *args: Any, peft_type: Any = None, **kwargs: Any):
        if peft_type is not None:
            found = peft_type.value if isinstance(peft_type, PeftType) else peft_type
            if found != cls.peft_type.value:
                raise ConfigError(f"{cls.__name__}: peft_type={found!r} does not match this class, "
                                  f"which is {cls.peft_type.value!r}")
        return super().__call__(*args, **kwargs)

    @property
    def __signature__(cls) -> inspect.Signature:
        """The fields as keywords plus ``peft_type``, for ``inspect`` (not this ``__call__``'s)."""
        init = inspect.signature(cls.__init__)
        params = list(init.parameters.values())[1:]  # without self
        extra = inspect.Parameter("peft_type", inspect.Parameter.KEYWORD_ONLY, default=None)
        return init.replace(parameters=params + [extra], return_annotation=inspect.Signature.empty)


def _deltatune_version() -> Optional[str]:
    """The running deltatune's version (``deltatune.__version__``; read from the loaded package
    so that this module imports nothing of deltatune), or None while the package is loading."""
    return getattr(sys.modules.get("deltatune"), "__version__", None)


# Prompt-learning methods (virtual tokens instead of wrapped layers), as peft groups them.
_PROMPT_LEARNING = frozenset({PeftType.PROMPT_TUNING, PeftType.PREFIX_TUNING, PeftType.P_TUNING})


@dataclass
class PeftConfig(metaclass=_ConfigType):
    """Fields common to every method.

    Attributes:
        task_type: what the base model does (``TaskType`` or its string), optional.
        inference_mode: if True, nothing is trainable after wrapping.
        base_model_name_or_path: where the base came from; written to the file so tools can
            find the base (deltatune fills it from ``model.config._name_or_path`` when unset).
        revision: base model revision, for peft compatibility.
        peft_version: the library version that wrote the config, as peft writes it (filled with
            deltatune's version when not given; a loaded file keeps the version it names). Not
            compared by ``==``.
    """

    peft_type: ClassVar[PeftType]
    # Extra keys peft writes for this method, with the values meaning "feature not used".
    # They are written so peft sees a complete file, and accepted on read only at these values.
    peft_extra_defaults: ClassVar[dict[str, Any]] = {}
    # Prefix of this method's tensor keys in peft's files: wrapped layers live under the user's
    # model (``base_model.model.``); peft's prompt-learning methods write ``base_model.``.
    file_key_prefix: ClassVar[str] = "base_model.model."

    task_type: Optional[Union[str, TaskType]] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    peft_version: Optional[str] = field(default=None, kw_only=True, compare=False)

    def __post_init__(self) -> None:
        if self.peft_version is None:
            self.peft_version = _deltatune_version()
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if self.task_type is not None and self.task_type not in TaskType._value2member_map_:
            raise ConfigError(f"Invalid task type: {self.task_type!r}. Must be one of the following task types: "
                              f"{', '.join(TaskType._value2member_map_)}. (field task_type)")

    @property
    def is_prompt_learning(self) -> bool:
        """True for prompt tuning, prefix tuning and P-tuning (virtual tokens, no wrapped layers)."""
        return self.peft_type in _PROMPT_LEARNING

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The ``adapter_config.json`` content, in peft's schema (all keys peft writes)."""
        out = dict(self.peft_extra_defaults)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
            out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value  # BdLoraConfig
        out["peft_type"] = self.peft_type.value
        out.setdefault("auto_mapping", None)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "adapter_config.json") -> "PeftConfig":
        """Build a config from peft's JSON dict.

        Keys peft writes for features deltatune does not implement are accepted only while they
        hold their "unused" value; anything else is an error naming the key and ``source``. Keys
        deltatune does not know at all (a newer peft's) are ignored with a warning naming them, as
        peft does, when they hold a value that turns something on, and silently when they do not.
        """
        data = dict(data)
        found = data.pop("peft_type", cls.peft_type.value)
        if found != cls.peft_type.value:
            raise ConfigError(f"{source}: peft_type is {found!r}, expected {cls.peft_type.value!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key in names:
                kwargs[key] = value
            elif key == "auto_mapping" or _is_unused(value, cls.peft_extra_defaults.get(key, _MISSING)):
                continue
            elif key in cls.peft_extra_defaults:
                raise ConfigError(f"{source}: field {key!r}={value!r} is not supported by deltatune "
                                  f"for {cls.peft_type.value}")
            else:
                unknown.append(key)
        if unknown:
            warnings.warn(f"Unexpected keyword arguments {sorted(unknown)} for class {cls.__name__}, these are "
                          f"ignored. ({source}: unknown to deltatune, probably written by a newer peft; the "
                          "adapter may not behave as it did where it was saved)", stacklevel=2)
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    # -- files: peft's API names, so that code written for peft runs unchanged ------------------
    def save_pretrained(self, directory: str | os.PathLike, **overrides: Any) -> None:
        """Write ``directory/adapter_config.json`` atomically (the directory is created if missing).

        ``overrides`` replace keys of ``to_dict()`` in the file (e.g. ``inference_mode=True``,
        which ``checkpoint.peft_format`` writes for every saved adapter, as peft does).
        """
        # The one leaf below this module (standard library only); imported here so that importing
        # the configs loads nothing else of the package.
        from deltatune.atomic import atomic_write_json

        atomic_write_json(Path(directory) / CONFIG_NAME, {**self.to_dict(), **overrides})

    save = save_pretrained

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **_ignored: Any) -> dict[str, Any]:
        """The JSON object in ``path_json_file`` as a dict, unvalidated (peft's classmethod; a
        ``runtime_config`` key, which peft never reads from files, is dropped with a warning).
        Raises ConfigError naming the file if it is not valid JSON or not a JSON object."""
        try:
            with open(path_json_file, encoding="utf-8") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path_json_file}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path_json_file}: not a JSON object")
        if "runtime_config" in data:
            warnings.warn(f"{path_json_file}: ignoring its 'runtime_config' key (runtime only)", stacklevel=2)
            del data["runtime_config"]
        return data

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, subfolder: str | None = None, revision: str | None = None,
                        cache_dir: str | None = None, token: str | None = None) -> "PeftConfig":
        """Read ``directory/adapter_config.json`` (``directory/subfolder/...``) into the config class
        its ``peft_type`` names; as in peft, the file decides the class. ``directory`` may be a Hub
        repo id (``revision``, ``cache_dir``, ``token``: huggingface_hub's; offline, its cache).

        Raises:
            FileNotFoundError: no adapter_config.json there (locally or on the Hub / in its cache).
            ConfigError: unreadable JSON, no or unknown ``peft_type``, or an unsupported field
                (the message names the file and the key).
        """
        path = os.path.join(os.fspath(directory), subfolder or "", CONFIG_NAME)
        if not os.path.isfile(path) and not os.path.isdir(directory):
            path = _hub_file(str(directory), subfolder, revision, cache_dir, token) or path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: not found (is {directory} an adapter directory?)")
        data = cls.from_json_file(path)
        if "peft_type" not in data:
            raise MissingKeyError(f"The {cls.__name__} config that is trying to be loaded is missing required keys: "
                                  f"{{'peft_type'}}. ({path} is not an adapter config)")
        return config_class(data["peft_type"], source=path).from_dict(data, source=path)

    def __init_subclass__(cls, **kwargs) -> None:
        """Record each method's config class under the ``peft_type`` it declares (first one wins;
        aliases and subclasses that keep their parent's ``peft_type`` are not entries)."""
        super().__init_subclass__(**kwargs)
        if "peft_type" in vars(cls):
            _CLASSES.setdefault(cls.peft_type.value, cls)


# peft_type -> config class, filled as the classes are defined (``PeftConfig.__init_subclass__``).
# Every method's config class is defined once ``import deltatune`` has run.
_CLASSES: dict[str, type[PeftConfig]] = {}


def config_class(peft_type: str, source: str = "config") -> type[PeftConfig]:
    """The config class of ``peft_type`` (as read from ``source``); ConfigError naming both if unknown."""
    if peft_type not in _CLASSES:
        raise ConfigError(f"{source}: peft_type {peft_type!r} is not supported; known: {sorted(_CLASSES)}")
    return _CLASSES[peft_type]


_MISSING = object()


def _hub_file(repo_id: str, subfolder, revision, cache_dir, token) -> Optional[str]:
    from huggingface_hub import hf_hub_download  # Hub repo id -> its adapter_config.json (offline: the cache)
    try:
        return hf_hub_download(repo_id, CONFIG_NAME, subfolder=subfolder, revision=revision, cache_dir=cache_dir,
                               token=token)
    except Exception:  # noqa: BLE001 - not a repo id, not cached offline, no network: "not found"
        return None


def _is_unused(value: Any, default: Any) -> bool:
    return (default is not _MISSING and value == default) or value in (None, False, {}, [], "")


def _validate_pattern_dict(name: str, value: Any, kind: type) -> None:
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a dict of module-name pattern -> {kind.__name__}, got {value!r}")
    for key, v in value.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
            raise ConfigError(f"{name}[{key!r}]={v!r} must be a positive number")
        if kind is int and int(v) != v:
            raise ConfigError(f"{name}[{key!r}]={v!r} must be an integer")


@dataclass
class LoraConfig(PeftConfig):
    """LoRA (Hu et al. 2021): ``W' = W + (lora_alpha / r) * B @ A`` on the targeted layers.

    Attributes:
        r: rank of the update (> 0).
        lora_alpha: scaling numerator; the update is scaled by ``lora_alpha / r``, or by
            ``lora_alpha / sqrt(r)`` with ``use_rslora`` (Kalajdzievic 2023, rsLoRA).
        lora_dropout: dropout on the adapter's input, in [0, 1).
        target_modules: list of module-name suffixes, a regex matched against the full module
            name, or ``"all-linear"`` (every Linear/Conv1D except the output head).
        exclude_modules: same forms as ``target_modules``; matches are never wrapped.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a new head).
        bias: ``"none"``, ``"all"`` (every bias in the model trains) or ``"lora_only"`` (wrapped layers' biases).
        init_lora_weights: ``True`` (A Kaiming-uniform, B zero: starts as the base),
            ``"gaussian"`` (A normal with std 1/r), ``False`` (random B too: not an identity),
            ``"pissa"`` / ``"pissa_niter_N"`` (principal singular vectors, Meng et al. 2024; the
            base weight keeps the residual), ``"olora"`` (OLoRA, arXiv:2406.01775: a QR of the weight;
            residual base), ``"orthogonal"`` (``B @ A = 0``, even ranks; ``tuner.inits``), ``"loftq"`` (LoftQ, Li et al. 2023: the targeted
            linear layers become a 4-bit NF4 base and the factors start from the rank-r part of the
            rounding error; needs ``loftq_config``; see ``deltatune.quant.loftq``).
        loftq_config: ``LoftQConfig`` (or its dict) for ``init_lora_weights="loftq"``; kept as a
            dict, as peft does. Given with another init it is ignored with a warning (as in peft).
        rank_pattern / alpha_pattern: per-module overrides, keys are regexes matched against the
            end of the module name.
        layers_to_transform / layers_pattern: restrict to these layer indices (list-form targets).
        fan_in_fan_out: the base stores (in, out) weights (GPT-2's Conv1D; detected by type here; kept for files).
        target_parameters: list of ``nn.Parameter`` names (MoE experts), matched as target_modules' lists are.
        use_dora / use_bdlora: DoRA (its method registered) / BD-LoRA, a ``BdLoraConfig`` or dict (methods/bdlora.py).
        trainable_token_indices: token ids (input embedding) or {module: ids}; ``tuner.trainable_tokens``.
        ensure_weight_tying: adapters on tied embeddings stay tied (``tuner.tying``).
    """

    peft_type: ClassVar[PeftType] = PeftType.LORA
    peft_extra_defaults: ClassVar[dict[str, Any]] = {
        "arrow_config": None, "corda_config": None, "eva_config": None, "kasa_config": None,
        "layer_replication": None, "lora_ga_config": None, "megatron_config": None,
        "megatron_core": "megatron.core", "monteclora_config": None, "qalora_group_size": 16,
        "use_qalora": False, "velora_config": None,
    }

    r: int = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_dora: bool = False
    use_bdlora: Optional[Any] = None   # kept as given (object or file's dict), as peft; read by methods/bdlora.py
    loftq_config: Union["LoftQConfig", dict] = field(default_factory=dict)
    alora_invocation_tokens: Optional[list[int]] = None  # aLoRA: the delta acts from their last occurrence on
    target_parameters: Optional[list[str]] = None
    ensure_weight_tying: bool = False
    lora_bias: bool = False    # a bias on B (methods/lora_bias.py); with inits True/False, no DoRA (as in peft)
    trainable_token_indices: Optional[Union[list[int], dict]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r={self.r!r} must be a positive integer")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha={self.lora_alpha!r} must be a positive number")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if self.lora_bias and (self.init_lora_weights not in (True, False) or self.use_dora):  # (peft's words)
            raise ConfigError("The argument lora_bias=True is only for init_lora_weights=True/False, without DoRA")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias={self.bias!r} must be 'none', 'all' or 'lora_only'")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or init in ("gaussian", "pissa", "loftq", "olora", "orthogonal", "mica")
                or (isinstance(init, str) and init.startswith("pissa_niter_")
                    and init[len("pissa_niter_"):].isdigit())):
            raise ConfigError(f"init_lora_weights={init!r} must be True, False, 'gaussian', "
                              "'pissa', 'pissa_niter_N', 'olora', 'orthogonal', 'mica' or 'loftq'")
        self.loftq_config = _loftq_dict(self.loftq_config, init)
        self.target_modules = _normalise_targets("target_modules", self.target_modules)
        self.exclude_modules = _normalise_targets("exclude_modules", self.exclude_modules)
        if isinstance(self.target_parameters, str):  # peft's TypeError: target_modules takes a str, this does not
            raise TypeError("`target_parameters` must be a list of strings or None.")
        self.modules_to_save = None if self.modules_to_save is None else list(self.modules_to_save)
        if isinstance(self.layers_to_transform, int) and not isinstance(self.layers_to_transform, bool):
            self.layers_to_transform = [self.layers_to_transform]
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            raise ConfigError("layers_to_transform only works with a list of target_modules, "
                              "not a regex string")
        _validate_pattern_dict("rank_pattern", self.rank_pattern, int)
        _validate_pattern_dict("alpha_pattern", self.alpha_pattern, float)
        if (tokens := self.alora_invocation_tokens) is not None and (
                self.use_dora or not tokens or any(type(t) is not int for t in tokens)):
            raise ConfigError(f"alora_invocation_tokens={tokens!r} must be a non-empty list of token ids; aLoRA "
                              f"does not combine with use_dora (use_dora={self.use_dora})")
        if init == "orthogonal" and (self.r % 2 or any(int(v) % 2 for v in self.rank_pattern.values())):
            raise ConfigError(f"init_lora_weights='orthogonal' needs an even rank (r={self.r}, "
                              f"rank_pattern={self.rank_pattern}): A and B take half of the rows each")


@dataclass
class LoftQConfig:
    """LoftQ's settings (Li et al. 2023, arXiv:2310.08659), peft's names and defaults.

    Pass as ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(...))``.

    Attributes:
        loftq_bits: bits of the quantized base; 4 (NF4, bitsandbytes' layout) is the only value
            deltatune supports (peft also has 8).
        loftq_iter: alternating steps (quantize ``W - B A``, then an SVD of the residual), >= 1.
    """

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        if self.loftq_bits != 4 or isinstance(self.loftq_bits, bool):
            raise ConfigError(f"loftq_config.loftq_bits={self.loftq_bits!r}: only 4 (NF4) is supported")
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ConfigError(f"loftq_config.loftq_iter={self.loftq_iter!r} must be an integer >= 1")


def _loftq_dict(value, init) -> dict:
    """``loftq_config`` as peft keeps it: a plain dict, checked; ``{}`` unless init is "loftq"."""
    if isinstance(value, LoftQConfig):
        value = dataclasses.asdict(value)
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"loftq_config must be a LoftQConfig or a dict, got {value!r}")
    if init != "loftq":
        if value:
            warnings.warn(f"loftq_config={value!r} is ignored: init_lora_weights is {init!r}, not 'loftq'",
                          stacklevel=4)
        return {}
    if not value:
        raise ConfigError("init_lora_weights='loftq' needs loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=N)")
    unknown = sorted(set(value) - {f.name for f in dataclasses.fields(LoftQConfig)})
    if unknown:
        raise ConfigError(f"loftq_config: unknown key {unknown[0]!r}; known: loftq_bits, loftq_iter")
    return dataclasses.asdict(LoftQConfig(**value))


def _normalise_targets(name: str, value):
    if value is None or isinstance(value, str):
        return value
    try:
        items = list(value)
    except TypeError:
        raise ConfigError(f"{name} must be a list of module names or a regex string, got {value!r}")
    if not all(isinstance(v, str) and v for v in items):
        raise ConfigError(f"{name} must contain non-empty strings, got {items!r}")
    return items
