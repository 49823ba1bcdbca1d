"""Adapter arithmetic: add_weighted_adapter against peft, exactness, peft's problems fixed, combine CLI."""
from __future__ import annotations

import warnings

import pytest
import torch

import deltatune
from deltatune import LoraConfig, PeftModel, merging
from deltatune.arithmetic import CombineError
from deltatune.methods.ia3 import IA3Config
from tests.conftest import logits_of, save_perturbed_adapter, tiny_llama, token_batch

peft = pytest.importorskip("peft")

TYPES = list(merging.COMBINATION_TYPES)
WEIGHTS = [0.7, -0.4]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two same-rank adapters (a, b), one of another rank and target set (c), two rsLoRA ones."""
    root = tmp_path_factory.mktemp("adapters")
    qv = ["q_proj", "v_proj"]
    return {
        "a": save_perturbed_adapter(root / "a", LoraConfig(r=4, lora_alpha=8, target_modules=qv), 1),
        "b": save_perturbed_adapter(root / "b", LoraConfig(r=4, lora_alpha=16, target_modules=qv), 2),
        "c": save_perturbed_adapter(root / "c", LoraConfig(r=6, lora_alpha=3, target_modules=["q_proj", "k_proj", "down_proj"]), 3),
        "rs1": save_perturbed_adapter(root / "rs1", LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=qv), 4),
        "rs2": save_perturbed_adapter(root / "rs2", LoraConfig(r=8, lora_alpha=8, use_rslora=True, target_modules=qv), 5),
        "dora": save_perturbed_adapter(root / "dora", LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=qv), 6),
    }


def _load(lib, saved, names):
    model = lib.PeftModel.from_pretrained(tiny_llama(), saved[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(saved[name], adapter_name=name)
    return model.eval()


def _seeded_peft_dare(monkeypatch, seed):
    """peft draws DARE's masks from the global generator; give it the generator ``seed=`` gives
    deltatune, so both see the same random stream (the order of draws is what is compared)."""
    import peft.utils.merge_utils as mu

    g = torch.Generator().manual_seed(seed)

    def random_pruning(tensor, density, rescale):
        kept = tensor * torch.bernoulli(torch.full_like(tensor, density), generator=g)
        return kept / density if rescale else kept

    monkeypatch.setattr(mu, "random_pruning", random_pruning)


def _combined_logits(model, name, ids):
    model.set_adapter(name)
    with torch.no_grad():
        return logits_of(model, ids)


@pytest.mark.parametrize("kind", TYPES + ["svd-clamped"])
def test_every_type_matches_peft(kind, saved, monkeypatch):
    names = ["a", "b"] if kind not in ("cat", "svd", "svd-clamped") else ["a", "c"]   # other ranks and targets
    kw = {"density": 0.5} if kind in merging.PRUNING_TYPES else {}
    if kind == "svd-clamped":
        kind, kw = "svd", {"svd_clamp": 0.9, "svd_rank": 3}
    _seeded_peft_dare(monkeypatch, 11)
    theirs, ours = _load(peft, saved, names), _load(deltatune, saved, names)
    theirs.add_weighted_adapter(names, WEIGHTS, "mix", combination_type=kind, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours.add_weighted_adapter(names, WEIGHTS, "mix", combination_type=kind, seed=11, **kw)
    ids = token_batch()
    expected = _combined_logits(theirs, "mix", ids)
    torch.testing.assert_close(_combined_logits(ours, "mix", ids), expected, rtol=0, atol=1e-4)
    with torch.no_grad():   # and the combination changed the model (not two untouched bases)
        assert (expected - logits_of(tiny_llama(), ids)).abs().max() > 1e-3


def _deltas(model, name):
    """Module name -> the adapter's full delta (merged weight minus base), fp32."""
    out = {}
    for module, layer in model.base_model.adapter_layers():
        if name in layer.held:
            W = layer.get_base_layer().weight.detach().float()
            out[module] = layer.merged_weight(W.clone(), name) - W
    return out


def _weighted_sum(model, names, weights):
    total = {}
    for name, w in zip(names, weights):
        for module, delta in _deltas(model, name).items():
            total[module] = total.get(module, 0) + w * delta
    return total


