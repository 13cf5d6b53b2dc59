"""Calibrate the global threshold θ of the threshold encoder on activations (BatchTopK paper).

θ is chosen so that the mean L0 of ``z_i = pre_i · [pre_i > θ]`` over the data equals the SAE's
k: it lies between the (k·N)-th and (k·N + 1)-th largest pre-activation of N tokens. SAEs
imported without θ (``bcywinski/SAeUron`` folders, sparsify) get it from the statistics pass:
feed a :class:`ThresholdCalibrator` the pre-activations the pass computes anyway
(``ConceptLibrary.accumulate_activations(..., calibrator=c)``), then store it with
``ConceptLibrary.record_threshold(c)`` (written to ``concepts/index.json``) and/or
``sae.cfg.threshold`` (written to ``cfg.json``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .model import SparseAutoencoder

_CHUNK_ELEMENTS = 1 << 23  # histc counts in float32: exact per call below 2^24


class ThresholdCalibrator:
    """Streaming θ estimate from a log-spaced histogram of pre-activations.

    Memory is ``bins`` counts whatever the data size. With the defaults (32,768 bins over
    [1e-6, 1e6]) neighbouring edges differ by 0.084 %; θ is interpolated inside its bin, so the
    resulting mean L0 is within a fraction of a percent of the target. :func:`calibrate_threshold`
    refines it to the exact order statistic when the data can be read twice.
    """

    def __init__(
        self,
        sae: SparseAutoencoder | None = None,
        target_l0: float | None = None,
        *,
        low: float = 1e-6,
        high: float = 1e6,
        bins: int = 32768,
    ) -> None:
        if target_l0 is None:
            if sae is None:
                raise ValueError("give `target_l0` or an `sae` (whose k is the target)")
            target_l0 = sae.cfg.k
        if not 0 < low < high:
            raise ValueError(f"need 0 < low < high, got {low}, {high}")
        self.sae = sae
        self.target_l0 = float(target_l0)
        self.log_low, self.log_high, self.bins = math.log(low), math.log(high), int(bins)
        self.width = (self.log_high - self.log_low) / self.bins
        self.hist = torch.zeros(self.bins, dtype=torch.float64)
        self.above = 0  # values > high
        self.tokens = 0

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add activations ``x`` [..., d] (encoded with the calibrator's SAE)."""
        if self.sae is None:
            raise ValueError("this calibrator has no SAE; feed pre-activations with update_pre")
        self.update_pre(self.sae.pre_acts(x))

    @torch.no_grad()
    def update_pre(self, pre: Tensor) -> None:
        """Add pre-activations [..., n] (after the ReLU)."""
        flat = pre.detach().reshape(-1)
        self.tokens += flat.numel() // pre.shape[-1]
        high = math.exp(self.log_high)
        for chunk in flat.split(_CHUNK_ELEMENTS):
            v = chunk.float()
            self.above += int((v > high).sum())
            # log(0) = -inf and values outside [low, high] fall outside histc's range: ignored
            h = torch.histc(v.log(), bins=self.bins, min=self.log_low, max=self.log_high)
            self.hist += h.to("cpu", torch.float64)

    def _locate(self) -> tuple[float, int] | None:
        """(log θ estimate, bin index) or None when the data cannot reach the target."""
        target = self.target_l0 * self.tokens
        if self.tokens == 0:
            raise ValueError("the calibrator has seen no activations")
        if self.above >= target:
            warnings.warn("θ is above the calibrator's range; returning its upper bound", stacklevel=3)
            return self.log_high, self.bins - 1
        from_top = self.hist.flip(0).cumsum(0) + self.above
        j_rev = int(torch.searchsorted(from_top, torch.tensor([target], dtype=torch.float64))[0])
        if j_rev >= self.bins:
            return None
        j = self.bins - 1 - j_rev
        count = float(self.hist[j])
        need = target - (float(from_top[j_rev]) - count)
        return self.log_low + (j + 1 - need / count) * self.width, j

    @property
    def value(self) -> float:
        """θ such that the mean L0 of the data seen is ``target_l0`` (0.0 if fewer values are positive)."""
        found = self._locate()
        if found is None:
            warnings.warn(
                f"fewer than {self.target_l0:g} positive pre-activations per token on average: "
                "θ = 0 (every positive latent fires)",
                stacklevel=2,
            )
            return 0.0
        return math.exp(found[0])

    def describe(self) -> dict[str, Any]:
        return {
            "target_l0": self.target_l0,
            "tokens": self.tokens,
            "method": "log-histogram",
            "relative_resolution": math.expm1(self.width),
        }


def _refine(sae: SparseAutoencoder, chunks: list[Tensor], cal: ThresholdCalibrator) -> float | None:
    """Exact θ from a second pass over the values near the histogram estimate (None if missed)."""
    found = cal._locate()
    if found is None:
        return None
    _, j = found
    lo = math.exp(cal.log_low + (j - 2) * cal.width)
    hi = math.exp(cal.log_low + (j + 3) * cal.width)
    rank = round(cal.target_l0 * cal.tokens)  # θ lies between the rank-th and (rank+1)-th largest
    above, window = 0, []
    with torch.no_grad():
        for x in chunks:
            pre = sae.pre_acts(x).float()
            above += int((pre > hi).sum())
            window.append(pre[(pre >= lo) & (pre <= hi)].cpu())
    vals = torch.cat(window).sort(descending=True).values
    a, b = rank - above - 1, rank - above
    if a < 0 or b >= vals.numel():
        return None
    return float((vals[a] + vals[b]) / 2)


def calibrate_threshold(
    sae: SparseAutoencoder,
    activations: Tensor | Iterable[Tensor],
    target_l0: float | None = None,
    *,
    chunk_tokens: int = 4096,
) -> float:
    """θ for ``sae`` such that the mean L0 over ``activations`` equals ``target_l0`` (default k).

    A tensor [..., d] or a list of tensors is read twice and θ is exact (the mid-point between the
    (k·N)-th and (k·N + 1)-th largest pre-activation); a one-shot iterator gives the streaming
    histogram estimate.
    """
    cal = ThresholdCalibrator(sae, target_l0)
    if isinstance(activations, Tensor):
        chunks = list(activations.reshape(-1, activations.shape[-1]).split(chunk_tokens))
    elif isinstance(activations, list | tuple):
        chunks = list(activations)
    else:
        for x in activations:
            cal.update(x)
        return cal.value
    for x in chunks:
        cal.update(x)
    exact = _refine(sae, chunks, cal)
    return cal.value if exact is None else exact
