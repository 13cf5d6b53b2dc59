"""The τ grid: normalised denoising time in buckets, nearest-bucket lookup (clamped, warned once).

Concept statistics live on it: every sample lands in the bucket nearest its τ, and an ablation at
time τ reads the bucket nearest τ, so statistics from one step count serve any other.
"""

from __future__ import annotations

import bisect
import itertools
import math
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

_TAU_TOLERANCE = 1e-6


@dataclass(frozen=True)
class TauGrid:
    """Buckets over normalised time τ ∈ [0, 1]; lookup is nearest bucket centre.

    The default is ``num_buckets`` equal bins with centres (i + ½)/K, so the 50 DDIM steps of an
    SD sampler (τ = 0.001 + 0.02·j) land one per bucket; VLMs use one bucket. ``centres`` may give
    an explicit increasing grid instead. A τ exactly half-way between two centres goes to the upper
    one. τ outside [0, 1] is clamped, with one warning per grid.
    """

    num_buckets: int = 50
    centres: tuple[float, ...] | None = None
    _warned: list[bool] = field(default_factory=lambda: [False], compare=False, repr=False)
    _cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.centres is not None:
            c = tuple(float(v) for v in self.centres)
            if not c or any(b <= a for a, b in itertools.pairwise(c)) or c[0] < 0 or c[-1] > 1:
                raise ValueError("TauGrid centres must be strictly increasing values in [0, 1]")
            object.__setattr__(self, "centres", c)
            object.__setattr__(self, "num_buckets", len(c))
        if self.num_buckets < 1:
            raise ValueError(f"TauGrid needs at least one bucket, got {self.num_buckets}")

    def centre_values(self) -> Tensor:
        """Bucket centres [K] (float64)."""
        if self.centres is not None:
            return torch.tensor(self.centres, dtype=torch.float64)
        return (torch.arange(self.num_buckets, dtype=torch.float64) + 0.5) / self.num_buckets

    def boundaries(self, device: torch.device | str | None = None) -> Tensor:
        """Mid-points between consecutive centres [K − 1] (float32, on ``device``; cached)."""
        key = str(torch.device(device) if device is not None else torch.device("cpu"))
        out = self._cache.get(key)
        if out is None:
            c = self.centre_values()
            out = self._cache[key] = ((c[1:] + c[:-1]) / 2).to(device=key, dtype=torch.float32)
        return out

    def _warn(self, lo: float, hi: float) -> None:
        if not self._warned[0] and (
            lo < -_TAU_TOLERANCE or hi > 1 + _TAU_TOLERANCE or math.isnan(lo) or math.isnan(hi)
        ):
            self._warned[0] = True
            warnings.warn(
                f"normalised time τ in [{lo:.4g}, {hi:.4g}] is outside [0, 1]; clamped to "
                "the nearest bucket (warned once)",
                stacklevel=3,
            )

    def nearest(self, tau: float) -> int:
        """Bucket of one τ, in plain Python (no tensor work: the per-call path of the ablation)."""
        t = float(tau)
        self._warn(t, t)
        bounds = self._cache.get("list")
        if bounds is None:
            bounds = self._cache["list"] = self.boundaries().tolist()
        t32 = struct.unpack("f", struct.pack("f", min(max(t, 0.0), 1.0)))[0]  # as bucketize sees it
        return bisect.bisect_right(bounds, t32)

    def index(self, tau: float | Tensor, *, check: bool = True) -> Tensor:
        """Nearest bucket of each τ as a LongTensor of τ's shape (0-d for a float).

        ``check`` warns (once per grid) when τ leaves [0, 1]; it costs a host sync for a device
        tensor, so the ablation hot path skips it there (the timestep tracker already clamps).
        """
        t = tau if isinstance(tau, Tensor) else torch.tensor(float(tau))
        t = t.detach().to(torch.float32)
        if check and not self._warned[0] and t.numel():
            self._warn(float(t.min()), float(t.max()))
        if self.num_buckets == 1:
            return torch.zeros(t.shape, dtype=torch.long, device=t.device)
        return torch.bucketize(t.clamp(0.0, 1.0), self.boundaries(t.device), right=True)

    def to_dict(self) -> dict[str, Any]:
        if self.centres is not None:
            return {"num_buckets": self.num_buckets, "centres": list(self.centres)}
        return {"num_buckets": self.num_buckets}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TauGrid:
        centres = raw.get("centres")
        return cls(int(raw["num_buckets"]), tuple(centres) if centres is not None else None)


__all__ = ["TauGrid"]
