"""Streaming concept statistics: per-τ-bucket sums and counts of token-averaged latents, their
safetensors file, and the concept errors.

Memory is O(buckets × n) per concept however many prompts are seen; runs merge exactly (sums of
sums); a file remembers the SAE it was made with (fingerprint, d_in, n).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import BadFileError, SAeUronError
from .files import read_safetensors, typed_field
from .tau import TauGrid

STATS_FORMAT = "saeuron-concept-stats"
FORMAT_VERSION = 1
_HEADER_KEY = "saeuron_concept"


class ConceptError(SAeUronError, ValueError):
    """Base class of the concept errors."""


class ConceptMismatchError(ConceptError):
    """Statistics made for another SAE, hookpoint or τ grid than the one they are used with."""


class UnknownConceptError(SAeUronError, KeyError):
    """A concept name the library does not hold; the message lists the known ones."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        listed = ", ".join(map(repr, known)) if known else "none"
        self.message = f"unknown concept {name!r}.{hint} Known concepts: {listed}"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would print the message quoted
        return self.message


def hash_prompts(prompts: Sequence[str]) -> str:
    """sha256 of a prompt list (JSON-encoded, order matters)."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()


def _combine_hashes(a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a or b
    return hashlib.sha256("".join(sorted((a, b))).encode()).hexdigest()


def pool_tokens(latents: Tensor) -> Tensor:
    """[B, n] from [B, n] or [B, T..., n]: the spatial (token) average per sample."""
    if latents.dim() < 2:
        raise ValueError(f"latents must be [B, n] or [B, tokens..., n], got shape {tuple(latents.shape)}")
    if latents.dim() == 2:
        return latents
    return latents.float().mean(dim=tuple(range(1, latents.dim() - 1)))


@dataclass
class ConceptStats:
    """Streaming per-bucket sums and counts of spatially averaged latents for one concept.

    ``sums`` [K, n] float64 and ``counts`` [K] int64 (one count per prompt sample and bucket).
    Sums of fp32 latents in float64 are exact unless magnitudes span more than ~2^29, so
    accumulation order does not matter and merging runs is exact.
    """

    name: str
    num_latents: int
    tau_grid: TauGrid = field(default_factory=TauGrid)
    sae_fingerprint: str | None = None
    d_in: int | None = None
    hookpoint: str | None = None
    prompts: list[str] | None = field(default_factory=list)
    """Prompts seen, or None when withheld (then only ``prompts_sha256`` / ``num_prompts`` are kept)."""
    prompts_sha256: str | None = None
    num_prompts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    sums: Tensor = field(default=None)  # type: ignore[assignment]
    counts: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        k, n = self.tau_grid.num_buckets, self.num_latents
        if self.sums is None:
            self.sums = torch.zeros(k, n, dtype=torch.float64)
        if self.counts is None:
            self.counts = torch.zeros(k, dtype=torch.int64)
        self.sums = self.sums.to(torch.float64)
        self.counts = self.counts.to(torch.int64)
        if tuple(self.sums.shape) != (k, n) or tuple(self.counts.shape) != (k,):
            raise ConceptMismatchError(
                f"concept {self.name!r}: sums {tuple(self.sums.shape)} / counts {tuple(self.counts.shape)} "
                f"do not fit {k} τ buckets × {n} latents"
            )
        if self.prompts is not None:
            self.num_prompts = len(self.prompts)
            self.prompts_sha256 = hash_prompts(self.prompts) if self.prompts else self.prompts_sha256

    # -------------------------------------------------------------- accumulate
    @torch.no_grad()
    def update(self, latents: Tensor, tau: Tensor | float | None) -> None:
        """Add samples: ``latents`` [B, n] (already averaged over tokens), ``tau`` [B], a float or None.

        None is allowed only for a single-bucket grid (VLMs).
        """
        latents = pool_tokens(latents)
        if latents.shape[-1] != self.num_latents:
            raise ConceptMismatchError(
                f"concept {self.name!r}: latents have width {latents.shape[-1]}, "
                f"the statistics expect {self.num_latents}"
            )
        b = latents.shape[0]
        if tau is None:
            if self.tau_grid.num_buckets != 1:
                raise ValueError(f"τ is required: the grid has {self.tau_grid.num_buckets} buckets")
            bucket = torch.zeros(b, dtype=torch.long)
        else:
            bucket = self.tau_grid.index(tau).to("cpu").reshape(-1)
            if bucket.numel() == 1:
                bucket = bucket.expand(b)
            elif bucket.numel() != b:
                raise ValueError(f"τ has {bucket.numel()} values for {b} samples")
        self.sums.index_add_(0, bucket, latents.detach().to("cpu", torch.float64))
        self.counts += torch.bincount(bucket, minlength=self.tau_grid.num_buckets)

    def record_prompts(self, prompts: Iterable[str]) -> None:
        """Remember the prompts behind the samples (call once per prompt, not per step)."""
        prompts = list(prompts)
        if self.prompts is not None:
            self.prompts.extend(prompts)
            self.prompts_sha256 = hash_prompts(self.prompts)
        else:
            self.prompts_sha256 = _combine_hashes(self.prompts_sha256, hash_prompts(prompts))
        self.num_prompts += len(prompts)

    def check_compatible(self, other: ConceptStats) -> None:
        """Raise :class:`ConceptMismatchError` unless both were made for the same SAE, hookpoint and grid."""
        what = f"concept {self.name!r} and {other.name!r}"
        if self.num_latents != other.num_latents or self.d_in != other.d_in:
            raise ConceptMismatchError(
                f"{what}: SAE dims differ (d_in {self.d_in} vs {other.d_in}, "
                f"n {self.num_latents} vs {other.num_latents})"
            )
        if self.sae_fingerprint != other.sae_fingerprint:
            raise ConceptMismatchError(
                f"{what}: made with different SAEs (fingerprint "
                f"{self.sae_fingerprint} vs {other.sae_fingerprint})"
            )
        if self.tau_grid != other.tau_grid:
            raise ConceptMismatchError(f"{what}: τ grids differ ({self.tau_grid} vs {other.tau_grid})")
        if self.hookpoint and other.hookpoint and self.hookpoint != other.hookpoint:
            raise ConceptMismatchError(f"{what}: hookpoints differ ({self.hookpoint} vs {other.hookpoint})")

    def merge(self, other: ConceptStats) -> ConceptStats:
        """Add ``other``'s samples in place (exact: sums of sums); returns self. Keeps this name."""
        self.check_compatible(other)
        self.sums += other.sums.to(self.sums.device)
        self.counts += other.counts.to(self.counts.device)
        if self.prompts is not None and other.prompts is not None:
            self.prompts.extend(other.prompts)
            self.prompts_sha256 = hash_prompts(self.prompts) if self.prompts else None
        else:
            self.prompts = None
            self.prompts_sha256 = _combine_hashes(self.prompts_sha256, other.prompts_sha256)
        self.num_prompts += other.num_prompts
        self.hookpoint = self.hookpoint or other.hookpoint
        return self

    def copy(self) -> ConceptStats:
        return dataclasses.replace(
            self,
            prompts=None if self.prompts is None else list(self.prompts),
            extra=dict(self.extra),
            sums=self.sums.clone(),
            counts=self.counts.clone(),
        )

    # ------------------------------------------------------------------- read
    @property
    def total_count(self) -> int:
        return int(self.counts.sum())

    def means(self, fill_empty: bool = False) -> Tensor:
        """μ(i, τ) = sums / counts, [K, n] float64.

        Buckets without samples are NaN, or with ``fill_empty`` copy the nearest bucket that has
        samples (so statistics gathered with 25 steps serve a 50-step sampler).
        """
        return _means(self.sums, self.counts, self.tau_grid, fill_empty)

    # -------------------------------------------------------------------- io
    def metadata(self, include_prompts: bool = True) -> dict[str, Any]:
        return {
            "format": STATS_FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
            "num_latents": self.num_latents,
            "d_in": self.d_in,
            "hookpoint": self.hookpoint,
            "sae_fingerprint": self.sae_fingerprint,
            "tau_grid": self.tau_grid.to_dict(),
            "prompts": self.prompts if include_prompts else None,
            "prompts_sha256": self.prompts_sha256,
            "num_prompts": self.num_prompts,
            "extra": self.extra,
        }

    def save(
        self, path: str | Path, include_prompts: bool = True, stats_dtype: torch.dtype = torch.float64
    ) -> Path:
        """Write ``sums``/``counts`` and the metadata (JSON in the safetensors header).

        ``stats_dtype=torch.float32`` halves the file for shipping; loading reads either back into
        float64, but sums rounded to float32 no longer merge exactly with new samples.
        """
        if stats_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"stats_dtype must be torch.float64 or torch.float32, got {stats_dtype}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps(self.metadata(include_prompts), ensure_ascii=False)
        tmp = path.with_name(path.name + ".tmp")
        sums = self.sums.to(stats_dtype).contiguous().cpu()
        save_file(
            {"sums": sums, "counts": self.counts.contiguous().cpu()}, str(tmp), metadata={_HEADER_KEY: meta}
        )
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ConceptStats:
        """Read one statistics file; any problem (truncated, a pickle, a bad header, NaN/inf sums)
        is a :class:`~saeuron_plugin.errors.BadFileError` naming the file and the field."""
        path = Path(path)
        read = read_safetensors(path, "concept statistics file", ["sums", "counts"])
        sums, counts = read.tensors["sums"], read.tensors["counts"]
        raw = read.metadata.get(_HEADER_KEY)
        if raw is None:
            raise BadFileError(path, f"not a concept statistics file (no '{_HEADER_KEY}' header)")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as err:
            raise BadFileError(path, f"the header is not valid JSON: {err}", field=_HEADER_KEY) from err
        if not isinstance(meta, dict):
            raise BadFileError(path, "the header must be a JSON object", field=_HEADER_KEY)
        if meta.get("format") != STATS_FORMAT or _version(meta, path) > FORMAT_VERSION:
            raise ConceptError(f"{path}: unsupported format {meta.get('format')!r} v{meta.get('version')}")
        prompts = typed_field(meta, "prompts", list, path, default=None)
        try:
            return cls(
                name=typed_field(meta, "name", str, path),
                num_latents=typed_field(meta, "num_latents", int, path, positive=True),
                tau_grid=_tau_grid(meta, path),
                sae_fingerprint=typed_field(meta, "sae_fingerprint", str, path, default=None),
                d_in=typed_field(meta, "d_in", int, path, default=None, positive=True),
                hookpoint=typed_field(meta, "hookpoint", str, path, default=None),
                prompts=None if prompts is None else [str(p) for p in prompts],
                prompts_sha256=typed_field(meta, "prompts_sha256", str, path, default=None),
                num_prompts=typed_field(meta, "num_prompts", int, path, default=0),
                extra=typed_field(meta, "extra", dict, path, default={}),
                sums=sums,
                counts=counts,
            )
        except ConceptMismatchError as err:
            raise BadFileError(path, str(err), field="sums") from err


