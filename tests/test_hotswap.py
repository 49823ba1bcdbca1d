"""Hot-swapping adapters in place: same tensors, other weights; compiled models do not recompile."""
from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune import IA3Config, LoraConfig, PeftModel, hotswap_adapter, prepare_model_for_compiled_hotswap
from deltatune.hotswap import HotswapError
from tests.conftest import logits_of, save_perturbed_adapter, tiny_gpt2, tiny_llama, token_batch

QKV, QV = ["q_proj", "k_proj", "v_proj"], ["q_proj", "v_proj"]


def _wider_llama():
    """Another base with the same module names: hidden size 48 instead of 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("swap")
    return {
        "a": save_perturbed_adapter(root / "a", LoraConfig(r=4, lora_alpha=8, target_modules=QKV), 1),
        "b": save_perturbed_adapter(root / "b", LoraConfig(r=8, lora_alpha=4, target_modules=QV), 2),           # other rank, subset
        "a2": save_perturbed_adapter(root / "a2", LoraConfig(r=4, lora_alpha=32, target_modules=QKV), 3),       # same rank, new alpha
        "small": save_perturbed_adapter(root / "small", LoraConfig(r=2, lora_alpha=2, target_modules=QKV), 4),
        "rs": save_perturbed_adapter(root / "rs", LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=QKV), 5),
        "rs8": save_perturbed_adapter(root / "rs8", LoraConfig(r=8, lora_alpha=8, use_rslora=True, target_modules=QV), 6),
        "rs2": save_perturbed_adapter(root / "rs2", LoraConfig(r=2, lora_alpha=8, use_rslora=True, target_modules=QV), 13),
        "drop": save_perturbed_adapter(root / "drop", LoraConfig(r=4, lora_dropout=0.1, target_modules=QKV), 7),
        "more": save_perturbed_adapter(root / "more", LoraConfig(r=4, target_modules=QKV + ["o_proj"]), 8),
        "ia3": save_perturbed_adapter(root / "ia3", IA3Config(target_modules=["k_proj", "v_proj"]), 9),
        "gpt2": save_perturbed_adapter(root / "gpt2", LoraConfig(r=4, target_modules=["c_attn"]), 10, tiny_gpt2),
        "dora": save_perturbed_adapter(root / "dora", LoraConfig(r=4, use_dora=True, target_modules=QKV), 11),
        "dora2": save_perturbed_adapter(root / "dora2", LoraConfig(r=2, use_dora=True, target_modules=QV), 12),
        "wider": save_perturbed_adapter(root / "wider", LoraConfig(r=4, target_modules=QKV), 14, _wider_llama),
    }


IDS = token_batch()


def _reference(saved, name):
    with torch.no_grad():
        return logits_of(PeftModel.from_pretrained(tiny_llama(), saved[name]).eval(), IDS)


def _logits(model):
    with torch.no_grad():
        return logits_of(model, IDS)


def _tensors(model):
    return {id(p): p.data_ptr() for p in model.parameters()}, [id(m) for m in model.modules()]


@pytest.mark.parametrize("old, new", [("a", "a2"), ("a", "small"), ("rs", "rs2"), ("dora", "dora2")])
def test_swap_gives_the_new_adapters_logits_in_the_same_tensors(old, new, saved):
    model = PeftModel.from_pretrained(tiny_llama(), saved[old]).eval()
    before = _tensors(model)
    hotswap_adapter(model, saved[new])
    torch.testing.assert_close(_logits(model), _reference(saved, new), rtol=0, atol=1e-5)
    assert _tensors(model) == before          # same parameters, same storage, no new modules
    hotswap_adapter(model, saved[old])
    torch.testing.assert_close(_logits(model), _reference(saved, old), rtol=0, atol=1e-5)


def test_subset_of_layers_zeroes_the_rest_and_saves_right(saved, tmp_path):
    model = PeftModel.from_pretrained(tiny_llama(), saved["rs"]).eval()      # rsLoRA r=4 on q, k, v
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    hotswap_adapter(model, saved["rs8"])                                     # rsLoRA r=8 on q, v only
    want = _reference(saved, "rs8")
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=1e-5)
    k = model.base_model.model.model.layers[0].self_attn.k_proj
    assert not k.lora_B["default"].weight.any()
    model.save_pretrained(tmp_path)                                          # what the model holds, loadable
    peft = pytest.importorskip("peft")
    for lib in (deltatune, peft):
        with torch.no_grad():
            loaded = lib.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
            torch.testing.assert_close(logits_of(loaded, IDS), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("new, match", [
    ("b", "rank 8.*prepare_model_for_compiled_hotswap"),
    ("ia3", "IA3 adapter cannot replace a LORA"),
    ("rs", "use_rslora"),
    ("drop", "lora_dropout"),
    ("dora", "use_dora"),
    ("more", "o_proj.*cannot add layers"),
    ("gpt2", "cannot add layers"),
    ("wider", "shape .* another base"),
])
def test_refusals_leave_the_old_adapter(new, match, saved):
    model = PeftModel.from_pretrained(tiny_llama(), saved["a"]).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = model.peft_config["default"]
    with pytest.raises(HotswapError, match=match):
        hotswap_adapter(model, saved[new])
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.peft_config["default"] is config
    torch.testing.assert_close(_logits(model), _reference(saved, "a"), rtol=0, atol=0)


def test_merged_and_unknown_adapters_are_refused(saved):
    model = PeftModel.from_pretrained(tiny_llama(), saved["a"]).eval()
    with pytest.raises(HotswapError, match="no adapter 'other'"):
        hotswap_adapter(model, saved["a2"], adapter_name="other")
    model.merge_adapter()
    with pytest.raises(HotswapError, match="merged"):
        hotswap_adapter(model, saved["a2"])


def test_a_failure_while_writing_restores_the_old_adapter(saved, monkeypatch):
    import deltatune.hotswap as hs

    model = PeftModel.from_pretrained(tiny_llama(), saved["a"]).eval()
    prepare_model_for_compiled_hotswap(model)           # tensor scalings: restored in place too
    want = _reference(saved, "a")

    def broken(layer, name, value):
        raise RuntimeError("device lost")

    monkeypatch.setattr(hs, "_set_scaling", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        hotswap_adapter(model, saved["a2"])             # the factors were written before the scalings
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)


class CompileCounter:
    """A torch.compile backend that counts the graphs it is given (each compile or recompile) and
    runs them eagerly: the count is what matters, and inductor's C++ build would take minutes on CPU."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_compiled_model_swaps_without_recompiling(saved):
    torch._dynamo.reset()
    refs = {n: _reference(saved, n) for n in ("a", "b", "a2")}
    model = PeftModel.from_pretrained(tiny_llama(), saved["a"]).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    torch.testing.assert_close(_logits(compiled), refs["a"], rtol=0, atol=1e-5)
    compiles = counter.graphs
    assert compiles >= 1
    for name in ["b", "a2", "a", "b", "a"]:          # other ranks, alphas and target sets
        hotswap_adapter(compiled, saved[name])
        torch.testing.assert_close(_logits(compiled), refs[name], rtol=0, atol=1e-5)
    assert counter.graphs == compiles


