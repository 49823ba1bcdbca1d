"""``LoraConfig(lora_bias=True)``: B has a trained bias, ``y = base(x) + s·(B A x + b)``.

Against peft 0.21 (installed as a yardstick), on a linear layer, Conv1D (transformers), Conv2d and
Conv3d: the same output, files that cross in both directions with the same keys
(``<module>.lora_B.bias``) and output. Within deltatune: merging folds ``s·b`` into the base bias
and unmerging takes it out, each row of a mixed batch equals its adapter alone, training moves the
bias, and peft's refusals (DoRA, inits other than True/False, Embedding, merging into a layer
without a bias) are kept with peft's message prefixes.
"""
from __future__ import annotations

import contextlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune.config import ConfigError
from tests.conftest import perturb_trainable

peft = pytest.importorskip("peft")

# name -> (base layer factory, input shape)
LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (4, 4, 6)),
    "conv1D": (lambda: Conv1D(5, 6), (4, 4, 6)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (4, 4, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3, padding=1), (4, 4, 3, 4, 4)),
}


class Net(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def build(layer: str, bias: bool = True) -> Net:
    torch.manual_seed(0)
    net = Net(LAYERS[layer][0]())
    if not bias:
        net.layer.bias = None
    return net.eval()


def inputs(layer: str) -> torch.Tensor:
    return torch.randn(LAYERS[layer][1], generator=torch.Generator().manual_seed(1))


def config(lib, **kwargs):
    """alpha != r, so a bias left unscaled shows."""
    return lib.LoraConfig(**{"target_modules": ["layer"], "r": 4, "lora_alpha": 12, "lora_bias": True, **kwargs})


def out(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def lora_B(model, name: str = "default") -> nn.Module:
    return model.base_model.model.layer.lora_B[name]


@pytest.mark.parametrize("layer", list(LAYERS))
def test_peft_file_loads_in_deltatune_with_the_same_output(layer, tmp_path):
    theirs = peft.get_peft_model(build(layer), config(peft)).eval()
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path)
    assert "base_model.model.layer.lora_B.bias" in load_file(tmp_path / "adapter_model.safetensors")
    ours = deltatune.PeftModel.from_pretrained(build(layer), tmp_path).eval()
    close(lora_B(ours).bias, lora_B(theirs).bias)
    x = inputs(layer)
    close(out(ours, x), out(theirs, x))
    # the bias alone: B's weight at zero leaves base + s·b, which must match too
    for m in (ours, theirs):
        with torch.no_grad():
            lora_B(m).weight.zero_()
    assert not torch.allclose(out(ours, x), out(build(layer), x))
    close(out(ours, x), out(theirs, x))


@pytest.mark.parametrize("layer", list(LAYERS))
def test_deltatune_file_loads_in_peft_with_the_same_keys_and_output(layer, tmp_path):
    ours = deltatune.get_peft_model(build(layer), config(deltatune)).eval()
    perturb_trainable(ours)
    ours.save_pretrained(tmp_path / "ours")
    peft.get_peft_model(build(layer), config(peft)).save_pretrained(tmp_path / "theirs")
    mine, reference = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in reference.items()}
    assert "base_model.model.layer.lora_B.bias" in mine
    theirs = peft.PeftModel.from_pretrained(build(layer), tmp_path / "ours").eval()
    close(out(theirs, inputs(layer)), out(ours, inputs(layer)))


@pytest.mark.parametrize("layer", list(LAYERS))
def test_bias_starts_at_zero_and_training_moves_it(layer):
    model = deltatune.get_peft_model(build(layer), config(deltatune))
    b = lora_B(model).bias
    assert b.requires_grad and b.shape == (6 if layer.startswith("conv") and layer != "conv1D" else 5,)
    assert torch.equal(b, torch.zeros_like(b))
    x = inputs(layer)
    close(out(model.eval(), x), out(build(layer), x))       # a new adapter leaves the model unchanged
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    assert b.abs().sum() > 0


