"""Diffusion LoRA: files diffusers and kohya tools read, checked against diffusers itself.

Every model is a tiny random one built from a config (no download). "Same outputs" means the
UNet's (or transformer's) prediction for the same inputs within 1e-5 in fp32.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import UNet2DConditionModel  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from deltatune import LoraConfig, get_peft_model  # noqa: E402
from deltatune.checkpoint.io import CheckpointError  # noqa: E402
from deltatune.diffusion import METADATA_KEY, WEIGHT_NAME, load_lora_weights, save_lora_weights  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "conv1", "conv2"]


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """An SD-style UNet (cross-attention transformer blocks, resnets), ~0.8M parameters."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8).eval()


def tiny_pipeline(unet):
    """A StableDiffusionPipeline around ``unet`` (tiny VAE and CLIP text encoder, no tokenizer)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    te = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=1,
                                      vocab_size=64, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=None, unet=unet,
                                       scheduler=DDIMScheduler(clip_sample=False), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


INPUTS = None


def unet_out(model) -> torch.Tensor:
    """The UNet's noise prediction for fixed inputs (two samples, two timesteps, text states)."""
    global INPUTS
    if INPUTS is None:
        g = torch.Generator().manual_seed(7)
        INPUTS = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 600]), torch.randn(2, 5, 16, generator=g))
    x, t, text = INPUTS
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=text).sample


def trained_like(config: LoraConfig, seed: int = 0):
    """A deltatune LoRA whose B factors are non-zero (as after training)."""
    model = get_peft_model(tiny_unet(), config)
    torch.manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    return model


def diffusers_lora_unet(r: int, alpha: float, seed: int = 3):
    """A UNet with a LoRA added by diffusers/peft themselves, random factors."""
    from peft import LoraConfig as PeftLoraConfig

    unet = tiny_unet()
    unet.add_adapter(PeftLoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    return unet


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_deltatune_file_loads_in_diffusers_pipeline_with_same_outputs(tmp_path, layout):
    """alpha != r (12 vs 4) over attention, feed-forward and resnet Conv2d layers."""
    model = trained_like(LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS))
    expected = unet_out(model)
    assert not close(expected, unet_out(tiny_unet()), 1e-3)  # the adapter changes the output
    path = save_lora_weights(model, tmp_path, layout=layout)
    assert path == tmp_path / WEIGHT_NAME
    pipe = tiny_pipeline(tiny_unet())
    pipe.load_lora_weights(tmp_path)
    assert close(unet_out(pipe.unet), expected)
    back = load_lora_weights(tiny_unet(), tmp_path)
    assert close(unet_out(back), expected)


def test_dora_file_loads_in_diffusers_with_same_outputs(tmp_path):
    """DoRA (magnitude vectors, Conv2d's stored (1, out, 1, 1) as peft does) through diffusers."""
    model = trained_like(LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["to_q", "to_v", "conv1"]))
    expected = unet_out(model)
    save_lora_weights(model, tmp_path)
    pipe = tiny_pipeline(tiny_unet())
    pipe.load_lora_weights(tmp_path)
    assert close(unet_out(pipe.unet), expected)
    assert close(unet_out(load_lora_weights(tiny_unet(), tmp_path)), expected)


def test_diffusers_file_keys_and_metadata(tmp_path):
    model = trained_like(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "conv1"]))
    save_lora_weights(model, tmp_path)
    keys = load_file(tmp_path / WEIGHT_NAME)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert keys["unet.down_blocks.0.resnets.0.conv1.lora_B.weight"].shape == (16, 4, 1, 1)
    with safe_open(str(tmp_path / WEIGHT_NAME), "pt") as fh:
        meta = json.loads(fh.metadata()[METADATA_KEY])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8
    assert "down_blocks.0.resnets.0.conv1" in meta["unet.target_modules"]