def test_without_preparation_a_new_scaling_recompiles(saved):
    """The control: the counter does see recompiles (a float scaling is a constant to dynamo)."""
    torch._dynamo.reset()
    model = PeftModel.from_pretrained(tiny_llama(), saved["a"]).eval()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    _logits(compiled)
    compiles = counter.graphs
    hotswap_adapter(compiled, saved["a2"])             # same rank, other alpha
    torch.testing.assert_close(_logits(compiled), _reference(saved, "a2"), rtol=0, atol=1e-5)
    assert counter.graphs > compiles


def test_prepare_checks(saved):
    model = PeftModel.from_pretrained(tiny_llama(), saved["b"]).eval()
    with pytest.raises(ValueError, match="rank 8 > target_rank=4"):
        prepare_model_for_compiled_hotswap(model, target_rank=4)
    with pytest.raises(ValueError, match="before torch.compile"):
        prepare_model_for_compiled_hotswap(torch.compile(model, backend="eager"), target_rank=8)
    dora = PeftModel.from_pretrained(tiny_llama(), saved["dora"]).eval()
    with pytest.raises(ValueError, match="DoRA"):
        prepare_model_for_compiled_hotswap(dora, target_rank=8)
    with pytest.raises(TypeError, match="PeftModel"):
        prepare_model_for_compiled_hotswap(tiny_llama(), target_rank=8)


