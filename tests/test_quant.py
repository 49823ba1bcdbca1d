"""deltatune.quant: 4-bit NF4 bases through bitsandbytes, on tiny random models (CPU, seconds).

Exactness against bitsandbytes, the storage budget, the compute path (forward/backward, dtype
choice), quantize()/prepare/dequantize, warnings and errors, and QLoRA end to end with the LoRA
core: training, saving onto a full-precision base, merging.
"""
from __future__ import annotations

import copy
import math
import sys
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("bitsandbytes")

import deltatune.quant as quant  # noqa: E402
from deltatune import LoraConfig, PeftModel, get_peft_model, registry  # noqa: E402
from deltatune.quant import Linear4bit, nf4  # noqa: E402
from tests.conftest import token_batch, train_steps  # noqa: E402

bnbf = nf4.import_bnb().functional


def llama(seed: int = 0, hidden: int = 64, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def _lora_wraps_4bit() -> bool:
    method = registry.method_for("LORA")
    return method.layer_class_for(Linear4bit(64, 64, device="meta")) is not None


needs_core = pytest.mark.skipif(not _lora_wraps_4bit(), reason=(
    "the LoRA core does not wrap registered linear-likes yet: registry.Method.layer_class_for must fall "
    "back to the nn.Linear layer class when registry.is_linear(module)"))


# ---------------------------------------------------------------------------------------------
# The layer

@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_dequantize_is_exactly_bitsandbytes(quant_type, double_quant):
    torch.manual_seed(0)
    W = torch.randn(96, 200) * 0.05                       # 19200 weights: a partial 256-block of scales
    linear = nn.Linear(200, 96)
    linear.weight.data = W
    layer = Linear4bit.from_linear(linear, quant_type, double_quant)
    q, state = bnbf.quantize_4bit(W, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    assert torch.equal(layer.dequantize(), bnbf.dequantize_4bit(q, state))
    assert torch.equal(layer.weight.view(-1), q.view(-1))
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad


def test_bits_per_param_counted_from_tensors():
    model = quant.quantize(llama(hidden=128))
    foot = quant.quantization_footprint(model)
    assert foot["layers"] == 14 and foot["params"] == sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    assert quant.quantized_bits_per_param(model) <= 4.2
    layer = Linear4bit.from_linear(nn.Linear(576, 576))
    own = sum(t.nbytes for t in layer.quantized_tensors()) * 8 / (576 * 576)
    assert own == pytest.approx(4 + 8 / 64 + 32 * math.ceil(576 * 9 / 256) / (576 * 576) + 32 / (576 * 576))
    no_dq = Linear4bit.from_linear(nn.Linear(576, 576), double_quant=False)
    assert sum(t.nbytes for t in no_dq.quantized_tensors()) * 8 / (576 * 576) == pytest.approx(4.5)


def test_forward_and_backward_match_dense_dequantized_weight():
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(64, 48))
    W, b = layer.dequantize(), layer.bias.detach()
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), F.linear(x_ref, W, b)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert layer.weight.grad is None and layer.bias.grad is None


def test_dequantizes_once_in_forward_and_once_in_backward(monkeypatch):
    layer = Linear4bit.from_linear(nn.Linear(64, 32))
    calls = []
    real = Linear4bit.dequantize
    monkeypatch.setattr(Linear4bit, "dequantize",
                        lambda self, dtype=torch.float32: calls.append(dtype) or real(self, dtype))
    layer(torch.randn(4, 64, requires_grad=True)).sum().backward()
    assert calls == [torch.float32, torch.float32]
    calls.clear()
    with torch.no_grad():
        layer(torch.randn(4, 64))
    assert len(calls) == 1


def test_cpu_computes_in_fp32_and_says_so_once(monkeypatch):
    monkeypatch.setattr(nf4, "_cpu_has", lambda dtype: False)
    monkeypatch.setattr(nf4, "_WARNED", set())
    layer = Linear4bit.from_linear(nn.Linear(64, 32), compute_dtype=torch.bfloat16)
    x = torch.randn(2, 64)
    with pytest.warns(UserWarning, match="float32 instead"):
        y = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)
    assert y.dtype == torch.float32 and torch.equal(y, F.linear(x, layer.dequantize(), layer.bias))
    monkeypatch.setattr(nf4, "_cpu_has", lambda dtype: True)
    assert nf4.resolve_compute_dtype(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    assert nf4.resolve_compute_dtype(None, torch.device("cpu")) == torch.float32
    assert nf4.resolve_compute_dtype(torch.float16, torch.device("cuda")) == torch.float16


def test_dtype_casts_keep_quant_state_and_state_dict_round_trips():
    layer = Linear4bit.from_linear(nn.Linear(64, 32))
    W = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.absmax2.dtype == torch.float32 and torch.equal(layer.dequantize(), W)
    fresh = Linear4bit(64, 32)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dequantize(), W)


