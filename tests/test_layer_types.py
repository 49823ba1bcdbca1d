"""LoRA, DoRA and (IA)³ on Conv1d, Conv3d, grouped convolutions and MultiheadAttention.

Against peft 0.21 (installed as a yardstick): files cross in both directions with the same output
and the same keys and shapes. Within deltatune: merged equals unmerged (grouped LoRA cannot merge:
a named error), disable and unload give the base, and each row of a mixed batch equals its adapter
run alone (MultiheadAttention refuses mixed batches by name).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune
from deltatune.adapter_set import MixingError
from deltatune.config import ConfigError
from tests.conftest import perturb_trainable

peft = pytest.importorskip("peft")

# name -> (base layer factory, input shape (4 rows), LoRA rank: a multiple of the groups)
LAYERS = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (4, 4, 9), 4),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3, padding=1), (4, 4, 3, 4, 4), 4),
    "conv2d-groups": (lambda: nn.Conv2d(8, 16, 3, padding=1, groups=4), (4, 8, 5, 5), 4),
    "conv1d-groups-stride": (lambda: nn.Conv1d(6, 9, 3, stride=2, groups=3), (4, 6, 11), 6),
    "mha": (lambda: nn.MultiheadAttention(8, 2, batch_first=True), (4, 5, 8), 4),
}
CONVS = [k for k in LAYERS if k != "mha"]
PEFT_IA3 = ["conv3d", "conv2d-groups"]          # peft 0.21's IA3 takes Conv2d/Conv3d, not nn.Conv1d


class Net(nn.Module):
    """One layer under test, called the way its type is called."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.attention = isinstance(layer, nn.MultiheadAttention)   # fixed before any wrapping

    def forward(self, x):
        if self.attention:
            return self.layer(x, x, x)[0]
        return self.layer(x)


def build(layer: str) -> Net:
    torch.manual_seed(0)
    return Net(LAYERS[layer][0]()).eval()


def inputs(layer: str) -> torch.Tensor:
    return torch.randn(LAYERS[layer][1], generator=torch.Generator().manual_seed(1))


def configs(lib, layer: str, method: str, r: int | None = None):
    """The same config in ``lib`` (peft or deltatune): random factors so outputs differ from the base."""
    r = r or LAYERS[layer][2]
    if method.startswith("ia3"):
        ff = ["layer"] if method == "ia3-ff" else []
        return lib.IA3Config(target_modules=["layer"], feedforward_modules=ff, init_ia3_weights=False)
    return lib.LoraConfig(target_modules=["layer"], r=r, lora_alpha=2 * r, init_lora_weights=False,
                          use_dora=method == "dora")


