"""``deltatune.generation``: the batched-completion helper and stop-token rule that evaluation,
``deltatune generate`` and the serving engine share (end to end they are checked by
test_cli_generate.py and the training evaluation tests; that serving no longer imports training
is the import-linter contract in pyproject.toml, run by test_import_layers.py)."""
from __future__ import annotations

import torch
from torch import nn

from deltatune.generation import cut_at_stop, decoding_kwargs, left_pad, pad_id, stop_token_ids


class _Tok:
    eos_token_id = 2
    pad_token_id = None

    def get_vocab(self):
        return {"<|im_end|>": 7, "hello": 3}


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.generation_config = type("G", (), {"eos_token_id": [9, 2]})()


class _Wrapper(nn.Module):   # DDP-style: the model under .module
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_stop_tokens_and_padding():
    assert stop_token_ids(_Tok()) == [2, 7]
    assert stop_token_ids(_Tok(), _Wrapper(_Model())) == [2, 7, 9]
    assert pad_id(_Tok(), [2, 7]) == 2 and pad_id(_Tok(), []) == 0


def test_left_pad_right_aligns_every_prompt():
    ids, mask = left_pad([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long
    assert cut_at_stop([4, 5, 2, 6], {2}) == [4, 5] and cut_at_stop([4, 5], {2}) == [4, 5]
    assert decoding_kwargs()["do_sample"] is False
    assert decoding_kwargs(0.7, None) == dict(do_sample=True, temperature=0.7, top_p=1.0, top_k=0)