@pytest.mark.parametrize("layer", list(LAYERS))
def test_merge_folds_the_scaled_bias_into_the_base_bias(layer):
    model = deltatune.get_peft_model(build(layer), config(deltatune)).eval()
    perturb_trainable(model)
    x = inputs(layer)
    want = out(model, x)
    base_bias = build(layer).layer.bias
    s = model.base_model.model.layer.scaling["default"]
    model.merge_adapter()
    close(model.base_model.model.layer.base_layer.bias, base_bias + s * lora_B(model).bias)
    close(out(model, x), want)
    model.unmerge_adapter()
    close(model.base_model.model.layer.base_layer.bias, base_bias)
    close(out(model, x), want)
    plain = model.merge_and_unload()
    assert type(plain.layer) is type(build(layer).layer)
    close(out(plain, x), want)


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_mixed_batch_rows_equal_single_adapter_runs(layer):
    model = deltatune.get_peft_model(build(layer), config(deltatune), adapter_name="a").eval()
    model.add_adapter("b", deltatune.LoraConfig(target_modules=["layer"], r=2))    # no bias, another rank
    model.add_adapter("c", config(deltatune, lora_alpha=3))
    perturb_trainable(model)
    for name in "abc":
        model.set_adapter(name)
        perturb_trainable(model, seed=ord(name))
    x = inputs(layer)
    names = ["a", "b", "__base__", "c"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                close(mixed[i], build(layer)(x[i:i + 1])[0])
                continue
            model.set_adapter(name)
            close(mixed[i], model(x[i:i + 1])[0])


def test_peft_refusals_and_messages():
    for kwargs in ({"use_dora": True}, {"init_lora_weights": "gaussian"}, {"init_lora_weights": "pissa"},
                   {"init_lora_weights": "olora"}):
        with pytest.raises(ConfigError, match="The argument lora_bias=True is"):
            deltatune.LoraConfig(target_modules=["layer"], lora_bias=True, **kwargs)
    emb = Net(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="lora_bias=True is not supported for Embedding"):
        deltatune.get_peft_model(emb, deltatune.LoraConfig(target_modules=["layer"], lora_bias=True))
    mha = Net(nn.MultiheadAttention(8, 2, batch_first=True))
    with pytest.raises(ValueError, match="lora_bias=True is not supported for MultiheadAttention"):
        deltatune.get_peft_model(mha, deltatune.LoraConfig(target_modules=["layer"], lora_bias=True))


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_no_base_bias_warns_runs_and_refuses_to_merge(layer):
    with pytest.warns(UserWarning, match="`lora_bias=True` was passed but the targeted layer of type"):
        model = deltatune.get_peft_model(build(layer, bias=False), config(deltatune)).eval()
    perturb_trainable(model)
    theirs = peft.get_peft_model(build(layer, bias=False), config(peft)).eval()
    theirs.load_state_dict(model.state_dict(), strict=False)
    x = inputs(layer)
    close(out(model, x), out(theirs, x))
    want = out(model, x)
    with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
        model.merge_adapter()
    close(out(model, x), want)                                  # nothing was merged


def test_the_engine_serves_a_lora_bias_adapter_beside_plain_lora(tmp_path):
    """The server's mixed batches take each row's bias from the layer's bank: greedy tokens equal
    the adapter run alone through PeftModel (Llama's projections have no bias: a warning, no merge)."""
    from transformers import AutoModelForCausalLM

    from deltatune.serving import Engine
    from tests.conftest import tiny_llama
    from tests.test_cli import _tiny_tokenizer
    from tests.test_serving_engine import GREEDY, assert_same_greedy, reference

    dirs = {"base": tmp_path / "base"}
    tiny_llama().save_pretrained(dirs["base"])
    _tiny_tokenizer().save_pretrained(dirs["base"])
    configs = {"bias": deltatune.LoraConfig(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "o_proj"]),
               "plain": deltatune.LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"])}
    for i, (name, cfg) in enumerate(configs.items()):
        with pytest.warns(UserWarning, match="has no bias") if cfg.lora_bias else contextlib.nullcontext():
            model = deltatune.PeftModel(AutoModelForCausalLM.from_pretrained(dirs["base"]), cfg)
        perturb_trainable(model, seed=i + 1, scale=0.3)
        model.save_pretrained(tmp_path / name)
        dirs[name] = tmp_path / name
    engine = Engine(str(dirs["base"]), max_num_seqs=3)
    for name in configs:
        engine.add_adapter(name, dirs[name])
    prompts, route = [[5, 6, 7], [9, 12], [3, 4], [20, 21]], ["bias", "plain", None, "bias"]
    outs = engine.generate(prompts, adapter=route, sampling=GREEDY)
    for prompt, name, got in zip(prompts, route, outs):
        assert_same_greedy(got.outputs[0].token_ids, *reference(dirs, name, prompt, GREEDY.max_tokens))
    # the bias matters here: with it zeroed in the file, the reference's tokens change
    shutil.copytree(dirs["bias"], tmp_path / "zeroed")
    file = tmp_path / "zeroed" / "adapter_model.safetensors"
    save_file({k: v.zero_() if k.endswith("lora_B.bias") else v for k, v in load_file(file).items()}, file)
    dirs["zeroed"] = tmp_path / "zeroed"
    assert any(reference(dirs, "zeroed", p, GREEDY.max_tokens)[0] != o.outputs[0].token_ids
               for p, name, o in zip(prompts, route, outs) if name == "bias")


def test_padding_ranks_for_compiled_hotswap_keeps_the_bias():
    """``prepare_model_for_compiled_hotswap`` pads the factors to a larger rank: B's bias stays."""
    model = deltatune.get_peft_model(build("linear"), config(deltatune)).eval()
    perturb_trainable(model)
    x = inputs("linear")
    want = out(model, x)
    deltatune.prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert lora_B(model).weight.shape == (5, 8) and lora_B(model).bias.shape == (5,)
    close(out(model, x), want)
