"""A ``PeftModel`` whose ``forward`` shows the wrapped model's parameters to ``inspect``.

Tools that read a model's forward signature (transformers' ``Trainer`` drops dataset columns the
forward does not name and finds label columns there) then see ``input_ids``, ``labels``, ...
(plus ``adapter_names``) instead of ``*args, **kwargs``.
"""
from __future__ import annotations

import inspect


def signed_class(cls: type, base_type: type) -> type:
    """``cls`` with a ``forward`` that shows ``base_type.forward``'s parameters to ``inspect``.

    Tools that read a model's forward signature (transformers' ``Trainer`` drops dataset
    columns the forward does not name and finds label columns there) then see ``input_ids``,
    ``labels``, ... instead of ``*args, **kwargs``. One subclass per (class, base type), cached;
    it keeps ``cls``'s name, and ``isinstance(model, cls)`` holds.
    """
    key = (cls, base_type)
    if key not in _SIGNED:
        unsigned_forward = cls.forward

        def forward(self, *args, **kwargs):
            return unsigned_forward(self, *args, **kwargs)

        forward.__doc__ = unsigned_forward.__doc__
        try:
            forward.__signature__ = _with_adapter_names(inspect.signature(base_type.forward))
        except (TypeError, ValueError):  # a builtin or odd callable: keep *args, **kwargs
            pass
        _SIGNED[key] = type(cls.__name__, (cls,), {
            "forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__, "_deltatune_signed": (cls, base_type)})
    return _SIGNED[key]


_SIGNED: dict[tuple[type, type], type] = {}


def _with_adapter_names(sig: inspect.Signature) -> inspect.Signature:
    """``sig`` plus a keyword-only ``adapter_names=None`` (before ``**kwargs``), so a dataset column
    of that name survives tools that keep only the columns the forward names."""
    params = list(sig.parameters.values())
    if "adapter_names" in sig.parameters:
        return sig
    extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
    cut = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    return sig.replace(parameters=params[:cut] + [extra] + params[cut:])


def new_signed(cls: type, base_type: type):
    """Unpickling helper: an empty instance of ``signed_class(cls, base_type)``."""
    return object.__new__(signed_class(cls, base_type))