def out(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def _zero_out_proj(model) -> None:
    """peft 0.21 adds MultiheadAttention's out_proj delta twice (huggingface/peft#3774; deltatune
    adds it once), so outputs compare with that factor at zero; the in_proj delta still differs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "out_proj.lora_B" in name:
                p.zero_()


PEFT_CASES = ([(k, m) for k in LAYERS for m in ("lora", "dora") if not (k == "mha" and m == "dora")]
              + [(k, m) for k in PEFT_IA3 for m in ("ia3", "ia3-ff")])
IDS = [f"{k}-{m}" for k, m in PEFT_CASES]


@pytest.mark.parametrize("layer, method", PEFT_CASES, ids=IDS)
def test_peft_file_loads_in_deltatune_with_the_same_output(layer, method, tmp_path):
    theirs = peft.get_peft_model(build(layer), configs(peft, layer, method)).eval()
    perturb_trainable(theirs)
    if layer == "mha":
        _zero_out_proj(theirs)
    theirs.save_pretrained(tmp_path)
    ours = deltatune.PeftModel.from_pretrained(build(layer), tmp_path).eval()
    x = inputs(layer)
    assert not torch.allclose(out(ours, x), out(build(layer), x))       # the adapter acts
    close(out(ours, x), out(theirs, x))


@pytest.mark.parametrize("layer, method", PEFT_CASES, ids=IDS)
def test_deltatune_file_loads_in_peft_with_the_same_keys_and_output(layer, method, tmp_path):
    ours = deltatune.get_peft_model(build(layer), configs(deltatune, layer, method)).eval()
    perturb_trainable(ours)
    if layer == "mha":
        _zero_out_proj(ours)
    ours.save_pretrained(tmp_path / "ours")
    peft.get_peft_model(build(layer), configs(peft, layer, method)).save_pretrained(tmp_path / "theirs")
    mine, reference = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in reference.items()}
    theirs = peft.PeftModel.from_pretrained(build(layer), tmp_path / "ours").eval()
    close(out(theirs, inputs(layer)), out(ours, inputs(layer)))


def test_mha_runs_both_projections_with_their_delta_once():
    """The reference: torch's attention with ``W + s·B A`` in both weights; gradients reach all
    four factors and the attention keeps its own parameters untouched."""
    model = deltatune.get_peft_model(build("mha"), configs(deltatune, "mha", "lora"))
    perturb_trainable(model)
    mha = build("mha").layer
    layer = model.base_model.model.layer
    s = layer.scaling["default"]
    w_in = mha.in_proj_weight + s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    o = layer.base_layer.out_proj
    w_out = mha.out_proj.weight + s * o.lora_B["default"].weight @ o.lora_A["default"].weight
    x = inputs("mha")
    with torch.no_grad():
        want = torch.func.functional_call(mha, {"in_proj_weight": w_in, "out_proj.weight": w_out}, (x, x, x))[0]
    close(out(model, x), want)
    model.train()
    model(x).square().sum().backward()
    factors = [p for n, p in model.named_parameters() if "lora_" in n]
    assert len(factors) == 4 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in factors)
    close(layer.base_layer.in_proj_weight, mha.in_proj_weight)
    assert isinstance(layer.base_layer.in_proj_weight, nn.Parameter)


DT_CASES = ([(k, m) for k in LAYERS for m in ("lora", "dora") if not (k == "mha" and m == "dora")]
            + [(k, m) for k in CONVS for m in ("ia3", "ia3-ff")])
DT_IDS = [f"{k}-{m}" for k, m in DT_CASES]


@pytest.mark.parametrize("layer, method", DT_CASES, ids=DT_IDS)
def test_merge_equals_unmerged_and_unload_gives_the_plain_layer(layer, method):
    model = deltatune.get_peft_model(build(layer), configs(deltatune, layer, method)).eval()
    perturb_trainable(model)
    x = inputs(layer)
    want = out(model, x)
    base_type = type(build(layer).layer)
    if "groups" in layer and method in ("lora", "dora"):
        with pytest.raises(NotImplementedError, match="groups=.*cannot be merged"):
            model.merge_adapter()
        return
    model.merge_adapter()
    close(out(model, x), want)
    model.unmerge_adapter()
    close(out(model, x), want)
    with model.disable_adapter():
        close(out(model, x), out(build(layer), x))
    plain = model.merge_and_unload()
    assert type(plain.layer) is base_type
    if layer == "mha":
        assert type(plain.layer.out_proj) is type(build(layer).layer.out_proj)
    close(out(plain, x), want)


@pytest.mark.parametrize("layer, method", DT_CASES, ids=DT_IDS)
def test_delete_and_unload_give_the_base(layer, method):
    model = deltatune.get_peft_model(build(layer), configs(deltatune, layer, method)).eval()
    perturb_trainable(model)
    x = inputs(layer)
    want = out(model, x)
    model.add_adapter("other", configs(deltatune, layer, method))
    model.delete_adapter("other")
    close(out(model, x), want)
    plain = model.unload()
    assert type(plain.layer) is type(build(layer).layer)
    assert sorted(plain.state_dict()) == sorted(build(layer).state_dict())
    close(out(plain, x), out(build(layer), x))


MIX = [(k, m) for k in CONVS for m in ("lora", "dora", "ia3", "ia3-ff")]


@pytest.mark.parametrize("layer, method", MIX, ids=[f"{k}-{m}" for k, m in MIX])
def test_mixed_batch_rows_equal_single_adapter_runs(layer, method):
    r = LAYERS[layer][2]
    model = deltatune.get_peft_model(build(layer), configs(deltatune, layer, method), adapter_name="a").eval()
    perturb_trainable(model, seed=1)
    other = "lora" if method == "dora" else method       # DoRA beside plain LoRA, ranks differ
    model.add_adapter("b", configs(deltatune, layer, other, r=2 * r))
    model.set_adapter("b")
    perturb_trainable(model, seed=2)
    x = inputs(layer)
    names = ["a", "b", "__base__", "a"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(x[i:i + 1])
            else:
                model.set_adapter(name)
                alone = model(x[i:i + 1])
            close(mixed[i:i + 1], alone)


def test_mha_refuses_a_mixed_batch_naming_the_module():
    model = deltatune.get_peft_model(build("mha"), configs(deltatune, "mha", "lora"), adapter_name="a")
    model.add_adapter("b", configs(deltatune, "mha", "lora", r=8))
    with pytest.raises(MixingError, match=r"module layer \(LoraMultiheadAttention\).*separate calls"):
        model(inputs("mha"), adapter_names=["a", "b", "a", "b"])


def test_a_rank_that_groups_do_not_divide_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"layer \(Conv2d, groups=4\).*r=6"):
        deltatune.get_peft_model(build("conv2d-groups"), deltatune.LoraConfig(target_modules=["layer"], r=6))


def test_dora_on_multihead_attention_is_refused_by_name():
    with pytest.raises(ConfigError, match="DoRA on layer"):
        deltatune.get_peft_model(build("mha"), deltatune.LoraConfig(target_modules=["layer"], use_dora=True))


def test_grouped_dora_runs_under_inference_mode_and_passes_the_conv_weight_through():
    """peft's models read ``conv.weight`` of a wrapped layer; inference tensors have no version
    counter for DoRA's norm cache to read."""
    model = deltatune.get_peft_model(build("conv2d-groups"), configs(deltatune, "conv2d-groups", "dora")).eval()
    perturb_trainable(model)
    assert model.base_model.model.layer.weight is model.base_model.model.layer.base_layer.weight
    want = out(model, inputs("conv2d-groups"))
    with torch.inference_mode():
        close(model(inputs("conv2d-groups")), want)


def test_mha_inside_a_transformer_encoder_layer_applies_its_adapter_in_eval():
    """nn.TransformerEncoderLayer's fused eval path reads the attention's weights itself; with an
    adapter live it must call the adapter layer instead (disabled: the fused path, the base)."""
    torch.manual_seed(0)
    base = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True).eval()
    reference = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True).eval()
    reference.load_state_dict(base.state_dict())
    model = deltatune.get_peft_model(base, deltatune.LoraConfig(target_modules=["self_attn"], r=2,
                                                                init_lora_weights=False)).eval()
    x = torch.randn(2, 4, 8)
    weights = model.base_model.model.self_attn.weights_for("default")
    with torch.no_grad():
        want = torch.func.functional_call(reference, {"self_attn.in_proj_weight": weights["in_proj_weight"],
                                                      "self_attn.out_proj.weight": weights["out_proj.base_layer.weight"]},
                                          (x,))
        close(model(x), want)
        with model.disable_adapter():
            close(model(x), reference(x))