def _version(meta: dict[str, Any], path: Path) -> int:
    return typed_field(meta, "version", int, path, default=0)


def _tau_grid(meta: dict[str, Any], path: Path) -> TauGrid:
    raw = typed_field(meta, "tau_grid", dict, path)
    try:
        return TauGrid.from_dict(raw)
    except (KeyError, TypeError, ValueError) as err:
        raise BadFileError(path, f"not a τ grid ({type(err).__name__}: {err})", field="tau_grid") from err


def _means(sums: Tensor, counts: Tensor, grid: TauGrid, fill_empty: bool) -> Tensor:
    c = counts.to(sums.dtype).unsqueeze(1)
    out = sums / c  # 0/0 → NaN for empty buckets
    if not fill_empty:
        return out
    full = (counts > 0).nonzero().flatten()
    if full.numel() == 0 or full.numel() == counts.numel():
        return out
    centres = grid.centre_values()
    # nearest bucket with samples; argmin returns the first minimum, so ties go to the lower τ
    nearest = full[(centres[:, None] - centres[full][None, :]).abs().argmin(dim=1)]
    return out[nearest]


def pooled_stats(stats: Sequence[ConceptStats]) -> tuple[Tensor, Tensor]:
    """Pooled (sums, counts) of several concepts: the statistics of the union of their prompts."""
    if not stats:
        raise ConceptError("cannot pool an empty set of concepts")
    sums = torch.stack([s.sums for s in stats]).sum(0)
    counts = torch.stack([s.counts for s in stats]).sum(0)
    return sums, counts


__all__ = [
    "FORMAT_VERSION",
    "STATS_FORMAT",
    "ConceptError",
    "ConceptMismatchError",
    "ConceptStats",
    "UnknownConceptError",
    "hash_prompts",
    "pool_tokens",
    "pooled_stats",
]