# ---------------------------------------------------------------------------------------------
# quantize(): selection, errors, warnings

def test_quantize_skips_head_and_honours_targets():
    model = quant.quantize(llama())
    assert type(model.lm_head) is nn.Linear
    assert all(isinstance(m, Linear4bit) for n, m in model.named_modules() if n.endswith(("_proj",)))
    some = quant.quantize(llama(), target_modules=["q_proj", "v_proj"], skip_modules=["layers.1.self_attn.v_proj"])
    chosen = sorted(n for n, m in some.named_modules() if isinstance(m, Linear4bit))
    assert chosen == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                      "model.layers.1.self_attn.q_proj"]
    head = quant.quantize(llama(), target_modules=r"lm_head")
    assert isinstance(head.lm_head, Linear4bit)


def test_quantized_model_runs_close_to_dense():
    dense = llama()
    ids = token_batch()
    ref = dense(input_ids=ids).logits
    out = quant.quantize(copy.deepcopy(dense))(input_ids=ids).logits
    assert (out - ref).abs().max() < 0.2 * ref.abs().max()


def test_tied_head_stays_dense():
    model = llama(tie=True)
    with pytest.warns(UserWarning, match="tied"):
        quant.quantize(model, target_modules=["lm_head", "q_proj"])
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("kwargs,field", [({"bits": 8}, "bits"), ({"quant_type": "int4"}, "quant_type"),
                                          ({"target_modules": ["nope"]}, "target_modules")])
def test_quantize_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        quant.quantize(llama(), **kwargs)


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setattr(nf4, "_bnb", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        quant.quantize(llama())


def test_quantize_after_adapters_is_refused():
    model = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="before adding adapters"):
        quant.quantize(model)


def test_warns_when_a_dense_copy_of_the_weights_stays_alive():
    model = llama()
    keep = [m.weight for n, m in model.named_modules() if n.endswith("q_proj")]  # noqa: F841
    with pytest.warns(UserWarning, match="dense torch.float32 weights alive"):
        quant.quantize(model)
    dup = llama().to(torch.bfloat16)
    quant.quantize(dup, target_modules=["layers.0.self_attn.q_proj"])
    dup.extra = nn.Parameter(dup.model.layers[0].self_attn.q_proj.dequantize(torch.bfloat16), requires_grad=False)
    with pytest.warns(UserWarning, match="duplicate 4-bit weights"):
        found = quant.check_dense_copies(dup)
    assert found == [("extra", "model.layers.0.self_attn.q_proj")]


# ---------------------------------------------------------------------------------------------
# prepare_model_for_kbit_training, transformers' load_in_4bit

def test_prepare_freezes_upcasts_and_checkpoints():
    model = quant.quantize(llama().to(torch.bfloat16))
    model = quant.prepare_model_for_kbit_training(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def test_transformers_load_in_4bit_on_cpu(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dense = llama()
    dense.save_pretrained(tmp_path)
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg)
    monkeypatch.setattr(nf4, "_WARNED", set())
    slow_bf16 = not nf4._cpu_has(torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = quant.prepare_model_for_kbit_training(model)
    assert any("float32 instead" in str(w.message) for w in caught) == slow_bf16
    q_proj = model.model.layers[0].self_attn.q_proj
    # The CPU decides: bf16 is kept only where AMX makes it fast (the merge check below follows suit).
    assert q_proj.compute_dtype == (torch.float32 if slow_bf16 else torch.bfloat16)
    W = registry.get_weight(q_proj)
    assert torch.equal(W, bnbf.dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state))
    assert registry.is_linear(q_proj) and registry.features(q_proj) == (64, 64)
    assert quant.quantization_footprint(model)["layers"] == 14

    merged = _train_then_merge(get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])))
    assert not any(quant.is_4bit(m) for m in merged.modules())
    assert getattr(merged, "hf_quantizer", None) is None