@pytest.mark.parametrize("names", [["a", "c"], ["rs1", "rs2"], ["a", "rs2", "c"]], ids=["ranks", "rslora", "three"])
@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_cat_and_full_rank_svd_are_the_weighted_sum(kind, names, saved):
    model = _load(deltatune, saved, names)
    weights = [0.7, -0.4, 1.3][:len(names)]
    full = sum(LoraConfig.from_pretrained(saved[n]).r for n in names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")    # exact types never warn
        model.add_weighted_adapter(names, weights, "mix", combination_type=kind, svd_rank=full)
    got, want = _deltas(model, "mix"), _weighted_sum(model, names, weights)
    assert sorted(got) == sorted(want)
    for module in want:
        torch.testing.assert_close(got[module], want[module], rtol=0, atol=1e-5)
    config = model.peft_config["mix"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (full, full, False)


def test_rslora_source_keeps_its_scaling(saved):
    """peft copies use_rslora into the combined config: one rank-4 rsLoRA source comes out with
    twice its delta there (sqrt(4) again); here it equals the source."""
    ours = _load(deltatune, saved, ["rs1"])
    ours.add_weighted_adapter(["rs1"], [1.0], "same", combination_type="svd")
    got, want = _deltas(ours, "same"), _deltas(ours, "rs1")
    for module in want:
        torch.testing.assert_close(got[module], want[module], rtol=0, atol=1e-5)
    theirs = _load(peft, saved, ["rs1"])
    theirs.add_weighted_adapter(["rs1"], [1.0], "same", combination_type="svd")
    layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    ratio = layer.get_delta_weight("same").norm() / layer.get_delta_weight("rs1").norm()
    assert abs(float(ratio) - 2.0) < 1e-4     # the peft problem the issue describes


@pytest.mark.parametrize("kind", merging.FACTORWISE_TYPES)
def test_factorwise_types_warn_once_with_the_error(kind, saved):
    model = _load(deltatune, saved, ["a", "b"])
    kw = {"density": 0.5} if kind in merging.PRUNING_TYPES else {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type=kind, seed=0, **kw)
    messages = [str(w.message) for w in caught if "weighted sum" in str(w.message)]
    assert len(messages) == 1 and "relative error" in messages[0] and "'cat'" in messages[0]


def test_single_source_linear_is_exact_and_silent(saved):
    model = _load(deltatune, saved, ["a"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.add_weighted_adapter(["a"], [-0.5], "neg", combination_type="linear")
    for module, delta in _deltas(model, "a").items():
        torch.testing.assert_close(_deltas(model, "neg")[module], -0.5 * delta, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties_svd"])
def test_dare_seed_reproduces(kind, saved):
    def combined(seed):
        model = _load(deltatune, saved, ["a", "b"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type=kind, density=0.5, seed=seed)
        return {k: v.clone() for k, v in model.base_model.adapter_state("mix").items()}

    torch.manual_seed(0)
    first = combined(3)
    torch.manual_seed(1)          # the global generator does not matter with seed=
    again, other = combined(3), combined(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_dora_sources_combine_their_merged_deltas(saved):
    model = _load(deltatune, saved, ["dora", "a"])
    model.add_weighted_adapter(["dora", "a"], WEIGHTS, "mix", combination_type="svd", svd_rank=32)
    got, want = _deltas(model, "mix"), _weighted_sum(model, ["dora", "a"], WEIGHTS)
    for module in want:
        torch.testing.assert_close(got[module], want[module], rtol=0, atol=1e-5)
    assert not model.peft_config["mix"].use_dora
    with pytest.raises(CombineError, match="DoRA.*svd"):
        model.add_weighted_adapter(["dora", "a"], WEIGHTS, "bad", combination_type="cat")
    assert "bad" not in model.peft_config


def test_ia3_linear_is_the_weighted_sum_and_matches_peft(tmp_path):
    kw = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    saved = {name: save_perturbed_adapter(tmp_path / name, IA3Config(**kw), seed) for name, seed in (("x", 1), ("y", 2))}
    ours, theirs = _load(deltatune, saved, ["x", "y"]), _load(peft, saved, ["x", "y"])
    ours.add_weighted_adapter(["x", "y"], [0.25, 0.75], "mix", combination_type="linear")
    theirs.add_weighted_adapter(["x", "y"], [0.25, 0.75], "mix")    # weights summing to 1: the same rule
    ids = token_batch()
    torch.testing.assert_close(_combined_logits(ours, "mix", ids), _combined_logits(theirs, "mix", ids),
                               rtol=0, atol=1e-4)
    ours.add_weighted_adapter(["x", "y"], [1.0, -0.5], "diff", combination_type="linear")
    got, want = _deltas(ours, "diff"), _weighted_sum(ours, ["x", "y"], [1.0, -0.5])
    for module in want:
        torch.testing.assert_close(got[module], want[module], rtol=0, atol=1e-5)
    with pytest.raises(CombineError, match="linear"):
        ours.add_weighted_adapter(["x", "y"], [0.5, 0.5], "bad", combination_type="svd")


def test_combined_adapter_saves_and_loads_in_peft(saved, tmp_path):
    model = _load(deltatune, saved, ["a", "c"])
    model.add_weighted_adapter(["a", "c"], WEIGHTS, "mix", combination_type="cat")
    model.set_adapter("mix")
    model.save_pretrained(tmp_path / "out", selected_adapters=["mix"])
    ids = token_batch()
    with torch.no_grad():
        want = logits_of(model, ids)
        for lib in (peft, deltatune):
            loaded = lib.PeftModel.from_pretrained(tiny_llama(), tmp_path / "out" / "mix").eval()
            torch.testing.assert_close(logits_of(loaded, ids), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("args, match", [
    ((["a", "zz"], WEIGHTS, "mix"), "unknown adapter"),
    ((["a", "b"], [1.0], "mix"), "1 weights for 2 adapters"),
    ((["a", "b"], WEIGHTS, "a"), "already exists"),
    ((["a", "b"], WEIGHTS, "mix", "ties"), "density"),
    ((["a", "b"], WEIGHTS, "mix", "nope"), "combination_type"),
    ((["a", "c"], WEIGHTS, "mix", "linear"), "one rank"),
])
def test_bad_requests_name_the_problem_and_change_nothing(args, match, saved):
    model = _load(deltatune, saved, ["a", "b", "c"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(*args)
    assert sorted(model.peft_config) == ["a", "b", "c"]
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)


def _main(argv):
    from deltatune.cli import main

    return main([str(a) for a in argv])


def test_combine_cli_needs_no_base_for_lora(saved, tmp_path, monkeypatch):
    def no_base(*_a, **_k):
        raise AssertionError("combine loaded the base model for LoRA sources")

    monkeypatch.setattr(deltatune.models, "load", no_base)
    out = tmp_path / "ties"
    assert _main(["combine", "--adapter", f"a={saved['a']}", "--adapter", f"b={saved['b']}", "--weights", "0.7,-0.4",
                  "--type", "ties", "--density", "0.5", "--out", out]) == 0
    model = _load(deltatune, saved, ["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type="ties", density=0.5)
    ids = token_batch()
    loaded = PeftModel.from_pretrained(tiny_llama(), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded, ids), _combined_logits(model, "mix", ids), rtol=0, atol=1e-6)


def test_combine_cli_loads_the_base_for_dora(saved, tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama().save_pretrained(base_dir)
    out = tmp_path / "mix"
    assert _main(["combine", "--base", base_dir, "--adapter", f"d={saved['dora']}", "--adapter", f"a={saved['a']}",
                  "--weights", "0.7,-0.4", "--type", "svd", "--svd-rank", 8, "--out", out]) == 0
    model = _load(deltatune, saved, ["dora", "a"])
    model.add_weighted_adapter(["dora", "a"], WEIGHTS, "mix", combination_type="svd", svd_rank=8)
    ids = token_batch()
    loaded = PeftModel.from_pretrained(tiny_llama(), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(loaded, ids), _combined_logits(model, "mix", ids), rtol=0, atol=1e-5)


def test_combine_cli_errors(saved, tmp_path, capsys):
    assert _main(["combine", "--adapter", f"a={saved['a']}", "--weights", "x", "--out", tmp_path / "o"]) == 2
    assert "--weights" in capsys.readouterr().err
    assert _main(["combine", "--adapter", f"a={saved['a']}", "--adapter", f"c={saved['c']}", "--weights", "1,1",
                  "--type", "linear", "--out", tmp_path / "o"]) == 2
    assert "one rank" in capsys.readouterr().err and not (tmp_path / "o").exists()
