"""Matrix-level diagnostics: what an edit does inside the model, in scalars per block and τ bucket.

After "When Self-Reference Fails to Close: Matrix-Level Dynamics in Large Language Models"
(REFERENCE §6), which compares prompt classes by scalar metrics of a model's internal matrices and
by effect size. Every metric here takes a batch of matrices ``[..., T, C]`` (T tokens, C channels:
one block output of one sample at one step) or of attention maps ``[..., Tq, Tk]`` and returns one
scalar per matrix, so a capture can reduce each call at once and never keep a
``[steps x tokens x channels]`` tensor (:class:`SampleMetrics` holds per-sample sums only).

Formulas (σ_i the singular values of the matrix M, p_i = σ_i / Σ_j σ_j):

* effective rank       erank(M) = exp(−Σ p_i log p_i)            (Roy & Vetterli; erank(I_n) = n, rank-1 → 1)
* top singular share   σ_1 / Σ σ_i
* participation ratio  (Σ σ_i²)² / Σ σ_i⁴                       (PR(I_n) = n, rank-1 → 1)
* variance kurtosis    E[(m − m̄)⁴] / E[(m − m̄)²]²  over every entry  (Pearson; a Gaussian gives 3)
* attention entropy    −Σ_k P_qk log P_qk, averaged over queries (and heads)
* relative L2 drift    ‖M′ − M‖_F / ‖M‖_F                       (M′ the edited run's matrix, same seed)
* cosine drift         1 − mean_t cos(M′_t, M_t)
* FVU                  ‖M − SAE(M)‖² / ‖M − mean_t M_t‖²        (an SAE's reconstruction error: the
  off-distribution score; activations an SAE has never seen reconstruct worse)
* Cohen's d            (mean a − mean b) / pooled s,  with a percentile-bootstrap interval
* AUC                  P(a > b) + ½ P(a = b)                    (Mann-Whitney)

Tensors only: no model library is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

_EPS = 1e-12


def singular_values(m: Tensor) -> Tensor:
    """Singular values of each matrix ``[..., T, C]`` (float32, descending)."""
    return torch.linalg.svdvals(m.detach().float())


def _spectrum(m: Tensor, s: Tensor | None) -> Tensor:
    return singular_values(m) if s is None else s


def effective_rank(m: Tensor, s: Tensor | None = None) -> Tensor:
    """exp of the entropy of the normalised singular values, one per matrix (``s``: precomputed)."""
    s = _spectrum(m, s)
    p = s / s.sum(-1, keepdim=True).clamp_min(_EPS)
    entropy = -(p * p.clamp_min(_EPS).log()).sum(-1)
    return entropy.exp()


def top_singular_share(m: Tensor, s: Tensor | None = None) -> Tensor:
    """σ_1 / Σ σ_i, one per matrix: 1 for rank 1, 1/n for the identity."""
    s = _spectrum(m, s)
    return s[..., 0] / s.sum(-1).clamp_min(_EPS)


def participation_ratio(m: Tensor, s: Tensor | None = None) -> Tensor:
    """(Σ λ_i)² / Σ λ_i² with λ = σ² (the eigenvalues of MᵀM), one per matrix."""
    lam = _spectrum(m, s).square()
    return lam.sum(-1).square() / lam.square().sum(-1).clamp_min(_EPS)


def variance_kurtosis(m: Tensor) -> Tensor:
    """Pearson kurtosis of every entry of each matrix ``[..., T, C]`` (3 for a Gaussian)."""
    flat = m.detach().float().flatten(-2)
    centred = flat - flat.mean(-1, keepdim=True)
    var = centred.square().mean(-1)
    return centred.pow(4).mean(-1) / var.square().clamp_min(_EPS)


def attention_entropy(p: Tensor) -> Tensor:
    """Entropy (nats) of each query's attention distribution ``[..., Tq, Tk]``, averaged over queries."""
    p = p.detach().float()
    return -(p * p.clamp_min(_EPS).log()).sum(-1).mean(-1)


