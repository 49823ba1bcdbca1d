"""BD-LoRA (``LoraConfig(use_bdlora=BdLoraConfig(...))``): block-diagonal A or B factors.

Against peft 0.21 (installed as a yardstick): files cross in both directions with the same keys,
shapes and outputs; merged weights equal. Within deltatune: the block structure survives training,
rows of a mixed batch equal their adapter alone, peft's errors are raised (same words), and the
serving engine runs a BD-LoRA adapter as ``PeftModel`` does.
"""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune
from deltatune.config import ConfigError
from deltatune.methods.bdlora import BlockDiagonalLinear
from tests.conftest import perturb_trainable, tiny_llama

peft = pytest.importorskip("peft")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(12, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 8)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


# name -> BdLoraConfig kwargs (peft's test cases, with block counts that divide every dimension)
CASES = {
    "a-only": dict(target_modules_bd_a=["lin0"], match_strict=False),
    "b-only": dict(target_modules_bd_b=["lin1"], nblocks=2, match_strict=False),
    "both": dict(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2),
    "both-4": dict(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=4),
}


def base() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


def x() -> torch.Tensor:
    return torch.randn(5, 12, generator=torch.Generator().manual_seed(1))


def config(lib, case: str, **kw):
    return lib.LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8,
                          use_bdlora=lib.BdLoraConfig(**CASES[case]), **kw)


def out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(x())


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_loads_with_same_output_and_saves_back_the_same_keys(case, tmp_path):
    ref = peft.get_peft_model(base(), config(peft, case))
    perturb_trainable(ref, scale=0.3)
    ref.save_pretrained(tmp_path / "peft")
    ours = deltatune.PeftModel.from_pretrained(base(), tmp_path / "peft").eval()
    ref.eval()
    assert not torch.allclose(out(ref), base()(x()), atol=1e-3)
    close(out(ours), out(ref))
    ours.save_pretrained(tmp_path / "ours")
    theirs, mine = load_file(tmp_path / "peft/adapter_model.safetensors"), load_file(tmp_path / "ours/adapter_model.safetensors")
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in mine.items()}
    for k in theirs:
        assert torch.equal(theirs[k], mine[k]), k
    saved = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert saved["use_bdlora"] == json.loads((tmp_path / "peft/adapter_config.json").read_text())["use_bdlora"]
    back = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    close(out(back), out(ref))


