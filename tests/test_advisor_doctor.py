"""deltatune doctor: each finding has a case that triggers it and one that does not."""
from __future__ import annotations

import json

import pytest
import torch

from deltatune.advisor import doctor as D
from deltatune.advisor.shapes import KNOWN


def codes(findings):
    return {f.code for f in findings}


GOOD_LORA = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                                  "gate_proj", "up_proj", "down_proj"]}
SHAPE = KNOWN["smollm2-135m"]


def test_a_good_config_has_no_findings():
    assert D.check_adapter_config(GOOD_LORA, SHAPE) == []
    assert D.check_adapter_config({**GOOD_LORA, "target_modules": "all-linear"}, SHAPE) == []


@pytest.mark.parametrize("change,code", [
    ({"r": 2, "lora_alpha": 4}, "rank-too-low"),
    ({"lora_alpha": 512}, "alpha-off"),
    ({"lora_alpha": 2}, "alpha-off"),
    ({"r": 256, "lora_alpha": 2, "use_rslora": True}, "alpha-off"),
    ({"r": 128, "lora_alpha": 256}, "rslora-advice"),
    ({"target_modules": ["q_proj", "v_proj"]}, "qv-only"),
    ({"target_modules": ["q_proj", "v_proj", "lm_head"]}, "targets-head"),
    ({"target_modules": ["query_key_value"]}, "targets-match-nothing"),
    ({"target_modules": r".*\.attn\.c_attn"}, "targets-match-nothing"),
])
def test_adapter_config_findings(change, code):
    found = D.check_adapter_config({**GOOD_LORA, **change}, SHAPE)
    assert code in codes(found)
    assert all(f.why and f.fix and f.severity in D.SEVERITIES for f in found)


def test_rslora_at_its_own_scale_is_fine():
    assert D.check_adapter_config({**GOOD_LORA, "r": 256, "lora_alpha": 32, "use_rslora": True}, SHAPE) == []
    # regex targets that match are fine, and without a base nothing is claimed about matching
    assert D.check_adapter_config({**GOOD_LORA, "target_modules": r".*\.(q|v)_proj"}, SHAPE) == []
    assert D.check_adapter_config({**GOOD_LORA, "target_modules": ["query_key_value"]}, None) == []


def _write_adapter(directory, tensors, cfg):
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(directory / "adapter_model.safetensors"))


def test_full_model_saved_as_adapter(tmp_path):
    cfg = {**GOOD_LORA, "r": 4}
    clean = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}
    _write_adapter(tmp_path / "good", clean, cfg)
    assert "full-model-saved" not in codes(D.diagnose_path(tmp_path / "good"))
    _write_adapter(tmp_path / "bad", {**clean, "base_model.model.model.layers.0.mlp.up_proj.weight": torch.zeros(96, 64)}, cfg)
    assert "full-model-saved" in codes(D.diagnose_path(tmp_path / "bad"))
    saved = {**cfg, "modules_to_save": ["score"]}  # a trained head listed in modules_to_save is meant to be there
    _write_adapter(tmp_path / "head", {**clean, "base_model.model.score.modules_to_save.weight": torch.zeros(96, 64)}, saved)
    assert "full-model-saved" not in codes(D.diagnose_path(tmp_path / "head"))
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors").write_bytes(b"")
    assert codes(D.diagnose_path(merged)) == {"full-model-saved"}


