"""Serve prompt tuning, P-tuning and prefix tuning adapters beside a LoRA adapter and the base, in
one batch, on the default model (SmolLM2-135M-Instruct), and check every row against
``PeftModel.generate`` for its adapter alone (greedy, token for token).

    python examples/serve_virtual_tokens.py

The adapters are untrained (prompt tuning starts from a text, the others from random values): the
point is that the engine's rows are exactly what each adapter gives alone, not what they say.
Prints each adapter's load time, each row's answer and whether it equals ``generate``'s; exits 1
if one does not.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import deltatune  # noqa: E402
from deltatune import LoraConfig, PeftModel, models  # noqa: E402
from deltatune.serving import Engine, SamplingParams  # noqa: E402

CONFIGS = {
    "prompt": lambda: deltatune.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20,
                                                   prompt_tuning_init="TEXT", tokenizer_name_or_path="default",
                                                   prompt_tuning_init_text="Answer only in French, briefly."),
    "ptuning": lambda: deltatune.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
    "prefix": lambda: deltatune.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
    "lora": lambda: LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
}
ROWS = [("The capital of France is", "prompt"), ("Write a haiku about the sea.", "ptuning"),
        ("2 + 2 =", "prefix"), ("List three colours:", "lora"), ("Hello,", None)]
MAX_TOKENS = 16


def alone(directory: Path, adapter: str | None, ids: torch.Tensor) -> list[int]:
    """``PeftModel.generate`` of one prompt for one adapter (eos does not stop it)."""
    model = models.load("default").eval()
    model.generation_config.eos_token_id = None
    if adapter is not None:
        model = PeftModel.from_pretrained(model, directory / adapter).eval()
    with torch.no_grad():
        return model.generate(input_ids=ids, max_new_tokens=MAX_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()


def main() -> int:
    directory = Path(tempfile.mkdtemp(prefix="virtual-tokens-"))
    for seed, (name, make) in enumerate(CONFIGS.items()):
        torch.manual_seed(seed)
        PeftModel(models.load("default"), make()).save_pretrained(directory / name)
    engine = Engine("default", max_num_seqs=8)
    for name in CONFIGS:
        start = time.perf_counter()
        engine.add_adapter(name, directory / name)
        print(f"loaded {name} in {time.perf_counter() - start:.2f} s")
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = engine.generate([p for p, _ in ROWS], adapter=[a for _, a in ROWS], sampling=greedy)
    same = 0
    for (prompt, adapter), out in zip(ROWS, outputs):
        ids = engine.tokenizer(prompt, return_tensors="pt")["input_ids"]
        equal = out.outputs[0].token_ids == alone(directory, adapter, ids)
        same += equal
        print(f"{adapter or 'base':8} {'equal' if equal else 'DIFFERS'}  {out.outputs[0].text!r}")
    print(f"{same}/{len(ROWS)} rows equal PeftModel.generate for their adapter alone")
    return 0 if same == len(ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
