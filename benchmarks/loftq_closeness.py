"""How close the untuned QLoRA and LoftQ (1 iteration) models are to the dense model, on the demo.

Side check for benchmarks/qlora_accuracy.py: logits on the first N held-out examples (all
tokens), L2 distance and KL(dense || model) summed over examples, for the NF4 base with LoRA at
zero and with the LoftQ start (r=16, alpha=32, every linear layer, fp32).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loftq_closeness.py [--examples 4]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import deltatune  # noqa: E402
from deltatune import LoftQConfig, LoraConfig, get_peft_model, models  # noqa: E402
from deltatune.training.data import load_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=4)
    args = ap.parse_args()
    ds = load_dataset(str(ROOT / "data" / "demo_eval.jsonl"), models.load_tokenizer("default"), max_length=512)
    ids = [torch.tensor(e.input_ids)[None] for e in ds.examples[:args.examples]]

    def logits(model):
        with torch.no_grad():
            return [model(i).logits.float() for i in ids]

    dense = logits(models.load("default").eval())
    cfg = dict(r=16, lora_alpha=32, target_modules="all-linear")
    nf4 = logits(get_peft_model(deltatune.quantize(models.load("default")), LoraConfig(**cfg)).eval())
    t = time.perf_counter()
    loftq_model = get_peft_model(models.load("default"), LoraConfig(**cfg, init_lora_weights="loftq",
                                                                    loftq_config=LoftQConfig(loftq_iter=1))).eval()
    print(f"LoftQ (1 iteration) initialisation: {time.perf_counter() - t:.0f} s", flush=True)
    loftq = logits(loftq_model)

    def l2(out):
        return sum(((x - d) ** 2).sum().item() for x, d in zip(out, dense)) ** 0.5

    def kl(out):
        return sum(torch.nn.functional.kl_div(x.log_softmax(-1), d.log_softmax(-1), log_target=True,
                                              reduction="batchmean").item() for x, d in zip(out, dense))

    print(f"logit L2 distance to dense: nf4 {l2(nf4):.0f}, loftq1 {l2(loftq):.0f}")
    print(f"KL(dense || model), summed: nf4 {kl(nf4):.1f}, loftq1 {kl(loftq):.1f}")


if __name__ == "__main__":
    main()