def test_prepared_model_trains_and_saves_its_padded_rank(saved, tmp_path):
    model = PeftModel.from_pretrained(tiny_llama(), saved["a"], is_trainable=True)
    want = _reference(saved, "a")
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    model.eval()
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=1e-5)
    assert model.peft_config["default"].r == 8 and model.peft_config["default"].lora_alpha == 16
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), want, rtol=0, atol=1e-5)
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss                # tensor scalings carry gradients to A, B
    loss.backward()
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.grad is not None


def test_ia3_swaps_too(tmp_path):
    kw = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    x = save_perturbed_adapter(tmp_path / "x", IA3Config(**kw), 1)
    y = save_perturbed_adapter(tmp_path / "y", IA3Config(**kw), 2)
    model = PeftModel.from_pretrained(tiny_llama(), x).eval()
    hotswap_adapter(model, y)
    torch.testing.assert_close(_logits(model), logits_of(PeftModel.from_pretrained(tiny_llama(), y).eval(), IDS),
                               rtol=0, atol=1e-5)


def test_swapped_biases_go_live_while_another_adapters_are_live_too(tmp_path):
    """A merged adapter and the active one both have trained biases live; swapping the active one's
    file must change the live biases to the new file's, as loading it fresh would."""
    config = LoraConfig(r=4, target_modules=["c_attn"], bias="lora_only")
    paths = {s: save_perturbed_adapter(tmp_path / str(s), config, s, tiny_gpt2) for s in (21, 22, 23)}
    model = PeftModel.from_pretrained(tiny_gpt2(), paths[21], adapter_name="m").eval()
    model.load_adapter(paths[22], adapter_name="b")
    model.set_adapter("b")
    model.merge_adapter(["m"])
    _logits(model)                                   # biases of m and b are live now
    hotswap_adapter(model, str(paths[23]), adapter_name="b")
    fresh = PeftModel.from_pretrained(tiny_gpt2(), paths[21], adapter_name="m").eval()
    fresh.load_adapter(paths[23], adapter_name="b")
    fresh.set_adapter("b")
    fresh.merge_adapter(["m"])
    torch.testing.assert_close(_logits(model), _logits(fresh))


class _Convs(torch.nn.Module):
    """One convolution of each dimension (``groups`` for the 2-d one)."""

    def __init__(self, groups: int = 1):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular")
        self.c2 = torch.nn.Conv2d(4, 6, 3, padding=1, groups=groups)
        self.c3 = torch.nn.Conv3d(4, 6, 1)

    def forward(self, x1, x2, x3):
        return torch.cat([self.c1(x1).flatten(), self.c2(x2).flatten(), self.c3(x3).flatten()])


def test_convolutions_of_every_dimension_are_padded_and_swapped(tmp_path):
    """prepare_model_for_compiled_hotswap pads Conv1d/2d/3d factors (kernel and padding mode kept) without
    changing the output, and a swap then gives the other adapter's output; a grouped convolution is refused
    and left as it was."""
    torch.manual_seed(1)
    xs = (torch.randn(2, 4, 5), torch.randn(2, 4, 5, 5), torch.randn(2, 4, 2, 3, 3))
    kw = dict(target_modules=["c1", "c2", "c3"], lora_alpha=4)
    x = save_perturbed_adapter(tmp_path / "x", LoraConfig(r=2, **kw), 1, _Convs)
    y = save_perturbed_adapter(tmp_path / "y", LoraConfig(r=4, **kw), 2, _Convs)
    want_x, want_y = (PeftModel.from_pretrained(_Convs(), p).eval()(*xs).detach() for p in (x, y))
    model = PeftModel.from_pretrained(_Convs(), x).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    assert model.base_model.model.c3.lora_A["default"].weight.shape == (8, 4, 1, 1, 1)
    assert model.base_model.model.c1.lora_A["default"].padding_mode == "circular"
    torch.testing.assert_close(model(*xs).detach(), want_x, rtol=0, atol=1e-5)
    hotswap_adapter(model, y)
    torch.testing.assert_close(model(*xs).detach(), want_y, rtol=0, atol=1e-5)
    grouped = PeftModel.from_pretrained(_Convs(groups=2), save_perturbed_adapter(
        tmp_path / "g", LoraConfig(r=2, **kw), 3, lambda: _Convs(groups=2))).eval()
    before = grouped(*xs).detach()
    with pytest.raises(ValueError, match="groups=2"):
        prepare_model_for_compiled_hotswap(grouped, target_rank=8)
    torch.testing.assert_close(grouped(*xs).detach(), before, rtol=0, atol=0)
