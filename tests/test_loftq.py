"""LoftQ (issue 12): exactness instead of parity (peft 0.21's LoftQ needs CUDA), files, CLI.

Exactness: with one iteration each layer's effective weight (dequantized 4-bit base + s·B@A) is
NF4(W) dequantized plus the best rank-r approximation of the rounding error; more iterations
never move the effective weight further from W.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

import deltatune  # noqa: E402
from deltatune import LoftQConfig, LoraConfig, PeftModel, get_peft_model, quant  # noqa: E402
from deltatune.config import ConfigError  # noqa: E402
from deltatune.checkpoint.io import CheckpointError  # noqa: E402
from deltatune.quant.loftq import (load_4bit_layers, loftq_decompose, replace_lora_weights_loftq,  # noqa: E402
                                   save_4bit_layers)
from deltatune.quant.nf4 import Linear4bit  # noqa: E402

from conftest import logits_of, tiny_gpt2, tiny_llama, token_batch  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def loftq_config(iters: int = 1, r: int = 4, alpha: float = 8, targets=TARGETS) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights="loftq",
                      loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=iters))


def dense_weights(model) -> dict[str, torch.Tensor]:
    return {n: deltatune.registry.get_weight(m).detach().float().clone() for n, m in model.named_modules()
            if type(m) is nn.Linear or type(m).__name__ == "Conv1D"}


def effective(layer) -> torch.Tensor:
    """Dequantized base + s·B@A (out, in), fp32."""
    return quant.dense_weight(layer.base_layer) + layer.delta_weight("default")


def rank_r(R: torch.Tensor, r: int) -> torch.Tensor:
    """Best rank-r approximation, computed independently in float64."""
    U, S, Vh = torch.linalg.svd(R.double(), full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


def nf4(W: torch.Tensor) -> torch.Tensor:
    """What deltatune.quantize stores for W, dequantized."""
    layer = Linear4bit(W.shape[1], W.shape[0], bias=False, device="meta")
    layer.quantize_(W)
    return layer.dequantize()


# -- exactness ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, targets", [(tiny_llama, TARGETS), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_one_iteration_is_nf4_plus_the_best_rank_r_fix(make, targets):
    model = make()
    W = dense_weights(model)
    peft_model = get_peft_model(model, loftq_config(1, r=4, alpha=8, targets=targets))   # scaling 2
    layers = list(peft_model.base_model.adapter_layers())
    assert len(layers) == 2 * len(targets)
    for name, layer in layers:
        assert isinstance(layer.base_layer, Linear4bit) and layer.base_layer.double_quant
        Q = quant.dense_weight(layer.base_layer)
        assert torch.equal(Q, nf4(W[name]))                  # the base deltatune.quantize makes
        expected = Q.double() + rank_r(W[name] - Q, 4)
        got = effective(layer).double()
        assert (got - expected).norm() / expected.norm() < 1e-5, name
        # the starting correction is not nothing: it removes part of the rounding error
        assert (W[name] - got.float()).norm() < (W[name] - Q).norm()


def test_more_iterations_never_increase_the_error():
    model = tiny_llama()
    W = dense_weights(model)
    errors = {}
    for iters in (1, 2, 3, 5):
        peft_model = get_peft_model(tiny_llama(), loftq_config(iters))
        errors[iters] = {n: (W[n] - effective(layer)).norm().item()
                         for n, layer in peft_model.base_model.adapter_layers()}
    for name in errors[1]:
        series = [errors[i][name] for i in (1, 2, 3, 5)]
        assert all(b <= a for a, b in zip(series, series[1:])), (name, series)
    # and iterating helps on these random weights (LoftQ is not a no-op after its first step)
    assert sum(errors[5].values()) < 0.95 * sum(errors[1].values())


def test_decompose_keeps_the_best_iterate_and_reports_it():
    torch.manual_seed(0)
    W = torch.randn(48, 64)
    result = loftq_decompose(W, r=4, scaling=0.5, num_iter=4)
    assert len(result.errors) == 4 and result.error == min(result.errors)
    W_eff = result.layer.dequantize() + 0.5 * result.B @ result.A
    assert abs((W - W_eff).norm().item() / W.norm().item() - result.error) < 1e-5
    assert result.error < result.quant_error


def test_loftq_model_is_closer_to_the_dense_model_than_plain_qlora():
    ids = token_batch()
    dense = logits_of(tiny_llama(), ids)
    plain = get_peft_model(deltatune.quantize(tiny_llama()), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    loftq = get_peft_model(tiny_llama(), loftq_config(5))
    assert (logits_of(loftq, ids) - dense).norm() < (logits_of(plain, ids) - dense).norm()
    # ready to train: factors trainable, 4-bit weights frozen, loss goes down
    trainable = [n for n, p in loftq.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    from conftest import train_steps

    losses = train_steps(loftq, ids, steps=4, lr=1e-2)
    assert losses[-1] < losses[0]


# -- files ---------------------------------------------------------------------------------------------

def test_saved_adapter_is_plain_peft_lora_and_loads_onto_its_4bit_base(tmp_path):
    from safetensors import safe_open

    ids = token_batch()
    model = get_peft_model(tiny_llama(), loftq_config(3))
    with torch.no_grad():
        for _, layer in model.base_model.adapter_layers():     # as if trained
            layer.lora_B["default"].weight.mul_(1.5)
    expected = logits_of(model, ids)
    model.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["loftq_config"] == {}   # no loader redoes LoftQ
    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["deltatune_loftq_config"]) == {"loftq_bits": 4, "loftq_iter": 3}

    base = model.unload()                                      # the 4-bit base LoftQ made
    assert sum(isinstance(m, Linear4bit) for m in base.modules()) == 2 * len(TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # no warning on the right base
        loaded = PeftModel.from_pretrained(base, tmp_path / "a")
    assert torch.allclose(logits_of(loaded, ids), expected, atol=1e-5)
    assert loaded.peft_config["default"].init_lora_weights == "loftq"
    loaded.save_pretrained(tmp_path / "b")                     # the mark survives a second save
    with safe_open(str(tmp_path / "b" / "adapter_model.safetensors"), "pt") as fh:
        assert "deltatune_loftq_config" in fh.metadata()

    # the 4-bit base itself travels as a file, and goes back into a freshly loaded dense model
    assert save_4bit_layers(loaded, tmp_path / "base.safetensors") == 2 * len(TARGETS)
    fresh = load_4bit_layers(tiny_llama(), tmp_path / "base.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = PeftModel.from_pretrained(fresh, tmp_path / "a")
    assert torch.equal(logits_of(again, ids), logits_of(loaded, ids))
    with pytest.raises(CheckpointError, match="layer 'model.layers.0.mlp.up_proj' is 64x32, the model's"):
        from transformers import LlamaConfig, LlamaForCausalLM

        other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        load_4bit_layers(other, tmp_path / "base.safetensors")
    assert not any(isinstance(m, Linear4bit) for m in other.modules())   # nothing replaced


def test_one_iteration_adapter_loads_onto_a_freshly_quantized_base(tmp_path):
    ids = token_batch()
    model = get_peft_model(tiny_llama(), loftq_config(1))
    expected = logits_of(model, ids)
    model.save_pretrained(tmp_path)
    fresh = deltatune.quantize(tiny_llama(), target_modules=TARGETS)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.allclose(logits_of(loaded, ids), expected, atol=1e-5)


def test_loading_onto_a_full_precision_base_warns_that_it_changes_the_model(tmp_path):
    model = get_peft_model(tiny_llama(), loftq_config(1))
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="initialised by LoftQ for a 4-bit NF4 base.*change the model"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="initialised by LoftQ"):
        peft_model.load_adapter(tmp_path, "loftq")
    # a plain LoRA file gives no such warning
    get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PeftModel.from_pretrained(tiny_llama(), tmp_path / "plain")


def test_peft_reads_the_file_as_ordinary_lora(tmp_path):
    peft = pytest.importorskip("peft")
    ids = token_batch()
    model = get_peft_model(tiny_llama(), loftq_config(1))
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert torch.allclose(logits_of(theirs, ids), logits_of(ours, ids), atol=1e-5)


# -- a model already in 4 bits: replace_lora_weights_loftq ----------------------------------------------

def test_replace_lora_weights_loftq_reads_the_dense_weights_from_safetensors(tmp_path):
    tiny_llama().save_pretrained(tmp_path)                    # model.safetensors
    reference = get_peft_model(tiny_llama(), loftq_config(1))
    peft_model = get_peft_model(deltatune.quantize(tiny_llama(), target_modules=TARGETS),
                                LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    report = replace_lora_weights_loftq(peft_model, model_path=tmp_path)
    assert set(report) == {n for n, _ in peft_model.base_model.adapter_layers()}
    ref_layers = dict(reference.base_model.adapter_layers())
    for name, layer in peft_model.base_model.adapter_layers():
        assert report[name]["after"] < report[name]["before"]
        got, want = effective(layer).double(), effective(ref_layers[name]).double()
        assert (got - want).norm() / want.norm() < 1e-5, name
    assert deltatune.replace_lora_weights_loftq is replace_lora_weights_loftq


def test_replace_lora_weights_loftq_callback_rolls_back_and_errors_leave_the_model(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    peft_model = get_peft_model(deltatune.quantize(tiny_llama(), target_modules=TARGETS),
                                LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    before = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    keep_only = "model.layers.0.self_attn.q_proj"
    replace_lora_weights_loftq(peft_model, model_path=tmp_path, callback=lambda m, name: name == keep_only)
    for key, value in peft_model.state_dict().items():
        if "lora_" in key:
            changed = not torch.equal(value, before[key])
            assert changed == (keep_only + ".lora_" in key and "lora_B" in key or
                               keep_only + ".lora_" in key and "lora_A" in key), key

    other = tmp_path / "other"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    snapshot = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    with pytest.raises(ValueError, match="up_proj.weight has shape"):
        replace_lora_weights_loftq(peft_model, model_path=other)
    assert all(torch.equal(peft_model.state_dict()[k], v) for k, v in snapshot.items())
    with pytest.raises(ValueError, match="no LoRA layer of adapter 'default' on a 4-bit base"):
        replace_lora_weights_loftq(get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])),
                                   model_path=tmp_path)


# -- config and errors -----------------------------------------------------------------------------------

def test_config_validation_and_peft_names():
    cfg = loftq_config(2)
    assert cfg.loftq_config == {"loftq_bits": 4, "loftq_iter": 2}       # a dict, as peft keeps it
    assert cfg.to_dict()["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    assert LoraConfig.from_dict(cfg.to_dict()).loftq_config == cfg.loftq_config
    with pytest.raises(ConfigError, match="needs loftq_config"):
        LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ConfigError, match="loftq_bits=8: only 4"):
        LoftQConfig(loftq_bits=8)
    with pytest.raises(ConfigError, match="loftq_iter=0"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 0})
    with pytest.raises(ConfigError, match="unknown key 'bits'"):
        LoraConfig(init_lora_weights="loftq", loftq_config={"bits": 4})
    with pytest.warns(UserWarning, match="is ignored"):
        assert LoraConfig(loftq_config=LoftQConfig()).loftq_config == {}


def _snapshot(model):
    return [type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(model, snapshot):
    types, state = snapshot
    assert [type(m) for m in model.modules()] == types
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)


def test_refusals_name_the_problem_and_leave_the_model_as_it_was():
    quantized = deltatune.quantize(tiny_llama())
    snap = _snapshot(quantized)
    with pytest.raises(ConfigError, match="already 4-bit.*replace_lora_weights_loftq"):
        get_peft_model(quantized, loftq_config(1))
    _assert_same(quantized, snap)

    # q_proj of layer 0 is converted before v_proj fails (it holds another adapter): undone
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["v_proj"]))
    snap = _snapshot(peft_model)
    with pytest.raises(ConfigError, match="already holds adapter"):
        peft_model.add_adapter("loftq", loftq_config(1, targets=["q_proj", "v_proj"]))
    _assert_same(peft_model, snap)
    assert list(peft_model.peft_config) == ["default"]

    with pytest.raises(ConfigError, match="for linear layers.*embed_tokens is a Embedding"):
        get_peft_model(tiny_llama(), loftq_config(1, targets=["embed_tokens"]))


# -- training: deltatune train --quantize nf4 --init loftq[:N] -----------------------------------------

def test_train_config_maps_init_loftq():
    from deltatune.training.api import adapter_config, make_config
    from deltatune.training.config import TrainConfigError

    cfg = make_config(quantize="nf4", init="loftq:5", r=4)
    adapter = adapter_config(cfg)
    assert adapter.init_lora_weights == "loftq" and adapter.loftq_config == {"loftq_bits": 4, "loftq_iter": 5}
    assert adapter_config(make_config(quantize="nf4", init="loftq")).loftq_config["loftq_iter"] == 1
    assert adapter_config(make_config(init="gaussian")).init_lora_weights == "gaussian"
    with pytest.raises(TrainConfigError, match="needs quantize='nf4'"):
        make_config(init="loftq:2")
    with pytest.raises(TrainConfigError, match="loftq or loftq:N"):
        make_config(quantize="nf4", init="loftq:x")


def test_cli_train_with_loftq(tmp_path):
    from safetensors import safe_open
    from test_training_helpers import chat_rows, cli_module, read_metrics, run_cli, save_tiny_model, write_jsonl

    from deltatune.training.api import load_model, make_config

    model_dir = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(32, seed=0))
    # only q_proj targeted: LoftQ makes those 4-bit, --quantize the other linear layers
    cfg = make_config(model=str(model_dir), data=str(data), dtype="float32", quantize="nf4", init="loftq:2",
                      r=4, target="q_proj")
    model, _ = load_model(cfg, torch.device("cpu"))
    q = [l.base_layer for n, l in model.base_model.adapter_layers()]
    assert len(q) == 2 and all(m.deltatune_loftq_error["per_iter"].__len__() == 2 for m in q)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 2 * 7

    out = tmp_path / "run"
    run_cli(["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--dtype", "float32",
             "--no-progress", "--rank", "4", "--alpha", "8", "--lr", "5e-3", "--quantize", "nf4",
             "--init", "loftq:2", "--max-steps", "4", "--batch-size", "8", "--no-exact-match"], module=cli_module())
    assert len([r for r in read_metrics(out) if "loss" in r]) == 4
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["deltatune_loftq_config"])["loftq_iter"] == 2
    # deltatune eval / chat put the run's 4-bit base back under the adapter: no warning
    from deltatune.training.api import load_inference_model

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        net, *_ = load_inference_model(str(model_dir), str(out / "adapter"), dtype="float32", device="cpu")
    assert sum(isinstance(m, Linear4bit) for m in net.modules()) == 2 * 7