@pytest.mark.parametrize("case", ["b-only", "both"])
def test_deltatune_file_loads_in_peft_and_merges_to_the_same_weights(case, tmp_path):
    ours = deltatune.get_peft_model(base(), config(deltatune, case))
    perturb_trainable(ours, scale=0.3)
    ours.eval()
    # the saved factors are peft's compact shapes: B (out, r / nblocks), A (r, in / nblocks)
    state = ours.state_dict()
    nb = CASES[case]["nblocks"]
    assert state["base_model.model.lin1.lora_B.default.weight"].shape == (8, 4 // nb)
    ours.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(base(), tmp_path).eval()
    close(out(ours), out(ref))
    merged_ours, merged_ref = ours.merge_and_unload(), ref.merge_and_unload()
    for (k, a), (_, b) in zip(merged_ours.state_dict().items(), merged_ref.state_dict().items()):
        close(a, b)
    close(out(merged_ours), out(merged_ref))


def test_merge_equals_unmerged_and_unmerge_restores_the_base():
    model = deltatune.get_peft_model(base(), config(deltatune, "both"))
    perturb_trainable(model, scale=0.3)
    model.eval()
    before, weight = out(model), model.base_model.model.lin1.base_layer.weight.clone()
    model.merge_adapter()
    close(out(model), before)
    model.unmerge_adapter()
    close(model.base_model.model.lin1.base_layer.weight, weight)
    with model.disable_adapter():
        close(out(model), base()(x()).detach())


def test_training_keeps_the_blocks_diagonal_and_lowers_the_loss():
    model = deltatune.get_peft_model(base(), config(deltatune, "both", init_lora_weights=False))
    layer = model.base_model.model.lin0
    assert isinstance(layer.lora_A["default"], BlockDiagonalLinear)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "base_model.model.lin0.lora_A.default.weight" in trainable
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    target = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(5):
        loss = ((model(x()) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    A = layer.factors("default")[0]                       # (r=4, in=12), 2 blocks of (2, 6)
    assert torch.count_nonzero(A[:2, 6:]) == 0 and torch.count_nonzero(A[2:, :6]) == 0


def test_block_diagonal_forward_equals_its_dense_matrix():
    layer = BlockDiagonalLinear(12, 8, nblocks=4)
    nn.init.normal_(layer.weight)
    h = torch.randn(3, 5, 12)
    close(layer(h), h @ layer.dense_weight().T)
    assert layer.weight.shape == (8, 3)


def test_mixed_batch_rows_equal_each_adapter_alone():
    model = deltatune.get_peft_model(base(), config(deltatune, "both"), adapter_name="bd")
    model.add_adapter("plain", deltatune.LoraConfig(target_modules=["lin0", "lin1"], r=2))
    perturb_trainable(model, scale=0.3)
    model.eval()
    names = ["bd", "plain", "__base__", "bd", "plain"]
    with torch.no_grad():
        mixed = model(x(), adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                alone = base()(x()[i:i + 1])
            else:
                model.set_adapter(name)
                alone = model(x()[i:i + 1])
            close(mixed[i:i + 1], alone)


def test_combining_refuses_bdlora_adapters_instead_of_mixing_their_blocks():
    # concatenating compact factors along the rank would put one adapter's blocks in another's place
    model = deltatune.get_peft_model(base(), config(deltatune, "both"), adapter_name="a")
    model.add_adapter("b", config(deltatune, "both"))
    for kind in ("cat", "linear", "svd"):
        with pytest.raises(ValueError, match="adapter 'a' uses BD-LoRA"):
            model.add_weighted_adapter(["a", "b"], [1.0, 1.0], f"c_{kind}", combination_type=kind)
        assert f"c_{kind}" not in model.peft_config


def test_hotswap_refuses_bdlora_by_name(tmp_path):
    # compact factors carry no rank to compare or pad: hot-swap's rank rules would misread them
    model = deltatune.get_peft_model(base(), config(deltatune, "both"))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="BD-LoRA adapters \\(use_bdlora\\) cannot be hot-swapped"):
        deltatune.hotswap_adapter(model, tmp_path, adapter_name="default")
    with pytest.raises(ValueError, match=r"adapter\(s\) \['default'\] use BD-LoRA"):
        deltatune.prepare_model_for_compiled_hotswap(model, target_rank=8)


def test_peft_errors_are_raised_with_peft_words():
    with pytest.raises(ValueError, match="Found overlapping modules in target_modules_bd lists"):
        deltatune.BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin0"])
    # a dict (as in a file) is checked when the adapter is added, where peft checks it
    overlap = deltatune.LoraConfig(target_modules=["lin0"], use_bdlora={"target_modules_bd_a": ["lin0"],
                                                                        "target_modules_bd_b": ["lin0"]})
    with pytest.raises(ValueError, match="Found overlapping modules"):
        deltatune.get_peft_model(base(), overlap)
    strict = deltatune.LoraConfig(target_modules=["lin0"], use_bdlora={"target_modules_bd_a": ["nope"]})
    with pytest.raises(ValueError, match="lin0 matches neither A nor B block-diagonal patterns"):
        deltatune.get_peft_model(base(), strict)
    odd = deltatune.LoraConfig(target_modules=["lin0"], use_bdlora={"target_modules_bd_a": ["lin0"], "nblocks": 5})
    with pytest.raises(ValueError, match="lin0: .*not divisible by nblocks=5"):
        deltatune.get_peft_model(base(), odd)
    model = base()
    with pytest.raises(ConfigError, match="unknown key 'blocks'"):
        deltatune.get_peft_model(model, deltatune.LoraConfig(target_modules=["lin0"], use_bdlora={"blocks": 2}))
    assert type(model.lin0) is nn.Linear                   # the failed add left the model as it was
    with pytest.raises(ConfigError, match="use_dora"):
        deltatune.get_peft_model(base(), config(deltatune, "both", use_dora=True))
    with pytest.raises(ConfigError, match="init_lora_weights='pissa'"):
        deltatune.get_peft_model(base(), config(deltatune, "both", init_lora_weights="pissa"))


def test_engine_serves_a_bdlora_adapter_as_peft_model_runs_it(tmp_path):
    from deltatune.serving import Engine, SamplingParams
    from tests.test_cli import _tiny_tokenizer

    tiny_llama().save_pretrained(tmp_path / "base")
    _tiny_tokenizer().save_pretrained(tmp_path / "base")
    bd = deltatune.BdLoraConfig(target_modules_bd_a=["o_proj", "down_proj"],
                                target_modules_bd_b=["q_proj", "k_proj", "v_proj", "up_proj", "gate_proj"], nblocks=2)
    cfg = deltatune.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_bdlora=bd)
    model = deltatune.get_peft_model(tiny_llama(), cfg)
    perturb_trainable(model, scale=0.5)
    model.save_pretrained(tmp_path / "bd")
    engine = Engine(str(tmp_path / "base"))
    engine.add_adapter("bd", tmp_path / "bd")
    prompt, greedy = [5, 6, 7], SamplingParams(max_tokens=6, temperature=0.0)
    served = engine.generate(prompt, adapter="bd", sampling=greedy)[0].outputs[0].token_ids
    model.eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert served == ids[len(prompt):]
    assert served != engine.generate(prompt, sampling=greedy)[0].outputs[0].token_ids


def test_config_keeps_what_it_was_given_and_writes_peft_schema(tmp_path):
    bd = deltatune.BdLoraConfig(target_modules_bd_b=["lin1"], nblocks=2)
    cfg = deltatune.LoraConfig(target_modules=["lin1"], use_bdlora=bd)
    assert cfg.use_bdlora is bd
    cfg.save_pretrained(tmp_path)
    loaded = deltatune.PeftConfig.from_pretrained(tmp_path)
    assert loaded.use_bdlora == {"target_modules_bd_a": None, "target_modules_bd_b": ["lin1"], "nblocks": 2,
                                 "match_strict": True}
    # peft's from_pretrained rebuilds its BdLoraConfig; deltatune keeps the file's dict (what peft keeps
    # when given one), turned into a BdLoraConfig when the adapter is added
    assert dataclasses.asdict(peft.LoraConfig.from_pretrained(tmp_path).use_bdlora) == loaded.use_bdlora
    assert copy.deepcopy(cfg).to_dict() == cfg.to_dict()


def test_16bit_inference_caches_cast_factors_by_the_stored_weights(monkeypatch):
    # the accelerator path (16-bit input, fp32 factors cast once and cached) keys its cache on the
    # stored compact weights: BD-LoRA's dense views are new tensors each call, so they cannot key it
    from deltatune.methods import lora as lora_module

    monkeypatch.setattr(lora_module, "cast_factors_on", lambda device: True)
    model = deltatune.get_peft_model(base().to(torch.bfloat16), config(deltatune, "both"))
    perturb_trainable(model, scale=0.3)
    model.eval()
    h = x().to(torch.bfloat16)
    layer = model.base_model.model.lin1
    for step in range(3):
        with torch.no_grad():
            got = layer(torch.relu(model.base_model.model.lin0(h)))
            inner = torch.relu(model.base_model.model.lin0(h))
            A, B = layer.factors("default")
            want = layer.base_layer(inner).float() + (inner.float() @ A.T @ B.T) * layer.scaling["default"]
            close(got.float(), want, atol=0.1)
            cached = layer._cast["default"]
            layer(inner)                                        # unchanged factors: the cached copies serve
            assert layer._cast["default"] is cached
            layer.lora_B["default"].weight.add_(0.5)            # an optimizer step between calls
