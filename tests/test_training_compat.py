"""Packing's version floor: refused clearly on a transformers/torch that cannot isolate packed
sequences, and on the installed versions packed sequences really do not see each other.

(Llama with SDPA through the training loss is covered by
``test_training_data.py::test_packed_loss_equals_unpacked_and_reference``; here: logits per
position, eager attention, and GPT-2, whose mask moved to ``masking_utils`` later than Llama's.)
"""
from __future__ import annotations

import importlib

import pytest
import torch
import transformers

from deltatune.training import compat
from deltatune.training.batching import collate, pack_rows
from deltatune.training.compat import PackingUnsupportedError, check_packing_support, packing_problem
from deltatune.training.data import IGNORE, Example
from tests.conftest import tiny_gpt2, tiny_llama


def examples(lengths=(9, 4, 3, 6, 2), vocab: int = 128, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        out.append(Example(ids, [IGNORE] + ids[1:]))
    return out


def installed_transformers():
    """The ``transformers`` module ``compat.installed_versions`` reads now: ``sys.modules``' entry,
    which an earlier test file can leave different from the one imported when this file was
    collected (seen after tests/test_training_loop.py), so patching that one changed nothing."""
    return importlib.import_module("transformers")


@pytest.mark.parametrize("old", ["4.46.0", "4.53.0", "4.54.1", "4.55.0.dev0"])
def test_packing_refused_below_the_floor_naming_versions_and_why(monkeypatch, old):
    monkeypatch.setattr(installed_transformers(), "__version__", old)
    with pytest.raises(PackingUnsupportedError) as info:
        collate(examples(), packing=True)
    message = str(info.value)
    assert f"transformers {old} is installed" in message
    assert f"transformers>={compat.PACKING_MIN_TRANSFORMERS}" in message
    assert "attends to the sequences before it" in message
    assert "--no-packing" in message
    # One sequence per row needs no packed mask: unaffected.
    assert collate(examples(), packing=False).input_ids.shape[0] == 5


def test_packing_refused_on_old_torch_before_transformers_5(monkeypatch):
    monkeypatch.setattr(installed_transformers(), "__version__", "4.57.6")
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(PackingUnsupportedError, match=r"torch 2\.5\.1\+cpu is installed.*torch>=2\.6"):
        check_packing_support()
    monkeypatch.setattr(torch, "__version__", "2.6.0+cpu")
    check_packing_support()
    monkeypatch.setattr(installed_transformers(), "__version__", "5.0.0")
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    check_packing_support()  # transformers 5 builds the packed mask on any torch it supports


def test_installed_versions_are_accepted():
    assert packing_problem(transformers.__version__, torch.__version__) is None
    assert packing_problem("4.55.0", "2.6.0") is None
    assert packing_problem("4.53.1", "2.6.0") is not None  # Llama would be fine, GPT-2 would not


@pytest.mark.parametrize("make, attn", [(tiny_llama, "eager"), (tiny_gpt2, "sdpa"), (tiny_gpt2, "eager")],
                         ids=["llama-eager", "gpt2-sdpa", "gpt2-eager"])
def test_packed_sequences_do_not_attend_to_each_other(make, attn):
    model = make()
    model.config._attn_implementation = attn
    exs = examples()
    batch = collate(exs, packing=True)
    rows = pack_rows([len(e) for e in exs], max(len(e) for e in exs))
    assert any(len(r) > 1 for r in rows) and batch.input_ids.shape[0] == len(rows)
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
        for r, members in enumerate(rows):
            start = 0
            for i in members:
                n = len(exs[i])
                alone = model(input_ids=torch.tensor([exs[i].input_ids]), use_cache=False).logits[0]
                torch.testing.assert_close(packed[r, start:start + n], alone, rtol=1e-5, atol=1e-5,
                                           msg=f"sequence {i} (row {r}, offset {start}) sees its row")
                start += n
