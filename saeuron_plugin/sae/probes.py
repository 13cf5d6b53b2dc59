"""Paired runs for diagnostics: the same samples, unedited and edited, in one model call.

A diagnostics run puts every sample in the batch twice (same prompt, same seed): rows ``[0, B)``
are the *base* twins, rows ``[B, 2B)`` the *edited* twins (per CFG half). :class:`PairedEditor`
runs an editor on the edited twins only, so one call yields both trajectories step by step, and
:class:`PairObserver` (an editor that never edits, installed after the edit) reduces each call at
its site to scalar metrics of both twins and to the drift between them (:mod:`.diagnostics`),
added to a :class:`~.diagnostics.SampleMetrics` keyed by sample and τ bucket. Nothing of size
``[steps x tokens x channels]`` is kept. With nothing selected, the twins compute the same rows
and every drift is exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .diagnostics import (
    SampleMetrics,
    attention_metrics,
    cosine_drift,
    fraction_of_variance_unexplained,
    matrix_metrics,
    relative_drift,
)
from .sites import CallContext, Editor
from .tau import TauGrid


class PairLayout:
    """Which rows of a call are edited twins; shared by the editors and observers of one run.

    ``pairs``: samples per call (B); ``offset``: index of the call's first sample in the run.
    """

    def __init__(self, pairs: int = 1, offset: int = 0) -> None:
        self.pairs = pairs
        self.offset = offset
        self.order: list[str] = []
        """Sites in the order they first ran (the model's execution order)."""

    def edited_rows(self, rows: int) -> Tensor:
        """[rows] bool: True on edited twins (rows are ``[base B, edited B]`` repeated per CFG half)."""
        period = 2 * self.pairs
        if rows % period:
            raise RuntimeError(f"{rows} rows in a call of {self.pairs} sample pairs: not twin-shaped")
        return (torch.arange(rows) % period) >= self.pairs


class PairedEditor:
    """An :class:`~.sites.Editor` applied to the edited twins only; base twins pass unchanged."""

    def __init__(self, editor: Editor, layout: PairLayout) -> None:
        self.editor = editor
        self.layout = layout

    def __call__(self, tokens: Tensor, ctx: CallContext) -> Tensor:
        if ctx.owner is not None:  # tokens gathered over samples (VLM sites): split by each token's sample
            return self._by_owner(tokens, ctx.owner(tokens))
        twin = self.layout.edited_rows(tokens.shape[0])
        rows = twin.nonzero().flatten().to(tokens.device)
        tau = ctx.tau_per_row(tokens.shape[0])
        sub_ctx = CallContext(
            None if tau is None else tau[twin],
            None if ctx.cond_mask is None else ctx.cond_mask[twin.to(ctx.cond_mask.device)],
        )
        part = tokens.index_select(0, rows)
        edited = self.editor(part, sub_ctx)
        if edited is part:
            return tokens
        out = tokens.clone()
        out[rows] = edited.to(tokens.dtype)
        return out

    def _by_owner(self, tokens: Tensor, owner: Tensor) -> Tensor:
        flat = tokens.reshape(-1, tokens.shape[-1])
        rows = (owner.to(flat.device) >= self.layout.pairs).nonzero().flatten()
        part = flat.index_select(0, rows)
        edited = self.editor(part, CallContext())
        if edited is part:
            return tokens
        out = flat.clone()
        out[rows] = edited.to(tokens.dtype)
        return out.reshape(tokens.shape)


@dataclass
class PairedRun:
    """What one paired run measured (any runtime): per-sample metrics, sites in execution order, the
    edited sites, and the images of both twins when they were decoded."""

    metrics: SampleMetrics
    order: list[str]
    edited_sites: list[str]
    base_images: Tensor | None = None
    edited_images: Tensor | None = None
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


class PairObserver:
    """Observer at one site: metrics of base and edited twins and their drift, per sample and τ bucket.

    Metric names are ``base/<metric>``, ``edited/<metric>``, ``drift/relative_l2`` and
    ``drift/cosine``; with ``sae`` (the bundle's SAE at this site) also ``<twin>/fvu``, the
    off-distribution score. Only conditional rows count (every row when the branch is unknown).
    """

    def __init__(
        self, site: str, store: SampleMetrics, layout: PairLayout, grid: TauGrid, sae: Any = None
    ) -> None:
        self.site = site
        self.store = store
        self.layout = layout
        self.grid = grid
        self.sae = sae

    def __call__(self, tokens: Tensor, ctx: CallContext) -> Tensor:
        rows, tau = ctx.conditional(tokens)
        self.observe(rows, tau)
        return tokens

    def _split(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        pairs = self.layout.pairs
        if rows.shape[0] != 2 * pairs:
            raise RuntimeError(f"{self.site}: {rows.shape[0]} conditional rows for {pairs} sample pairs")
        if self.site not in self.layout.order:
            self.layout.order.append(self.site)
        return rows[:pairs].float(), rows[pairs:].float()

    @torch.no_grad()
    def observe(self, rows: Tensor, tau: Tensor | None) -> None:
        """Record the pair metrics of conditional token matrices ``[2B, T, C]`` (base twins first)."""
        base, edited = self._split(rows)
        values: dict[str, Tensor] = {}
        for twin, m in (("base", base), ("edited", edited)):
            for name, v in matrix_metrics(m).items():
                values[f"{twin}/{name}"] = v
            if self.sae is not None:
                values[f"{twin}/fvu"] = self._fvu(m)
        values["drift/relative_l2"] = relative_drift(edited, base)
        values["drift/cosine"] = cosine_drift(edited, base)
        self._record(values, tau)

    @torch.no_grad()
    def observe_attention(self, probs: Tensor, tau: Tensor | None) -> None:
        """Record attention-map metrics of conditional maps ``[2B, heads, Tq, Tk]`` (base twins first);
        ``drift/attention_tv`` is the total-variation distance between the twins' maps."""
        base, edited = self._split(probs)
        values = {
            f"{twin}/{name}": v
            for twin, p in (("base", base), ("edited", edited))
            for name, v in attention_metrics(p).items()
        }
        values["drift/attention_tv"] = 0.5 * (edited - base).abs().sum(-1).mean((-1, -2))
        self._record(values, tau)

    def _record(self, values: dict[str, Tensor], tau: Tensor | None) -> None:
        pairs = self.layout.pairs
        samples = torch.arange(pairs) + self.layout.offset
        buckets = self._buckets(tau, pairs)
        for name, v in values.items():
            self.store.add(self.site, name, v.cpu(), samples, buckets)

    def _buckets(self, tau: Tensor | None, pairs: int) -> Tensor:
        if tau is None:
            return torch.zeros(pairs, dtype=torch.long)
        return self.grid.index(tau[:pairs].float()).long().cpu()

    def _fvu(self, m: Tensor) -> Tensor:
        sae = self.sae
        flat = m.reshape(-1, m.shape[-1]).to(sae.device, torch.float32)
        recon = sae(flat).reconstruction.reshape(m.shape).to(m.device)
        return fraction_of_variance_unexplained(m, recon)


__all__ = ["PairLayout", "PairObserver", "PairedEditor", "PairedRun"]
