"""benchmarks/peft_suite.py: its ``peft`` shim answers with deltatune, and its figures are counted right."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import peft_suite  # noqa: E402

pytest.importorskip("peft")

PROBE = """
import deltatune, peft
from peft import LoraConfig, VeraConfig, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.import_utils import is_transformers_ge_v5
from peft.utils import infer_device
assert peft.__file__.startswith(SHIM), peft.__file__
assert LoraConfig is deltatune.LoraConfig and get_peft_model_state_dict is deltatune.get_peft_model_state_dict
config = VeraConfig(r=2)           # building a missing config works (test modules do it at import) ...
try:
    config.peft_type               # ... using it names what deltatune lacks
except NotImplementedError as exc:
    assert "deltatune has no peft.VeraConfig" in str(exc)
else:
    raise AssertionError("a missing name must refuse use")
assert isinstance(is_transformers_ge_v5, bool) and infer_device() in ("cpu", "cuda")
print("ok")
"""


def test_shim_resolves_to_deltatune(tmp_path):
    shim = peft_suite.write_shim(tmp_path / "shim")
    code = f"SHIM = {str(shim)!r}\n" + PROBE
    env = {"PYTHONPATH": f"{shim}:{ROOT}", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_compare_counts_only_tests_peft_passes():
    theirs = {"a": ("passed", ""), "b": ("passed", ""), "c": ("passed", ""), "d": ("failed", "x")}
    ours = {"a": ("passed", ""), "b": ("failed", "NotImplementedError: deltatune has no peft.VeraConfig"),
            "d": ("passed", "")}
    result = peft_suite.compare(theirs, ours)
    assert result["peft_passed"] == 3 and result["deltatune_passed_of_those"] == 1
    assert result["pass_ratio"] == round(1 / 3, 4) and result["deltatune_passed_but_peft_not"] == 1
    assert dict(result["missing_peft_names"]) == {"peft.VeraConfig": 1}
    assert peft_suite.cause("shape (3, 4) vs 'q_proj'") == "shape (N, N) vs '…'"


@pytest.mark.parametrize("test_id, kind", [
    ("tests/test_custom_models.py::TestPeftCustomModel::test_forward[Vanilla MLP 1 LoRA-MLP-LoraConfig]", "claimed"),
    ("tests/test_custom_models.py::TestPeftCustomModel::test_forward[Vanilla MLP 1 LOKR-MLP-LoKrConfig]", "other"),
    ("tests.test_config.TestPeftConfig::test_methods[RandLoraConfig]", "other"),
    ("tests.test_config.TestPeftConfig::test_methods[MiSSConfig]", "other"),
    ("tests.test_low_level_api.TestInject::test_inject_from_state_dict_missing_keys_warning", "unnamed"),
    ("tests.test_x::test_average_prompt_tuning", "claimed"),
])
def test_selection_by_method_named_in_the_test_id(test_id, kind):
    assert peft_suite.kind_of(test_id) == kind
