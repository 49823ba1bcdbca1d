"""A style LoRA on a tiny diffusion model, end to end on CPU, with nothing downloaded.

1. A small denoising UNet (diffusers ``UNet2DModel`` + ``DDPMScheduler``) learns the 8x8
   handwritten digits scikit-learn ships, digits 0-4 only.
2. A LoRA (rank 4 on attention and the resnets' first convolution, 4.2% of the parameters) learns a "style"
   the base never saw: digits 5-9. Only the adapter trains; the base stays frozen.
3. A small classifier (logistic regression on the 64 pixels, trained on real digits 0-9)
   measures which share of generated samples are 5-9, for the base, base + LoRA and the LoRA
   merged into the UNet. A PNG grid shows samples of each; the adapter is written as a
   diffusers LoRA file (``deltatune info`` reads it; diffusers' ``load_lora_adapter`` too).

    python examples/diffusion_digits.py                      # ~4 min of CPU time (1 thread)
    python examples/diffusion_digits.py --base-steps 400 --lora-steps 200 --samples 64   # quick look

An example script, not ``deltatune train --task diffusion``: ``deltatune train`` is built around
causal-LM batches (JSONL text, tokenizers, next-token loss); a diffusion run needs a noise
schedule, an image dataset and a sampler, and the whole loop fits in one readable screen here.
The library part a user needs is ``get_peft_model`` + ``deltatune.diffusion``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from deltatune import LoraConfig, get_peft_model  # noqa: E402
from deltatune.diffusion import save_lora_weights  # noqa: E402

NEW_STYLE = (5, 6, 7, 8, 9)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-steps", type=int, default=800, help="base training steps on digits 0-4")
    p.add_argument("--lora-steps", type=int, default=400, help="LoRA training steps on digits 5-9")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--r", type=int, default=4, help="LoRA rank (4: 4.2%% of the parameters)")
    p.add_argument("--samples", type=int, default=256, help="samples drawn per model for the classifier")
    p.add_argument("--sample-steps", type=int, default=40, help="DDPM denoising steps when sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: these tensors are tiny; more threads only contend on a shared CPU)")
    p.add_argument("--out", default="runs/diffusion_digits", help="grid, results.json, the LoRA file")
    return p.parse_args()


def digits():
    """(images in [-1, 1] as (N, 1, 8, 8) float32, labels) from sklearn's 8x8 digits (0..16 ink)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0     # (N, 1, 8, 8)
    return x, torch.tensor(data.target)


def make_unet():
    """A ~0.7M-parameter UNet: 8x8 -> 4x4, self-attention at 4x4."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=16,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def train(model, scheduler, images: torch.Tensor, steps: int, lr: float, batch: int, desc: str) -> float:
    """Denoising training (predict the added noise, MSE); returns the last 100 steps' mean loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    losses = []
    for _ in (bar := tqdm(range(steps), desc=desc, mininterval=2)):
        x0 = images[torch.randint(len(images), (batch,))]
        noise = torch.randn_like(x0)
        t = torch.randint(scheduler.config.num_train_timesteps, (batch,))
        loss = F.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
    model.eval()
    return float(np.mean(losses[-100:]))


@torch.no_grad()
def sample(model, scheduler, n: int, steps: int, seed: int) -> torch.Tensor:
    """``n`` DDPM samples in [-1, 1], (n, 1, 8, 8); the same seed gives the same noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x, generator=g).prev_sample
    return x.clamp(-1, 1)


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """Samples back to sklearn's scale (0..16 ink), flattened to 64 features."""
    return ((x + 1.0) * 8.0).reshape(len(x), -1).numpy()


def grid_png(rows: list[tuple[str, torch.Tensor]], path: Path, per_row: int = 16, scale: int = 4) -> None:
    """One band of ``per_row`` samples per model, labels on the left, upscaled for viewing."""
    from PIL import Image, ImageDraw

    cell, label_w = 8 * scale + 2, 110
    img = Image.new("L", (label_w + per_row * cell, len(rows) * cell + 2), 255)
    draw = ImageDraw.Draw(img)
    for i, (label, x) in enumerate(rows):
        draw.text((4, i * cell + cell // 3), label, fill=0)
        for j in range(min(per_row, len(x))):
            pixels = ((1.0 - (x[j, 0] + 1.0) / 2.0) * 255).clamp(0, 255).byte().numpy()   # ink dark
            tile = Image.fromarray(pixels).resize((8 * scale, 8 * scale), Image.NEAREST)
            img.paste(tile, (label_w + j * cell + 1, i * cell + 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def main() -> None:
    from diffusers import DDPMScheduler
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    out = Path(args.out)
    images, labels = digits()
    new = torch.isin(labels, torch.tensor(NEW_STYLE))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")

    xtr, xte, ytr, yte = train_test_split(to_pixels(images), labels.numpy(), test_size=0.25,
                                          random_state=args.seed, stratify=labels.numpy())
    clf = LogisticRegression(max_iter=3000).fit(xtr, ytr)
    clf_acc = float(clf.score(xte, yte))

    def share_new(x: torch.Tensor) -> float:
        return float(np.isin(clf.predict(to_pixels(x)), NEW_STYLE).mean())

    unet = make_unet()
    base_loss = train(unet, scheduler, images[~new], args.base_steps, 2e-3, args.batch, "base on 0-4")
    base_s = sample(unet, scheduler, args.samples, args.sample_steps, args.seed + 1)

    config = LoraConfig(r=args.r, lora_alpha=2 * args.r, init_lora_weights="gaussian",
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"])
    model = get_peft_model(unet, config)
    trainable, total = model.get_nb_trainable_parameters()
    lora_loss = train(model, scheduler, images[new], args.lora_steps, 5e-3, args.batch, "LoRA on 5-9")
    lora_s = sample(model, scheduler, args.samples, args.sample_steps, args.seed + 1)
    with model.disable_adapter():
        base_again = sample(model, scheduler, args.samples, args.sample_steps, args.seed + 1)
    lora_file = save_lora_weights(model, out)
    merged = model.merge_and_unload()
    merged_s = sample(merged, scheduler, args.samples, args.sample_steps, args.seed + 1)

    results = {
        "classifier_test_accuracy": clf_acc,
        "share_new_style": {"real 0-4": share_new(images[~new]), "real 5-9": share_new(images[new]),
                            "base": share_new(base_s), "base + LoRA": share_new(lora_s),
                            "merged": share_new(merged_s), "adapter disabled": share_new(base_again)},
        "max_abs_diff_merged_vs_lora_samples": float((merged_s - lora_s).abs().max()),
        "trainable_parameters": trainable, "total_parameters": total,
        "trainable_percent": 100.0 * trainable / total,
        "final_loss": {"base": base_loss, "lora": lora_loss},
        "samples_per_model": args.samples, "base_steps": args.base_steps, "lora_steps": args.lora_steps,
        "lora_file": str(lora_file), "seconds": time.perf_counter() - start,
        "load_average_at_end": os.getloadavg(), "torch_threads": args.threads,
    }
    grid_png([("base (0-4)", base_s), ("base + LoRA", lora_s), ("merged", merged_s)], out / "samples.png")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
