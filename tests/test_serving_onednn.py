"""The engine's oneDNN packed GEMM (``deltatune.serving.packed``, backend "onednn"): the packed copy
serves every row count (no padding) and gives ``F.linear``'s results to fp32 tolerance, autograd
takes the plain path, a changed weight is packed again, and it is the engine's default where
PyTorch has it (the backend vLLM's CPU build runs, and faster than MKL's on AMD CPUs)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltatune.serving import packed
from tests.test_serving_engine import dirs, engine_for  # noqa: F401  (dirs: fixture)

needs_onednn = pytest.mark.skipif(not packed.onednn_available(), reason="this PyTorch has no oneDNN linear ops")


@pytest.mark.parametrize("in_f,out_f,bias", [(576, 192, False), (64, 256, True), (7, 5, True)])
@needs_onednn
def test_onednn_path_at_every_row_count_equals_linear(in_f, out_f, bias):
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f, bias=bias)
    fast = packed.PackedLinear.from_linear(layer, rows=4, backend="onednn")
    assert fast.weight is layer.weight and fast.bias is layer.bias      # shared, not copied
    # 4 rows (the hint), fewer, more, 3D, and a non-contiguous slice (the LM head's last positions)
    inputs = [torch.randn(4, in_f), torch.randn(1, in_f), torch.randn(3, 1, in_f), torch.randn(5, 7, in_f),
              torch.randn(2, 6, in_f)[:, -1:]]
    with torch.no_grad():
        for x in inputs:
            torch.testing.assert_close(fast(x), F.linear(x, layer.weight, layer.bias))
        # the packed copy is what every row count uses: put another matrix's (2 W) in its place
        # (the weight unchanged, so it is not packed again)
        fast._packed = torch.ops.mkldnn._reorder_linear_weight(2 * layer.weight, 4)
        for x in inputs:
            torch.testing.assert_close(fast(x), F.linear(x, 2 * layer.weight, layer.bias))
    # with autograd the plain path runs (the packed op has no backward)
    x = torch.randn(4, in_f, requires_grad=True)
    fast(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


@needs_onednn
def test_a_changed_weight_is_packed_again_by_onednn():
    torch.manual_seed(0)
    fast = packed.PackedLinear.from_linear(nn.Linear(32, 16, bias=False), rows=2, backend="onednn")
    x = torch.randn(3, 32)
    with torch.no_grad():
        before = fast(x)
        fast.weight.copy_(torch.randn(16, 32))                    # in place
        torch.testing.assert_close(fast(x), F.linear(x, fast.weight))
    assert not torch.allclose(before, fast(x))


@needs_onednn
def test_engine_packs_with_onednn_by_default(dirs):  # noqa: F811
    assert packed.default_backend() == "onednn"
    engine = engine_for(dirs, max_num_seqs=4)
    layers = [m for m in engine.model.modules() if isinstance(m, packed.PackedLinear)]
    assert len(layers) == engine.packed_linears > 0
    assert {m.backend for m in layers} == {"onednn"}


def test_an_unknown_backend_is_refused_by_name():
    with pytest.raises(RuntimeError, match="no packed GEMM for backend 'cublas'"):
        packed.pack_linears(nn.Sequential(nn.Linear(4, 4)), 2, backend="cublas")
