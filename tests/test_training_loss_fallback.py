"""The training loss's generic path (models without a decoder/head split): the same loss as
``forward``, and one model run over the batch's tokens (prompt tuning's virtual tokens run once alone,
to fill the cache, as in ``forward``)."""
from __future__ import annotations

import torch

import deltatune
from deltatune import LoraConfig, get_peft_model
from deltatune.training import loss as loss_mod
from deltatune.training.batching import Batch
from tests.conftest import tiny_llama, token_batch


def _batch(ids: torch.Tensor) -> Batch:
    rows, length = ids.shape
    targets = torch.cat([ids[:, 1:], torch.full((rows, 1), -100)], 1)              # (R, L)
    return Batch(ids, torch.arange(length).expand(rows, length), targets, tokens=rows * length,
                 label_tokens=rows * (length - 1))


def _forward_loss(model, ids: torch.Tensor, virtual: int) -> torch.Tensor:
    logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids)).logits[:, virtual:]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum")


def test_generic_path_matches_forward_with_one_model_call(monkeypatch):
    monkeypatch.setattr(loss_mod, "_fast_parts", lambda hf: None)      # as for a model without get_decoder
    for config, virtual in ((deltatune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), 3),
                            (LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False), 0)):
        model = get_peft_model(tiny_llama(), config)
        ids = token_batch(length=8)
        with torch.no_grad():
            expected = _forward_loss(model, ids, virtual)
        calls = []   # runs over the batch's own tokens (a run of the virtual tokens alone fills the cache)

        def count(module, args, kwargs, out):
            x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
            if x is not None and x.shape[1] >= ids.shape[1]:
                calls.append(1)

        hook = model.get_base_model().register_forward_hook(count, with_kwargs=True)
        got = loss_mod.lm_loss_sum(model, _batch(ids))
        hook.remove()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert len(calls) == 1, f"{type(config).__name__}: the loss called the model {len(calls)} times"
        got.backward()
        assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
