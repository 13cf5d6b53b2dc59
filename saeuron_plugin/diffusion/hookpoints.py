"""Model families, hookpoint lookup and token layout for diffusers denoisers.

A hookpoint is a module path relative to the pipeline (``unet.up_blocks.1.attentions.1``,
``unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2``, ``transformer.transformer_blocks.7``).
The module's *type* decides how it is hooked, never its name: SD3.5's ``attn2`` is a self-attention
``Attention`` and is refused as a cross-attention hookpoint.

All conversions between a module's output and the ``[B, T, C]`` token view an editor sees live in
:func:`to_tokens`, so every mechanism shares one definition of "token" (row-major H·W for feature
maps, the image stream for joint text/image blocks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.transformers.transformer_flux import (
    FluxSingleTransformerBlock,
    FluxTransformer2DModel,
    FluxTransformerBlock,
)
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.utils import BaseOutput
from torch import Tensor, nn

from ..errors import HookpointError, UnsupportedModelError

Family = Literal["sd1", "sd2", "sdxl", "pixart", "sd3", "flux"]
Kind = Literal["block", "attn", "transformer_block"]
FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl", "pixart", "sd3", "flux")
DENOISER_NAMES = ("unet", "transformer")

# Blocks whose output is ``(encoder_hidden_states, hidden_states)``: the image stream is element 1.
# Checked in diffusers 0.42: JointTransformerBlock (SD3; the last one returns (None, hs)),
# FluxTransformerBlock and FluxSingleTransformerBlock (the single block splits its joint stream
# back into text and image parts before returning).
_JOINT_BLOCKS = (JointTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock)
_TRANSFORMER_BLOCKS = (BasicTransformerBlock, *_JOINT_BLOCKS)


@dataclass(frozen=True)
class Hookpoint:
    """A resolved hookpoint: the module, how it is hooked, and its activation width.

    ``output_index`` is the element of a tuple output that holds the image tokens (0 for plain
    tensors and ``(sample,)`` tuples, 1 for joint text/image blocks).
    """

    path: str
    module: nn.Module = dataclasses.field(repr=False, compare=False)
    kind: Kind
    width: int
    family: str
    output_index: int = 0


# ------------------------------------------------------------------ families
def get_denoiser(pipe_or_denoiser: Any) -> nn.Module:
    """The denoiser of a pipeline (``unet`` or ``transformer``), or the module itself.

    A ``torch.compile`` wrapper is unwrapped: hooks go on the original module's submodules.
    """
    if isinstance(pipe_or_denoiser, nn.Module):
        return getattr(pipe_or_denoiser, "_orig_mod", pipe_or_denoiser)
    for name in DENOISER_NAMES:
        module = getattr(pipe_or_denoiser, name, None)
        if isinstance(module, nn.Module):
            return getattr(module, "_orig_mod", module)
    raise UnsupportedModelError(
        f"{type(pipe_or_denoiser).__name__} has no `unet` or `transformer` denoiser to hook"
    )


def denoiser_name(pipe_or_denoiser: Any) -> str:
    """The pipeline attribute holding the denoiser: ``"unet"`` or ``"transformer"``."""
    return "unet" if isinstance(get_denoiser(pipe_or_denoiser), UNet2DConditionModel) else "transformer"


def detect_family(pipe_or_denoiser: Any) -> str:
    """Model family from the denoiser class and config: sd1, sd2, sdxl, pixart, sd3 or flux.

    SD 1.x and 2.x share a class; they are told apart by the text width (1024 → sd2), best
    effort. Both normalise time the same way, so a wrong guess there changes only labels.
    """
    denoiser = get_denoiser(pipe_or_denoiser)
    if isinstance(denoiser, UNet2DConditionModel):
        cfg = denoiser.config
        if cfg.addition_embed_type == "text_time":
            return "sdxl"
        if cfg.addition_embed_type is not None or cfg.encoder_hid_dim_type is not None:
            raise UnsupportedModelError(
                f"UNet2DConditionModel with addition_embed_type={cfg.addition_embed_type!r}, "
                f"encoder_hid_dim_type={cfg.encoder_hid_dim_type!r} is not an SD 1.x/2.x/XL UNet"
            )
        dims = cfg.cross_attention_dim
        dims = dims if isinstance(dims, list | tuple) else [dims]
        return "sd2" if 1024 in dims else "sd1"
    for cls, family in (
        (PixArtTransformer2DModel, "pixart"),
        (SD3Transformer2DModel, "sd3"),
        (FluxTransformer2DModel, "flux"),
    ):
        if isinstance(denoiser, cls):
            return family
    raise UnsupportedModelError(
        f"unsupported denoiser {type(denoiser).__name__}: supported are UNet2DConditionModel (SD 1.x, 2.x, "
        "XL), PixArtTransformer2DModel, SD3Transformer2DModel and FluxTransformer2DModel"
    )


# ----------------------------------------------------------------- resolution
def _classify(module: nn.Module) -> tuple[Kind, int, int] | str:
    """(kind, width, output_index) for a hookable module, else the reason it is not hookable."""
    if isinstance(module, Transformer2DModel):
        cfg = module.config
        return "block", int(cfg.out_channels or cfg.in_channels), 0
    if isinstance(module, Attention):
        if not module.is_cross_attention:
            return "it is a self-attention Attention (is_cross_attention=False), not cross-attention"
        return "attn", int(module.out_dim), 0
    if isinstance(module, _TRANSFORMER_BLOCKS):
        attn = getattr(module, "attn1", None) or module.attn
        return "transformer_block", int(attn.query_dim), _image_stream_index(module)
    return f"{type(module).__name__} is not a hookable module type"


def _image_stream_index(block: nn.Module) -> int:
    """Which element of a transformer block's output holds the image tokens: diffusers' own table
    (``hooks._helpers.TransformerBlockRegistry``, private, read defensively), else ours."""
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry

        index = TransformerBlockRegistry.get(type(block)).return_hidden_states_index
        if isinstance(index, int):
            return index
    except (ImportError, AttributeError, ValueError, KeyError):
        pass
    return 1 if isinstance(block, _JOINT_BLOCKS) else 0


def list_hookpoints(pipe: Any) -> list[Hookpoint]:
    """Every standard hookpoint of a pipeline, in module order.

    UNets: every ``Transformer2DModel`` block and every cross-attention ``Attention`` inside.
    Transformers: every block of ``transformer_blocks`` (and FLUX's ``single_transformer_blocks``),
    and the block's cross-attention ``attn2`` where it has one (PixArt).
    """
    denoiser, prefix, family = get_denoiser(pipe), denoiser_name(pipe), detect_family(pipe)
    if isinstance(denoiser, UNet2DConditionModel):
        candidates: Any = denoiser.named_modules()
    else:
        candidates = (
            (name, module)
            for group in ("transformer_blocks", "single_transformer_blocks")
            for i, block in enumerate(getattr(denoiser, group, ()))
            for name, module in (
                (f"{group}.{i}", block),
                (f"{group}.{i}.attn2", getattr(block, "attn2", None)),
            )
            if module is not None
        )
    unet = isinstance(denoiser, UNet2DConditionModel)
    found = []
    for name, module in candidates:
        info = _classify(module)
        if isinstance(info, tuple) and not (unet and info[0] == "transformer_block"):
            found.append(Hookpoint(f"{prefix}.{name}", module, *info[:2], family, info[2]))
    return found


def resolve_hookpoint(pipe: Any, path: str) -> Hookpoint:
    """Find the module at ``path`` (relative to the pipeline) and decide how to hook it."""
    denoiser, prefix = get_denoiser(pipe), denoiser_name(pipe)
    head, _, rest = path.partition(".")
    module = None
    if head == prefix and rest:
        try:
            module = denoiser.get_submodule(rest)
        except AttributeError:
            module = None
    if module is None:
        why = (
            f"paths start with {prefix!r}"
            if head != prefix
            else f"{type(denoiser).__name__} has no submodule {rest!r}"
        )
        raise HookpointError(f"unknown hookpoint {path!r} ({why}); {_valid_list(pipe)}")
    info = _classify(module)
    if isinstance(info, str):
        raise HookpointError(f"hookpoint {path!r} cannot be hooked: {info}; {_valid_list(pipe)}")
    return Hookpoint(path, module, info[0], info[1], detect_family(pipe), info[2])


def _valid_list(pipe: Any, limit: int = 60) -> str:
    paths = [h.path for h in list_hookpoints(pipe)]
    shown = ", ".join(paths[:limit]) + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")
    return f"valid hookpoints: {shown}"


# -------------------------------------------------------------- token layout
Restore = Callable[[Tensor], Any]


def to_tokens(output: Any, index: int = 0) -> tuple[Tensor, Restore]:
    """View a module output as tokens ``[B, T, C]`` plus a function putting edited tokens back.

    Handles ``[B, C, H, W]`` feature maps (tokens in row-major H·W order, a view, no copy),
    ``[B, L, C]`` token tensors, and tuples / ``BaseOutput`` objects whose element ``index`` holds
    the image tokens (the rest is passed through untouched). ``restore`` casts back to the
    original dtype and, for feature maps, returns a contiguous NCHW tensor.
    """
    if isinstance(output, Tensor):
        return _tensor_tokens(output)
    if isinstance(output, BaseOutput):
        key = list(output.keys())[index]
        tokens, restore_inner = _tensor_tokens(output[key])

        def restore_output(edited: Tensor) -> Any:
            return dataclasses.replace(output, **{key: restore_inner(edited)})

        return tokens, restore_output
    if isinstance(output, tuple | list):
        tokens, restore_inner = _tensor_tokens(output[index])

        def restore_seq(edited: Tensor) -> Any:
            items = list(output)
            items[index] = restore_inner(edited)
            return type(output)(items)

        return tokens, restore_seq
    raise TypeError(f"cannot read tokens from a module output of type {type(output).__name__}")


def _tensor_tokens(x: Tensor) -> tuple[Tensor, Restore]:
    if x.dim() == 4:
        h, w = x.shape[-2:]
        contiguous = x.is_contiguous()

        def restore_map(edited: Tensor) -> Tensor:
            out = edited.to(x.dtype).unflatten(1, (h, w)).permute(0, 3, 1, 2)
            return out.contiguous() if contiguous else out

        return x.permute(0, 2, 3, 1).flatten(1, 2), restore_map
    if x.dim() == 3:
        return x, lambda edited: edited.to(x.dtype)
    raise ValueError(f"expected a [B, C, H, W] or [B, L, C] activation, got shape {tuple(x.shape)}")
