"""``PeftModel``: one base model, any number of named adapters, peft's API.

Structure mirrors peft's so parameter names match theirs (``base_model.model.<path>...``):
``PeftModel.base_model`` is a ``TunerModel`` whose ``.model`` is the user's model with some
modules replaced by adapter layers. Every layer shares the model's one ``AdapterSet`` (names,
slots, active / merged / disabled), and ``applying`` (``peft_model.call``) is the one entry that
decides what the adapters do to a call: ``forward``, ``generate``, the training loss and the
serving engine all enter it, with ``adapter_names=`` (one name per row) for mixed-adapter
batches. Files: ``peft_model.files``; merging: each layer's pure ``merged_weight``.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from contextlib import contextmanager
from typing import Any, Sequence

from torch import nn

from deltatune import registry
from deltatune.adapter_set import AdapterSet
from deltatune.config import TASK_HEADS, PeftConfig
from deltatune.peft_model import call as _call
from deltatune.peft_model import files as _files
from deltatune.peft_model import merge as _merge
from deltatune.peft_model.signature import new_signed, signed_class
from deltatune.peft_model.surface import PeftSurface
from deltatune.tuner import TunerModel
from deltatune.tuner.inits import frozen_parameters


class PeftModel(PeftSurface, nn.Module):
    """A base model with named adapters. Use ``get_peft_model`` or ``PeftModel.from_pretrained``.

    Attributes:
        base_model: the ``TunerModel``; ``base_model.model`` is the wrapped user model.
        peft_config: adapter name -> config.
    """

    # task_type -> the task class (``peft_model.tasks`` fills it); ``from_pretrained`` picks from it.
    task_classes: dict[str, type] = {}

    def __new__(cls, model: nn.Module | None = None, *args, **kwargs):
        if model is not None and "_deltatune_signed" not in cls.__dict__:
            cls = signed_class(cls, type(model))
        return super().__new__(cls)

    def __reduce_ex__(self, protocol):
        """Pickle as ``cls`` + base type (the signed subclass is not importable by name)."""
        reduced = super().__reduce_ex__(protocol)
        signed = type(self).__dict__.get("_deltatune_signed")
        if signed is None or not isinstance(reduced, tuple) or len(reduced) < 2:
            return reduced
        return (new_signed, signed) + tuple(reduced[2:])

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False) -> None:
        """``autocast_adapter_dtype`` (peft's): adapter tensors on a float16/bfloat16 base are float32
        (True) or the base's dtype (False); see ``add_adapter``. ``low_cpu_mem_usage=True`` warns
        (``warn_unhonoured``)."""
        from deltatune.quant import prepare_4bit_layers

        super().__init__()
        prepare_4bit_layers(model)  # registers weight access for bitsandbytes 4-bit layers, if any
        self.adapter_set = AdapterSet()
        self._mixing_problems: tuple[int, dict] = (-1, {})   # cache of ``call.mixing_problem``
        self.base_model = TunerModel(model, self.adapter_set)
        object.__setattr__(self.base_model, "_peft", self)  # the tuner's peft surface acts here (not a submodule)
        self.add_adapter(adapter_name, peft_config, low_cpu_mem_usage, autocast_adapter_dtype=autocast_adapter_dtype)
        self.set_adapter(adapter_name)

    # -- attribute pass-through ----------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks come from ``base_model`` (``prefix``...), which passes what
        it lacks on to the wrapped model (``config``, ``device``...), as in peft."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "adapter_set"):
                raise
            return getattr(self.base_model, name)

    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        """Adapter name -> config (peft's attribute; the adapter set's table)."""
        return self.adapter_set.configs

    def get_base_model(self) -> nn.Module:
        """The user's model (with adapter layers inside, unless unloaded)."""
        return self.base_model.model

    # -- calls ---------------------------------------------------------------------------------
    def forward(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """Calls the wrapped model with the active adapter applied, or with ``adapter_names[i]``
        on row ``i`` (``"__base__"``: no adapter) — peft's mixed-batch keyword; a list of
        another length than the input's rows is a ValueError (``MixingError``) naming both.
        Prompt and P-tuning logits include the virtual positions first, as peft's
        (``peft_model.virtual``). aLoRA adapters act from each row's invocation on
        (``methods.alora``; peft's ``alora_offsets=`` gives the positions instead)."""
        model, offsets = self.base_model.model, kwargs.pop("alora_offsets", None)
        _call.check_rows(adapter_names, args, kwargs)
        with self.applying(adapter_names) as call:
            if call.prepares_inputs:  # the method prepares the inputs (by name); outputs as peft's
                given = _call.named(model, args, kwargs)
                prepared = call.prepare(given, alora_offsets=offsets)
                return call.finish(given, prepared, model(**prepared))
            return model(*args, **kwargs)

    def generate(self, *args, adapter_names: Sequence[str] | None = None, **kwargs):
        """``generate`` of the wrapped transformers model with the active adapter applied, or one
        adapter per prompt with ``adapter_names`` (beams and sampling included: each prompt's
        expanded rows keep its adapter)."""
        model, offsets = self.base_model.model, kwargs.pop("alora_offsets", None)
        _call.check_rows(adapter_names, args, kwargs)
        with self.applying(adapter_names) as call:
            if call.prepares_inputs:  # the method puts its virtual tokens in the cache (aLoRA: finds the invocation)
                args, kwargs = (), call.prepare_generate(_call.named(model, args, kwargs), offsets)
            return model.generate(*args, **kwargs)

    def applying(self, adapter_names: Sequence[str] | str | None = None, *, reuse: _call.Call | None = None):
        """The one call entry: a context that decides what the adapters do to a call and yields a
        ``Call`` that prepares its inputs (``call.prepare(kwargs, callee=...)``,
        ``call.prepare_generate(kwargs)``); ``forward``, ``generate``, the training loss and the
        serving engine all run inside it.

        ``adapter_names=None`` applies the current route (the active adapter and merged ones, or
        an enclosing call's). A list gives each row's adapter: one name for every row takes the
        single-adapter path; different names make a mixed batch, where each layer gathers every
        row's factors from its bank. The route is this thread's / task's own. ``reuse``: a
        previous call whose route tensor to reuse for the same rows (see ``call.applying``).

        Raises:
            MixingError: an unknown name, an adapter merged into the weights, or an adapter that
                cannot share a batch (``call.mixing_problem``: its method, trained biases, or a
                layer type without a per-row path).
        """
        return _call.applying(self, adapter_names, reuse)

    # -- adapters ------------------------------------------------------------------------------
    @property
    def active_adapter(self) -> str:
        """Name of the active adapter."""
        return self.adapter_set.active

    @property
    def active_adapters(self) -> list[str]:
        """Active adapter names (a list, as in peft)."""
        return [self.adapter_set.active] if self.adapter_set.active is not None else []

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new adapter (inactive unless it is the first). On error the model is unchanged
        (base weights an initialisation such as PiSSA changed are restored). Its tensors in each
        wrapped layer take the base weight's dtype, float32 on a 16-bit base unless
        ``autocast_adapter_dtype=False`` (peft's rule; ``TunerModel.cast_adapter``).

        Raises:
            ValueError: ``adapter_name`` exists already, or the config is invalid for this model.
        """
        warn_unhonoured(f"add_adapter({adapter_name!r})", low_cpu_mem_usage=low_cpu_mem_usage)
        if adapter_name in self.adapter_set:
            raise ValueError(f"Adapter with name {adapter_name!r} already exists (delete_adapter() it first)")
        peft_config = _for_task(peft_config)
        complete = registry.method_of(peft_config).complete_config
        if complete is not None:  # fields that depend on the base, as peft writes them
            peft_config = complete(peft_config, self.base_model.model)
        if peft_config.base_model_name_or_path is None:
            source = getattr(getattr(self.base_model.model, "config", None), "_name_or_path", None) or None
            peft_config = dataclasses.replace(peft_config, base_model_name_or_path=source)
        self.adapter_set.add(adapter_name, peft_config)
        try:
            self.base_model.inject(adapter_name, peft_config)
            self.base_model.cast_adapter(adapter_name, autocast_adapter_dtype)
        except BaseException:
            self._discard(adapter_name)
            raise
        for _, layer in self.base_model.adapter_layers():
            keep = getattr(layer, "keep_init", None)
            if keep is not None and adapter_name in layer.held:
                keep(adapter_name)
        self._refresh()

    def _discard(self, adapter_name: str) -> None:
        """Take a half-added adapter out again, undoing what its initialisation did to the base."""
        for _, layer in self.base_model.adapter_layers():
            undo = getattr(layer, "undo_init", None)
            if undo is not None and adapter_name in layer.held:
                undo(adapter_name)
        self.base_model.remove_adapter(adapter_name)
        self.adapter_set.remove(adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the active adapter (and the trainable one unless inference mode).

        Merged adapters are unmerged first, with a warning, as peft does: a merged adapter would
        otherwise stay in the weights under the new one.
        """
        if adapter_name not in self.adapter_set:
            raise ValueError(f"adapter {adapter_name!r} not found; have {sorted(self.peft_config)}")
        if self.adapter_set.merged and adapter_name != self.adapter_set.active:
            warnings.warn(f"set_adapter({adapter_name!r}): unmerging adapter(s) {self.adapter_set.merged} "
                          "from the base weights first", stacklevel=2)
            self.unmerge_adapter()
        self.adapter_set.active = adapter_name
        self._refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name`` from the model.

        Raises:
            ValueError: no such adapter, or it is merged into the base weights (as in peft:
                ``unmerge_adapter()`` first, so the weights are never changed behind your back).
        """
        if adapter_name not in self.adapter_set:
            raise ValueError(f"Adapter {adapter_name} does not exist (have {sorted(self.peft_config)})")
        if adapter_name in self.adapter_set.merged:  # peft's sentence first: code written for peft matches it
            raise ValueError(f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them "
                             "first. (unmerge_adapter(): deleting would leave its delta in the base weights.)")
        self.base_model.remove_adapter(adapter_name)
        self.adapter_set.remove(adapter_name)
        if self.adapter_set.active is None:
            self.adapter_set.active = next(iter(self.peft_config), None)
        self._refresh()

    def _applied(self) -> list[str]:
        """Adapters whose effect the model shows outside a call: merged ones and the active one."""
        if self.adapter_set.disabled:
            return []
        return list(dict.fromkeys(self.adapter_set.merged + self.active_adapters))

    def _refresh(self) -> None:
        """Set ``requires_grad`` for the active adapter and put the applied adapters' biases live."""
        self.base_model.sync_biases(self._applied())
        active = self.adapter_set.active
        mark_trainable(self.base_model, active, self.peft_config.get(active) if active else None)

    @contextmanager
    def disable_adapter(self):
        """Context manager running the bare base model.

        Merged adapters are unmerged once, with a warning, and stay unmerged afterwards (as in
        peft): re-merging on exit would round a 4-bit base's weights again on every call. Adapter
        parameters have ``requires_grad=False`` inside, as in peft, and get it back on exit.
        """
        if self.adapter_set.merged:
            warnings.warn(f"disable_adapter(): unmerging adapter(s) {self.adapter_set.merged} from the base "
                          "weights; they stay unmerged afterwards (merge_adapter() merges them again)",
                          stacklevel=3)
            self.unmerge_adapter()
        previous = self.adapter_set.disabled
        # As peft: adapter tensors do not train while disabled; those that did are restored on exit.
        frozen = [p for name in self.peft_config for c in self.base_model.component_list
                  for p in c.parameters_of(name) if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        self.adapter_set.disabled = True
        self.base_model.sync_biases([])
        try:
            yield
        finally:
            self.adapter_set.disabled = previous
            for p in frozen:
                p.requires_grad_(True)
            self.base_model.sync_biases(self._applied())

    # -- merging -------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active (or given) adapters into the base weights; ``unmerge_adapter`` undoes it.

        Each adapter merges into every layer or none: with ``safe_merge`` every layer's result is
        checked for non-finite values before any is written; another error (a method that cannot
        merge) unmerges the layers already done and re-raises.
        """
        _merge.merge_adapter(self, list(adapter_names) if adapter_names is not None else self.active_adapters,
                             safe_merge)
        self.base_model.sync_biases(self._applied())

    def unmerge_adapter(self) -> None:
        """Undo ``merge_adapter`` (every merged adapter, last merged first)."""
        _merge.unmerge_adapter(self)
        self.base_model.sync_biases(self._applied())

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None, requantize: bool = False) -> nn.Module:
        """Merge the active (or given) adapters and return the plain base model (no deltatune inside).

        With ``adapter_names`` exactly those adapters are merged (plus any merged before), with
        their trained biases and modules-to-save copies. A 4-bit base is dequantized first, so the
        result is a full-precision model with the delta added to the dequantized weights.
        ``requantize=True`` rounds the merged weights back to 4-bit NF4 and warns with the error
        that introduces.

        Raises:
            NotImplementedError: an adapter method that cannot merge (the message names it).
        """
        return _merge.merge_and_unload(self, adapter_names, safe_merge, requantize)

    def unload(self) -> nn.Module:
        """Return the base model with every adapter removed and nothing merged (merged adapters
        are unmerged, trained biases restored to the base's values)."""
        self.unmerge_adapter()
        return self.base_model.unload(merged=[])

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total", seed: int | None = None) -> None:
        """Add adapter ``adapter_name``, the weighted combination of loaded ``adapters`` (peft's API).

        ``combination_type``: ``linear``, ``cat``, ``svd``, ``ties``, ``ties_svd``, ``dare_linear``,
        ``dare_ties``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune``,
        ``magnitude_prune_svd``; same results as peft's, with its rsLoRA scaling fixed, a warning
        where the result is not the weighted sum of the deltas, and ``seed`` for DARE. Exact:
        ``cat``, and ``svd`` with ``svd_rank`` >= the sum of ranks. What each type does, and for
        which methods (LoRA, DoRA, IA3): ``deltatune.arithmetic``. The new adapter is not activated.

        Raises:
            ValueError (``arithmetic.CombineError``): the message names the adapter or argument;
                the model is left as it was.
        """
        from deltatune.arithmetic import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type=combination_type,
                             svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
                             svd_driver=svd_driver, density=density, majority_sign_method=majority_sign_method,
                             seed=seed)

    # -- parameters ----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts (tied weights counted once)."""
        trainable = total = 0
        for _, p in self.named_parameters():
            n = p.numel() * getattr(p, "deltatune_params_per_element", 1)
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: N || all params: M || trainable%: P`` (peft's line)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- files ---------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: bool | str = "auto",
                        is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
                        **unhonoured) -> None:
        """Write each adapter in peft's format: ``adapter_config.json`` + ``adapter_model.safetensors``
        (``adapter_model.bin`` with ``safe_serialization=False``), and a ``README.md`` model card
        (``peft_model.card``; an existing one is updated).

        The adapter named ``default`` goes in ``save_directory``, others in a subfolder of that
        name (peft's layout). The directory is written whole and switched in atomically, so a
        crash never leaves new weights beside an old config. ``save_embedding_layers``
        (``"auto"``, True, False): which embedding base weights come along
        (``deltatune.tuner.embeddings``).

        ``path_initial_model_for_weight_conversion`` (peft's name): the directory where a PiSSA
        adapter was saved right after initialisation; the adapter is then written as a plain
        rank-2r LoRA on the original base (``checkpoint.convert.pissa_to_lora``), which any LoRA
        loader (peft, vLLM, ``deltatune serve``) applies correctly.
        """
        warn_unhonoured("save_pretrained", **unhonoured)
        if is_main_process:
            _files.save_pretrained(self, save_directory, selected_adapters, path_initial_model_for_weight_conversion,
                                   safe_serialization=safe_serialization, save_embedding_layers=save_embedding_layers)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None,
                        autocast_adapter_dtype: bool = True, **unhonoured) -> "PeftModel":
        """Wrap ``model`` with the adapter saved in directory ``model_id`` (a ``.safetensors`` or
        peft's ``.bin`` file). ``PeftModel.from_pretrained`` gives the class of the config's
        ``task_type`` (``PeftModelForCausalLM``...), as peft does. ``subfolder=``: the adapter is in
        ``model_id/subfolder``; other peft keywords warn (``warn_unhonoured``).

        Raises:
            FileNotFoundError, ConfigError, CheckpointError: the message names the file and key;
                ``model`` is left as it was.
        """
        model_id = _in_subfolder(model_id, unhonoured.pop("subfolder", None))
        warn_unhonoured("PeftModel.from_pretrained", **unhonoured)
        return _files.from_pretrained(cls, model, model_id, adapter_name, is_trainable, config, autocast_adapter_dtype)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     autocast_adapter_dtype: bool = True, **unhonoured) -> _files.LoadResult:
        """Load another saved adapter under ``adapter_name`` (not activated; see ``set_adapter``);
        ``subfolder=`` as in ``from_pretrained``, other peft keywords warn.

        Returns:
            ``LoadResult(missing_keys, unexpected_keys)`` as peft does; both empty, since a load
            that does not match the adapter exactly raises (naming the key) and changes nothing.
        """
        model_id = _in_subfolder(model_id, unhonoured.pop("subfolder", None))
        warn_unhonoured(f"load_adapter({adapter_name!r})", **unhonoured)
        return _files.load_adapter(self, model_id, adapter_name, is_trainable, autocast_adapter_dtype)

    def _load_weights(self, adapter_name: str, tensors: dict, source) -> None:
        """Copy ``tensors`` (model-relative keys) into adapter ``adapter_name``, strictly
        (``files.load_weights``)."""
        _files.load_weights(self, adapter_name, tensors, source)


def warn_unhonoured(where: str, **options) -> None:
    """Warn, naming them, about peft keyword arguments of ``where`` that deltatune does not honour,
    given a value other than their no-op (None or False): a peft option is never ignored silently.
    ``low_cpu_mem_usage``: adapter tensors are always made initialised on the base layers' device."""
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    if given:
        listed = ", ".join(f"{k}={v!r}" for k, v in given.items())
        warnings.warn(f"{where}: {listed} not supported by deltatune; ignored", stacklevel=3)


def _in_subfolder(model_id: str | os.PathLike, subfolder: str | None) -> str | os.PathLike:
    """peft's ``subfolder=``: the adapter lies in ``model_id/subfolder``."""
    return os.path.join(model_id, subfolder) if subfolder else model_id


def _for_task(config: PeftConfig) -> PeftConfig:
    """Add the task's new head (e.g. ``score`` for SEQ_CLS) to ``modules_to_save``, as peft does."""
    heads = TASK_HEADS.get(config.task_type or "", [])
    if not heads or not hasattr(config, "modules_to_save"):
        return config
    current = list(config.modules_to_save or [])
    return dataclasses.replace(config, modules_to_save=current + [h for h in heads if h not in current])


def mark_trainable(tuner: TunerModel, adapter_name: str | None, config: PeftConfig | None) -> None:
    """Freeze everything, then unfreeze adapter ``adapter_name``'s parameters and its trained biases."""
    for p in tuner.parameters():
        p.requires_grad_(False)
    if adapter_name is None or config is None or config.inference_mode:
        return
    frozen = frozen_parameters(tuner, adapter_name, config)      # e.g. MiCA's B: saved, never trained
    for p in tuner.adapter_parameters(adapter_name):
        p.requires_grad_(id(p) not in frozen)


def warn_at_wrap(config: PeftConfig) -> None:
    """Known config mistakes, as warnings (``deltatune doctor``'s rules), when a model is wrapped."""
    from deltatune.advisor.doctor import warn_at_wrap as warn

    warn(config)
