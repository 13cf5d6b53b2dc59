"""Model families, hookpoint discovery and output layout for transformers vision-language models.

A hookpoint is a module path relative to the ``*ForConditionalGeneration`` model, as
``named_modules()`` spells it. Three kinds exist (paths found at run time, checked in
transformers 5.24; 4.57 uses the same decoder / projector paths):

* ``decoder``: one decoder layer of the language model, ``model.language_model.layers.<i>``
  (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Mllama) or ``model.text_model.layers.<i>``
  (Idefics3, SmolVLM). Output [B, T, d]; T matches the ``input_ids`` of the call, so image,
  text and padding positions are known from the top model's inputs.
* ``projector``: the multimodal projector, ``model.multi_modal_projector`` (LLaVA, Mllama),
  ``model.visual.merger`` (Qwen2-VL / 2.5-VL) or ``model.connector`` (Idefics3, SmolVLM).
  Every output token is an image token.
* ``vision``: one vision-encoder layer, e.g. ``model.vision_tower.encoder.layers.<i>`` (CLIP in
  5.x; ``model.vision_tower.vision_model.encoder.layers.<i>`` in 4.x), ``model.visual.blocks.<i>``
  (Qwen, packed [N, d] without a batch dim), ``model.vision_model.transformer.layers.<i>`` and
  ``model.vision_model.global_transformer.layers.<i>`` (Mllama), ``model.vision_model.encoder.layers.<i>``
  (Idefics3, SmolVLM).

Layer outputs may be a Tensor (transformers 5.x) or a tuple whose first element is the hidden
state (4.x): :func:`to_hidden` gives the tensor and a function that puts an edited one back.

Mllama has a single ``<|image|>`` token and injects vision through cross-attention layers, so
its decoder hookpoints work on text (or all) tokens at or after the first cross-attention layer.

This module imports torch only; transformers models are inspected by duck typing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from ..errors import HookpointError, UnsupportedModelError

Kind = Literal["decoder", "projector", "vision"]
TokenMode = Literal["image", "text", "all"]
TOKEN_MODES: tuple[str, ...] = ("image", "text", "all")

# config.model_type -> family. LLaVA-NeXT and SmolVLM share the LLaVA / Idefics3 layout.
FAMILIES: dict[str, str] = {
    "llava": "llava",
    "llava_next": "llava_next",
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "mllama": "mllama",
    "idefics3": "idefics3",
    "smolvlm": "smolvlm",
}

# Where each part lives, relative to the top model; the first path that exists wins.
_DECODER_ROOTS = ("model.language_model", "model.text_model", "language_model", "text_model")
_PROJECTOR_PATHS = (
    "model.multi_modal_projector",
    "model.visual.merger",
    "model.connector",
    "multi_modal_projector",
    "visual.merger",
    "connector",
)
_VISION_ROOTS = (
    "model.vision_tower",
    "model.visual",
    "model.vision_model",
    "vision_tower",
    "visual",
    "vision_model",
)
_LAYER_LISTS = ("layers", "blocks")


@dataclass(frozen=True)
class VLMHookpoint:
    """A resolved hookpoint: module, kind, output width and, for decoder layers, the layer index."""

    path: str
    module: nn.Module = dataclasses.field(repr=False, compare=False)
    kind: Kind
    width: int
    family: str
    index: int | None = None
    cross_attention: bool = False
    """Mllama decoder layers that attend to the image (``MllamaCrossAttentionDecoderLayer``)."""

    @property
    def image_only(self) -> bool:
        """Every token of this hookpoint is an image token (projector and vision layers)."""
        return self.kind != "decoder"


# ------------------------------------------------------------------------- families
def detect_family(model: Any) -> str:
    """Family of a supported ``*ForConditionalGeneration`` model; :class:`UnsupportedModelError` otherwise."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"expected a transformers model (nn.Module), got {type(model).__name__}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} (model_type={model_type!r}) is not a supported vision-language model; "
            f"supported model types: {', '.join(FAMILIES)}"
        )
    if not hasattr(model, "generate") or _find(model, _DECODER_ROOTS) is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is a {family} model without its generation head or language model; "
            "pass the *ForConditionalGeneration model (hookpoint paths are relative to it)"
        )
    return family


def image_token_id(model: Any) -> int | None:
    """``config.image_token_id`` (``image_token_index`` in older LLaVA / Mllama configs)."""
    cfg = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    return None


