"""Tiny random models shared by the tests (built from configs: nothing is downloaded)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Training reports MFU against this machine's measured matmul peak, cached per machine. A peak
# measured while the suite loads the CPU would be low and would stay in the user's cache: tests use
# a fixed one (tests/test_flops.py measures the real thing into a temporary cache).
os.environ.setdefault("DELTATUNE_PEAK_GFLOPS", "1000")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402


def tiny_llama(seed: int = 0):
    """A 2-layer Llama (q/k/v/o/gate/up/down, tied=False) with a 128-token vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    """A 2-layer GPT-2 (Conv1D layers with biases)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0):
    """A 2-layer BERT sequence classifier (new ``classifier`` head, biases everywhere)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


class TinyConvNet(nn.Module):
    """Embedding + Conv2d + Linear: one module of each non-transformers type LoRA supports."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 12)
        self.conv = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.point = nn.Conv2d(4, 4, kernel_size=1)
        self.head = nn.Linear(4 * 12 * 6, 5)

    def forward(self, input_ids):
        h = self.embed(input_ids).unsqueeze(1)        # (B, 1, 6, 12)
        h = self.point(torch.relu(self.conv(h)))      # (B, 4, 6, 12)
        return self.head(h.flatten(1))                # (B, 5)


def tiny_convnet(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


def token_batch(vocab: int = 128, batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def logits_of(model, ids):
    out = model(input_ids=ids) if not isinstance(model, TinyConvNet) else model(ids)
    return out.logits if hasattr(out, "logits") else out


def train_steps(model, ids: torch.Tensor | None = None, steps: int = 6, lr: float = 2e-2) -> list[float]:
    """``steps`` AdamW steps of the LM loss on ``ids`` (default: a 4x12 batch) over the trainable
    parameters, in train mode; returns the losses."""
    ids = token_batch(batch=4, length=12) if ids is None else ids
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_file_crosses(source, directory, load, build, ids, atol: float = 1e-5):
    """Save ``source``'s adapter to ``directory``, load the file onto ``build()`` with ``load``
    (e.g. ``peft.PeftModel.from_pretrained``) and check both give the same logits on ``ids``.
    Returns the loaded model."""
    source.eval()
    source.save_pretrained(directory)
    loaded = load(build(), directory).eval()
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(source, ids), rtol=0, atol=atol)
    return loaded


def perturb_trainable(model, seed: int = 123, scale: float = 0.05) -> None:
    """Stand-in for training: move every trainable tensor so saved files carry real values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture
def llama():
    return tiny_llama()


def save_perturbed_adapter(directory, config, seed: int, build=tiny_llama, scale: float = 0.3):
    """Wrap ``build()`` with ``config``, move its trainable tensors (``perturb_trainable``) and save
    the adapter to ``directory``; returns ``directory``."""
    from deltatune import get_peft_model

    model = get_peft_model(build(), config)
    perturb_trainable(model, seed=seed, scale=scale)
    model.save_pretrained(directory)
    return directory
