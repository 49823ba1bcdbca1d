"""LoRA on bare parameters (``LoraConfig(target_parameters=[...])``, ``methods/lora_param.py``).

Against peft 0.21 (installed as a yardstick), on a 2-d parameter of a custom layer, on the 3-d
expert weights of a mixture-of-experts block (both layouts, two parameters of one module nested)
and on tiny Mixtral and gpt-oss models: the same factors give the same outputs, and files cross in both directions
with the same keys and shapes. Within deltatune: merged equals unmerged, disable and unload give
the base, training moves only the factors, and what peft refuses is refused by name (dropout,
DoRA, a module also in target_modules, different parameter sets across adapters, mixed batches,
serving beside other adapters).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import deltatune
from deltatune.adapter_set import MixingError
from deltatune.config import ConfigError

peft = pytest.importorskip("peft")


class LinearParam(nn.Module):
    """A linear layer that reads its (in, out) weight directly: not an nn.Linear, so only its
    parameter can be targeted."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) / d_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class Experts(nn.Module):
    """Experts in 3-d parameters, (E, out, in) or, with ``is_transposed``, (E, in, out); every
    token goes through every expert, weighted by a softmax gate (so every expert's delta counts)."""

    def __init__(self, n: int = 3, d: int = 8, h: int = 6, transposed: bool = False) -> None:
        super().__init__()
        self.is_transposed = transposed
        gu, dn = ((n, d, 2 * h), (n, h, d)) if transposed else ((n, 2 * h, d), (n, d, h))
        self.gate_up_proj = nn.Parameter(torch.randn(gu) / d ** 0.5)
        self.down_proj = nn.Parameter(torch.randn(dn) / h ** 0.5)
        self.gate = nn.Linear(d, n)

    def forward(self, x):                                                   # (B, d)
        w = self.gate(x).softmax(-1)                                        # (B, E)
        eq = "bd,edk->ebk" if self.is_transposed else "bd,ekd->ebk"
        g, u = torch.einsum(eq, x, self.gate_up_proj).chunk(2, -1)          # (E, B, h) each
        h = F.silu(g) * u
        eq = "ebh,ehd->ebd" if self.is_transposed else "ebh,edh->ebd"
        return torch.einsum("ebd,be->bd", torch.einsum(eq, h, self.down_proj), w)


class Net(nn.Module):
    def __init__(self, transposed: bool = False) -> None:
        super().__init__()
        self.lin0 = LinearParam(8, 8)
        self.experts = Experts(transposed=transposed)
        self.lin1 = nn.Linear(8, 2)

    def forward(self, x):
        return self.lin1(self.experts(torch.relu(self.lin0(x))))


BOTH = ["experts.gate_up_proj", "experts.down_proj"]
CASES = {  # name -> (transposed experts, config fields)
    "2d": (False, dict(target_modules=[], target_parameters=["lin0.weight"])),
    "experts": (False, dict(target_modules=[], target_parameters=BOTH)),
    "experts-transposed": (True, dict(target_modules=[], target_parameters=BOTH)),
    "with-modules": (False, dict(target_modules=["lin1"], target_parameters=["experts.down_proj"])),
}


def base(case: str) -> Net:
    torch.manual_seed(0)
    return Net(transposed=CASES[case][0]).eval()


def config(lib, case: str, **extra):
    return lib.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, **{**CASES[case][1], **extra})


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))


def out(model, x=X) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def pair(case: str):
    """The same adapter in peft and in deltatune (peft's random factors copied over by key)."""
    torch.manual_seed(2)
    theirs = peft.get_peft_model(base(case), config(peft, case)).eval()
    ours = deltatune.get_peft_model(base(case), config(deltatune, case)).eval()
    mine = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    wanted = {k: v for k, v in theirs.state_dict().items() if "lora_" in k}
    assert sorted(mine) == sorted(wanted)                       # same module structure, same names
    ours.load_state_dict(wanted, strict=False)
    return theirs, ours


@pytest.mark.parametrize("case", CASES)
def test_outputs_equal_peft(case):
    theirs, ours = pair(case)
    assert (out(ours) - out(base(case))).abs().max() > 1e-3    # the adapter does something
    close(out(ours), out(theirs))
    ours.train(), theirs.train()                                  # no dropout here: same in training
    close(ours(X), theirs(X))


@pytest.mark.parametrize("case", CASES)
def test_files_cross_both_ways(case, tmp_path):
    theirs, ours = pair(case)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    a = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape for k in a)
    loaded = deltatune.PeftModel.from_pretrained(base(case), tmp_path / "peft").eval()
    close(out(loaded), out(theirs))
    back = peft.PeftModel.from_pretrained(base(case), tmp_path / "ours").eval()
    close(out(back), out(ours))


