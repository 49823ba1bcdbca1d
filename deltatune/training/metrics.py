"""What a run reports: metrics log (JSONL + CSV), progress bar, loss-curve PNG.

Both log files are rewritten whole (atomically) at every record: they are small, and a killed run
never leaves a half line. A resumed run drops records past its checkpoint before appending.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from deltatune.checkpoint.io import atomic_path, atomic_write_text

_FIRST_COLUMNS = ("step", "epoch", "loss", "eval_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "elapsed_s")


class MetricsLog:
    """Records (dicts with a ``step``) mirrored to ``metrics.jsonl`` and ``metrics.csv`` in ``out``."""

    def __init__(self, out: str | Path | None, enabled: bool = True) -> None:
        self.out = Path(out) if out is not None else None
        self.enabled = enabled and out is not None
        self.records: list[dict] = []

    @property
    def jsonl_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def resume_from(self, step: int) -> None:
        """Load an earlier run's records up to and including ``step``."""
        if self.out is None or not self.jsonl_path.is_file():
            return
        for line in self.jsonl_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("step", 0) <= step:
                self.records.append(record)

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self.enabled:
            self._write()

    def _write(self) -> None:
        atomic_write_text(self.jsonl_path, "".join(json.dumps(r) + "\n" for r in self.records))
        columns = [c for c in _FIRST_COLUMNS if any(c in r for r in self.records)]
        columns += sorted({k for r in self.records for k in r} - set(columns))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.records)
        atomic_write_text(self.out / "metrics.csv", buf.getvalue())

    def series(self, key: str) -> tuple[list[int], list[float]]:
        rows = [(r["step"], r[key]) for r in self.records if r.get(key) is not None]
        return [s for s, _ in rows], [v for _, v in rows]


def plot_loss_curve(log: MetricsLog, path: str | Path, title: str = "training loss") -> Path | None:
    """Write the train (raw and smoothed) and eval loss against step as a PNG; None if no data."""
    steps, losses = log.series("loss")
    eval_steps, eval_losses = log.series("eval_loss")
    if not steps and not eval_steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if steps:
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train (per step)")
        ax.plot(steps, _ema(losses), color="tab:blue", linewidth=2, label="train (smoothed)")
    if eval_steps:
        ax.plot(eval_steps, eval_losses, "o-", color="tab:orange", label="eval")
    values = [v for v in losses + eval_losses if v > 0]
    if values and max(values) / min(values) > 20:
        ax.set_yscale("log")  # the interesting part of a fine-tuning curve is orders of magnitude down
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _ema(values: list[float]) -> list[float]:
    """Bias-corrected moving average (as in Adam) of log-loss, span ~ min(20, n/10) points.

    Averaging logs (a geometric mean) follows a loss that falls by orders of magnitude
    instead of trailing its first, largest values.
    """
    beta = 1 - 1 / max(2.0, min(20.0, len(values) / 10))
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * math.log(max(v, 1e-12))
        out.append(math.exp(avg / (1 - beta ** i)))
    return out


class Progress:
    """tqdm bar over optimizer steps showing loss, tokens/s and lr; tqdm adds the ETA."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train") -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                            smoothing=0.1)

    def update(self, loss: float, tokens_per_s: float, lr: float, mfu: float | None = None) -> None:
        if self.bar is None:
            return
        mfu_text = f" mfu={mfu:.1%}" if mfu is not None else ""
        self.bar.set_postfix_str(f"loss={loss:.4f} tok/s={tokens_per_s:,.0f}{mfu_text} lr={lr:.2e}", refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