def test_bnb_4bit_layers_keep_weights_and_gradients_through_an_eval_pass(tmp_path, monkeypatch):
    """Where bf16 is kept (AMX), bitsandbytes' AVX512-BF16 inference repacking must still stay off:
    the first eval forward would rewrite the stored weights lossily (block scales to bf16) and,
    back in training, the layer would give its input a wrong gradient."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    monkeypatch.setattr(nf4, "_cpu_has", lambda dtype: True)  # as on a CPU with AMX
    llama().save_pretrained(tmp_path)
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = quant.prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg))
    layers = [m for m in model.modules() if quant.is_4bit(m)]
    assert all(m.compute_dtype == torch.bfloat16 and not m.support_avx512bf16_for_cpu for m in layers)
    before = [nf4.bnb_dequantize(m) for m in layers]
    model.eval()
    with torch.no_grad():
        model(input_ids=token_batch())
    assert all(torch.equal(nf4.bnb_dequantize(m), W) for m, W in zip(layers, before))
    model.train()
    q_proj = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64, requires_grad=True)
    q_proj(x).float().sum().backward()
    expected = torch.ones(3, 64) @ before[layers.index(q_proj)]
    assert x.grad is not None
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=4 * 2 ** -8 * expected.abs().max().item())


# ---------------------------------------------------------------------------------------------
# QLoRA end to end with the LoRA core

def _train_then_merge(peft_model, steps: int = 4):
    """Train a few steps (the loss must fall), then merge into the dequantized base: the merged
    model gives the unmerged logits. Returns the merged model.

    The merged model is dense fp32. With the 4-bit layers computing in fp32 as well, the two agree
    to 1e-4 on every CPU. In the dtype the layers chose themselves they agree only to that dtype's
    rounding: a requested bf16 stays bf16 on CPUs with AMX (``nf4.resolve_compute_dtype``) and
    becomes fp32 elsewhere, so that check's tolerance comes from the compute dtype. A merge that
    lost the delta would be off by the adapter's whole effect, required to dwarf both tolerances.
    """
    losses = train_steps(peft_model, steps=steps)
    assert losses[-1] < losses[0]
    peft_model.eval()
    ids = token_batch()
    dtypes = {_compute_dtype(m) for m in peft_model.modules() if quant.is_4bit(m)}
    with torch.no_grad():
        with _computing_in_fp32(peft_model):
            unmerged_fp32 = peft_model(input_ids=ids).logits
            with peft_model.disable_adapter():
                base = peft_model(input_ids=ids).logits
        unmerged = peft_model(input_ids=ids).logits  # in the layers' own compute dtype
        merged_model = quant.dequantize_model(peft_model).merge_and_unload()
        merged = merged_model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged_fp32, atol=1e-4, rtol=1e-4)
    tol = _rounding_tolerance(dtypes, unmerged_fp32)
    torch.testing.assert_close(merged, unmerged, atol=tol, rtol=0)
    effect = (unmerged_fp32 - base).abs().max().item()
    assert effect > 10 * tol, f"the adapter moves logits by {effect:.2e}, too little against a tolerance of {tol:.2e}"
    return merged_model


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a 4-bit layer (ours or bitsandbytes') computes in for fp32 inputs on the CPU."""
    return nf4.resolve_compute_dtype(module.compute_dtype, torch.device("cpu")) or torch.float32


@contextmanager
def _computing_in_fp32(model: nn.Module):
    """Every 4-bit layer computes in fp32 inside the block, as the merged dense model does."""
    saved = [(m, m.compute_dtype) for m in model.modules() if quant.is_4bit(m)]
    for m, _ in saved:
        # bitsandbytes' fused CPU inference format computes in bf16 whatever the compute dtype;
        # prepare_model_for_kbit_training keeps layers out of it.
        assert not getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
        m.compute_dtype = torch.float32
    try:
        yield
    finally:
        for m, dtype in saved:
            m.compute_dtype = dtype


def _rounding_tolerance(dtypes: set, logits: torch.Tensor) -> float:
    """How far logits may move when 4-bit layers compute in ``dtypes`` instead of fp32.

    fp32: 1e-4. bf16/fp16: 4 unit roundoffs (2^-8 for bf16) of the largest logit. Each bf16
    matmul rounds its input, weights and output once; measured over 10 seeds: at most 1.05 unit
    roundoffs of the largest logit, with 1 or 2 threads alike.
    """
    unit = max(torch.finfo(d).eps / 2 for d in dtypes | {torch.float32})
    if unit <= torch.finfo(torch.float32).eps:
        return 1e-4
    return 4 * unit * logits.abs().max().item()


@needs_core
def test_qlora_trains_and_leaves_4bit_weights_untouched():
    model = quant.prepare_model_for_kbit_training(quant.quantize(llama()))
    frozen = {n: t.clone() for n, t in model.state_dict().items()}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(model, config)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    losses = train_steps(peft_model)
    assert losses[-1] < losses[0]
    for name, t in peft_model.base_model.model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(t, frozen[name.replace(".base_layer", "")]), name


@needs_core
def test_gradients_reach_input_and_lora_but_not_4bit_weight():
    model = quant.quantize(llama())
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    peft_model.train()
    ids = token_batch()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_B["default"].weight.grad is not None
    assert layer.base_layer.weight.grad is None


