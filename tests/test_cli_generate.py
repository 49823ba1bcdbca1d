"""`deltatune generate`: one batch whose rows use different adapters (or the base), from the command line.

Every row of the CLI's batch must give what its adapter gives on that prompt alone (greedy, no
padding), so the checks below compare against separate single-prompt runs.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltatune import LoraConfig, PeftModel, get_peft_model, models
from deltatune.cli import main
from deltatune.training.evaluate import stop_token_ids
from tests.test_cli import base_dir  # noqa: F401  (fixture: tiny Llama + word-level tokenizer directory)

PROMPTS = ["w5 w9 w17 w33", "w3 w4", "w60 w7 w7"]  # different lengths: rows are left-padded
N = 8  # new tokens


@pytest.fixture
def adapters(tmp_path, base_dir):  # noqa: F811
    """Two LoRA adapters with random (non-zero) factors, different ranks and target sets."""
    specs = {"a": (1, dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])),
             "b": (2, dict(r=8, lora_alpha=8, target_modules=["o_proj", "up_proj"]))}
    out = {}
    for name, (seed, kw) in specs.items():
        torch.manual_seed(seed)
        model = get_peft_model(models.load(base_dir), LoraConfig(init_lora_weights=False, **kw))
        model.save_pretrained(tmp_path / name)
        out[name] = tmp_path / name
    return out


def alone(base_dir, adapter, prompt: str, max_new_tokens: int = N) -> str:  # noqa: F811
    """Greedy completion of one prompt, no batch, no padding: the base with ``adapter`` (or None)."""
    tokenizer = models.load_tokenizer(base_dir)
    model = models.load(base_dir)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    stops = stop_token_ids(tokenizer, model)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    cut = next((k for k, t in enumerate(new) if t in stops), len(new))
    return tokenizer.decode(new[:cut], skip_special_tokens=True)


def run_json(capsys, *args) -> list[dict]:
    assert main(["generate", "--dtype", "float32", "--max-new-tokens", str(N), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def adapter_args(adapters) -> list[str]:
    return [arg for name, path in adapters.items() for arg in ("--adapter", f"{name}={path}")]


def prompt_args(prompts) -> list[str]:
    return [arg for p in prompts for arg in ("--prompt", p)]


def error_of(capsys, *args) -> str:
    """Run the verb expecting a usage error: exit code 2, nothing on stdout, stderr ending in ``error: ...``
    (after the progress bars of whatever loaded first). Returns that last line."""
    capsys.readouterr()  # drop what the fixtures printed
    assert main(["generate", "--dtype", "float32", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("error: "), captured.err
    return last


# -- rows run alone vs in one batch (single adapter / base: the plain path) ---------------------------

def test_one_adapter_serves_every_prompt(capsys, base_dir, adapters):  # noqa: F811
    rows = run_json(capsys, "--base", str(base_dir), "--adapter", f"a={adapters['a']}", *prompt_args(PROMPTS))
    assert [r["adapter"] for r in rows] == ["a"] * 3
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["completion"] for r in rows] == [alone(base_dir, adapters["a"], p) for p in PROMPTS]


def test_no_adapter_is_the_base(capsys, base_dir):  # noqa: F811
    rows = run_json(capsys, "--base", str(base_dir), *prompt_args(PROMPTS[:2]))
    assert [r["adapter"] for r in rows] == ["__base__"] * 2
    assert [r["completion"] for r in rows] == [alone(base_dir, None, p) for p in PROMPTS[:2]]


def test_all_rows_on_base_with_adapters_loaded(capsys, base_dir, adapters):  # noqa: F811
    rows = run_json(capsys, "--base", str(base_dir), *adapter_args(adapters), *prompt_args(PROMPTS[:2]),
                    "--use", "__base__", "--use", "__base__")
    assert [r["completion"] for r in rows] == [alone(base_dir, None, p) for p in PROMPTS[:2]]


def test_bare_adapter_dir_and_model_flag_still_work(capsys, base_dir, adapters):  # noqa: F811
    """The single-adapter form of the earlier `generate` verb: --model DIR --adapter DIR."""
    rows = run_json(capsys, "--model", str(base_dir), "--adapter", str(adapters["b"]), "--prompt", PROMPTS[0])
    expected = alone(base_dir, adapters["b"], PROMPTS[0])
    assert rows == [{"adapter": "default", "prompt": PROMPTS[0], "completion": expected}]


def test_prompts_from_stdin(capsys, monkeypatch, base_dir):  # noqa: F811
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n"))
    rows = run_json(capsys, "--base", str(base_dir))
    assert [r["prompt"] for r in rows] == PROMPTS[:2]


def test_chat_template_by_default_and_no_chat(tmp_path, capsys, base_dir):  # noqa: F811
    chat_base = tmp_path / "chat-base"
    models.load(base_dir).save_pretrained(chat_base)
    tokenizer = models.load_tokenizer(base_dir)
    tokenizer.chat_template = ("{% for m in messages %}w10 {{ m['content'] }} w11 {% endfor %}"
                               "{% if add_generation_prompt %}w12{% endif %}")
    tokenizer.save_pretrained(chat_base)
    templated = run_json(capsys, "--base", str(chat_base), "--prompt", "w5 w9")
    raw = run_json(capsys, "--base", str(chat_base), "--no-chat", "--prompt", "w10 w5 w9 w11 w12")
    assert templated[0]["completion"] == raw[0]["completion"] == alone(chat_base, None, "w10 w5 w9 w11 w12")
    with_system = run_json(capsys, "--base", str(chat_base), "--system", "w20", "--prompt", "w5 w9")
    assert with_system[0]["completion"] == alone(chat_base, None, "w10 w20 w11 w10 w5 w9 w11 w12")


def test_sampling_is_reproducible_with_a_seed(capsys, base_dir, adapters):  # noqa: F811
    args = ["--base", str(base_dir), "--adapter", f"a={adapters['a']}", *prompt_args(PROMPTS),
            "--temperature", "1.5", "--top-p", "0.95", "--seed", "7"]
    first, second = run_json(capsys, *args), run_json(capsys, *args)
    assert first == second
    assert all(r["completion"] for r in first)


def test_text_output_names_adapter_prompt_and_completion(capsys, base_dir, adapters):  # noqa: F811
    assert main(["generate", "--base", str(base_dir), "--dtype", "float32", "--max-new-tokens", str(N),
                 "--adapter", f"a={adapters['a']}", "--prompt", PROMPTS[0]]) == 0
    out = capsys.readouterr().out
    expected = alone(base_dir, adapters["a"], PROMPTS[0])
    assert out == f"[1] adapter: a\nprompt:     {PROMPTS[0]}\ncompletion: {expected}\n\n"


# -- mixed batches (need PeftModel.generate(adapter_names=...), issue 15) -----------------------------

def test_each_row_of_a_mixed_batch_equals_its_adapter_alone(capsys, base_dir, adapters):  # noqa: F811
    rows = run_json(capsys, "--base", str(base_dir), *adapter_args(adapters), *prompt_args(PROMPTS),
                    "--use", "a", "--use", "b", "--use", "__base__")
    assert [r["adapter"] for r in rows] == ["a", "b", "__base__"]
    assert [r["completion"] for r in rows] == [alone(base_dir, adapters["a"], PROMPTS[0]),
                                               alone(base_dir, adapters["b"], PROMPTS[1]),
                                               alone(base_dir, None, PROMPTS[2])]


def test_same_prompt_on_every_adapter_differs_per_row(capsys, base_dir, adapters):  # noqa: F811
    """One prompt three times: the rows differ only by adapter, so their completions must differ."""
    p = PROMPTS[0]
    rows = run_json(capsys, "--base", str(base_dir), *adapter_args(adapters), *prompt_args([p, p, p, p]),
                    "--use", "b", "--use", "__base__", "--use", "a", "--use", "b")
    got = [r["completion"] for r in rows]
    expected = {name: alone(base_dir, adapters.get(name), p) for name in ("a", "b", "__base__")}
    assert len(set(expected.values())) == 3, "the adapters should change this prompt's completion"
    assert got == [expected["b"], expected["__base__"], expected["a"], expected["b"]]


def test_default_pairing_prompt_i_uses_adapter_i(capsys, base_dir, adapters):  # noqa: F811
    rows = run_json(capsys, "--base", str(base_dir), *adapter_args(adapters), *prompt_args(PROMPTS[:2]))
    assert [r["adapter"] for r in rows] == ["a", "b"]
    assert [r["completion"] for r in rows] == [alone(base_dir, adapters["a"], PROMPTS[0]),
                                               alone(base_dir, adapters["b"], PROMPTS[1])]


def test_console_script_runs_a_mixed_batch(tmp_path, base_dir, adapters):  # noqa: F811
    """The installed `deltatune` command, in a fresh process."""
    script = Path(sys.executable).parent / "deltatune"
    assert script.is_file(), f"{script}: the console script is not installed (pip install -e .)"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([str(script), "generate", "--base", str(base_dir), "--dtype", "float32",
                           *adapter_args(adapters), *prompt_args(PROMPTS[:2]), "--use", "b", "--use", "a",
                           "--max-new-tokens", str(N), "--json"],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert [(r["adapter"], r["completion"]) for r in rows] == [("b", alone(base_dir, adapters["b"], PROMPTS[0])),
                                                               ("a", alone(base_dir, adapters["a"], PROMPTS[1]))]


# -- errors: exit code 2 and a message naming the problem ---------------------------------------------

def test_adapter_not_name_equals_dir(capsys, base_dir, tmp_path):  # noqa: F811
    err = error_of(capsys, "--base", str(base_dir), "--adapter", str(tmp_path / "nowhere"), "--prompt", "w5")
    assert "expected NAME=DIR" in err and "nowhere" in err
    assert "expected NAME=DIR" in error_of(capsys, "--base", str(base_dir), "--adapter", "a=", "--prompt", "w5")
    assert "expected NAME=DIR" in error_of(capsys, "--base", str(base_dir), "--adapter", "=x", "--prompt", "w5")


def test_duplicate_adapter_names(capsys, base_dir, adapters):  # noqa: F811
    err = error_of(capsys, "--base", str(base_dir), "--adapter", f"a={adapters['a']}",
                   "--adapter", f"a={adapters['b']}", "--prompt", "w5")
    assert "duplicate adapter name 'a'" in err
    err = error_of(capsys, "--base", str(base_dir), "--adapter", str(adapters["a"]),
                   "--adapter", f"default={adapters['b']}", "--prompt", "w5")
    assert "duplicate adapter name 'default'" in err and "bare --adapter DIR" in err


def test_reserved_base_name(capsys, base_dir, adapters):  # noqa: F811
    err = error_of(capsys, "--base", str(base_dir), "--adapter", f"__base__={adapters['a']}", "--prompt", "w5")
    assert "'__base__' is reserved" in err


def test_directory_that_is_not_an_adapter(capsys, base_dir, adapters, tmp_path):  # noqa: F811
    empty = tmp_path / "empty"
    empty.mkdir()
    err = error_of(capsys, "--base", str(base_dir), "--adapter", f"a={adapters['a']}", "--adapter", f"b={empty}",
                   "--prompt", "w5", "--prompt", "w6")
    assert f"--adapter b={empty}: " in err and "adapter_config.json: not found" in err
    err = error_of(capsys, "--base", str(base_dir), "--adapter", f"a={tmp_path / 'missing'}", "--prompt", "w5")
    assert "--adapter a=" in err and "missing" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text((adapters["a"] / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(
        (adapters["a"] / "adapter_model.safetensors").read_bytes()[:100])  # truncated
    err = error_of(capsys, "--base", str(base_dir), "--adapter", f"a={broken}", "--prompt", "w5")
    assert f"--adapter a={broken}: " in err and "adapter_model.safetensors" in err


def test_use_names_an_unknown_adapter(capsys, base_dir, adapters):  # noqa: F811
    err = error_of(capsys, "--base", str(base_dir), *adapter_args(adapters), "--prompt", "w5", "--use", "c")
    assert "--use 'c': no such adapter; known: a, b, __base__" in err
    err = error_of(capsys, "--base", str(base_dir), "--prompt", "w5", "--use", "a")
    assert "known: __base__" in err


def test_count_mismatches(capsys, base_dir, adapters):  # noqa: F811
    err = error_of(capsys, "--base", str(base_dir), *adapter_args(adapters), *prompt_args(PROMPTS))
    assert "3 prompt(s) and 2 adapters" in err and "--use" in err
    err = error_of(capsys, "--base", str(base_dir), *adapter_args(adapters), *prompt_args(PROMPTS),
                   "--use", "a", "--use", "b")
    assert "2 --use for 3 prompt(s)" in err


def test_no_prompt(capsys, monkeypatch, base_dir):  # noqa: F811
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert "no prompt" in error_of(capsys, "--base", str(base_dir))


def test_bad_sampling_and_chat_flags(capsys, base_dir):  # noqa: F811
    base = ["--base", str(base_dir), "--prompt", "w5"]
    assert "--temperature -1.0" in error_of(capsys, *base, "--temperature", "-1")
    assert "--top-p 1.5" in error_of(capsys, *base, "--temperature", "1", "--top-p", "1.5")
    assert "--top-p applies when sampling" in error_of(capsys, *base, "--top-p", "0.9")
    assert "--max-new-tokens 0" in error_of(capsys, *base, "--max-new-tokens", "0")
    assert "no chat template" in error_of(capsys, *base, "--chat")  # the tiny tokenizer has none
