"""The tiny served world of the serving tests: a random Llama with a word-level tokenizer and a chat
template, LoRA adapters written by deltatune, ``deltatune serve`` in a subprocess, and the reference
every greedy answer is held to (the same prompt decoded alone through ``PeftModel``).

One server per test session (fixture ``serving``): test_serving_http.py, test_serving_load.py and
test_serving_browser.py all talk to it. This is a plain module (imported as ``tests.serving_fixtures``
by all three), so the server started by the first is the one the others get.
"""
from __future__ import annotations

import atexit
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
import torch

from deltatune import LoraConfig, PeftModel, get_peft_model, models

KEY = "sk-test-key"
CHAT_TEMPLATE = ("{% for m in messages %}w10 {{ m['content'] }} w11 {% endfor %}"
                 "{% if add_generation_prompt %}w12{% endif %}")
EOS, SPECIAL = 2, {0, 1, 2}  # </s> ends a completion; <unk>, <pad>, </s> are not in decoded text
CONTEXT = 256


def tiny_tokenizer():
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Special tokens must not be prefixes of words: an added token "w1" would split "w10" in two.
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_base(directory: Path, hidden: int = 32, seed: int = 0) -> Path:
    """A 2-layer random Llama (context ``CONTEXT``) with the word-level tokenizer, saved to ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                      bos_token_id=1, eos_token_id=EOS)
    LlamaForCausalLM(cfg).eval().save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


ADAPTER_SPECS = [dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                 dict(r=8, lora_alpha=8, target_modules=["o_proj", "up_proj", "down_proj"]),
                 dict(r=2, lora_alpha=4, target_modules=["k_proj", "gate_proj"])]


def make_adapter(base: Path, directory: Path, seed: int, **spec) -> Path:
    """A LoRA adapter on ``base`` with random, non-zero factors (a stand-in for a trained one)."""
    spec = spec or ADAPTER_SPECS[seed % len(ADAPTER_SPECS)]
    torch.manual_seed(1000 + seed)
    with warnings.catch_warnings():  # the doctor's advice on tiny ranks and q/v-only targets
        warnings.simplefilter("ignore")
        model = get_peft_model(models.load(base), LoraConfig(init_lora_weights=False, **spec))
    with torch.no_grad():  # large enough that each adapter's greedy answer differs from the base's
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(3.0)
    model.save_pretrained(directory)
    return directory


class Server:
    """``deltatune serve`` in a subprocess on a free loopback port (``--port 0``; the server prints it)."""

    def __init__(self, base: Path, *args: str, log: Path, timeout: float = 90.0) -> None:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
        self.log = log
        self._err = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "deltatune", "serve", "--model", str(base),
                                      "--host", "127.0.0.1", "--port", "0", "--log-level", "warning", *args],
                                     stdout=subprocess.PIPE, stderr=self._err, text=True, env=env)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"server did not start in {timeout} s:\n{log.read_text()}") from None
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                self.url = match.group(1)
                break
        while httpx.get(f"{self.url}/health", timeout=10).status_code != 200:  # uvicorn up: the app answers
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()

    def metrics(self) -> dict[str, float]:
        from deltatune.serving.metrics import parse_text

        return parse_text(httpx.get(f"{self.url}/metrics", timeout=10).text)


def ids_of(text: str) -> list[int]:
    """Token ids of a decoded answer (the word-level tokenizer is invertible: ``w17`` is id 17)."""
    return [int(word[1:]) for word in text.split()]


def alone(base: Path, adapter: Path | None, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy decoding of one prompt by itself through ``PeftModel`` (no batch, no cache): the new
    token ids up to eos, and at each step the gap between the two highest logits."""
    model = _model(base, adapter)
    ids, new, gaps = list(prompt_ids), [], []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            top = logits.topk(2).values
            gaps.append(float(top[0] - top[1]))
            token = int(logits.argmax())
            if token == EOS:
                break
            new.append(token)
            ids.append(token)
    return new, gaps


_models: dict = {}


def _model(base: Path, adapter: Path | None):
    key = (str(base), str(adapter), adapter.stat().st_mtime_ns if adapter else 0)
    if key not in _models:
        model = models.load(base)
        _models[key] = (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()
    return _models[key]


def assert_same_greedy(text: str, expected: tuple[list[int], list[float]], tol: float = 1e-4) -> None:
    """The server's greedy ``text`` equals the alone run's tokens; a first difference is allowed only
    at a step where the alone run's two best logits were within ``tol`` (a near tie that a different
    order of float sums in a batch may flip)."""
    got = ids_of(text)
    new, gaps = expected
    want = [t for t in new if t not in SPECIAL]
    if got == want:
        return
    step = next(i for i, (a, b) in enumerate(zip(got + [None], want + [None])) if a != b)
    assert step < len(gaps) and gaps[step] < tol, (
        f"answer differs from the request alone at token {step} where the alone run's top-2 logit gap "
        f"was {gaps[step] if step < len(gaps) else None}: got {got}, alone {want}")


def sse_events(response: httpx.Response) -> list:
    """The ``data:`` payloads of a server-sent event stream (JSON decoded; ``[DONE]`` kept as text)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected line in the event stream: {line!r}"
    return events


# -- the server all three serving test modules talk to (one start: ~10 s) ----------------------------

SERVED = list("abcdefgh")  # 8 adapters served from the start, plus "gone" (the load test unloads it)
BASE_NAME = "tiny-base"    # --served-model-name
MAX_WAITING = 48           # 32 running + 48 waiting: the load test's 71 requests fit, the queue test fills it


_shared: dict = {}  # the one server of the test session, started by whichever module asks first


@pytest.fixture(scope="session")
def serving(tmp_path_factory):
    """``deltatune serve`` on a tiny base with adapters ``a``..``h`` and ``gone`` (ranks 2-8), an API key,
    ``--max-lora-rank 16``; ``paths`` also holds adapters not served at start (``x``, ``h2``) and bad
    ones (``big``: rank 32, ``foreign``: another base's shapes, ``corrupt``: not safetensors).

    Each module importing this fixture gets its own definition from pytest (and its own teardown),
    so the server lives in this module's ``_shared`` and stops when the test process exits: one start
    per session."""
    if not _shared:
        _shared.update(_start_server(tmp_path_factory.mktemp("serve")))
        atexit.register(_shared["server"].stop)
    return _shared


def _start_server(root: Path) -> dict:
    base = make_base(root / "base")
    names = SERVED + ["x", "h2", "gone"]
    paths = {name: make_adapter(base, root / name, seed) for seed, name in enumerate(names)}
    paths["big"] = make_adapter(base, root / "big", 9, r=32, lora_alpha=32, target_modules=["q_proj"])
    paths["foreign"] = make_adapter(make_base(root / "other-base", hidden=48), root / "foreign", 5)
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((paths["a"] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    paths["corrupt"] = corrupt
    adapters = [arg for name in SERVED + ["gone"] for arg in ("--adapter", f"{name}={paths[name]}")]
    server = Server(base, *adapters, "--api-key", KEY, "--served-model-name", BASE_NAME, "--max-lora-rank", "16",
                    "--max-num-seqs", "32", "--max-waiting", str(MAX_WAITING), "--max-loras", "8",
                    "--enable-lora-loading", "--lora-root", str(root), log=root / "server.log")
    return dict(base=base, paths=paths, server=server, url=server.url)
