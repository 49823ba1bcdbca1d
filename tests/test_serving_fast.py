"""The engine's CPU fast paths. Base linear weights pre-packed for MKL's GEMM
(``deltatune.serving.packed``): the packed path is taken at the packed row count (and padded up to
it from above half) and gives ``F.linear``'s results, a changed weight is packed again, and an
engine with packed weights generates what one without them does. Greedy sampling's argmax on CPU
picks what ``torch.argmax`` picks, ties and NaN included. RMSNorm layers are fused only where
``F.rms_norm`` gives the same bits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltatune.serving import Engine, SamplingParams
from deltatune.serving import norms, packed, sampling
from tests.test_serving_engine import PROMPTS, ROUTE, dirs, engine_for  # noqa: F401  (dirs: fixture)

needs_mkl = pytest.mark.skipif(not packed.mkl_available(), reason="this PyTorch has no MKL packed GEMM")


def test_greedy_argmax_is_torch_argmax_ties_and_nan_included():
    torch.manual_seed(0)
    logits = torch.randn(6, 49152)
    logits[1, [7, 300, 9000]] = 50.0                 # a tie: the first index wins
    logits[2, :] = 1.0                               # all equal
    logits[3, 123] = float("nan")                    # NaN counts as the largest, as in torch
    logits[4, -1] = float("inf")
    got = sampling._argmax(logits)
    assert got.dtype == torch.long and torch.equal(got, logits.argmax(-1))
    assert got[1:4].tolist() == [7, 0, 123]
    assert sampling.sample(logits, [SamplingParams(temperature=0)] * 6, [None] * 6) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("in_f,out_f,bias", [(576, 192, False), (64, 256, True), (7, 5, True)])
@needs_mkl
def test_packed_path_at_the_packed_row_count_equals_linear(in_f, out_f, bias):
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f, bias=bias)
    fast = packed.PackedLinear.from_linear(layer, rows=4)
    assert fast.weight is layer.weight and fast.bias is layer.bias      # shared, not copied
    with torch.no_grad():
        for x in (torch.randn(4, in_f), torch.randn(4, 1, in_f), torch.randn(2, 2, in_f), torch.randn(3, 1, in_f),
                  torch.randn(2, in_f)):
            torch.testing.assert_close(fast(x), F.linear(x, layer.weight, layer.bias))
        # the packed copy is what 3- and 4-row inputs use (3 padded to 4), and only they: put another
        # matrix's (2 W) in its place (the weight unchanged, so it is not packed again)
        fast._packed = torch.ops.mkl._mkl_reorder_linear_weight(2 * layer.weight, 4)
        for x in (torch.randn(4, in_f), torch.randn(3, 1, in_f)):
            torch.testing.assert_close(fast(x), F.linear(x, 2 * layer.weight, layer.bias))
        x = torch.randn(2, in_f)
        torch.testing.assert_close(fast(x), F.linear(x, layer.weight, layer.bias))
    # with autograd the plain path runs (the packed op has no backward)
    x = torch.randn(4, in_f, requires_grad=True)
    fast(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


@needs_mkl
def test_a_changed_weight_is_packed_again():
    torch.manual_seed(0)
    fast = packed.PackedLinear.from_linear(nn.Linear(32, 16, bias=False), rows=2)
    x = torch.randn(2, 32)
    with torch.no_grad():
        before = fast(x)
        fast.weight.copy_(torch.randn(16, 32))                    # in place
        torch.testing.assert_close(fast(x), F.linear(x, fast.weight))
        fast.weight = nn.Parameter(torch.randn(16, 32))           # a new tensor
        torch.testing.assert_close(fast(x), F.linear(x, fast.weight))
    assert not torch.allclose(before, fast(x))


@needs_mkl
def test_engine_with_packed_weights_generates_what_the_plain_one_does(dirs):  # noqa: F811
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts, route = PROMPTS[:4], ROUTE[:4]
    fast = engine_for(dirs, max_num_seqs=4)
    plain = engine_for(dirs, max_num_seqs=4, pack_weights=False)
    assert fast.packed_linears > 0 and plain.packed_linears == 0
    # adapters wrap the packed layers like any nn.Linear
    wrapped = [m.base_layer for m in fast.model.modules() if hasattr(m, "base_layer")]
    assert wrapped and all(isinstance(b, packed.PackedLinear) for b in wrapped if isinstance(b, nn.Linear))
    got = [o.outputs[0].token_ids for o in fast.generate(prompts, adapter=route, sampling=greedy)]
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, adapter=route, sampling=greedy)]
    assert got == want


@needs_mkl
def test_pack_weights_where_it_cannot_apply_says_why(dirs):  # noqa: F811
    with pytest.raises(ValueError, match="pack_weights=True needs a CPU float32 engine"):
        Engine(str(dirs["base"]), dtype=torch.bfloat16, pack_weights=True)
    assert Engine(str(dirs["base"]), dtype=torch.bfloat16).packed_linears == 0


def test_rms_norms_are_fused_only_where_the_result_is_the_same():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    class OffsetRMSNorm(LlamaRMSNorm):      # Gemma's formula: (1 + weight) * x_normed
        def forward(self, x):
            return (1 + self.weight) * super().forward(x) / self.weight

    torch.manual_seed(0)
    model = nn.Sequential(LlamaRMSNorm(64, eps=1e-5), OffsetRMSNorm(64, eps=1e-5), nn.Linear(64, 64))
    with torch.no_grad():
        for norm in model[:2]:
            norm.weight.normal_()
    x = torch.randn(4, 7, 64)
    want = [model[0](x), model[1](x)]
    assert norms.fuse_rms_norms(model) == 1
    assert isinstance(model[0], norms.FusedRMSNorm) and type(model[1]) is OffsetRMSNorm
    assert torch.equal(model[0](x), want[0]) and torch.equal(model[1](x), want[1])


def test_engine_fuses_the_base_norms(dirs):  # noqa: F811
    engine = engine_for(dirs, names=("a",), max_num_seqs=2)
    layers = engine.model.config.num_hidden_layers
    assert engine.fused_norms == 2 * layers + 1          # two per decoder layer and the final one


@needs_mkl
def test_a_packed_layer_copies_like_a_linear_and_packs_its_copy_on_use():
    """modules_to_save copies the base layer (copy.deepcopy): MKL's packed tensor has no storage to
    copy, so the copy starts unpacked, shares nothing with the original and packs on first use."""
    import copy

    torch.manual_seed(0)
    fast = packed.PackedLinear.from_linear(nn.Linear(32, 16), rows=2)
    x = torch.randn(2, 32)
    with torch.no_grad():
        want = fast(x)
        twin = copy.deepcopy(fast)
        assert twin.weight.data_ptr() != fast.weight.data_ptr()
        torch.testing.assert_close(twin(x), want)
        twin.weight.mul_(2)
        torch.testing.assert_close(fast(x), want)                      # the original is untouched
        torch.testing.assert_close(twin(x), F.linear(x, twin.weight, twin.bias))


@needs_mkl
def test_an_adapter_with_modules_to_save_loads_into_a_packed_engine(dirs, tmp_path):  # noqa: F811
    """A LoRA adapter that saves lm_head (a packed layer) loads and answers as PeftModel.generate."""
    from tests.serving_fixtures import alone, make_adapter

    path = make_adapter(dirs["base"], tmp_path / "head", 3, r=4, target_modules=["q_proj", "v_proj"],
                        modules_to_save=["lm_head"])
    engine = engine_for(dirs, max_num_seqs=4)
    assert engine.packed_linears > 0
    engine.add_adapter("head", path)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    got = engine.generate([PROMPTS[0]], adapter=["head"], sampling=greedy)[0].outputs[0].token_ids
    assert got == alone(dirs["base"], path, PROMPTS[0], 6)[0]
