"""The transformers/torch versions that packing relies on, checked when packing is used.

Packing (``batching.collate(packing=True)``) puts several sequences in one row, restarts
``position_ids`` at 0 for each and passes no ``attention_mask``. Only transformers'
``masking_utils`` turns that into a block-diagonal causal mask (``find_packed_sequence_indices``,
called by ``create_causal_mask`` when there is no attention mask and no cache). Without it the
model builds a plain causal mask and every packed sequence silently attends to the ones before
it in its row: the loss still goes down, on the wrong objective. Measured with tiny random models
(logits of the second sequence of a packed row against that sequence alone):

- transformers <= 4.53.0: no packed-sequence detection at all; Llama and GPT-2 both leak.
- 4.53.1: ``find_packed_sequence_indices`` appears; Llama-family models (which call
  ``create_causal_mask(..., position_ids=...)``) are isolated, GPT-2 still leaks.
- 4.55.0: GPT-2 moves to ``create_causal_mask`` too: both isolated.
- 4.53.1 up to 4.57.x apply the packed mask only ``if ... _is_torch_greater_or_equal_than_2_6``:
  with torch < 2.6 they leak again. transformers 5.0 drops that condition.

Plain rows (``packing=False``) need none of this, so the check runs only when packing is asked
for, not at ``import deltatune``.
"""
from __future__ import annotations

from packaging.version import Version

# First transformers release whose masks keep packed sequences apart for every model family we
# support (Llama-family models since 4.53.1, GPT-2 since 4.55.0).
PACKING_MIN_TRANSFORMERS = "4.55.0"
# transformers releases before this one also need torch >= PACKING_MIN_TORCH for the packed mask.
PACKING_TORCH_FREE_TRANSFORMERS = "5.0.0"
PACKING_MIN_TORCH = "2.6"


class PackingUnsupportedError(RuntimeError):
    """The installed transformers/torch would let packed sequences attend to each other."""


def _torch_release(version: str) -> Version:
    """``2.6.0+cpu`` / ``2.6.0.dev20241112`` -> ``2.6.0``: transformers itself accepts torch dev
    builds as their release (``is_torch_greater_or_equal(..., accept_dev=True)``)."""
    return Version(Version(version).base_version)


def installed_versions() -> tuple[str, str]:
    """``(transformers.__version__, torch.__version__)`` as installed now."""
    import torch
    import transformers

    return transformers.__version__, torch.__version__


def packing_problem(transformers_version: str, torch_version: str) -> str | None:
    """Why packing is unsafe with these versions, or None when it is safe."""
    leak = ("packed sequences are separated only by position_ids restarting at 0, and without a "
            "block-diagonal mask built from them every packed sequence silently attends to the "
            "sequences before it in its row")
    fix = "upgrade, or train without packing (packing=False, CLI --no-packing)"
    tf = Version(transformers_version)  # a dev/rc of the floor may predate the feature: refused
    if tf < Version(PACKING_MIN_TRANSFORMERS):
        return (f"packing needs transformers>={PACKING_MIN_TRANSFORMERS} (Llama-family models "
                f">=4.53.1, GPT-2 >=4.55.0), but transformers {transformers_version} is installed, "
                f"which builds no packed-sequence mask: {leak}. Fix: {fix}.")
    if tf < Version(PACKING_TORCH_FREE_TRANSFORMERS) and _torch_release(torch_version) < Version(PACKING_MIN_TORCH):
        return (f"packing with transformers {transformers_version} needs torch>={PACKING_MIN_TORCH} "
                f"(or transformers>={PACKING_TORCH_FREE_TRANSFORMERS}), but torch {torch_version} is "
                f"installed: transformers<{PACKING_TORCH_FREE_TRANSFORMERS} builds the packed-sequence "
                f"mask only on torch>={PACKING_MIN_TORCH}, and {leak}. Fix: {fix}.")
    return None


def check_packing_support() -> None:
    """Raise ``PackingUnsupportedError`` if the installed versions cannot isolate packed sequences."""
    problem = packing_problem(*installed_versions())
    if problem is not None:
        raise PackingUnsupportedError(problem)
