"""Judges as plug-ins: images → probabilities over named labels, per domain.

A *judge* is anything with

* ``labels``: ``{domain: [label, ...]}`` (e.g. ``{"style": ["Van Gogh", "Monet", ...]}``), and
* ``probabilities(images) -> {domain: Tensor [N, len(labels[domain])]}`` (rows sum to 1),

where ``images`` is a float tensor ``[N, 3, H, W]`` in [0, 1], a list of PIL images, or a uint8
array. UA / IRA / CRA and every tuning objective are computed from these probabilities. Three
implementations:

* the ShapesCanvas judges (``saeuron_plugin.shapescanvas.judges.Judges``, ``load_judge("shapescanvas")``);
* :class:`ClipZeroShotJudge`: any CLIP through transformers (``CLIPModel`` + ``CLIPProcessor``, a
  Hub id or a local folder), label prompts built from the names with editable templates, the
  judge a user of a real model has (UnlearnCanvas-style evaluations use CLIP or ViT classifiers);
* :class:`CallableJudge`: any Python callable given as ``"module:function"``.

A judge that cannot load (offline and not cached, unknown repo, bad folder) raises
:class:`JudgeLoadError` when it is built, so a tuning run fails before any generation.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ..errors import SAeUronError
from ..sae.io import hub_offline

DEFAULT_TEMPLATES = {"style": "an image in {} style", "object": "a photo of a {}", "color": "something {}"}
"""Label prompt per domain (``{}`` is the label); other domains use ``"a photo of {}"``."""


class JudgeLoadError(SAeUronError, OSError):
    """A judge that cannot be loaded (missing, offline and not cached, not a judge)."""


@runtime_checkable
class Judge(Protocol):
    """Images → probabilities over named labels, per domain (see the module docstring)."""

    @property
    def labels(self) -> dict[str, list[str]]: ...

    def probabilities(self, images: Any) -> dict[str, Tensor]: ...


def as_float_images(images: Any) -> Tensor:
    """``[N, 3, H, W]`` float in [0, 1] from a tensor, a uint8 array / tensor or a list of PIL images."""
    if isinstance(images, Tensor):
        x = images
    elif isinstance(images, np.ndarray):
        x = torch.from_numpy(images)
        if x.dim() == 4 and x.shape[-1] in (1, 3):  # NHWC numpy
            x = x.permute(0, 3, 1, 2)
    else:
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1) for im in images])
    if not x.is_floating_point():
        x = x.float() / 255.0
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(x.shape)}")
    return x.clamp(0, 1)


def _pil(x: Tensor) -> list[Any]:
    """PIL images from [N, 3, H, W] floats in [0, 1]: what every image processor accepts."""
    from PIL import Image

    arrays = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]


class ClipZeroShotJudge:
    """CLIP zero-shot classification per domain: softmax over cosine similarities with label prompts.

    ``labels``: ``{domain: [names]}``; ``templates``: ``{domain: "a photo of a {}"}`` (defaults:
    :data:`DEFAULT_TEMPLATES`). ``model`` is a Hub id or a local folder holding a ``CLIPModel``
    and its processor; ``HF_HUB_OFFLINE=1`` uses the cache only.
    """

    def __init__(
        self,
        model: str,
        labels: Mapping[str, Sequence[str]],
        *,
        templates: Mapping[str, str] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        **from_pretrained: Any,
    ) -> None:
        if not labels or any(len(v) < 2 for v in labels.values()):
            raise ValueError("a CLIP judge needs at least one domain with two or more labels")
        from_pretrained.setdefault("local_files_only", hub_offline())  # read now, not at import time
        try:
            from transformers import CLIPModel, CLIPProcessor

            self.model = CLIPModel.from_pretrained(model, **from_pretrained).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(model, **from_pretrained)
        except (OSError, ValueError) as err:  # transformers' "not found / not cached / offline"
            raise JudgeLoadError(f"cannot load the CLIP judge {model!r}: {err}") from err
        self._labels = {d: list(v) for d, v in labels.items()}
        given = dict(templates or {})
        self.templates = {d: given.get(d, DEFAULT_TEMPLATES.get(d, "a photo of {}")) for d in labels}
        self.batch_size = batch_size
        self._text = {
            d: self._embed_text([self.templates[d].format(n) for n in names])
            for d, names in self._labels.items()
        }

    @property
    def labels(self) -> dict[str, list[str]]:
        return dict(self._labels)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @staticmethod
    def _features(output: Any) -> Tensor:
        """The projected embedding (transformers 4.x returns a tensor, 5.x may return an output object)."""
        return output if isinstance(output, Tensor) else output.pooler_output

    @torch.no_grad()
    def _embed_text(self, prompts: list[str]) -> Tensor:
        tokens = self.processor(text=prompts, return_tensors="pt", padding=True)
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        emb = self._features(self.model.get_text_features(**tokens))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def probabilities(self, images: Any) -> dict[str, Tensor]:
        x = as_float_images(images)
        scale = float(self.model.logit_scale.exp())
        out: dict[str, list[Tensor]] = {d: [] for d in self._labels}
        for i in range(0, len(x), self.batch_size):
            pixels = self.processor(images=_pil(x[i : i + self.batch_size]), return_tensors="pt")[
                "pixel_values"
            ].to(self.device)
            emb = self._features(self.model.get_image_features(pixel_values=pixels))
            emb = torch.nn.functional.normalize(emb.float(), dim=-1)
            for d, text in self._text.items():
                out[d].append((scale * emb @ text.T).softmax(-1).cpu())
        return {d: torch.cat(v) for d, v in out.items()}


class CallableJudge:
    """A judge from any callable ``fn(images) -> {domain: probabilities}``; ``labels`` as given, or the
    callable's own ``labels`` attribute."""

    def __init__(
        self, fn: Callable[[Any], Mapping[str, Tensor]], labels: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        found = labels if labels is not None else getattr(fn, "labels", None)
        if not found:
            raise ValueError(
                "give the judge's labels ({domain: [names]}) or a callable with a `labels` attribute"
            )
        self.fn = fn
        self._labels = {d: list(v) for d, v in found.items()}

    @property
    def labels(self) -> dict[str, list[str]]:
        return dict(self._labels)

    def probabilities(self, images: Any) -> dict[str, Tensor]:
        out = dict(self.fn(images))
        for domain, names in self._labels.items():
            p = out.get(domain)
            if p is None or tuple(p.shape[-1:]) != (len(names),):
                got = None if p is None else tuple(p.shape)
                raise ValueError(f"the judge returned {got} for {domain!r}, expected [N, {len(names)}]")
        return out


def _import(spec: str) -> Any:
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise JudgeLoadError(f"cannot import the judge {spec!r} (expected 'module:function'): {err}") from err


def load_judge(
    spec: str | Judge,
    *,
    labels: Mapping[str, Sequence[str]] | None = None,
    device: str | torch.device = "cpu",
    **options: Any,
) -> Judge:
    """A judge from a name: ``"shapescanvas"`` (the shipped judges, or ``"shapescanvas:FOLDER"``),
    ``"clip:MODEL"`` (a Hub id or folder; needs ``labels``), ``"module:function"`` (a callable, or a
    factory returning a judge), or a judge object itself. Fails here, before any generation."""
    if not isinstance(spec, str):
        if not isinstance(spec, Judge):
            raise TypeError(f"not a judge: {type(spec).__name__} (needs `labels` and `probabilities`)")
        return spec
    kind, _, rest = spec.partition(":")
    if kind == "shapescanvas":
        from ..shapescanvas.judges import Judges

        shipped = Path(__file__).resolve().parents[2] / "checkpoints" / "shapescanvas-judges"
        folder = Path(rest) if rest else shipped
        if not (folder / "config.json").is_file():
            raise JudgeLoadError(f"no ShapesCanvas judges at {folder}")
        return Judges.from_pretrained(folder, device=device)
    if kind == "clip":
        if not rest or labels is None:
            raise ValueError("a CLIP judge is 'clip:MODEL' and needs labels ({domain: [names]})")
        return ClipZeroShotJudge(rest, labels, device=device, **options)
    if not rest:
        raise JudgeLoadError(f"unknown judge {spec!r}: use 'shapescanvas', 'clip:MODEL' or 'module:function'")
    obj = _import(spec)
    if isinstance(obj, Judge):
        return obj
    if isinstance(obj, type) or (callable(obj) and getattr(obj, "labels", None) is None and labels is None):
        made = obj(**options)  # a factory
        if isinstance(made, Judge):
            return made
        return CallableJudge(made, labels)
    return CallableJudge(obj, labels)


__all__ = [
    "DEFAULT_TEMPLATES",
    "CallableJudge",
    "ClipZeroShotJudge",
    "Judge",
    "JudgeLoadError",
    "as_float_images",
    "load_judge",
]