@pytest.mark.parametrize("with_metadata", [True, False])
def test_diffusers_saved_file_loads_with_diffusers_outputs(tmp_path, with_metadata):
    """A file diffusers writes itself, alpha (16) != r (4): with the metadata both keep alpha;
    without it diffusers uses alpha = r, and so must deltatune (same outputs as diffusers)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    unet = diffusers_lora_unet(r=4, alpha=16)
    original = unet_out(unet)
    meta = unet.peft_config["default"].to_dict() if with_metadata else None
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=meta)
    pipe = tiny_pipeline(tiny_unet())
    pipe.load_lora_weights(tmp_path)
    via_diffusers = unet_out(pipe.unet)
    ours = load_lora_weights(tiny_unet(), tmp_path)
    assert close(unet_out(ours), via_diffusers)
    assert close(via_diffusers, original) == with_metadata   # without metadata alpha is lost
    layer = ours.base_model.model.down_blocks[0].resnets[0].conv1
    assert layer.scaling["default"] == (4.0 if with_metadata else 1.0)


def kohya_file(path, modules: dict, seed: int = 5) -> dict:
    """Write a kohya file as sd-scripts writes one for SD 1.x (diffusers module names with '_'
    for '.'): ``{flat name: (fan_in, fan_out, r, alpha)}``; returns the tensors."""
    torch.manual_seed(seed)
    state = {}
    for flat, (fan_in, fan_out, r, alpha) in modules.items():
        conv = "conv1" in flat
        state[f"lora_unet_{flat}.lora_down.weight"] = torch.randn(r, fan_in, *((3, 3) if conv else ()))
        state[f"lora_unet_{flat}.lora_up.weight"] = torch.randn(fan_out, r, *((1, 1) if conv else ())) * 0.3
        state[f"lora_unet_{flat}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))
    return state


KOHYA_MODULES = {"down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (16, 16, 4, 2.0),
                 "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (16, 16, 8, 2.0),
                 "mid_block_attentions_0_transformer_blocks_0_ff_net_2": (128, 32, 4, 2.0),
                 "up_blocks_1_resnets_0_conv1": (48, 16, 4, 2.0)}


def test_kohya_file_mixed_ranks_loads_with_diffusers_outputs(tmp_path):
    """Ranks 4 and 8, alpha 2 != r, on attention, feed-forward and a resnet conv."""
    kohya_file(tmp_path / "style.safetensors", KOHYA_MODULES)
    pipe = tiny_pipeline(tiny_unet())
    pipe.load_lora_weights(str(tmp_path), weight_name="style.safetensors")
    ours = load_lora_weights(tiny_unet(), tmp_path / "style.safetensors")
    assert close(unet_out(ours), unet_out(pipe.unet))
    assert not close(unet_out(ours), unet_out(tiny_unet()), 1e-3)
    conv = ours.base_model.model.up_blocks[1].resnets[0].conv1
    assert conv.r["default"] == 4 and conv.scaling["default"] == pytest.approx(0.5)


def test_kohya_per_module_alphas_follow_kohya(tmp_path):
    """Each module scaled by its own alpha / r, as sd-scripts applies it: equal to the UNet with
    ``W + alpha/r * up @ down`` written into each weight by hand. (diffusers 0.42 drops the
    per-module alpha of attention modules here: its alpha_pattern keeps the key's
    'processor.to_k_lora.down.weight' tail and peft ignores it.)"""
    modules = {**KOHYA_MODULES, "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (16, 16, 8, 8.0),
               "mid_block_attentions_0_transformer_blocks_0_ff_net_2": (128, 32, 4, 1.0)}
    state = kohya_file(tmp_path / "style.safetensors", modules)
    ours = load_lora_weights(tiny_unet(), tmp_path / "style.safetensors")
    by_hand = tiny_unet()
    with torch.no_grad():
        for flat, (_, _, r, alpha) in modules.items():
            down, up = state[f"lora_unet_{flat}.lora_down.weight"], state[f"lora_unet_{flat}.lora_up.weight"]
            module = dict(by_hand.named_modules())[next(n for n, _ in by_hand.named_modules()
                                                        if n.replace(".", "_") == flat)]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)   # (out, in[, kh, kw])
            module.weight += alpha / r * delta
    assert close(unet_out(ours), unet_out(by_hand))


def test_strict_loading_names_the_key_and_leaves_model_unchanged(tmp_path):
    model = trained_like(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]))
    save_lora_weights(model, tmp_path)
    state = load_file(tmp_path / WEIGHT_NAME)
    state["unet.down_blocks.0.attentions.0.no_such.lora_A.weight"] = torch.zeros(4, 16)
    save_file(state, str(tmp_path / "extra.safetensors"))
    unet = tiny_unet()
    before = unet_out(unet)
    with pytest.raises(CheckpointError, match="unet.down_blocks.0.attentions.0.no_such.lora_A.weight"):
        load_lora_weights(unet, tmp_path / "extra.safetensors")
    state.pop("unet.down_blocks.0.attentions.0.no_such.lora_A.weight")
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
    state[key] = torch.zeros(16, 8)                                   # wrong rank for its A
    save_file(state, str(tmp_path / "shape.safetensors"))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_lora_weights(unet, tmp_path / "shape.safetensors")
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 16),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(16, 4)},
              str(tmp_path / "sgm.safetensors"))
    with pytest.raises(CheckpointError, match="lora_unet_input_blocks_1_1_proj_in"):
        load_lora_weights(unet, tmp_path / "sgm.safetensors")
    assert type(unet.mid_block.attentions[0].transformer_blocks[0].attn1.to_q) is torch.nn.Linear
    assert torch.equal(unet_out(unet), before)


def test_merge_into_unet_matches_unmerged_and_adds_no_layers(tmp_path):
    model = trained_like(LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    save_lora_weights(model, tmp_path)
    loaded = load_lora_weights(tiny_unet(), tmp_path)
    unmerged = unet_out(loaded)
    merged = loaded.merge_and_unload()
    assert type(merged) is UNet2DConditionModel
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in tiny_unet().parameters())
    assert close(unet_out(merged), unmerged)


def test_second_adapter_and_prefix_none(tmp_path):
    """A model's own ``save_lora_adapter`` file (bare keys) loads with prefix=None beside another."""
    unet = diffusers_lora_unet(r=4, alpha=8)
    expected = unet_out(unet)
    unet.save_lora_adapter(str(tmp_path))
    first = trained_like(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]))
    ours = load_lora_weights(first, tmp_path, prefix=None, adapter_name="style")
    assert ours is first and ours.active_adapter == "default"
    ours.set_adapter("style")
    assert close(unet_out(ours), expected)


