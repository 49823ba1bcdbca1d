"""The one call entry: what the adapters do to a call.

``PeftModel.applying(adapter_names)`` is a context that owns all of it:

- the *route* (the active adapter, one adapter for the whole batch, or one per row), set in the
  adapter set's ``ContextVar`` so concurrent threads and tasks never see each other's;
- the one *mixing rule* (``mixing_problem``): which adapters may share a batch with others;
- *trained biases*: the routed adapter's are live for the call;
- *input preparation*: the ``Call`` it yields prepares a call's keyword arguments (virtual tokens,
  their masks, positions and labels) for any callee, and ``generate``'s; for aLoRA adapters it
  finds each row's invocation in the input ids (``methods.alora``).

``forward``, ``generate``, the training loss and the serving engine all enter it::

    with peft.applying(names) as call:
        out = model(**call.prepare(kwargs))
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from deltatune import registry
from deltatune.adapter_set import MixingError, length_error
from deltatune.methods import alora


class Call:
    """One call's adapters, yielded by ``PeftModel.applying``.

    Attributes:
        names: the rows' adapter names given (None: the active adapter).
        route: what the layers apply: None (base), an adapter name, or per-row slots (N,).
        version: the adapter set's slot version the route was resolved under.
        activation: where the routed aLoRA adapters act (``alora.Activation``), or None.
    """

    def __init__(self, names: list[str] | None, route, version: int, component=None, model=None,
                 activation: alora.Activation | None = None) -> None:
        self.names, self.route, self.version = names, route, version
        self._component, self._model = component, model
        self.activation = activation

    @property
    def prepares_inputs(self) -> bool:
        """True when the routed adapter's method reads or changes the call's inputs (virtual
        tokens; aLoRA's invocation)."""
        return self._component is not None or self.activation is not None

    def prepare(self, kwargs: dict, callee: nn.Module | None = None, alora_offsets=None) -> dict:
        """``kwargs`` of a call to ``callee`` (default: the user's model; the training loss calls
        its decoder body) with the routed adapter's inputs in: virtual tokens with their mask,
        positions and labels. Unchanged (the same dict) when the method adds no inputs. An aLoRA
        call reads where each row's invocation starts from ``input_ids`` (or peft's
        ``alora_offsets``, one per row)."""
        if self.activation is not None:
            self.activation.read(kwargs, alora_offsets)
        if self._component is None:
            return kwargs
        return self._component.prepare(self._model, kwargs, callee)

    def prepare_generate(self, kwargs: dict, alora_offsets=None) -> dict:
        """``generate``'s keyword arguments with the routed adapter's inputs in (virtual tokens in
        the cache, the mask one longer per virtual token); unchanged for other methods. aLoRA: as
        ``prepare``; generated positions are past the invocation."""
        if self.activation is not None:
            self.activation.read(kwargs, alora_offsets)
        if self._component is None:
            return kwargs
        return self._component.generation_kwargs(self._model, kwargs)

    def finish(self, kwargs: dict, prepared: dict, out):
        """The output of ``forward`` (``out``, of ``model(**prepared)`` for a call given ``kwargs``)
        as peft shapes it: prompt and P-tuning logits on a decoder gain the virtual positions
        (``peft_model.virtual``)."""
        if self._component is None:
            return out
        from deltatune.peft_model.virtual import with_virtual_positions

        return with_virtual_positions(self._model, kwargs, prepared, out)

    def matches(self, names: list[str] | None, version: int) -> bool:
        """True if this call routed rows ``names`` under slot version ``version``."""
        return self.names is not None and self.names == names and self.version == version


NO_ADAPTERS = Call(None, None, 0)
"""The call of a model without adapters: prepares nothing."""


def mixing_problem(peft, adapter_name: str) -> str | None:
    """Why adapter ``adapter_name`` of PeftModel ``peft`` cannot share a batch with rows of other
    adapters, or None if it can: the one rule, used by ``applying`` and by the serving engine.

    Its method must be mixable (declared on the method), it must not train its own biases (rows
    of one batch share the live biases), and every layer holding it must have a per-row path.
    """
    config = peft.peft_config.get(adapter_name)
    if config is None:
        return None
    version, answers = peft._mixing_problems
    if version != peft.adapter_set.version:  # adapters came or went: layers and biases may differ
        version, answers = peft._mixing_problems = (peft.adapter_set.version, {})
    if adapter_name not in answers:
        answers[adapter_name] = _problem(peft, adapter_name, config)
    return answers[adapter_name]


def _problem(peft, adapter_name: str, config) -> str | None:
    method = registry.method_of(config)
    if not method.mixable:
        return (f"adapter {adapter_name!r} is a {config.peft_type.value} adapter, which cannot share a batch "
                "with other adapters; run its rows in a separate call")
    if peft.base_model.trains_biases(adapter_name):
        return (f"adapter {adapter_name!r} trains its own biases (bias={getattr(config, 'bias', None)!r}): rows "
                "with different adapters cannot have different biases; train with bias='none'")
    for module, layer in peft.base_model.adapter_layers():
        if adapter_name in layer.held and not getattr(layer, "mixable", True):
            return (f"adapter {adapter_name!r}: module {module} ({type(layer).__name__}) cannot serve mixed "
                    f"batches: {layer.cannot_mix_reason()}")
    return None


@contextmanager
def applying(peft, adapter_names: Sequence[str] | str | None = None, reuse: Call | None = None) -> Iterator[Call]:
    """``PeftModel.applying``: route, check, put biases live, yield the ``Call``; undo on exit.

    ``adapter_names=None`` keeps the current route (the active adapter, or an enclosing call's).
    ``reuse``: a previous ``Call``; when it routed the same rows under the same slots, this call
    routes with its very route tensor, so layers find their gathered factors by identity (each
    decode step of a server). Only for callers that know no adapter tensor changed in between.

    Raises:
        MixingError: an unknown name, an adapter merged into the weights, or an adapter that
            cannot share a batch (``mixing_problem``).
    """
    tuner, adapter_set = peft.base_model, peft.adapter_set
    if adapter_names is None:
        route = adapter_set.route()
        with alora.activating(adapter_set, None, route, lambda: _checkpointed(tuner)) as activation:
            yield Call(None, route, adapter_set.version, *_component(tuner, route), activation=activation)
        return
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    fresh = adapter_set.disabled or adapter_set.merged  # resolve says what these mean
    if reuse is not None and not fresh and reuse.matches(names, adapter_set.version):
        route = reuse.route
    else:
        route = adapter_set.resolve(names)
    if route is not None and not isinstance(route, str):
        problems = [p for p in (mixing_problem(peft, n) for n in dict.fromkeys(names)) if p]
        if problems:
            raise MixingError(problems[0])
    previous = tuner.live_biases()
    tuner.sync_biases([route] if isinstance(route, str) else [])
    try:
        with adapter_set.routed(route), alora.activating(adapter_set, names, route,
                                                         lambda: _checkpointed(tuner)) as activation:
            yield Call(names, route, adapter_set.version, *_component(tuner, route), activation=activation)
    finally:
        tuner.sync_biases(previous)


def _checkpointed(tuner) -> bool:
    """True while the model trains with transformers' gradient checkpointing (a module walk: asked
    only by calls that route an aLoRA adapter)."""
    return tuner.training and any(getattr(m, "gradient_checkpointing", False) is True for m in tuner.modules())


def _component(tuner, route) -> tuple:
    """``(component, model)`` preparing the inputs of a call routed by ``route``, or ``()``."""
    component = tuner.component_for(route) if isinstance(route, str) else None
    return (component, tuner.model) if component is not None else ()


def check_rows(adapter_names: Sequence[str] | str | None, args: tuple, kwargs: dict) -> None:
    """Raise MixingError (a ValueError) naming both counts unless a list of ``adapter_names`` has
    one name per row of the call's input (its first tensor: ``input_ids``, ``inputs_embeds``...).

    As in peft, for ``forward`` and ``generate``: a list of another length would otherwise be
    repeated over the rows (``adapter_set.rows_for``, meant for the rows generation expands each
    prompt into, which are counted after this check) and give rows the wrong adapter.
    """
    if adapter_names is None or isinstance(adapter_names, str):
        return
    preferred = [kwargs.get(k) for k in ("input_ids", "inputs_embeds")]
    first = next((v for v in (*args, *preferred, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()), None)
    if first is not None and first.shape[0] != len(adapter_names):
        raise length_error(len(adapter_names), first.shape[0])


def named(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Positional arguments of a call to ``model`` as keywords (inputs are prepared by name)."""
    if not args:
        return kwargs
    names = [n for n in inspect.signature(model.forward).parameters if n not in ("self",)]
    return {**dict(zip(names, args)), **kwargs}
