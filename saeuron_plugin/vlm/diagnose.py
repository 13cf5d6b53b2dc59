"""Diagnostics capture on a transformers VLM: base and unlearned twins in one forward, per decoder layer.

Each sample runs as a batch of two identical rows; the editors (the bundle's ablators at their
hookpoints and token sets) change the second row only
(:class:`~saeuron_plugin.sae.probes.PairedEditor` splits the selected tokens by their sample), and
an observer at every decoder layer (all tokens, installed after the edit) records the metrics of
both rows and their drift (:class:`~saeuron_plugin.sae.probes.PairObserver`). VLMs have no time
axis: one τ bucket. Attention maps are not captured here: the decoder's attention needs its rotary
position state, which a module hook does not see.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..sae.diagnostics import SampleMetrics
from ..sae.probes import PairedEditor, PairedRun, PairLayout, PairObserver
from ..sae.sites import Editor
from ..sae.tau import TauGrid
from .hookpoints import hookpoint_index
from .hooks import install_sites
from .inputs import to_device


def _twin(value: Any) -> Any:
    return torch.cat([value, value]) if isinstance(value, Tensor) else value


def run_pairs(
    model: nn.Module,
    inputs: Sequence[Mapping[str, Any]],
    editors: Mapping[str, Editor],
    *,
    tokens: Mapping[str, str | None] | None = None,
    sites: Sequence[str] | None = None,
    saes: Mapping[str, Any] | None = None,
    show_progress: bool = True,
    desc: str = "diagnose",
) -> PairedRun:
    """Run every sample (model inputs of batch size 1: ``input_ids``, ``attention_mask``,
    ``pixel_values``, ...) as a base / edited pair; ``editors``: hookpoint → editor, ``tokens``:
    hookpoint → token set it edits (default: the hookpoint's own); ``sites``: the observed
    hookpoints (default: every decoder layer); ``saes``: hookpoint → SAE for the FVU score."""
    if not inputs:
        raise ValueError("no samples to diagnose")
    index = hookpoint_index(model)
    observed = list(sites) if sites is not None else index.paths("decoder")
    layout = PairLayout(1)
    store = SampleMetrics(len(inputs), 1)
    grid = TauGrid(1)
    observers = {s: PairObserver(s, store, layout, grid, (saes or {}).get(s)) for s in observed}
    param = next(model.parameters())
    dtype = param.dtype if param.is_floating_point() else None
    start = time.perf_counter()
    # site hooks are prepended: observers first, then the edits, so each edit runs before the observer
    observe = install_sites(model, observers, "all", index=index)
    edits = {p: PairedEditor(e, layout) for p, e in editors.items()}
    with (
        observe,
        install_sites(model, edits, dict(tokens or {}), index=index, allow_stack=True),
        torch.no_grad(),
    ):
        for i, sample in enumerate(tqdm(inputs, desc=desc, unit="sample", disable=not show_progress)):
            if any(
                isinstance(v, Tensor) and v.dim() and v.shape[0] != 1
                for k, v in sample.items()
                if k in ("input_ids", "attention_mask")
            ):
                raise ValueError(f"sample {i}: give one sample per input dict (batch size 1)")
            layout.offset = i
            model(**to_device({k: _twin(v) for k, v in sample.items()}, param.device, dtype), use_cache=False)
    return PairedRun(
        metrics=store,
        order=list(layout.order) + [s for s in observed if s not in layout.order],
        edited_sites=list(editors),
        seconds=time.perf_counter() - start,
        info={"samples": len(inputs), "tau_buckets": 1},
    )


__all__ = ["run_pairs"]