def test_info_on_diffusers_and_kohya_files(tmp_path, capsys):
    from deltatune.cli import main

    model = trained_like(LoraConfig(r=4, lora_alpha=12, target_modules=["to_q", "conv1"]))
    save_lora_weights(model, tmp_path / "d")
    save_lora_weights(model, tmp_path / "k", layout="kohya", weight_name="style.safetensors")
    assert main(["info", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "diffusers" in out and "component unet" in out and "rank 4" in out and "lora_alpha': 12" in out
    assert main(["info", str(tmp_path / "k" / "style.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "kohya" in out and "alpha 12" in out
    save_file({"unet.a.lora_A.weight": torch.zeros(2, 3), "unet.a.lora_B.weight": torch.zeros(3, 2)},
              str(tmp_path / "bare.safetensors"))
    assert main(["info", str(tmp_path / "bare.safetensors")]) == 0
    assert "alpha = r" in capsys.readouterr().out


def test_transformer_backbones_roundtrip_with_diffusers(tmp_path):
    """SD3 and Flux transformers: attention projections and feed-forward, prefix 'transformer'."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cases = [
        (lambda: SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                       num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                       pooled_projection_dim=16, out_channels=4),
         dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
              pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([5]))),
        (lambda: FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)),
         dict(hidden_states=torch.randn(1, 16, 4, generator=g), encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
              pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
              img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(3, 3))),
    ]
    for i, (make, inputs) in enumerate(cases):
        def build():
            torch.manual_seed(i)
            return make().eval()
        model = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v",
                                                                                       "to_out.0", "ff.net.2"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.2, generator=g)
            expected = model(**inputs).sample
        save_lora_weights(model, tmp_path / str(i), prefix="transformer")
        theirs = build()
        theirs.load_lora_adapter(str(tmp_path / str(i)), prefix="transformer", weight_name=WEIGHT_NAME)
        ours = load_lora_weights(build(), tmp_path / str(i), prefix="transformer")
        with torch.no_grad():
            assert close(theirs(**inputs).sample, expected)
            assert close(ours(**inputs).sample, expected)


def test_other_components_are_skipped_unknown_prefixes_are_errors(tmp_path):
    """A pipeline file's text-encoder part (diffusers 'text_encoder.*', kohya 'lora_te_*') is not
    the UNet's: skipped. A key under no known component is an error naming it."""
    state = kohya_file(tmp_path / "k.safetensors", KOHYA_MODULES)
    state["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 16)
    state["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(16, 4)
    save_file(state, str(tmp_path / "with_te.safetensors"))
    assert close(unet_out(load_lora_weights(tiny_unet(), tmp_path / "with_te.safetensors")),
                 unet_out(load_lora_weights(tiny_unet(), tmp_path / "k.safetensors")), 0)
    model = trained_like(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q"]))  # rewritten files lose the header
    save_lora_weights(model, tmp_path)
    state = load_file(tmp_path / WEIGHT_NAME)
    save_file({**state, "text_encoder.text_model.q_proj.lora_A.weight": torch.zeros(4, 16)},
              str(tmp_path / "pipe.safetensors"))
    assert close(unet_out(load_lora_weights(tiny_unet(), tmp_path / "pipe.safetensors")), unet_out(model))
    save_file({**state, "vae.decoder.conv_in.lora_A.weight": torch.zeros(4, 16)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match="vae.decoder.conv_in.lora_A.weight"):
        load_lora_weights(tiny_unet(), tmp_path / "odd.safetensors")
