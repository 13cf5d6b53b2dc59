"""Collect hookpoint activations from a VLM over (image, prompt) samples.

Each sample runs through one forward pass (the prompt as ``generate()`` would prefill it); the
selected tokens of every hookpoint (image, text or all non-padding tokens; see :mod:`.hooks`)
become rows ``[d]`` of an :class:`~saeuron_plugin.sae.store.ActivationStore`, one store per
hookpoint, without a τ column (VLMs have no time axis). Samples already stored are skipped on a
re-run. A callable ``sink(hookpoint, rows)`` can take the rows instead (streaming to a trainer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..sae.processes import require_single_process
from ..sae.sites import BatchLoop, CallContext, CollectResult, Editor
from ..sae.store import flushing, open_stores
from .hookpoints import VLMHookpoint, check_tokens, hookpoint_index, pad_token_id, resolve_hookpoint
from .hooks import install_sites
from .inputs import Sample, iter_batches, make_samples, to_device

Sink = Callable[[str, Tensor], None]


def model_name(model: Any) -> str | None:
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(
        model, "name_or_path", None
    )
    return str(name) if name else None


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def run_samples(
    model: nn.Module,
    samples: Sequence[Sample],
    editors: Mapping[str, Editor],
    tokens: Mapping[str, str | None] | str | None,
    loop: BatchLoop,
    *,
    processor: Any = None,
    batch_size: int = 1,
    add_image_token: bool = True,
) -> None:
    """Forward every sample (no cache, no grad) with ``editors`` hooked in: the loop shared by
    collection and the concept statistics pass (``loop``: its progress bar and per-batch
    callbacks, which receive the batch's sample indices)."""
    index = hookpoint_index(model)
    device = next(model.parameters()).device
    dtype = _model_dtype(model)
    batches = iter_batches(
        samples, processor, batch_size, pad_token_id(model), add_image_token=add_image_token
    )
    each = contextlib.closing(loop.each(batches, len(samples), "sample", key=lambda item: item[0]))
    with install_sites(model, editors, tokens, index=index), torch.no_grad(), each as batches:
        for _, batch in batches:
            model(**to_device(batch, device, dtype), use_cache=False)


class _Capture:
    """Editor recording the selected rows per sample of the current batch (never edits)."""

    def __init__(self, path: str, max_tokens: int | None, seed: int) -> None:
        self.path = path
        self.max_tokens = max_tokens
        self.generator = torch.Generator().manual_seed(seed)
        self.rows: dict[int, list[Tensor]] = {}

    def __call__(self, selected: Tensor, ctx: CallContext) -> Tensor:
        flat, owner, _ = ctx.samples(selected.detach())
        for b in owner.unique().tolist():
            rows = flat[(owner == b).to(flat.device)]
            if self.max_tokens is not None and rows.shape[0] > self.max_tokens:
                keep = torch.randperm(rows.shape[0], generator=self.generator)[: self.max_tokens]
                rows = rows[keep.sort().values.to(rows.device)]
            self.rows.setdefault(int(b), []).append(rows.cpu())
        return selected

    def take(self, n: int) -> list[Tensor]:
        width = next((r[0].shape[-1] for r in self.rows.values() if r), 0)
        out = [torch.cat(self.rows[b]) if b in self.rows else torch.empty(0, width) for b in range(n)]
        self.rows = {}
        return out


def _open_stores(
    store: Any, hookpoints: list[VLMHookpoint], modes: dict[str, str], model: Any, dtype: torch.dtype
) -> dict[str, Any] | Sink:
    name = model_name(model)
    specs = {
        hp.path: (
            hp.width,
            {
                "hookpoint": hp.path,
                "model_family": hp.family,
                "base_model": name,
                "tokens": modes[hp.path],
                "kind": hp.kind,
            },
        )
        for hp in hookpoints
    }
    return open_stores(store, specs, dtype)


def collect_activations(
    model: nn.Module,
    images: Sequence[Any] | None,
    prompts: Sequence[str] | str | None,
    processor_or_inputs: Any,
    hookpoints: Sequence[str],
    store: Any,
    *,
    tokens: Mapping[str, str] | str | None = None,
    batch_size: int = 1,
    max_tokens_per_sample: int | None = None,
    seed: int = 0,
    store_dtype: torch.dtype = torch.float16,
    add_image_token: bool = True,
    show_progress: bool = True,
) -> CollectResult:
    """Run every (image, prompt) sample once and store the selected tokens of each hookpoint.

    ``processor_or_inputs``: a processor (used with ``images`` and ``prompts``) or prepared inputs
    (see :func:`~.inputs.make_samples`). ``tokens``: ``image`` / ``text`` / ``all`` / ``auto``
    (default: image tokens at decoder layers, text tokens for Mllama, everything at projector and
    vision layers), one for all hookpoints or per path. ``store``: a folder (one store per
    hookpoint in ``<folder>/<hookpoint>``), an ``ActivationStore`` (one hookpoint), a dict
    hookpoint → store, or a callable ``sink(hookpoint, rows)`` called once per batch.
    ``max_tokens_per_sample`` keeps that many random tokens (seeded) per sample and hookpoint.
    """
    require_single_process("VLM activation collection")
    if max_tokens_per_sample is not None and max_tokens_per_sample < 1:
        raise ValueError(f"max_tokens_per_sample must be >= 1 or None, got {max_tokens_per_sample}")
    samples = make_samples(images, prompts, processor_or_inputs)
    processor = processor_or_inputs if samples[0].inputs is None else None
    index = hookpoint_index(model)
    resolved = [resolve_hookpoint(model, p, index) for p in hookpoints]
    if not resolved:
        raise ValueError("no hookpoints to collect")
    modes = {
        hp.path: check_tokens(hp, tokens.get(hp.path) if isinstance(tokens, Mapping) else tokens, model)
        for hp in resolved
    }
    targets = _open_stores(store, resolved, modes, model, store_dtype)
    sink = targets if callable(targets) else None
    stores: dict[str, Any] = {} if sink is not None else targets  # type: ignore[assignment]

    keys = [s.key(i) for i, s in enumerate(samples)]
    todo = [
        i for i in range(len(samples)) if not (stores and all(st.has_key(keys[i]) for st in stores.values()))
    ]
    result = CollectResult(skipped=len(samples) - len(todo), rows={hp.path: 0 for hp in resolved})
    captures = {
        hp.path: _Capture(hp.path, max_tokens_per_sample, seed + 7919 * n) for n, hp in enumerate(resolved)
    }
    order = [samples[i] for i in todo]

    def done(chunk: list[int]) -> None:
        for path, cap in captures.items():
            per_sample = cap.take(len(chunk))
            if sink is not None:
                rows = torch.cat(per_sample)
                if rows.shape[0]:
                    sink(path, rows)
                result.rows[path] += rows.shape[0]
                continue
            target = stores[path]
            for local, rows in zip(chunk, per_sample):
                key = keys[todo[local]]
                if target.has_key(key):
                    continue
                if rows.shape[0] == 0:
                    raise RuntimeError(
                        f"{path}: sample {samples[todo[local]].label!r} has no {modes[path]} "
                        "tokens (does the prompt contain the image placeholder?)"
                    )
                target.append(rows, key=key)
                result.rows[path] += rows.shape[0]
        result.collected += len(chunk)

    with flushing(stores):
        loop = BatchLoop("collect", show_progress, on_batch_end=done)
        run_samples(
            model,
            order,
            captures,
            modes,
            loop,
            processor=processor,
            batch_size=batch_size,
            add_image_token=add_image_token,
        )
    return result


__all__ = ["CollectResult", "collect_activations", "model_name", "run_samples"]