@needs_core
def test_adapter_from_4bit_base_loads_onto_full_precision_base(tmp_path):
    dense = llama()
    qmodel = quant.quantize(copy.deepcopy(dense))
    peft_model = get_peft_model(qmodel, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    train_steps(peft_model, steps=3)
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()
    ids = token_batch()
    with torch.no_grad():
        q_logits = peft_model(input_ids=ids).logits
    # onto the original dense base: loads, keys match, close to the 4-bit run
    on_dense = PeftModel.from_pretrained(copy.deepcopy(dense), tmp_path)
    # onto a dense base holding the dequantized weights: the same function as the 4-bit run
    on_deq = PeftModel.from_pretrained(quant.dequantize_model(quant.quantize(copy.deepcopy(dense))), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(on_deq(input_ids=ids).logits, q_logits, atol=1e-4, rtol=1e-4)
        assert (on_dense(input_ids=ids).logits - q_logits).abs().max() < 0.2 * q_logits.abs().max()


@needs_core
def test_merge_and_unload_on_4bit_base_gives_dense_model():
    peft_model = get_peft_model(quant.quantize(llama()), LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    train_steps(peft_model, steps=3)
    peft_model.eval()
    ids = token_batch()
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        merged = quant.dequantize_model(peft_model).merge_and_unload()
        assert not any(quant.is_4bit(m) for m in merged.modules())
        assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged, atol=1e-4, rtol=1e-4)
        with pytest.warns(UserWarning, match="requantize"):
            report = quant.requantize(merged)
    assert len(report.layers) == 14 and 0 < report.max_rel < 0.2
    assert isinstance(merged.model.layers[0].self_attn.q_proj, Linear4bit)


@needs_core
def test_merging_into_4bit_weights_warns_about_rounding():
    peft_model = get_peft_model(quant.quantize(llama()), LoraConfig(r=4, target_modules=["q_proj"]))
    train_steps(peft_model, steps=2)
    with pytest.warns(UserWarning, match="re-rounds"):
        peft_model.merge_adapter()
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert layer.deltatune_requantization_error["rel_delta"] > 0


@needs_core
def test_dora_on_4bit_base_trains_and_merges():
    config = LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "v_proj"])
    _train_then_merge(get_peft_model(quant.quantize(llama()), config))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_quantize_lets_go_of_a_memory_mapped_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from deltatune.quant import _file_mappings

    llama(tie=True).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)

    def mapped():
        ranges = _file_mappings()
        return [n for n, p in model.named_parameters()
                if any(lo <= p.untyped_storage().data_ptr() < hi for lo, hi in ranges)]

    if not mapped():
        pytest.skip("this transformers version does not memory-map safetensors")
    ids = token_batch()
    ref = quant.quantize(copy.deepcopy(model))(input_ids=ids).logits
    quant.quantize(model)
    assert mapped() == []
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model(input_ids=ids).logits, ref)


def test_4bit_layer_under_autocast_dequantizes_to_the_autocast_dtype(monkeypatch):
    from deltatune.quant import Linear4bit

    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 64)
    layer = Linear4bit.from_linear(dense)
    asked = []
    real = Linear4bit.dequantize
    monkeypatch.setattr(Linear4bit, "dequantize", lambda self, dtype=torch.float32: asked.append(dtype) or real(self, dtype))
    x = torch.randn(3, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and asked[0] == torch.bfloat16
    # same numbers as autocast's own cast of the fp32 dequantized weight
    expected = torch.nn.functional.linear(x.detach().bfloat16(), real(layer, torch.float32).bfloat16(),
                                          layer.bias.bfloat16())
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert x.grad is not None and torch.isfinite(x.grad).all()


@needs_core
def test_qlora_training_is_lora_on_the_nf4_rounded_base():
    """QLoRA changes how the base is stored, not what is computed: trained on a 4-bit base, LoRA
    follows the same path as on a dense copy holding the NF4-rounded weights."""
    quantized = quant.quantize(llama())
    rounded = quant.dequantize_model(copy.deepcopy(quantized))
    assert not any(isinstance(m, Linear4bit) for m in rounded.modules())
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    torch.manual_seed(7)
    qlora = get_peft_model(quantized, config)
    torch.manual_seed(7)
    lora = get_peft_model(rounded, config)
    q_losses, d_losses = train_steps(qlora), train_steps(lora)
    assert q_losses[-1] < q_losses[0]
    torch.testing.assert_close(torch.tensor(q_losses), torch.tensor(d_losses), rtol=1e-5, atol=1e-5)
    q_state = {k: v for k, v in qlora.state_dict().items() if "lora_" in k}
    d_state = {k: v for k, v in lora.state_dict().items() if "lora_" in k}
    assert q_state.keys() == d_state.keys()
    for key in q_state:
        torch.testing.assert_close(q_state[key], d_state[key], rtol=1e-4, atol=1e-5)
