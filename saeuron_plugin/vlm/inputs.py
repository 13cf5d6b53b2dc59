"""(image, prompt) samples → batches of model inputs, through a processor or from prepared inputs.

Two ways in:

* ``images`` + ``prompts`` + a processor (``AutoProcessor``; anything called as
  ``processor(images=..., text=..., return_tensors="pt", padding=True)``). A prompt without the
  processor's image placeholder gets it prepended (``add_image_token=False`` to turn that off);
  padding is on the left, as generation needs.
* prepared inputs: a sequence of per-sample dicts (processor outputs with a batch dim of 1), or
  one dict / ``BatchFeature`` holding a whole batch. Per-sample dicts are collated here:
  sequence fields (``input_ids``, ``attention_mask``, ``mm_token_type_ids``,
  ``cross_attention_mask``, ...) are left-padded, the rest concatenated along dim 0
  (Qwen's packed ``pixel_values`` and ``image_grid_thw`` included).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# Fields whose dim 1 is the token sequence (left-padded when collating).
SEQUENCE_FIELDS = (
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "token_type_ids",
    "cross_attention_mask",
    "position_ids",
)


@dataclass
class Sample:
    """One (image, prompt) pair, or one sample of prepared inputs; ``label`` names it in statistics."""

    label: str
    image: Any = None
    prompt: str | None = None
    inputs: Mapping[str, Any] | None = None

    def key(self, index: int) -> str:
        """Resume key: position plus a hash of the content."""
        h = hashlib.sha256()
        h.update((self.prompt or "").encode())
        if self.image is not None:
            _hash_value(h, self.image)
        if self.inputs is not None:
            for name in sorted(self.inputs):
                h.update(name.encode())
                _hash_value(h, self.inputs[name])
        return f"{index}:{h.hexdigest()[:16]}"


def _hash_value(h: Any, value: Any) -> None:
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif hasattr(value, "tobytes") and hasattr(value, "size"):  # PIL image or numpy array
        h.update(repr(getattr(value, "size", None)).encode())
        h.update(value.tobytes())
    else:
        h.update(repr(value).encode())


def _is_batch(value: Any) -> bool:
    return isinstance(value, Mapping) or (
        hasattr(value, "keys") and hasattr(value, "__getitem__") and not isinstance(value, Sequence)
    )


def make_samples(
    images: Sequence[Any] | Any | None, prompts: Sequence[str] | str | None, processor_or_inputs: Any = None
) -> list[Sample]:
    """Normalise the accepted argument forms into a list of :class:`Sample`.

    ``processor_or_inputs`` callable: a processor, used with ``images`` and ``prompts`` (one prompt
    for every image, or one per image; images may be None for text-only prompts). Otherwise it
    holds prepared inputs (a sequence of per-sample dicts, or one batched dict); ``prompts`` then
    only label the samples.
    """
    if processor_or_inputs is None:
        raise ValueError("give a processor (with images and prompts) or prepared inputs")
    if callable(processor_or_inputs) and not _is_batch(processor_or_inputs):
        if images is not None and not isinstance(images, Sequence):
            images = [images]
        n = len(images) if images is not None else (1 if isinstance(prompts, str) else len(prompts or []))
        if isinstance(prompts, str) or prompts is None:
            if prompts is None:
                raise ValueError("prompts are required with a processor")
            prompt_list = [prompts] * n
        else:
            prompt_list = list(prompts)
        if images is not None and len(prompt_list) != len(images):
            raise ValueError(
                f"{len(images)} images but {len(prompt_list)} prompts (give one prompt, or one per image)"
            )
        if not prompt_list:
            raise ValueError("no samples: images and prompts are empty")
        imgs = list(images) if images is not None else [None] * len(prompt_list)
        return [Sample(_label(i, p, im), im, p) for i, (im, p) in enumerate(zip(imgs, prompt_list))]
    inputs = processor_or_inputs
    if _is_batch(inputs):
        batch = {k: inputs[k] for k in inputs.keys()}  # noqa: SIM118 - BatchFeature-like objects
        ids = batch.get("input_ids")
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError("a batched inputs dict needs `input_ids` of shape [B, T]")
        per = split_batch(batch)
    else:
        per = [dict(x) for x in inputs]
    if not per:
        raise ValueError("no samples: the inputs are empty")
    labels = [prompts] * len(per) if isinstance(prompts, str) else list(prompts or [])
    if labels and len(labels) != len(per):
        raise ValueError(f"{len(per)} input samples but {len(labels)} prompts")
    return [
        Sample(labels[i] if labels else f"<sample {i}>", None, labels[i] if labels else None, x)
        for i, x in enumerate(per)
    ]


def _label(i: int, prompt: str | None, image: Any) -> str:
    name = getattr(image, "filename", None) or (f"<image {i}>" if image is not None else "<no image>")
    return f"{name} | {prompt}"


def split_batch(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-sample dicts of a batched inputs dict (only fields with a batch dim are split).

    Qwen's packed ``pixel_values`` [N, D] are split by ``image_grid_thw``; padding stays (harmless).
    """
    ids = batch["input_ids"]
    b = ids.shape[0]
    if b == 1:
        return [dict(batch)]
    out: list[dict[str, Any]] = [{} for _ in range(b)]
    grid = batch.get("image_grid_thw")
    for name, value in batch.items():
        if name == "pixel_values" and grid is not None and isinstance(value, Tensor) and value.dim() == 2:
            raise ValueError("cannot split a batch of packed Qwen pixel_values; pass per-sample inputs")
        if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == b:
            for i in range(b):
                out[i][name] = value[i : i + 1]
        elif name == "image_grid_thw":
            raise ValueError("cannot split image_grid_thw across samples; pass per-sample inputs")
        else:
            for i in range(b):
                out[i][name] = value
    return out


