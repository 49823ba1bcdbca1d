"""Shared pieces of the training tests: a byte-level ChatML tokenizer, a tiny Llama, JSONL files.

Nothing is downloaded: the tokenizer is built from the 256 byte symbols plus three specials.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tokenizer():
    """Byte-level BPE without merges: ids 0-2 are <|endoftext|>, <|im_start|>, <|im_end|> (eos)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(tmodels.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    return tok


def tiny_causal_lm(vocab_size: int, seed: int = 0, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=2, pad_token_id=0, bos_token_id=None, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def save_tiny_model(directory: Path, tied: bool = False) -> Path:
    """A tiny Llama + tokenizer as an ordinary transformers directory (what ``--model DIR`` reads);
    ``tied``: one matrix for the input embedding and the output head."""
    tok = make_tokenizer()
    tiny_causal_lm(len(tok), tied=tied).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """A toy extraction task: "ann is 42" -> "ann=42"."""
    rng = random.Random(seed)
    names = ["ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal"]
    rows = []
    for _ in range(n):
        name, age = rng.choice(names), rng.randint(10, 99)
        filler = " ok" * rng.randint(0, 6)  # varied lengths exercise packing
        rows.append({"messages": [{"role": "user", "content": f"{name} is {age}{filler}"},
                                  {"role": "assistant", "content": f"{name}={age}"}]})
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def run_cli(args: list[str], cwd: Path | None = None, timeout: int = 300, module: str = "deltatune",
            launcher: list[str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m <module> ...`` (or ``launcher + ...``) in a subprocess with the repo importable."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cmd = (launcher or [sys.executable, "-m", module]) + args
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                             f"stderr:\n{proc.stderr[-3000:]}")
    return proc


def cli_module() -> str:
    """``deltatune`` once cli.py registers the training verbs, else the training package's own entry."""
    import argparse

    from deltatune.cli import build_parser

    verbs = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return "deltatune" if verbs and "train" in verbs[0].choices else "deltatune.training"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine OpenMP barriers stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
