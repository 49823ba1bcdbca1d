"""`deltatune info` and `deltatune merge`, and the issue's snippet on the real default model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import deltatune
from deltatune import LoraConfig, PeftModel, TaskType, get_peft_model
from deltatune.cli import main
from tests.conftest import logits_of, perturb_trainable, tiny_llama, token_batch


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w1", eos_token="w2")


@pytest.fixture
def base_dir(tmp_path):
    path = tmp_path / "base"
    tiny_llama().save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def adapter_dir(tmp_path, base_dir):
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    perturb_trainable(model)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_info_describes_the_adapter(adapter_dir, base_dir, capsys):
    assert main(["info", str(adapter_dir)]) == 0
    out = capsys.readouterr().out
    assert "LORA" in out and "q_proj, v_proj" in out and "4 / 8" in out
    assert str(base_dir) in out  # the base it was made for
    assert main(["info", str(adapter_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert info["modules"] == 4
    assert info["file_bytes"] == (adapter_dir / "adapter_model.safetensors").stat().st_size


def test_info_on_a_non_adapter_is_a_clear_error(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "adapter_config.json: not found" in capsys.readouterr().err


def test_merge_writes_a_directory_plain_transformers_loads(tmp_path, base_dir, adapter_dir):
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out)]) == 0
    ids = token_batch()
    from transformers import AutoModelForCausalLM
    expected = logits_of(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir), ids)
    # a separate interpreter that never imports deltatune
    code = (
        "import sys, torch, json\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "print(json.dumps(m(input_ids=ids).logits.tolist()))\n"
        "assert 'deltatune' not in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = torch.tensor(json.loads(run.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # refuses to clobber a non-empty directory unless asked
    assert main(["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out)]) == 2
    assert main(["merge", "--base", str(base_dir), "--adapter", str(adapter_dir), "--out", str(out), "--overwrite"]) == 0


def test_targets_dry_run_lists_modules(base_dir, capsys):
    assert main(["targets", "--model", str(base_dir), "--target", "q_proj,v_proj"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"model.layers.{i}.self_attn.{p}  (Linear)" for i in range(2) for p in ("q_proj", "v_proj")]


@pytest.mark.real_model
def test_issue_snippet_on_the_default_model(tmp_path, capsys):
    """The README's first snippet, verbatim in spirit, on SmolLM2-135M-Instruct."""
    base = deltatune.models.load_default()
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=16, lora_alpha=32, lora_dropout=0.05,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    assert capsys.readouterr().out.startswith("trainable params: 1,843,200 || all params: ")
    perturb_trainable(model, scale=0.01)
    model.eval()
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2]])
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "my-lora")
    size = (tmp_path / "my-lora" / "adapter_model.safetensors").stat().st_size
    assert 7_000_000 < size < 8_000_000  # 1,843,200 fp32 values + header
    loaded = PeftModel.from_pretrained(deltatune.models.load_default(), tmp_path / "my-lora")
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    merged = loaded.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-4)