def test_training_config_findings(tmp_path, monkeypatch):
    from deltatune.training import precision

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(50)))
    good = {"model": "smollm2-135m", "method": "lora", "r": 16, "alpha": 32, "lr": 2e-4, "data": str(data),
            "dtype": "bfloat16", "device": "cpu"}
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert D.check_training_config(good, SHAPE, 50) == []
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert "bf16-on-cpu" in codes(D.check_training_config(good, SHAPE, 50))
    assert "bf16-on-cpu" not in codes(D.check_training_config({**good, "dtype": "auto"}, SHAPE, 50))
    assert "dropout-tiny-data" in codes(D.check_training_config({**good, "dropout": 0.1}, SHAPE, 50))
    assert "dropout-tiny-data" not in codes(D.check_training_config({**good, "dropout": 0.1}, SHAPE, 50_000))
    assert "lr-off" in codes(D.check_training_config({**good, "lr": 0.05}, SHAPE, 50))
    assert "lr-off" in codes(D.check_training_config({**good, "lr": 1e-7}, SHAPE, 50))
    assert "lr-off" not in codes(D.check_training_config({**good, "method": "ia3", "lr": 3e-3}, SHAPE, 50))
    dense = {**good, "quantize": "nf4", "method_args": {"modules_to_save": ["up_proj"]}}
    assert "4bit-with-dense-copy" in codes(D.check_training_config(dense, SHAPE, 50))
    assert "4bit-with-dense-copy" not in codes(D.check_training_config({**good, "quantize": "nf4"}, SHAPE, 50))
    # from a file: the data file's examples are counted, the model's shape is read
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(f"model: smollm2-135m\ndata: {data}\ndropout: 0.2\ntarget: q_proj,v_proj\n")
    assert {"dropout-tiny-data", "qv-only"} <= codes(D.diagnose_path(cfg_file))


def test_4bit_base_with_a_dense_copy():
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune.quant import quantize

    cfg = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = quantize(LlamaForCausalLM(cfg))
    assert D.check_model(model) == []
    torch.manual_seed(0)
    original = LlamaForCausalLM(cfg)
    model.register_parameter("kept_copy", torch.nn.Parameter(original.model.layers[0].mlp.up_proj.weight.detach().clone()))
    assert codes(D.check_model(model)) == {"4bit-with-dense-copy"}


@pytest.mark.parametrize("losses,code", [
    ([3.0, 2.5, 2.0, float("nan"), float("nan")], "loss-diverged"),
    ([3.0, 2.0, 1.5, 1.2, 2.5, 4.0, 6.0, 9.0, 12.0], "loss-diverged"),
    ([3.0, 3.01, 2.99, 3.0, 3.0, 3.02, 2.99], "loss-flat"),
    ([3.0, 2.0, 1.5, 1.2, 1.0, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8], "loss-plateau"),
])
def test_loss_curves(losses, code):
    assert codes(D.check_losses(losses)) == {code}


def test_a_healthy_loss_curve_has_no_findings():
    assert D.check_losses([3.0 * 0.9 ** i for i in range(30)]) == []


def test_run_directory_and_cli_exit_codes(tmp_path, capsys):
    from deltatune.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "loss": 3.0 * 0.9 ** i}) + "\n" for i in range(20)))
    _write_adapter(run / "adapter", {"a.lora_A.weight": torch.zeros(16, 64), "a.lora_B.weight": torch.zeros(64, 16)},
                   {**GOOD_LORA, "target_modules": ["q_proj", "v_proj"]})
    assert main(["doctor", str(run), "--json"]) == 0  # warnings only
    assert {f["code"] for f in json.loads(capsys.readouterr().out)} == {"qv-only"}
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 21, "loss": float("nan")}) + "\n")
        fh.write(json.dumps({"step": 22, "loss": float("nan")}) + "\n")
    assert main(["doctor", str(run)]) == 1
    out = capsys.readouterr().out
    assert "[error] loss-diverged" in out and "fix:" in out
    assert main(["doctor", str(tmp_path / "missing")]) == 2


def test_get_peft_model_warns_about_config_mistakes():
    import warnings

    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune import LoraConfig, get_peft_model

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    with pytest.warns(UserWarning, match="rank-too-low"):
        get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    with pytest.warns(UserWarning, match="qv-only"):
        get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))


def test_train_start_warns_about_run_mistakes():
    import warnings

    from deltatune.training.config import TrainConfig

    with pytest.warns(UserWarning, match="dropout-tiny-data"):
        D.warn_at_train(TrainConfig(dropout=0.1), 40)
    with pytest.warns(UserWarning, match="lr-off"):
        D.warn_at_train(TrainConfig(lr=0.1), 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert D.warn_at_train(TrainConfig(), 40) == []