def relative_drift(edited: Tensor, base: Tensor) -> Tensor:
    """‖edited − base‖_F / ‖base‖_F per matrix (0 exactly when they are equal)."""
    e, b = edited.detach().float().flatten(-2), base.detach().float().flatten(-2)
    return (e - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(_EPS)


def cosine_drift(edited: Tensor, base: Tensor) -> Tensor:
    """1 − the mean over tokens of the cosine between edited and base token vectors, per matrix."""
    e, b = edited.detach().float(), base.detach().float()
    if torch.equal(e, b):  # exactly 0, not 1 − (1 − rounding)
        return torch.zeros(e.shape[:-2])
    return 1.0 - torch.nn.functional.cosine_similarity(e, b, dim=-1, eps=_EPS).mean(-1)


def fraction_of_variance_unexplained(x: Tensor, x_hat: Tensor) -> Tensor:
    """‖x − x̂‖² / ‖x − mean_t x‖² per matrix ``[..., T, C]`` (an SAE's reconstruction error)."""
    x, x_hat = x.detach().float(), x_hat.detach().float()
    residual = (x - x_hat).square().sum((-1, -2))
    total = (x - x.mean(-2, keepdim=True)).square().sum((-1, -2))
    return residual / total.clamp_min(_EPS)


def matrix_metrics(m: Tensor) -> dict[str, Tensor]:
    """Every single-matrix metric of token matrices ``[..., T, C]`` (one SVD shared)."""
    s = singular_values(m)
    return {
        "effective_rank": effective_rank(m, s),
        "top_singular_share": top_singular_share(m, s),
        "participation_ratio": participation_ratio(m, s),
        "variance_kurtosis": variance_kurtosis(m),
    }


def attention_metrics(p: Tensor) -> dict[str, Tensor]:
    """Metrics of attention maps ``[..., heads, Tq, Tk]``, averaged over heads."""
    return {
        "attention_entropy": attention_entropy(p).mean(-1),
        "attention_effective_rank": effective_rank(p).mean(-1),
    }


# ------------------------------------------------------------------------------- effect sizes
def _as_tensor(values: Sequence[float] | Tensor) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).flatten()
    return t[torch.isfinite(t)]


def cohens_d(a: Sequence[float] | Tensor, b: Sequence[float] | Tensor) -> float:
    """(mean a − mean b) / pooled standard deviation; 0 when both groups are constant and equal,
    ±inf when they are constant and differ, NaN with fewer than two values in a group."""
    a, b = _as_tensor(a), _as_tensor(b)
    if a.numel() < 2 or b.numel() < 2:
        return math.nan
    diff = float(a.mean() - b.mean())
    pooled = ((a.numel() - 1) * a.var() + (b.numel() - 1) * b.var()) / (a.numel() + b.numel() - 2)
    sd = float(pooled.sqrt())
    if sd <= 1e-12 * max(1.0, abs(float(a.mean())), abs(float(b.mean()))):
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / sd


def auc(positive: Sequence[float] | Tensor, negative: Sequence[float] | Tensor) -> float:
    """P(positive > negative) + ½ P(equal): 1 when every positive value is larger, 0.5 at chance."""
    pos, neg = _as_tensor(positive), _as_tensor(negative)
    if not pos.numel() or not neg.numel():
        return math.nan
    greater = (pos[:, None] > neg[None, :]).double().mean()
    equal = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + 0.5 * equal)


