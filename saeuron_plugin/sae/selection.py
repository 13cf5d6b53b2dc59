"""SAeUron's concept score and the per-τ feature selection (percentile or top-N).

score(i, τ, c) = μ(i, τ, D_c) / (Σ_j μ(j, τ, D_c) + δ) − μ(i, τ, D_¬c) / (Σ_j μ(j, τ, D_¬c) + δ), δ = 1e-8
(REFERENCE §1). μ(·, D_¬c) is the *pooled* mean over every prompt sample of the contrast set
(pooled sums / pooled counts), which is the reference's "mean over the prompts of D_¬c"; a mean
of per-concept means would instead weight small concepts up.

Selection per bucket: ``score > quantile(score_row, p / 100)`` (strict, as the reference), with
the quantile linearly interpolated between order statistics, i.e. numpy's default
``np.percentile(method="linear")`` and ``torch.quantile(interpolation="linear")``. It is computed
here by sorting, so rows of any length work (``torch.quantile`` refuses inputs > 16M elements).
At n = 20,480: p = 99.999 → 1 latent, 99.995 → 2, 99.99 → 3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .library import ConceptLibrary
    from .tau import TauGrid

SCORE_DELTA = 1e-8


def quantile_linear(rows: Tensor, q: float) -> Tensor:
    """q-quantile of each row of ``rows`` [..., n] with linear interpolation (numpy's default).

    position = q·(n − 1); value = s[⌊pos⌋] + (pos − ⌊pos⌋)·(s[⌈pos⌉] − s[⌊pos⌋]) over the sorted row.
    NaN anywhere in a row gives NaN (like numpy / torch).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    n = rows.shape[-1]
    s = rows.sort(dim=-1).values
    pos = q * (n - 1)
    lo = int(pos)  # floor, pos ≥ 0
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    out = s[..., lo] + frac * (s[..., hi] - s[..., lo]) if frac else s[..., lo].clone()
    return out.masked_fill(rows.isnan().any(dim=-1), float("nan"))


CONTRAST_MODES = ("auto", "others", "worst", "background")
"""The named contrast sets of :func:`concept_scores` (anything else is a list of concept names)."""


def concept_scores(
    lib: ConceptLibrary, name: str, contrast: str | list[str] = "auto", delta: float = SCORE_DELTA
) -> Tensor:
    """SAeUron score of every latent for concept ``name`` per τ bucket: [K, n] float64.

    ``contrast``: ``"others"`` (the library's other concepts, pooled), ``"worst"`` (each other
    concept on its own; a latent scores against the one that uses it most), ``"background"`` (its
    background set), a list of concept names, or ``"auto"`` (others when there are any, else the
    background). Buckets without data borrow the nearest bucket that has some; a concept without
    any data scores NaN (and selects nothing).

    ``"worst"`` exists because pooling dilutes a latent that one other concept shares: in a library
    of 17 concepts, a latent that "cross" and "heart" both use looks cross-specific against the pool,
    and ablating it erases hearts too.
    """
    stats = lib.get(name)
    mu_c = stats.means(fill_empty=True)
    if isinstance(contrast, str):
        others = [n for n in lib.names if n != name]
        if contrast == "auto":
            contrast = "others" if others else "background"
        if contrast in ("others", "worst"):
            if not others:
                raise ValueError(
                    f"concept {name!r} is the only concept in the library: "
                    "score it against a background set (contrast='background')"
                )
            if contrast == "worst":
                rest = torch.stack([_share(lib.get(n).means(fill_empty=True), delta) for n in others])
                return _share(mu_c, delta) - rest.max(0).values
            mu_rest = lib.pooled_means(others)
        elif contrast == "background":
            if lib.background is None:
                raise ValueError(
                    f"the library has no background set to contrast {name!r} with; add one "
                    "(ConceptLibrary.accumulate_background) or add other concepts"
                )
            mu_rest = lib.background.means(fill_empty=True)
        else:
            raise ValueError(f"contrast must be one of {CONTRAST_MODES} or a list of names, got {contrast!r}")
    else:
        names = list(contrast)
        if not names:
            raise ValueError("contrast list is empty")
        if name in names:
            raise ValueError(f"concept {name!r} cannot be part of its own contrast set")
        mu_rest = lib.pooled_means(names)
    return _share(mu_c, delta) - _share(mu_rest, delta)


def _share(means: Tensor, delta: float) -> Tensor:
    """Each latent's share of a concept's total mean activation per bucket (the reference's score term)."""
    return means / (means.sum(-1, keepdim=True) + delta)


@dataclass
class FeatureSelection:
    """Selected latents per τ bucket (ragged, stored padded).

    ``indices`` [K, S] long, each row in decreasing score order, padded with −1; ``scores`` [K, S]
    their scores (NaN padding).
    """

    indices: Tensor
    scores: Tensor
    tau_grid: TauGrid | None = None

    @property
    def mask(self) -> Tensor:
        return self.indices >= 0

    @property
    def num_buckets(self) -> int:
        return self.indices.shape[0]

    @property
    def counts(self) -> Tensor:
        """Selected latents per bucket [K]."""
        return self.mask.sum(-1)

    def bucket(self, k: int) -> Tensor:
        """Latents selected in bucket ``k`` (decreasing score)."""
        row = self.indices[k]
        return row[row >= 0]

    def __len__(self) -> int:
        return int(self.counts.sum())

    def union(self) -> Tensor:
        """Every latent selected in some bucket, sorted."""
        return torch.unique(self.indices[self.mask])

    def table(self) -> list[tuple[int, list[int], float]]:
        """(latent, buckets where it is selected, its best score), best first: which latents, when."""
        rows: dict[int, tuple[list[int], float]] = {}
        for k in range(self.num_buckets):
            for i, s in zip(self.indices[k].tolist(), self.scores[k].tolist()):
                if i < 0:
                    continue
                buckets, best = rows.get(i, ([], float("-inf")))
                buckets.append(k)
                rows[i] = (buckets, max(best, s))
        return sorted(((i, b, s) for i, (b, s) in rows.items()), key=lambda r: (-r[2], r[0]))

    def describe(self, limit: int = 20) -> str:
        lines = [
            f"{len(self.union())} latents selected over {self.num_buckets} τ buckets "
            f"({len(self)} (latent, bucket) pairs)"
        ]
        centres = self.tau_grid.centre_values().tolist() if self.tau_grid is not None else None
        for i, buckets, s in self.table()[:limit]:
            where = (
                f"τ {centres[min(buckets)]:.3f}–{centres[max(buckets)]:.3f}"
                if centres
                else f"buckets {min(buckets)}–{max(buckets)}"
            )
            lines.append(f"  latent {i:6d}  score {s:.4g}  {len(buckets)} buckets, {where}")
        return "\n".join(lines)


def select_features(
    scores: Tensor, percentile: float | None = None, top_n: int | None = None, tau_grid: TauGrid | None = None
) -> FeatureSelection:
    """Select latents per bucket from ``scores`` [K, n]: give exactly one of ``percentile`` / ``top_n``.

    ``percentile`` p ∈ [0, 100]: latents with score strictly above the row's linear-interpolated
    p-th percentile (reference behaviour). ``top_n``: the N highest *positive* scores per bucket,
    ties to the lower index (a latent scoring ≤ 0 is no more active on the concept than on its
    contrast: ablating it removes nothing of the concept). Rows containing NaN (no data) select
    nothing; NaN scores are never picked.
    """
    if (percentile is None) == (top_n is None):
        raise ValueError("give exactly one of `percentile` or `top_n`")
    if scores.dim() == 1:
        scores = scores.unsqueeze(0)
    k_buckets, n = scores.shape
    order = torch.sort(scores.nan_to_num(nan=float("-inf")), dim=-1, descending=True, stable=True)
    if percentile is not None:
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        cut = quantile_linear(scores, percentile / 100.0)
        keep = (scores > cut.unsqueeze(-1)).sum(-1)  # NaN rows: the cut is NaN, nothing is kept
    else:
        if top_n < 0:
            raise ValueError(f"top_n must be ≥ 0, got {top_n}")
        keep = (scores > 0).sum(-1).clamp(max=min(top_n, n))  # NaN > 0 is False
    width = int(keep.max()) if k_buckets else 0
    col = torch.arange(width).unsqueeze(0)
    valid = col < keep.unsqueeze(1)
    indices = order.indices[:, :width].masked_fill(~valid, -1)
    picked = scores.gather(1, order.indices[:, :width]).masked_fill(~valid, float("nan"))
    return FeatureSelection(indices.long(), picked.to(torch.float64), tau_grid)
