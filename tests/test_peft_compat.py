"""``deltatune doctor --peft-compat``: the peft names, keywords and values a script uses that deltatune lacks."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

import deltatune
from deltatune.advisor.peft_compat import (add_peft_compat_arguments, check_file, check_source, peft_imports,
                                           run_peft_compat)

ROOT = Path(__file__).resolve().parents[1]
OVERVIEW = Path("/work/shared/reference/peft-overview.md")
# The python blocks of the PEFT overview this project follows, as written there (peft and hub names);
# test_overview_copy_is_current keeps this copy honest where the overview is at hand.
OVERVIEW_SNIPPETS = [
    'from peft import LoraConfig, get_peft_model, TaskType\nfrom transformers import AutoModelForCausalLM\n'
    'base = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.1-8B")\nconfig = LoraConfig(\n'
    'task_type=TaskType.CAUSAL_LM,\nr=16, lora_alpha=32, lora_dropout=0.05,\n'
    'target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],\n)\nmodel = get_peft_model(base, config)\n'
    'model.print_trainable_parameters() # ~0.5% trainable\n',
    'from transformers import BitsAndBytesConfig\nimport torch\nbnb = BitsAndBytesConfig(\nload_in_4bit=True,\n'
    'bnb_4bit_quant_type="nf4",\nbnb_4bit_compute_dtype=torch.bfloat16,\nbnb_4bit_use_double_quant=True,\n)\n'
    'base = AutoModelForCausalLM.from_pretrained(\n"meta-llama/Llama-3.1-70B", quantization_config=bnb, '
    'device_map="auto",\n)\nmodel = get_peft_model(base, lora_config) # 70B on single 48GB GPU\n',
    'model.save_pretrained("./my-lora") # ~50MB, not 140GB\nfrom peft import PeftModel\n'
    'loaded = PeftModel.from_pretrained(base, "./my-lora")\n',
    'merged = model.merge_and_unload() # W ← W + αBA/r\n'
    'merged.save_pretrained("./merged-model") # standard HF model, no peft dep\n',
    '# vLLM 0.6+ supports dynamic LoRA loading\nfrom vllm import LLM, SamplingParams\n'
    'from vllm.lora.request import LoRARequest\n'
    'llm = LLM(model="meta-llama/Llama-3.1-8B", enable_lora=True, max_loras=8)\n'
    'out = llm.generate(prompts, sampling_params,\nlora_request=LoRARequest("customer-42", 1, "./customer-42-lora"))\n',
    'config = LoraConfig(r=16, lora_alpha=32, use_dora=True, # peft >= 0.10\ntarget_modules=["q_proj", "v_proj"])\n',
    'from peft import PromptTuningConfig, PromptTuningInit\nconfig = PromptTuningConfig(\n'
    'task_type=TaskType.CAUSAL_LM,\nprompt_tuning_init=PromptTuningInit.TEXT,\nnum_virtual_tokens=20,\n'
    'prompt_tuning_init_text="Classify sentiment:",\ntokenizer_name_or_path="meta-llama/Llama-3.1-8B",\n)\n',
]

MIGRATING = '''import peft
from peft import LoraConfig, get_peft_model, TaskType, AutoPeftModelForCausalLM
from peft.utils import get_peft_model_state_dict
config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8,
                    lora_bias=True, init_lora_weights="eva", layer_replication=None)
model = peft.PeftModel.from_pretrained(base, "dir", ephemeral_gpu_offload=True)
model.print_trainable_parameters()
model.get_model_status()
model.push_to_hub("me/adapter")
peft.IA3Config(target_modules=["k"], feedforward_modules=["v"])
'''


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), re.S)


def _by_line(findings):
    return {(f.line, f.code) for f in findings}


def test_lists_unsupported_names_keywords_and_values_with_lines():
    findings = check_source(MIGRATING)
    assert _by_line(findings) == {
        (2, "peft-name"),            # AutoPeftModelForCausalLM
        (3, "peft-import-path"),     # peft.utils -> deltatune's top level
        (5, "peft-keyword"),         # layer_replication: no such field
        (5, "peft-value"),           # lora_bias=True, init_lora_weights="eva"
        (6, "peft-ignored"),         # ephemeral_gpu_offload, accepted and ignored
        (8, "peft-method"),          # get_model_status
        (10, "peft-value"),          # feedforward_modules not within target_modules
    }
    text = "\n".join(f.message for f in findings)
    assert "lora_bias=True" in text and "layer_replication" in text and "push_to_hub" not in text
    assert "r=8" not in text  # the refused value is named, not the whole call
    replication = next(f for f in findings if "layer_replication" in f.message)
    assert "peft's default" in replication.fix  # None is the unused value: removing it changes nothing
    severities = {f.code: f.severity for f in findings}
    assert severities["peft-ignored"] == "warning" and severities["peft-import-path"] == "info"


def test_support_is_read_from_deltatune_not_a_list(monkeypatch):
    """A name deltatune gains stops being a finding, with no table to update."""
    assert any("AutoPeftModelForCausalLM" in f.message for f in check_source(MIGRATING))
    monkeypatch.setattr(deltatune, "AutoPeftModelForCausalLM", deltatune.PeftModel, raising=False)
    assert not any("AutoPeftModelForCausalLM" in f.message for f in check_source(MIGRATING))


def test_notebook_cells_share_names_and_skip_magics(tmp_path):
    cells = [{"cell_type": "markdown", "source": ["from peft import Nothing"]},
             {"cell_type": "code", "source": ["!pip install peft\n", "from peft import LoraConfig\n"]},
             {"cell_type": "code", "source": "%time x = 1\nc = LoraConfig(r=4, layer_replication=[[0, 1]])\n"},
             {"cell_type": "code", "source": "def broken(:\n"}]
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps({"cells": cells, "nbformat": 4}))
    findings = check_file(path)
    assert [(f.cell, f.line, f.code) for f in findings] == [(2, 2, "peft-keyword"), (3, 1, "parse")]
    assert findings[0].message.startswith("cell 2, line 2:")


def test_readme_snippets_run_after_the_import_change():
    """The README's (and the docs') snippets, with ``deltatune`` read as ``peft``: nothing they use is missing."""
    blocks = [b for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))] for b in _python_blocks(path)]
    assert len(_python_blocks(ROOT / "README.md")) >= 1 and len(blocks) >= 5
    used = 0
    for block in blocks:
        assert check_source(block) == []  # as written they import deltatune, not peft
        as_peft = block.replace("deltatune", "peft")
        assert check_source(as_peft) == [], as_peft
        used += len(peft_imports(as_peft))
    assert used >= 10


def test_overview_copy_is_current():
    if not OVERVIEW.exists():
        pytest.skip(f"{OVERVIEW} is not on this machine")
    assert _python_blocks(OVERVIEW) == OVERVIEW_SNIPPETS


@pytest.mark.parametrize("index", range(len(OVERVIEW_SNIPPETS)))
def test_overview_snippets_have_no_findings(index):
    assert check_source(OVERVIEW_SNIPPETS[index]) == []


def test_overview_as_one_script_checks_every_peft_use():
    """Joined, the snippets' variables flow (model from get_peft_model, then its methods) and every
    peft name they use is one deltatune has; adding a peft-only option makes a finding."""
    script = "\n".join(OVERVIEW_SNIPPETS)
    assert check_source(script) == []
    assert {name for _, _, name in peft_imports(script)} == {
        "peft.LoraConfig", "peft.get_peft_model", "peft.TaskType", "peft.PeftModel", "peft.PromptTuningConfig",
        "peft.PromptTuningInit"}
    changed = script.replace("use_dora=True,", "use_dora=True, layer_replication=[[0, 1]],")
    (finding,) = check_source(changed)
    assert finding.code == "peft-keyword" and "layer_replication" in finding.message
    assert script.splitlines()[finding.line - 1].startswith("config = LoraConfig(r=16")


def test_cli_hookup_prints_findings_and_exit_code(tmp_path, capsys):
    clean, bad = tmp_path / "clean.py", tmp_path / "bad.py"
    clean.write_text(OVERVIEW_SNIPPETS[0])
    bad.write_text(MIGRATING)
    parser = argparse.ArgumentParser()
    add_peft_compat_arguments(parser)
    assert run_peft_compat(parser.parse_args(["--peft-compat", str(clean)])) == 0
    assert "no known problems found" in capsys.readouterr().out
    assert run_peft_compat(parser.parse_args(["--peft-compat", str(clean), str(bad)])) == 1
    out = capsys.readouterr().out
    assert f"{bad}:" in out and "line 8: model.get_model_status" in out


def test_cli_doctor_peft_compat(tmp_path, capsys):
    """`deltatune doctor --peft-compat FILE`: the findings with their lines, exit 1 on an error; 0 for a
    script deltatune runs as it is."""
    from deltatune.cli import main

    bad = tmp_path / "train.py"
    bad.write_text("from peft import LoraConfig\nconfig = LoraConfig(r=8,\n    lora_bias=True, use_dora=True)\n")
    assert main(["doctor", "--peft-compat", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "line 3" in out and "lora_bias" in out  # the keyword's own line
    good = tmp_path / "ok.py"
    good.write_text("from peft import LoraConfig, get_peft_model\nconfig = LoraConfig(r=8, lora_alpha=16)\n")
    assert main(["doctor", "--peft-compat", str(good)]) == 0
