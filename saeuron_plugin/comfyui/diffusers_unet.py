"""Load an SD-1.x-shaped diffusers ``UNet2DConditionModel`` into ComfyUI's own ``UNetModel``.

ComfyUI's diffusers loader only recognises the released SD architectures; this builds the
``unet_config`` from the diffusers config instead, so small SD-shaped UNets (the embedded
ShapesCanvas default, the tiny test UNets) run on ComfyUI's model code and sampling. Weights are
mapped with ``comfy.utils.unet_to_diffusers`` (ComfyUI's own key map). ComfyUI hard-codes 32
groups in its GroupNorms; other ``norm_num_groups`` get a custom ``operations`` class whose
GroupNorm uses the diffusers group count. The result is a ``ModelPatcher`` like the one a
checkpoint loader returns (an SD 1.5 model config, EPS or v prediction).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..sae.files import read_json_object

_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_REQUIRED = {
    "act_fn": "silu",
    "addition_embed_type": None,
    "class_embed_type": None,
    "center_input_sample": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "dual_cross_attention": False,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "only_cross_attention": False,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "time_cond_proj_dim": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "reverse_transformer_layers_per_block": None,
    "attention_type": "default",
    "time_embedding_dim": None,
    "timestep_post_act": None,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "time_embedding_act_fn": None,
    "class_embeddings_concat": False,
}


def _per_level(value: Any, levels: int) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value] * levels


def unet_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """ComfyUI ``unet_config`` (``UNetModel`` kwargs) for an SD-1.x-shaped diffusers UNet config."""
    cfg = dict(config)
    for key, want in _REQUIRED.items():
        got = cfg.get(key, want)
        if got != want and not (key == "only_cross_attention" and not any(_per_level(got, 1))):
            raise ValueError(f"unsupported diffusers UNet: {key}={got!r} (need {want!r})")
    if float(cfg.get("norm_eps", 1e-5)) != 1e-5:
        raise ValueError(f"unsupported diffusers UNet: norm_eps={cfg.get('norm_eps')} (ComfyUI uses 1e-5)")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if any(t not in _DOWN for t in down) or any(t not in _UP for t in up) or len(down) != len(up):
        raise ValueError(f"unsupported block types {down} / {up}")
    levels = len(down)
    channels = list(cfg["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of {base}")
    res = _per_level(cfg.get("layers_per_block", 2), levels)
    depth = _per_level(cfg.get("transformer_layers_per_block", 1), levels)
    heads = _per_level(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8), levels)
    attn_levels = [i for i in range(levels) if _DOWN[down[i]] or _UP[up[levels - 1 - i]]]
    used = {heads[i] for i in attn_levels} | {heads[-1]}
    if len(used) == 1:
        head_kwargs = {"num_heads": int(used.pop()), "num_head_channels": -1}
    else:
        dims = {channels[i] // heads[i] for i in attn_levels} | {channels[-1] // heads[-1]}
        if len(dims) != 1:
            raise ValueError(f"attention heads {heads} fit neither a fixed head count nor a fixed head width")
        head_kwargs = {"num_heads": -1, "num_head_channels": int(dims.pop())}
    transformer_depth = [depth[i] if _DOWN[down[i]] else 0 for i in range(levels) for _ in range(res[i])]
    transformer_depth_output = [
        depth[i] if _UP[up[levels - 1 - i]] else 0 for i in range(levels) for _ in range(res[i] + 1)
    ]
    cross = cfg.get("cross_attention_dim")
    if isinstance(cross, list | tuple):
        if len(set(cross)) != 1:
            raise ValueError(f"per-level cross_attention_dim {cross} is not supported")
        cross = cross[0]
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "in_channels": int(cfg.get("in_channels", 4)),
        "out_channels": int(cfg.get("out_channels", 4)),
        "model_channels": int(base),
        "num_res_blocks": [int(r) for r in res],
        "channel_mult": [c // base for c in channels],
        "transformer_depth": transformer_depth,
        "transformer_depth_output": transformer_depth_output,
        "transformer_depth_middle": int(depth[-1]),
        "context_dim": int(cross),
        "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)),
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
        "dtype": torch.float32,
        **head_kwargs,
    }


def _group_norm_ops(groups: int) -> type:
    """ComfyUI operations whose GroupNorm always uses ``groups`` groups (ComfyUI hard-codes 32)."""
    import comfy.ops

    class GroupNorm(comfy.ops.disable_weight_init.GroupNorm):
        def __init__(self, num_groups: int, num_channels: int, *args: Any, **kwargs: Any) -> None:
            super().__init__(groups, num_channels, *args, **kwargs)

    return type(f"GroupNorm{groups}Ops", (comfy.ops.disable_weight_init,), {"GroupNorm": GroupNorm})


def load_diffusers_unet(
    unet: Any,
    *,
    scheduler_config: Mapping[str, Any] | None = None,
    latent_scale: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A ComfyUI ``ModelPatcher`` holding ``unet``: a diffusers UNet2DConditionModel, its folder, or a
    pipeline folder (then the scheduler config and the VAE scaling factor are read from it too).

    ``scheduler_config`` (the diffusers scheduler's config) sets the beta schedule, the number of
    training steps and the prediction type; ``latent_scale`` is the VAE scaling factor (default
    0.18215, SD's).
    """

    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils

    if isinstance(unet, str | Path):
        from diffusers import UNet2DConditionModel

        folder = Path(unet)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet" if (folder / "unet").is_dir() else folder)
        sched_file, vae_file = folder / "scheduler" / "scheduler_config.json", folder / "vae" / "config.json"
        if scheduler_config is None and sched_file.is_file():
            scheduler_config = read_json_object(sched_file, "scheduler config")
        if latent_scale is None and vae_file.is_file():
            latent_scale = read_json_object(vae_file, "VAE config").get("scaling_factor")
    latent_scale = 0.18215 if latent_scale is None else float(latent_scale)
    unet_config = unet_config_from_diffusers(unet.config)
    unet_config["dtype"] = dtype
    sched = dict(scheduler_config or {})
    schedule = {"scaled_linear": "linear", "linear": "sqrt_linear"}.get(
        sched.get("beta_schedule", "scaled_linear")
    )
    if schedule is None:
        raise ValueError(f"unsupported beta_schedule {sched.get('beta_schedule')!r}")
    sampling = {
        "beta_schedule": schedule,
        "linear_start": float(sched.get("beta_start", 0.00085)),
        "linear_end": float(sched.get("beta_end", 0.012)),
        "timesteps": int(sched.get("num_train_timesteps", 1000)),
    }
    if sched.get("rescale_betas_zero_snr"):
        sampling["zsnr"] = True

    class LatentFormat(comfy.latent_formats.SD15):
        def __init__(self) -> None:
            super().__init__(scale_factor=latent_scale)

    attrs = {
        "unet_config": {},
        "unet_extra_config": {},
        "latent_format": LatentFormat,
        "sampling_settings": sampling,
    }
    config_cls = type("DiffusersSD15", (comfy.supported_models.SD15,), attrs)
    model_config = config_cls(unet_config)
    groups = int(unet.config.get("norm_num_groups", 32))
    if groups != 32:
        model_config.custom_operations = _group_norm_ops(groups)
    model_type = comfy.model_base.ModelType.EPS
    if sched.get("prediction_type", "epsilon") == "v_prediction":
        model_type = comfy.model_base.ModelType.V_PREDICTION
    model = comfy.model_base.BaseModel(model_config, model_type=model_type)
    key_map = comfy.utils.unet_to_diffusers(unet_config)
    state = unet.state_dict()
    missing_map = [k for k in state if k not in key_map]
    if missing_map:
        raise ValueError(
            f"no ComfyUI key for diffusers weights {missing_map[:5]} (+{len(missing_map) - 5})"
            if len(missing_map) > 5
            else f"no ComfyUI key for diffusers weights {missing_map}"
        )
    converted = {key_map[k]: v.to(dtype) for k, v in state.items()}
    model.diffusion_model.load_state_dict(converted, strict=True)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


__all__ = ["load_diffusers_unet", "unet_config_from_diffusers"]