def bootstrap_interval(
    a: Sequence[float] | Tensor,
    b: Sequence[float] | Tensor,
    statistic: Callable[[Tensor, Tensor], float] = cohens_d,
    *,
    rounds: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(a, b)``, resampling each group with replacement."""
    a, b = _as_tensor(a), _as_tensor(b)
    if a.numel() < 2 or b.numel() < 2:
        return math.nan, math.nan
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(rounds):
        ra = a[torch.randint(a.numel(), (a.numel(),), generator=gen)]
        rb = b[torch.randint(b.numel(), (b.numel(),), generator=gen)]
        values.append(statistic(ra, rb))
    v = torch.tensor(values, dtype=torch.float64)
    v = v[~torch.isnan(v)]
    if not v.numel():
        return math.nan, math.nan
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return float(v.quantile(lo)), float(v.quantile(hi))


@dataclass
class Effect:
    """How well one metric separates two groups: Cohen's d with its bootstrap interval, and AUC."""

    d: float
    d_low: float
    d_high: float
    auc: float
    n_a: int
    n_b: int

    @classmethod
    def between(
        cls, a: Sequence[float] | Tensor, b: Sequence[float] | Tensor, *, rounds: int = 1000, seed: int = 0
    ) -> Effect:
        ta, tb = _as_tensor(a), _as_tensor(b)
        low, high = bootstrap_interval(ta, tb, rounds=rounds, seed=seed)
        return cls(cohens_d(ta, tb), low, high, auc(ta, tb), int(ta.numel()), int(tb.numel()))


# ------------------------------------------------------------------------------- streaming store
class SampleMetrics:
    """Per-sample means of scalar metrics, per (site, metric, τ bucket), accumulated call by call.

    A capture adds one value per (row, call) with the sample and τ bucket of the row; only sums and
    counts ``[samples, buckets]`` are kept. :meth:`table` gives the per-sample means (NaN where a
    sample never reached that bucket).
    """

    def __init__(self, num_samples: int, num_buckets: int) -> None:
        self.num_samples = num_samples
        self.num_buckets = num_buckets
        self._sums: dict[tuple[str, str], Tensor] = {}
        self._counts: dict[tuple[str, str], Tensor] = {}

    def add(self, site: str, metric: str, values: Tensor, samples: Tensor, buckets: Tensor) -> None:
        """Add ``values`` [R] of rows belonging to ``samples`` [R] at τ buckets ``buckets`` [R]."""
        key = (site, metric)
        if key not in self._sums:
            self._sums[key] = torch.zeros(self.num_samples * self.num_buckets, dtype=torch.float64)
            self._counts[key] = torch.zeros(self.num_samples * self.num_buckets, dtype=torch.float64)
        flat = samples.long().cpu() * self.num_buckets + buckets.long().cpu()
        self._sums[key].index_add_(0, flat, values.detach().double().cpu())
        self._counts[key].index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))

    def keys(self) -> list[tuple[str, str]]:
        return list(self._sums)

    def __contains__(self, key: object) -> bool:
        """``(site, metric) in metrics``: whether anything was added under that key."""
        return key in self._sums

    def sites(self) -> list[str]:
        return list(dict.fromkeys(site for site, _ in self._sums))

    def metrics(self) -> list[str]:
        return list(dict.fromkeys(metric for _, metric in self._sums))

    def table(self, site: str, metric: str) -> Tensor:
        """Per-sample means ``[samples, buckets]`` (float64, NaN where nothing was added)."""
        sums, counts = self._sums[(site, metric)], self._counts[(site, metric)]
        out = sums / counts
        out[counts == 0] = math.nan
        return out.reshape(self.num_samples, self.num_buckets)

    def per_sample(self, site: str, metric: str) -> Tensor:
        """Per-sample mean over every bucket the sample reached ``[samples]``."""
        return self.table(site, metric).nanmean(-1)


__all__ = [
    "Effect",
    "SampleMetrics",
    "attention_entropy",
    "attention_metrics",
    "auc",
    "bootstrap_interval",
    "cohens_d",
    "cosine_drift",
    "effective_rank",
    "fraction_of_variance_unexplained",
    "matrix_metrics",
    "participation_ratio",
    "relative_drift",
    "singular_values",
    "top_singular_share",
    "variance_kurtosis",
]
