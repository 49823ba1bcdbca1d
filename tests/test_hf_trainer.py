"""A deltatune PeftModel is an ordinary nn.Module: transformers' own ``Trainer`` trains it."""
from __future__ import annotations

import pytest
import torch

from deltatune import LoraConfig, PeftModel, get_peft_model
from tests.conftest import logits_of, tiny_llama, token_batch


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_transformers_trainer_trains_a_deltatune_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    # one short sequence repeated: a tiny LoRA can memorise it, so the loss must fall
    ids = token_batch(batch=1, length=16).repeat(16, 1)
    before = model(input_ids=ids[:2], labels=ids[:2]).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, num_train_epochs=10,
                             learning_rate=3e-2, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(ids))
    trainer.train()
    # Trainer found the label column from the forward signature, so evaluation reports a loss
    assert trainer.label_names == ["labels"]
    assert "eval_loss" in trainer.evaluate(eval_dataset=_Rows(ids[:4]))
    after = model(input_ids=ids[:2], labels=ids[:2]).loss.item()
    assert after < before - 0.2, (before, after)  # ~0.4 here; untrained: 0
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen {name} changed"
    # what Trainer trained saves and reloads as an adapter with the same logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    probe = token_batch()
    torch.testing.assert_close(logits_of(loaded, probe), logits_of(model, probe), rtol=0, atol=1e-5)


def test_forward_signature_is_the_bases_and_the_model_still_copies_and_pickles(tmp_path):
    import copy
    import inspect
    import pickle

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    params = inspect.signature(model.forward).parameters
    assert "input_ids" in params and "labels" in params and "attention_mask" in params
    assert type(model).__name__ == "PeftModel" and isinstance(model, PeftModel)
    probe = token_batch()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(clone) is type(model)
        torch.testing.assert_close(logits_of(clone, probe), logits_of(model, probe), rtol=0, atol=0)
