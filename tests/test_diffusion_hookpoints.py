"""Hookpoint tables, family detection, errors and token layout (diffusion adapter)."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from tiny_pipelines import tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

from saeuron_plugin.diffusion.hookpoints import (
    HookpointError,
    UnsupportedModelError,
    detect_family,
    list_hookpoints,
    resolve_hookpoint,
    to_tokens,
)

# Real model configs (as published on the Hub), built on the meta device: no weights, no download.
SD15_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
SD21_UNET = {
    **SD15_UNET,
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "sample_size": 96,
}
SDXL_UNET = dict(
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    in_channels=4,
    layers_per_block=2,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)
SD35M_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)


def meta(cls, cfg):
    with torch.device("meta"):
        return cls(**cfg)


@pytest.fixture(scope="module")
def sd15():
    return meta(UNet2DConditionModel, SD15_UNET)


def blocks(denoiser):
    return [h.path for h in list_hookpoints(denoiser) if h.kind == "block"]


def test_sd15_block_table(sd15):
    expected = (
        [f"unet.down_blocks.{b}.attentions.{i}" for b in range(3) for i in range(2)]
        + [f"unet.up_blocks.{b}.attentions.{i}" for b in (1, 2, 3) for i in range(3)]
        + ["unet.mid_block.attentions.0"]
    )
    assert sorted(blocks(sd15)) == sorted(expected)
    assert detect_family(sd15) == "sd1"
    hp = resolve_hookpoint(sd15, "unet.up_blocks.1.attentions.1")
    assert (hp.kind, hp.width, hp.family, hp.output_index) == ("block", 1280, "sd1", 0)
    attn = resolve_hookpoint(sd15, "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2")
    assert (attn.kind, attn.width) == ("attn", 1280)
    assert attn.module is sd15.up_blocks[1].attentions[2].transformer_blocks[0].attn2
    attns = [h.path for h in list_hookpoints(sd15) if h.kind == "attn"]
    assert len(attns) == 16 and all(p.endswith(".transformer_blocks.0.attn2") for p in attns)


def test_sdxl_and_sd2_tables():
    sdxl = meta(UNet2DConditionModel, SDXL_UNET)
    assert detect_family(sdxl) == "sdxl"
    expected = (
        [f"unet.down_blocks.{b}.attentions.{i}" for b in (1, 2) for i in range(2)]
        + [f"unet.up_blocks.{b}.attentions.{i}" for b in (0, 1) for i in range(3)]
        + ["unet.mid_block.attentions.0"]
    )
    assert sorted(blocks(sdxl)) == sorted(expected)
    assert resolve_hookpoint(sdxl, "unet.up_blocks.0.attentions.1").width == 1280
    assert resolve_hookpoint(sdxl, "unet.up_blocks.0.attentions.1.transformer_blocks.9.attn2").kind == "attn"
    assert detect_family(meta(UNet2DConditionModel, SD21_UNET)) == "sd2"


def test_sd35_attn2_is_self_attention_not_cross():
    sd35 = meta(SD3Transformer2DModel, SD35M_TRANSFORMER)
    assert detect_family(sd35) == "sd3"
    paths = [h.path for h in list_hookpoints(sd35)]
    assert paths == [f"transformer.transformer_blocks.{i}" for i in range(24)]
    with pytest.raises(HookpointError, match="self-attention"):
        resolve_hookpoint(sd35, "transformer.transformer_blocks.3.attn2")
    hp = resolve_hookpoint(sd35, "transformer.transformer_blocks.23")
    assert (hp.kind, hp.width, hp.output_index) == ("transformer_block", 1536, 1)


def test_tiny_pipeline_tables():
    sd = tiny_sd_pipeline()
    assert detect_family(sd) == "sd1"
    assert [(h.path, h.kind) for h in list_hookpoints(sd)] == [
        ("unet.down_blocks.0.attentions.0", "block"),
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2", "attn"),
        ("unet.up_blocks.1.attentions.0", "block"),
        ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2", "attn"),
        ("unet.up_blocks.1.attentions.1", "block"),
        ("unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2", "attn"),
        ("unet.mid_block.attentions.0", "block"),
        ("unet.mid_block.attentions.0.transformer_blocks.0.attn2", "attn"),
    ]
    # a BasicTransformerBlock inside a UNet resolves though it is not listed
    inner = resolve_hookpoint(sd, "unet.up_blocks.1.attentions.1.transformer_blocks.0")
    assert inner.kind == "transformer_block"
    pixart = tiny_pixart_pipeline()
    assert detect_family(pixart) == "pixart"
    assert [(h.path, h.output_index) for h in list_hookpoints(pixart)] == [  # attn2: PixArt's cross-attention
        ("transformer.transformer_blocks.0", 0),
        ("transformer.transformer_blocks.0.attn2", 0),
        ("transformer.transformer_blocks.1", 0),
        ("transformer.transformer_blocks.1.attn2", 0),
    ]
    assert resolve_hookpoint(pixart, "transformer.transformer_blocks.0.attn2").kind == "attn"
    sd3 = tiny_sd3_pipeline()
    assert detect_family(sd3) == "sd3"
    assert [h.path for h in list_hookpoints(sd3)] == [
        "transformer.transformer_blocks.0",
        "transformer.transformer_blocks.1",
    ]
    flux = tiny_flux_pipeline()
    assert detect_family(flux) == "flux"
    assert [(h.path, h.width, h.output_index) for h in list_hookpoints(flux)] == [
        ("transformer.transformer_blocks.0", 16, 1),
        ("transformer.single_transformer_blocks.0", 16, 1),
    ]


def test_unknown_and_unsupported_paths_list_valid_ones(sd15):
    with pytest.raises(HookpointError, match=r"unet\.up_blocks\.1\.attentions\.1") as err:
        resolve_hookpoint(sd15, "unet.up_blocks.9.attentions.1")
    assert "has no submodule" in str(err.value)
    with pytest.raises(HookpointError, match="paths start with 'unet'"):
        resolve_hookpoint(sd15, "transformer.transformer_blocks.0")
    with pytest.raises(HookpointError, match="not a hookable module type"):
        resolve_hookpoint(sd15, "unet.up_blocks.1.resnets.0")
    with pytest.raises(HookpointError, match="self-attention"):
        resolve_hookpoint(sd15, "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1")


def test_unsupported_models():
    with pytest.raises(UnsupportedModelError):
        detect_family(meta(UNet2DModel, dict(sample_size=8)))
    with pytest.raises(UnsupportedModelError):
        detect_family(object())
    with pytest.raises(UnsupportedModelError, match="addition_embed_type"):
        detect_family(
            meta(UNet2DConditionModel, {**SD15_UNET, "addition_embed_type": "image", "encoder_hid_dim": 768})
        )


def test_to_tokens_feature_map_row_major_view_and_restore():
    x = torch.randn(2, 5, 3, 4)
    tokens, restore = to_tokens(x)
    assert tokens.shape == (2, 12, 5)
    assert tokens.data_ptr() == x.data_ptr()  # a view: no copy when nothing is edited
    for h in range(3):
        for w in range(4):
            assert torch.equal(tokens[:, h * 4 + w], x[:, :, h, w])
    back = restore(tokens.to(torch.float64) + 1)
    assert back.dtype == x.dtype and back.is_contiguous() and torch.equal(back, x + 1)


def test_to_tokens_tuples_and_outputs():
    hs = torch.randn(2, 6, 8)
    tokens, restore = to_tokens((hs,))
    assert tokens is hs
    out = restore(hs * 2)
    assert isinstance(out, tuple) and len(out) == 1 and torch.equal(out[0], hs * 2)
    ehs = torch.randn(2, 3, 8)
    tokens, restore = to_tokens((ehs, hs), index=1)  # SD3 / FLUX joint blocks: (text, image)
    assert tokens is hs
    out = restore(hs + 1)
    assert out[0] is ehs and torch.equal(out[1], hs + 1)
    tokens, restore = to_tokens((None, hs), index=1)  # SD3's last joint block
    assert restore(hs)[0] is None
    fmap = torch.randn(1, 4, 2, 2)
    tokens, restore = to_tokens(Transformer2DModelOutput(sample=fmap))
    assert tokens.shape == (1, 4, 4)
    out = restore(tokens + 1)
    assert isinstance(out, Transformer2DModelOutput) and torch.equal(out.sample, fmap + 1)
    with pytest.raises(ValueError, match="expected a"):
        to_tokens(torch.randn(3))
    with pytest.raises(TypeError):
        to_tokens("nope")