def test_nesting_follows_peft():
    _, ours = pair("experts")
    outer = ours.base_model.model.experts
    assert isinstance(outer, deltatune.methods.lora_param.ParamWrapper)
    assert outer.parameter_name == "down_proj" and outer.base_layer.parameter_name == "gate_up_proj"
    assert isinstance(outer.get_base_layer(), Experts)
    # (E, out, in): A is (E·r, in), B is (out, E·r)
    assert outer.lora_A["default"].weight.shape == (6, 6) and outer.lora_B["default"].weight.shape == (8, 6)
    assert repr(outer).startswith("lora.ParamWrapper") and "parameter_name='down_proj'" in repr(outer)


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_unmerged_and_unload_gives_base(case):
    _, ours = pair(case)
    want = out(ours)
    with ours.disable_adapter():
        close(out(ours), out(base(case)))
    ours.merge_adapter(safe_merge=True)
    close(out(ours), want, atol=1e-4)
    ours.unmerge_adapter()
    close(out(ours), want)
    merged = ours.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert type(merged.experts) is Experts
    close(out(merged), want, atol=1e-4)
    _, ours = pair(case)
    close(out(ours.unload()), out(base(case)))


def test_training_moves_only_the_factors():
    model = deltatune.get_peft_model(base("experts"), deltatune.LoraConfig(target_modules=[], target_parameters=BOTH))
    close(out(model), out(base("experts")))                         # B starts at zero
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    target = torch.randn(5, 2, generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(5):
        loss = F.mse_loss(model(X), target)
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in names), n


def test_two_adapters_on_the_same_parameters_switch_like_peft(tmp_path):
    torch.manual_seed(2)
    theirs = peft.get_peft_model(base("experts"), config(peft, "experts")).eval()
    theirs.add_adapter("other", config(peft, "experts"))
    ours = deltatune.get_peft_model(base("experts"), config(deltatune, "experts")).eval()
    ours.add_adapter("other", config(deltatune, "experts"))
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if "lora_" in k}, strict=False)
    for name in ("other", "default"):
        theirs.set_adapter(name), ours.set_adapter(name)
        close(out(ours), out(theirs))
    ours.save_pretrained(tmp_path)
    loaded = deltatune.PeftModel.from_pretrained(base("experts"), tmp_path / "other", adapter_name="other").eval()
    theirs.set_adapter("other")
    close(out(loaded), out(theirs))
    ours.delete_adapter("other")                                     # from every level of the nesting
    assert ours.base_model.model.experts.held == ours.base_model.model.experts.base_layer.held == ["default"]


def tiny_moe(family: str):
    """A random 2-layer Mixtral ((E, out, in) experts) or gpt-oss ((E, in, out), ``is_transposed``)."""
    import transformers

    shared = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
    if family == "gpt_oss":
        cfg, cls = transformers.GptOssConfig(head_dim=8, **shared), transformers.GptOssForCausalLM
    else:
        cfg, cls = transformers.MixtralConfig(**shared), transformers.MixtralForCausalLM
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_tiny_moe_models_equal_peft(family, tmp_path):
    fields = dict(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj"],
                  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    torch.manual_seed(2)
    theirs = peft.get_peft_model(tiny_moe(family), peft.LoraConfig(**fields)).eval()
    theirs.save_pretrained(tmp_path)
    ours = deltatune.PeftModel.from_pretrained(tiny_moe(family), tmp_path).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = theirs(input_ids=ids).logits
        assert (want - tiny_moe(family)(input_ids=ids).logits).abs().max() > 1e-3
        close(ours(input_ids=ids).logits, want, atol=1e-4)
        close(ours.merge_and_unload()(input_ids=ids).logits, want, atol=1e-4)


# -- what is refused, by name --------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (dict(lora_dropout=0.1), "lora_dropout != 0"),
    (dict(use_dora=True), "use_dora=True"),
    (dict(init_lora_weights="olora"), "init_lora_weights='olora'"),
    (dict(target_modules=["lin1"], target_parameters=["lin1.weight"]), "Trying to wrap an `nn.Parameter`"),
    (dict(target_parameters=["nope.weight"]), "No `target_modules` passed"),
    (dict(target_parameters=["lin1.bias"]), "only 2d and 3d"),
])
def test_refused_by_name(extra, message):
    model = base("2d")
    with pytest.raises(ConfigError, match=message):
        deltatune.get_peft_model(model, deltatune.LoraConfig(**{**CASES["2d"][1], **extra}))
    assert not any(getattr(type(m), "is_adapter_layer", False) for m in model.modules())   # nothing left behind


def test_config_checks():
    with pytest.raises(TypeError, match="must be a list of strings"):
        deltatune.LoraConfig(target_parameters="lin0.weight")
    cfg = deltatune.LoraConfig(target_parameters=["experts.down_proj"])
    assert deltatune.LoraConfig.from_dict(cfg.to_dict()).target_parameters == ["experts.down_proj"]