def collate(samples: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, Any]:
    """One batch from per-sample input dicts: sequence fields left-padded, the rest concatenated."""
    if len(samples) == 1:
        return dict(samples[0])
    keys = list(samples[0])
    if any(set(s) != set(keys) for s in samples):
        raise ValueError("every sample's inputs must have the same fields")
    length = max(int(s["input_ids"].shape[1]) for s in samples)
    out: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples]
        if not isinstance(values[0], Tensor):
            if any(v != values[0] for v in values):
                raise ValueError(f"field {key!r} differs between samples; use batch_size=1")
            out[key] = values[0]
            continue
        if key in SEQUENCE_FIELDS:
            fill = pad_id if key == "input_ids" else 0
            padded = []
            for v in values:
                missing = length - v.shape[1]
                if missing:
                    pad = torch.full(
                        (v.shape[0], missing, *v.shape[2:]), fill, dtype=v.dtype, device=v.device
                    )
                    v = torch.cat([pad, v], dim=1)
                padded.append(v)
            out[key] = torch.cat(padded)
        else:
            if any(v.shape[1:] != values[0].shape[1:] for v in values):
                raise ValueError(
                    f"field {key!r} has different shapes across samples "
                    f"({[tuple(v.shape) for v in values]}); use batch_size=1"
                )
            out[key] = torch.cat(values)
    return out


def with_image_token(prompt: str, processor: Any) -> str:
    token = getattr(processor, "image_token", None) or getattr(
        getattr(processor, "tokenizer", None), "image_token", None
    )
    if token and token not in prompt:
        return f"{token}\n{prompt}"
    return prompt


def process(
    processor: Any, samples: Sequence[Sample], *, add_image_token: bool = True, **processor_kwargs: Any
) -> dict[str, Any]:
    """Run ``processor`` on a batch of (image, prompt) samples, padding on the left."""
    texts = [
        with_image_token(s.prompt or "", processor)
        if add_image_token and s.image is not None
        else (s.prompt or "")
        for s in samples
    ]
    images = [s.image for s in samples if s.image is not None]
    if images and len(images) != len(samples):
        raise ValueError("a batch mixes samples with and without images; use batch_size=1")
    tok = getattr(processor, "tokenizer", None)
    saved = getattr(tok, "padding_side", None)
    try:
        if saved is not None:
            tok.padding_side = "left"
        kwargs = {"text": texts, "return_tensors": "pt", "padding": True, **processor_kwargs}
        if images:
            # Mllama's processor takes the images of each sample as a list; the others a flat list
            kwargs["images"] = (
                [[im] for im in images] if type(processor).__name__.startswith("Mllama") else images
            )
        out = processor(**kwargs)
    finally:
        if saved is not None:
            tok.padding_side = saved
    return {k: out[k] for k in out.keys()}  # noqa: SIM118 - a BatchFeature


def iter_batches(
    samples: Sequence[Sample], processor: Any, batch_size: int, pad_id: int, *, add_image_token: bool = True
) -> Iterator[tuple[list[int], dict[str, Any]]]:
    """(sample indices, model inputs) per batch of ``batch_size`` samples."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(samples), batch_size):
        chunk = list(range(start, min(start + batch_size, len(samples))))
        part = [samples[i] for i in chunk]
        if part[0].inputs is not None:
            yield chunk, collate([s.inputs for s in part], pad_id)  # type: ignore[misc]
        else:
            if processor is None:
                raise ValueError("samples without prepared inputs need a processor")
            yield chunk, process(processor, part, add_image_token=add_image_token)


def to_device(batch: Mapping[str, Any], device: torch.device, dtype: torch.dtype | None) -> dict[str, Any]:
    """Tensors to the model's device; floating ones (pixel values) to its dtype."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor):
            v = v.to(device, dtype) if (dtype is not None and v.is_floating_point()) else v.to(device)
        out[k] = v
    return out


__all__ = [
    "SEQUENCE_FIELDS",
    "Sample",
    "collate",
    "iter_batches",
    "make_samples",
    "process",
    "split_batch",
    "to_device",
    "with_image_token",
]
