"""Tiny offline diffusers pipelines (random seeded weights, no downloads) for adapter tests.

Each builder returns a ready pipeline small enough that a 2-4 step generation at 16-32 px takes
well under a second on CPU. SD 1.x / SDXL use real CLIP text encoders with a character-level
tokenizer written to a temp folder; PixArt, SD3 and FLUX run without text encoders and take
``prompt_embeds`` (see the ``*_embeds`` helpers).
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_DIM = 32


def tiny_clip_tokenizer(max_length: int = 32) -> CLIPTokenizer:
    """Character-level CLIP tokenizer: specials + printable characters (+ ``</w>`` forms), no merges."""
    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    vocab = ["<|startoftext|>", "<|endoftext|>"] + chars + [f"{c}</w>" for c in chars]
    folder = Path(tempfile.mkdtemp(prefix="tiny-clip-tok-"))
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def _text_config(vocab_size: int, max_length: int, hidden: int = TEXT_DIM) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_length,
        projection_dim=hidden,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def tiny_vae(latent_channels: int = 4, **extra: Any) -> AutoencoderKL:
    """Two-level VAE (scale factor 2) with 8 channels per level."""
    return AutoencoderKL(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=16,
        **extra,
    )


def _ddim() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def tiny_sd_pipeline(
    cross_attention_dim: int = TEXT_DIM, seed: int = 0, channels: tuple[int, int] = (16, 32)
) -> StableDiffusionPipeline:
    """SD 1.x-shaped pipeline: CrossAttn down block 0, up block 1 (``unet.up_blocks.1.attentions.{0,1}``).

    ``up_blocks.1`` runs at ``channels[0]`` width (16 by default).
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(
        _text_config(len(tokenizer), tokenizer.model_max_length, cross_attention_dim)
    )
    pipe = StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=_ddim(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """SDXL-shaped pipeline: two text encoders, ``text_time`` added conditioning, 2-deep blocks."""
    torch.manual_seed(seed)
    time_dim = 4
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * TEXT_DIM,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * time_dim,
        norm_num_groups=8,
    )
    tokenizer = tiny_clip_tokenizer()
    cfg = _text_config(len(tokenizer), tokenizer.model_max_length)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(cfg).eval(),
        text_encoder_2=CLIPTextModelWithProjection(cfg).eval(),
        tokenizer=tokenizer,
        tokenizer_2=tiny_clip_tokenizer(),
        unet=unet.eval(),
        scheduler=DDIMScheduler.from_config(_ddim().config, timestep_spacing="trailing"),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart_pipeline(seed: int = 0) -> PixArtAlphaPipeline:
    """PixArt-α-shaped pipeline without a T5 encoder: pass :func:`pixart_embeds`."""
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=TEXT_DIM,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    pipe = PixArtAlphaPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=tiny_vae(),
        transformer=transformer.eval(),
        scheduler=DDIMScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3.5-shaped pipeline (block 0 has a self-attention ``attn2``); pass :func:`sd3_embeds`."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(shift_factor=0.0, scaling_factor=1.0),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """FLUX.1-shaped pipeline (1 double + 1 single block); pass :func:`flux_embeds`."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=16,
        axes_dims_rope=(4, 2, 2),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(shift_factor=0.0, scaling_factor=1.0),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer.eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- prompt embeddings
def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def pixart_embeds(n: int = 1, seq: int = 6, seed: int = 0) -> dict[str, Any]:
    """``prompt_embeds`` + masks (and negatives) for :func:`tiny_pixart_pipeline`."""
    mask = torch.ones(n, seq, dtype=torch.long)
    return {
        "negative_prompt": None,
        "prompt_embeds": _randn(n, seq, TEXT_DIM, seed=seed),
        "prompt_attention_mask": mask,
        "negative_prompt_embeds": _randn(n, seq, TEXT_DIM, seed=seed + 10_000),
        "negative_prompt_attention_mask": mask.clone(),
    }


def sd3_embeds(n: int = 1, seq: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` / ``pooled_prompt_embeds`` (and negatives) for :func:`tiny_sd3_pipeline`."""
    return {
        "prompt_embeds": _randn(n, seq, TEXT_DIM, seed=seed),
        "pooled_prompt_embeds": _randn(n, 16, seed=seed + 1),
        "negative_prompt_embeds": _randn(n, seq, TEXT_DIM, seed=seed + 10_000),
        "negative_pooled_prompt_embeds": _randn(n, 16, seed=seed + 10_001),
    }


def flux_embeds(n: int = 1, seq: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` / ``pooled_prompt_embeds`` for :func:`tiny_flux_pipeline`."""
    return {
        "prompt_embeds": _randn(n, seq, TEXT_DIM, seed=seed),
        "pooled_prompt_embeds": _randn(n, 16, seed=seed + 1),
    }