def text_config(model: Any) -> Any:
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


def cross_attention_layers(model: Any) -> list[int]:
    """Indices of Mllama's cross-attention decoder layers (empty for other families)."""
    layers = getattr(text_config(model), "cross_attention_layers", None)
    return sorted(int(i) for i in layers) if layers else []


def pad_token_id(model: Any) -> int:
    """A padding id for collating inputs (masked out, so any non-image id works)."""
    for cfg in (getattr(model, "generation_config", None), text_config(model), model.config):
        value = getattr(cfg, "pad_token_id", None) if cfg is not None else None
        if isinstance(value, int):
            return value
    return 0


# ------------------------------------------------------------------------- discovery
def _find(model: nn.Module, paths: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for path in paths:
        try:
            return path, model.get_submodule(path)
        except AttributeError:
            continue
    return None


def _first_norm_width(module: nn.Module) -> int | None:
    """Residual width of a transformer block: the size of its first 1-D norm weight."""
    for sub in module.modules():
        w = getattr(sub, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() == 1 and sub is not module:
            return int(w.numel())
    return None


def _last_linear_width(module: nn.Module) -> int | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features) if linears else None


def _layer_lists(root: nn.Module, prefix: str, skip: nn.Module | None) -> Iterator[tuple[str, nn.ModuleList]]:
    """ModuleLists named ``layers`` / ``blocks`` below ``root`` (outside ``skip``), in module order."""
    skipped = set() if skip is None else {id(m) for m in skip.modules()}
    for name, sub in root.named_modules():
        if (
            isinstance(sub, nn.ModuleList)
            and name.rsplit(".", 1)[-1] in _LAYER_LISTS
            and id(sub) not in skipped
        ):
            yield f"{prefix}.{name}" if name else prefix, sub


@dataclass
class HookpointIndex:
    """Every hookpoint of one model, by path, plus the layer lists (for range errors)."""

    family: str
    points: dict[str, VLMHookpoint]
    layer_lists: dict[str, int]
    """ModuleList path -> number of layers."""
    decoder_list: str

    def paths(self, kind: Kind | None = None) -> list[str]:
        return [p for p, h in self.points.items() if kind is None or h.kind == kind]

    def describe(self) -> str:
        """Valid hookpoints, compressed: ``model.language_model.layers.{0..31}, model.connector``."""
        parts = []
        for lst, n in self.layer_lists.items():
            parts.append(f"{lst}.{{0..{n - 1}}}" if n > 1 else f"{lst}.0")
        parts += [p for p, h in self.points.items() if h.kind == "projector"]
        return ", ".join(parts)


def hookpoint_index(model: Any) -> HookpointIndex:
    """Discover the decoder layers, projector and vision layers of a supported model."""
    family = detect_family(model)
    dec = _find(model, _DECODER_ROOTS)
    assert dec is not None  # detect_family checked it
    dec_path, dec_root = dec
    layers = getattr(dec_root, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__}: {dec_path} has no `layers` list")
    hidden = int(getattr(text_config(model), "hidden_size", 0) or _first_norm_width(layers[0]) or 0)
    cross = set(cross_attention_layers(model))
    points: dict[str, VLMHookpoint] = {}
    lists: dict[str, int] = {f"{dec_path}.layers": len(layers)}
    for i, layer in enumerate(layers):
        path = f"{dec_path}.layers.{i}"
        points[path] = VLMHookpoint(path, layer, "decoder", hidden, family, i, i in cross)
    proj = _find(model, _PROJECTOR_PATHS)
    if proj is not None:
        width = _last_linear_width(proj[1]) or hidden
        points[proj[0]] = VLMHookpoint(proj[0], proj[1], "projector", width, family)
    vis = _find(model, _VISION_ROOTS)
    if vis is not None:
        for list_path, lst in _layer_lists(vis[1], vis[0], proj[1] if proj else None):
            lists[list_path] = len(lst)
            for i, layer in enumerate(lst):
                path = f"{list_path}.{i}"
                width = _first_norm_width(layer)
                if width is None:
                    continue
                points[path] = VLMHookpoint(path, layer, "vision", width, family, i)
    return HookpointIndex(family, points, lists, f"{dec_path}.layers")


def list_hookpoints(model: Any, kind: Kind | None = None) -> list[str]:
    """Valid hookpoint paths of ``model`` (of one ``kind``, or all)."""
    return hookpoint_index(model).paths(kind)


def decoder_hookpoint(model: Any, layer: int) -> str:
    """Path of decoder layer ``layer`` (negative counts from the end)."""
    index = hookpoint_index(model)
    n = index.layer_lists[index.decoder_list]
    if not -n <= layer < n:
        raise HookpointError(
            f"decoder layer {layer} is out of range: {index.decoder_list} has {n} layers "
            f"(0..{n - 1}, or -{n}..-1)"
        )
    return f"{index.decoder_list}.{layer % n}"


def resolve_hookpoint(model: Any, path: str, index: HookpointIndex | None = None) -> VLMHookpoint:
    """The hookpoint at ``path``; :class:`HookpointError` (naming the valid ones) when there is none."""
    index = index or hookpoint_index(model)
    hp = index.points.get(path)
    if hp is not None:
        return hp
    m = re.fullmatch(r"(.*)\.(-?\d+)", path)
    if m and m[1] in index.layer_lists:
        n = index.layer_lists[m[1]]
        raise HookpointError(
            f"layer index {m[2]} is out of range for {path!r}: {m[1]} has {n} layers "
            f"(valid: {m[1]}.0 .. {m[1]}.{n - 1})"
        )
    raise HookpointError(
        f"{path!r} is not a hookpoint of this {index.family} model "
        f"({type(model).__name__}); valid hookpoints: {index.describe()}"
    )


def default_tokens(hp: VLMHookpoint) -> TokenMode:
    """Image tokens for decoder layers (text tokens for Mllama, whose image enters by cross-attention)."""
    if hp.image_only:
        return "all"
    return "text" if hp.family == "mllama" else "image"


def check_tokens(hp: VLMHookpoint, tokens: str | None, model: Any = None) -> TokenMode:
    """Validate the token selection for ``hp`` (None / ``auto``: :func:`default_tokens`)."""
    if tokens is None or tokens == "auto":
        return default_tokens(hp)
    if tokens not in TOKEN_MODES:
        raise ValueError(f"tokens must be 'image', 'text', 'all' or 'auto', got {tokens!r}")
    if hp.image_only:
        if tokens == "text":
            raise ValueError(
                f"{hp.path} is a {hp.kind} hookpoint: it holds image tokens only, "
                "so tokens='text' selects nothing (use 'all' or 'image')"
            )
        return "all"
    if hp.family == "mllama" and tokens == "image":
        raise ValueError(
            f"{hp.path}: Mllama has a single <|image|> token and injects the image through cross-attention "
            "layers; select tokens='text' or 'all' at a decoder layer at or after the first cross-attention "
            f"layer{_cross_hint(model)}"
        )
    return tokens  # type: ignore[return-value]


def _cross_hint(model: Any) -> str:
    layers = cross_attention_layers(model) if model is not None else []
    return f" (cross-attention layers: {layers})" if layers else ""


# --------------------------------------------------------------------------- outputs
def to_hidden(output: Any, path: str = "") -> tuple[Tensor, Callable[[Tensor], Any]]:
    """The hidden-state tensor of a module output and a function rebuilding the output around an edit.

    Tensor outputs (transformers 5.x layers, projectors) and tuples / lists whose first element is
    the hidden state (4.x layers) are understood.
    """
    if isinstance(output, Tensor):
        return output, lambda new: new
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        kind = type(output)

        def restore(new: Tensor) -> Any:
            rest = list(output[1:])
            return kind([new, *rest]) if kind in (tuple, list) else kind(new, *rest)

        return output[0], restore
    raise TypeError(
        f"{path or 'hookpoint'}: cannot find the hidden states in a {type(output).__name__} output"
    )


__all__ = [
    "FAMILIES",
    "TOKEN_MODES",
    "HookpointError",
    "HookpointIndex",
    "Kind",
    "TokenMode",
    "UnsupportedModelError",
    "VLMHookpoint",
    "check_tokens",
    "cross_attention_layers",
    "decoder_hookpoint",
    "default_tokens",
    "detect_family",
    "hookpoint_index",
    "image_token_id",
    "list_hookpoints",
    "pad_token_id",
    "resolve_hookpoint",
    "text_config",
    "to_hidden",
]