def test_warns_when_one_kind_matches_nothing():
    with pytest.warns(RuntimeWarning, match="target_modules=\\{'nope'\\} were set but no module was matched"):
        deltatune.get_peft_model(base("2d"), deltatune.LoraConfig(target_modules=["nope"],
                                                                  target_parameters=["lin0.weight"]))
    with pytest.warns(RuntimeWarning, match="no parameter was matched"):
        deltatune.get_peft_model(base("2d"), deltatune.LoraConfig(target_modules=["lin1"],
                                                                  target_parameters=["nope.weight"]))


def test_adapters_must_target_the_same_parameters():
    model = deltatune.get_peft_model(base("experts"), config(deltatune, "experts"))
    with pytest.raises(ConfigError, match="all adapters must target the same set of parameters"):
        model.add_adapter("other", deltatune.LoraConfig(target_modules=[], target_parameters=["lin0.weight"]))
    assert "other" not in model.peft_config
    assert model.base_model.model.experts.held == ["default"]


def test_mixed_batches_and_serving_are_refused(tmp_path):
    from deltatune.peft_model.call import mixing_problem

    model = deltatune.get_peft_model(base("experts"), config(deltatune, "experts")).eval()
    model.add_adapter("other", config(deltatune, "experts"))
    with pytest.raises(MixingError, match="ParamWrapper does not support mixed adapter batches"):
        model(X, adapter_names=["default", "other", "default", "other", "default"])
    assert "ParamWrapper" in mixing_problem(model, "default")


def test_the_engine_refuses_it_at_load(tmp_path):
    from deltatune.serving import AdapterLoadError, Engine
    from tests.conftest import tiny_llama
    from tests.test_cli import _tiny_tokenizer

    tiny_llama().save_pretrained(tmp_path / "base")
    _tiny_tokenizer().save_pretrained(tmp_path / "base")
    fields = dict(target_modules=[], target_parameters=["mlp.down_proj.weight"])
    deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(**fields)).save_pretrained(tmp_path / "a")
    engine = Engine(str(tmp_path / "base"))
    with pytest.raises(AdapterLoadError, match="ParamWrapper does not support mixed adapter batches"):
        engine.add_adapter("a", tmp_path / "a")
    assert list(engine.adapters()) == []


def test_combining_is_refused():
    model = deltatune.get_peft_model(base("experts"), config(deltatune, "experts"))
    model.add_adapter("other", config(deltatune, "experts"))
    with pytest.raises(ValueError, match="add_weighted_adapter does not support targeting nn.Parameter"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "both", combination_type="cat")
    assert "both" not in model.peft_config


class TwoWeights(nn.Module):
    """Two targeted parameters (nested wrappers) and a bias on one module."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 8) / 3)
        self.w2 = nn.Parameter(torch.randn(8, 8) / 3)
        self.bias = nn.Parameter(torch.randn(8))

    def forward(self, x):
        return x @ self.w1 @ self.w2 + self.bias


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_under_nested_wrappers_match_peft(bias, tmp_path):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(TwoWeights(), nn.Linear(8, 2))

    fields = dict(target_modules=[], target_parameters=["0.w1", "0.w2"], bias=bias, init_lora_weights=False)
    torch.manual_seed(2)
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**fields))
    ours = deltatune.get_peft_model(build(), deltatune.LoraConfig(**fields))
    trained = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trained == sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    assert "base_model.model.0.base_layer.base_layer.bias" in trained
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.1)                                          # a trained bias, a non-zero B
    theirs.save_pretrained(tmp_path)
    loaded = deltatune.PeftModel.from_pretrained(build(), tmp_path)
    close(out(loaded), out(theirs))
    with loaded.disable_adapter():
        close(out(loaded), out(build()))                            # the bias is the adapter's own here


def test_dry_run_lists_parameters():
    from deltatune.targeting import dry_run

    text = dry_run(base("experts"), deltatune.LoraConfig(target_modules=["lin1"], target_parameters=BOTH))
    assert text.splitlines() == ["lin1  (Linear)", "experts.gate_up_proj  (parameter (3, 12, 8) of Experts)",
                                 "experts.down_proj  (parameter (3, 8, 6) of Experts)"]


def test_hotswap_is_refused_by_name(tmp_path):
    from deltatune.hotswap import HotswapError, hotswap_adapter

    model = deltatune.get_peft_model(base("experts"), config(deltatune, "experts")).eval()
    deltatune.get_peft_model(base("experts"), config(deltatune, "experts")).save_pretrained(tmp_path)
    before = out(model)
    with pytest.raises(HotswapError, match="target_parameters"):
        hotswap_adapter(model, tmp_path, adapter_name="default")
    close(out(model), before)
