"""Concept statistics over normalised time: streaming sums, a library per SAE, safetensors files.

For every concept the library keeps, per time bucket τ and latent i, the sum of the spatially
averaged latent activation over the prompt samples seen and their count (SAeUron's μ(i, t, D)
is sum / count). Memory is O(buckets × n) per concept however many prompts are seen, runs merge
exactly (sums of sums), and a concept file remembers the SAE it was made with (a fingerprint of
its weights, d_in, n) so statistics are never applied to another SAE by mistake.

Layout on disk (one folder per hookpoint, next to the SAE's ``cfg.json``)::

    <folder>/concepts/<slug>.safetensors   "sums" [buckets, n] f64, "counts" [buckets] i64, JSON header
    <folder>/concepts/index.json           name → file, prompts, selection defaults, calibrated θ

Scores and feature selection live in :mod:`.selection` and are re-exported here. This module
knows tensors only (no diffusers / transformers imports).
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import re
import struct
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import BadFileError, MissingFileError, SAeUronError
from .files import read_json_object, read_safetensors, typed_field

if TYPE_CHECKING:
    from .calibration import ThresholdCalibrator
    from .model import SparseAutoencoder

STATS_FORMAT = "saeuron-concept-stats"
INDEX_FORMAT = "saeuron-concepts"
FORMAT_VERSION = 1
BACKGROUND_FILE = "_background.safetensors"  # slugs never start with "_", so no clash
_HEADER_KEY = "saeuron_concept"
_TAU_TOLERANCE = 1e-6


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


# ---------------------------------------------------------------------------------- τ grid
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
        if not self._warned[0] and (lo < -_TAU_TOLERANCE or hi > 1 + _TAU_TOLERANCE
                                    or math.isnan(lo) or math.isnan(hi)):
            self._warned[0] = True
            warnings.warn(f"normalised time τ in [{lo:.4g}, {hi:.4g}] is outside [0, 1]; clamped to "
                          "the nearest bucket (warned once)", stacklevel=3)

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


# ---------------------------------------------------------------------------- statistics
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
                f"do not fit {k} τ buckets × {n} latents")
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
            raise ConceptMismatchError(f"concept {self.name!r}: latents have width {latents.shape[-1]}, "
                                       f"the statistics expect {self.num_latents}")
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
            raise ConceptMismatchError(f"{what}: SAE dims differ (d_in {self.d_in} vs {other.d_in}, "
                                       f"n {self.num_latents} vs {other.num_latents})")
        if self.sae_fingerprint != other.sae_fingerprint:
            raise ConceptMismatchError(f"{what}: made with different SAEs (fingerprint "
                                       f"{self.sae_fingerprint} vs {other.sae_fingerprint})")
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
        return dataclasses.replace(self, prompts=None if self.prompts is None else list(self.prompts),
                                   extra=dict(self.extra), sums=self.sums.clone(), counts=self.counts.clone())

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
            "format": STATS_FORMAT, "version": FORMAT_VERSION, "name": self.name,
            "num_latents": self.num_latents, "d_in": self.d_in, "hookpoint": self.hookpoint,
            "sae_fingerprint": self.sae_fingerprint, "tau_grid": self.tau_grid.to_dict(),
            "prompts": self.prompts if include_prompts else None,
            "prompts_sha256": self.prompts_sha256, "num_prompts": self.num_prompts, "extra": self.extra,
        }

    def save(self, path: str | Path, include_prompts: bool = True,
             stats_dtype: torch.dtype = torch.float64) -> Path:
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
        save_file({"sums": sums, "counts": self.counts.contiguous().cpu()},
                  str(tmp), metadata={_HEADER_KEY: meta})
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
            return cls(name=typed_field(meta, "name", str, path),
                       num_latents=typed_field(meta, "num_latents", int, path, positive=True),
                       tau_grid=_tau_grid(meta, path),
                       sae_fingerprint=typed_field(meta, "sae_fingerprint", str, path, default=None),
                       d_in=typed_field(meta, "d_in", int, path, default=None, positive=True),
                       hookpoint=typed_field(meta, "hookpoint", str, path, default=None),
                       prompts=None if prompts is None else [str(p) for p in prompts],
                       prompts_sha256=typed_field(meta, "prompts_sha256", str, path, default=None),
                       num_prompts=typed_field(meta, "num_prompts", int, path, default=0),
                       extra=typed_field(meta, "extra", dict, path, default={}), sums=sums, counts=counts)
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


# -------------------------------------------------------------------------- library
@dataclass
class SelectionDefaults:
    """How a concept is unlearned unless the caller says otherwise (stored in ``index.json``)."""

    percentile: float | None = 99.999
    """Per-bucket percentile p: select latents with score > quantile(score, p/100) (strict)."""
    top_n: int | None = None
    """Alternatively the N best latents per bucket (takes precedence over ``percentile``)."""
    gamma: float = -1.0
    """Reference-rule multiplier γ < 0 (paper: −1 for styles, tuned in −1…−30 for objects)."""
    rule: str = "reference"
    """``reference``, ``zero`` or ``clamp`` (see :mod:`.ablation`)."""
    clamp_value: float = -1.0
    """Value the ``clamp`` rule writes into an active selected latent."""
    contrast: str | list[str] = "auto"
    """Contrast set for the score: ``auto`` (others, else background), ``others``, ``worst``,
    ``background``, or concept names (see :func:`.selection.concept_scores`)."""
    active: bool = True
    """False: the statistics stay (as contrast and gate) but adapters ablate the concept at this
    hookpoint only when asked for this hookpoint explicitly (e.g. styles at one block, objects at another)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SelectionDefaults:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
             *(f"lpt{i}" for i in range(1, 10))}


def _slug_base(name: str) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60].strip("-") or "concept"
    return base + "-concept" if base in _RESERVED else base


def make_slugs(names: Iterable[str]) -> dict[str, str]:
    """Filesystem-safe, unique, deterministic slugs (independent of order).

    ``Van Gogh`` → ``van-gogh``; names sharing a base (``A.B`` / ``a b``) all get a hash suffix.
    """
    names = list(dict.fromkeys(names))
    bases = {n: _slug_base(n) for n in names}
    seen: dict[str, int] = {}
    for b in bases.values():
        seen[b] = seen.get(b, 0) + 1
    out: dict[str, str] = {}
    for n in names:
        b = bases[n]
        if seen[b] > 1:
            digest = hashlib.sha256(n.encode()).hexdigest()
            b = f"{b}-{digest[:8]}"
            if b in seen:  # practically impossible; lengthen the hash
                b = f"{bases[n]}-{digest[:16]}"
        out[n] = b
    return out


class ConceptLibrary:
    """The concept statistics of ONE SAE at one hookpoint, plus an optional background set.

    ``background`` holds generic prompts used as the score contrast when a concept has no
    siblings; it also joins the pool μ(i, τ, D) that gates the reference ablation rule.
    """

    def __init__(self, num_latents: int, *, tau_grid: TauGrid | None = None,
                 sae_fingerprint: str | None = None, d_in: int | None = None,
                 hookpoint: str | None = None) -> None:
        self.num_latents = int(num_latents)
        self.tau_grid = tau_grid or TauGrid()
        self.sae_fingerprint = sae_fingerprint
        self.d_in = d_in
        self.hookpoint = hookpoint
        self.concepts: dict[str, ConceptStats] = {}
        self.background: ConceptStats | None = None
        self.defaults: dict[str, SelectionDefaults] = {}
        self.calibrated_threshold: float | None = None
        """θ calibrated during the statistics pass for SAEs imported without one (see :mod:`.calibration`)."""
        self.calibration: dict[str, Any] | None = None

    @classmethod
    def for_sae(cls, sae: SparseAutoencoder, *, tau_grid: TauGrid | None = None,
                hookpoint: str | None = None) -> ConceptLibrary:
        return cls(sae.num_latents, tau_grid=tau_grid, sae_fingerprint=sae.fingerprint(), d_in=sae.d_in,
                   hookpoint=hookpoint or sae.cfg.hookpoint)

    # ------------------------------------------------------------------ access
    @property
    def names(self) -> list[str]:
        return list(self.concepts)

    def __contains__(self, name: object) -> bool:
        return name in self.concepts

    def __len__(self) -> int:
        return len(self.concepts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.concepts)

    def __repr__(self) -> str:
        bg = ", +background" if self.background is not None else ""
        return (f"ConceptLibrary({len(self)} concepts{bg}, n={self.num_latents}, "
                f"buckets={self.tau_grid.num_buckets}, sae={self.sae_fingerprint})")

    def get(self, name: str) -> ConceptStats:
        try:
            return self.concepts[name]
        except KeyError:
            raise UnknownConceptError(name, self.names) from None

    def selection_defaults(self, name: str) -> SelectionDefaults:
        self.get(name)
        return self.defaults.get(name, SelectionDefaults())

    def set_selection_defaults(self, name: str, **changes: Any) -> SelectionDefaults:
        new = dataclasses.replace(self.selection_defaults(name), **changes)
        self.defaults[name] = new
        return new

    # -------------------------------------------------------------- accumulate
    def new_stats(self, name: str) -> ConceptStats:
        """Empty statistics carrying this library's SAE, grid and hookpoint."""
        return ConceptStats(name=name, num_latents=self.num_latents, tau_grid=self.tau_grid,
                            sae_fingerprint=self.sae_fingerprint, d_in=self.d_in, hookpoint=self.hookpoint)

    def _check(self, stats: ConceptStats) -> None:
        self.new_stats(stats.name).check_compatible(stats)

    def add_stats(self, stats: ConceptStats) -> ConceptStats:
        """Add a concept's statistics, merging into the existing ones of the same name."""
        self._check(stats)
        if stats.name in self.concepts:
            return self.concepts[stats.name].merge(stats)
        self.concepts[stats.name] = stats
        return stats

    def set_background(self, stats: ConceptStats) -> ConceptStats:
        self._check(stats)
        if self.background is None:
            self.background = stats
        else:
            self.background.merge(stats)
        return self.background

    def accumulate(self, name: str, latents: Tensor, tau: Tensor | float | None,
                   prompts: Iterable[str] | None = None) -> ConceptStats:
        """Add samples to concept ``name`` (created on first use). ``latents`` [B, n] or [B, T..., n]."""
        stats = self.concepts.get(name)
        if stats is None:
            stats = self.concepts[name] = self.new_stats(name)
        stats.update(latents, tau)
        if prompts is not None:
            stats.record_prompts(prompts)
        return stats

    def accumulate_background(self, latents: Tensor, tau: Tensor | float | None,
                              prompts: Iterable[str] | None = None) -> ConceptStats:
        if self.background is None:
            self.background = self.new_stats("background")
        self.background.update(latents, tau)
        if prompts is not None:
            self.background.record_prompts(prompts)
        return self.background

    @staticmethod
    @torch.no_grad()
    def encode_pooled(sae: SparseAutoencoder, x: Tensor,
                      calibrator: ThresholdCalibrator | None = None) -> Tensor:
        """SAE code of activations ``x`` [B, T..., d] (or [B, d]) averaged over tokens: [B, n] fp32.

        A ``calibrator`` sees the same pre-activations (one encoder pass for both).
        """
        pre = sae.pre_acts(x)
        if calibrator is not None:
            calibrator.update_pre(pre)
        if sae.cfg.encoder == "threshold":
            z = pre * (pre > sae.cfg.threshold)
        else:
            values, indices = pre.topk(sae.cfg.k, dim=-1, sorted=False)
            z = torch.zeros_like(pre).scatter_(-1, indices, values)
        return z.float() if x.dim() == 2 else pool_tokens(z)

    @torch.no_grad()
    def accumulate_activations(self, name: str | None, sae: SparseAutoencoder, x: Tensor,
                               tau: Tensor | float | None, *, prompts: Iterable[str] | None = None,
                               calibrator: ThresholdCalibrator | None = None) -> None:
        """Encode activations ``x`` [B, T..., d] with ``sae``, average over tokens, accumulate.

        ``name=None`` feeds the background set. A ``calibrator`` sees the same pre-activations
        (one encoder pass for both); store its result with :meth:`record_threshold`.
        """
        latents = self.encode_pooled(sae, x, calibrator)
        if name is None:
            self.accumulate_background(latents, tau, prompts)
        else:
            self.accumulate(name, latents, tau, prompts)

    def record_threshold(self, calibrator: ThresholdCalibrator | float,
                         target_l0: float | None = None) -> float:
        """Store a calibrated θ in the library (saved in ``index.json``); returns it."""
        if isinstance(calibrator, int | float):
            value, info = float(calibrator), {"target_l0": target_l0, "method": "given"}
        else:
            value, info = calibrator.value, calibrator.describe()
        self.calibrated_threshold = value
        self.calibration = info
        return value

    def merge(self, other: ConceptLibrary) -> ConceptLibrary:
        """Merge another run's library (same SAE) into this one, concept by concept."""
        for stats in other.concepts.values():
            self.add_stats(stats.copy())
        if other.background is not None:
            self.set_background(other.background.copy())
        for name, d in other.defaults.items():
            self.defaults.setdefault(name, d)
        return self

    # ------------------------------------------------------------------- means
    def pooled_means(self, names: Iterable[str], *, include_background: bool = False,
                     fill_empty: bool = True) -> Tensor:
        """Mean over the union of the prompts of ``names`` (pooled sums / pooled counts), [K, n] f64."""
        stats = [self.get(n) for n in names]
        if include_background and self.background is not None:
            stats.append(self.background)
        sums, counts = pooled_stats(stats)
        return _means(sums, counts, self.tau_grid, fill_empty)

    def all_means(self, fill_empty: bool = True) -> Tensor:
        """μ(i, τ, D) over every prompt the library holds (all concepts and the background)."""
        return self.pooled_means(self.names, include_background=True, fill_empty=fill_empty)

    # --------------------------------------------------------------- sae check
    def check_sae(self, sae: SparseAutoencoder, *, fingerprint: bool = True) -> None:
        """Raise :class:`ConceptMismatchError` unless ``sae`` is the SAE these statistics were made with."""
        if sae.num_latents != self.num_latents or (self.d_in is not None and sae.d_in != self.d_in):
            raise ConceptMismatchError(
                f"concept statistics are for an SAE with d_in={self.d_in}, n={self.num_latents}; "
                f"this SAE has d_in={sae.d_in}, n={sae.num_latents}")
        if fingerprint and self.sae_fingerprint is not None:
            fp = sae.fingerprint()
            if fp != self.sae_fingerprint:
                raise ConceptMismatchError(
                    f"concept statistics were made with another SAE (fingerprint {self.sae_fingerprint}, "
                    f"this SAE {fp}); recompute them with `saeuron concept` for this SAE")

    # -------------------------------------------------------------------- io
    def slugs(self) -> dict[str, str]:
        return make_slugs(self.names)

    def save(self, folder: str | Path, include_prompts: bool = True,
             stats_dtype: torch.dtype = torch.float64) -> Path:
        """Write ``folder/concepts/<slug>.safetensors`` and ``folder/concepts/index.json``
        (``stats_dtype``: see :meth:`ConceptStats.save`)."""
        out = Path(folder) / "concepts"
        out.mkdir(parents=True, exist_ok=True)
        slugs = self.slugs()
        entries: dict[str, Any] = {}
        for name, stats in self.concepts.items():
            file = f"{slugs[name]}.safetensors"
            stats.save(out / file, include_prompts, stats_dtype)
            entries[name] = {"file": file, "prompts": stats.prompts if include_prompts else None,
                             "prompts_sha256": stats.prompts_sha256, "num_prompts": stats.num_prompts,
                             "samples": stats.total_count,
                             "selection": self.selection_defaults(name).to_dict()}
        background = None
        if self.background is not None:
            self.background.save(out / BACKGROUND_FILE, include_prompts, stats_dtype)
            background = {"file": BACKGROUND_FILE, "num_prompts": self.background.num_prompts,
                          "prompts_sha256": self.background.prompts_sha256}
        index = {
            "format": INDEX_FORMAT, "version": FORMAT_VERSION, "sae_fingerprint": self.sae_fingerprint,
            "d_in": self.d_in, "num_latents": self.num_latents, "hookpoint": self.hookpoint,
            "tau_grid": self.tau_grid.to_dict(), "calibrated_threshold": self.calibrated_threshold,
            "calibration": self.calibration, "background": background, "concepts": entries,
        }
        tmp = out / "index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n")
        tmp.replace(out / "index.json")
        return out

    @classmethod
    def load(cls, folder: str | Path, sae: SparseAutoencoder | None = None) -> ConceptLibrary:
        """Read a library written by :meth:`save` (``folder`` or ``folder/concepts``).

        With ``sae``, refuse statistics made for another SAE (:class:`ConceptMismatchError`).
        """
        folder = Path(folder)
        root = folder if (folder / "index.json").is_file() else folder / "concepts"
        index_path = root / "index.json"
        if not index_path.is_file():
            raise MissingFileError(f"no concept library at {folder} "
                                   f"(expected {folder / 'concepts' / 'index.json'})")
        index = read_json_object(index_path, "concept library index")
        if index.get("format") != INDEX_FORMAT or _version(index, index_path) > FORMAT_VERSION:
            raise ConceptError(f"{index_path}: unsupported format {index.get('format')!r} "
                               f"v{index.get('version')}")
        lib = cls(typed_field(index, "num_latents", int, index_path, positive=True),
                  tau_grid=_tau_grid(index, index_path),
                  sae_fingerprint=typed_field(index, "sae_fingerprint", str, index_path, default=None),
                  d_in=typed_field(index, "d_in", int, index_path, default=None, positive=True),
                  hookpoint=typed_field(index, "hookpoint", str, index_path, default=None))
        if sae is not None:
            try:
                lib.check_sae(sae)
            except ConceptMismatchError as err:
                raise ConceptMismatchError(f"{index_path}: {err}") from None
        lib.calibrated_threshold = typed_field(index, "calibrated_threshold", float, index_path, default=None)
        lib.calibration = typed_field(index, "calibration", dict, index_path, default=None)
        for name, entry in typed_field(index, "concepts", dict, index_path, default={}).items():
            file = _entry_file(entry, index_path, f"concepts.{name}")
            stats = ConceptStats.load(root / file)
            if stats.name != name:
                raise ConceptError(f"{root / file} holds concept {stats.name!r}, the index says {name!r}")
            lib._check_file(stats, root / file)
            lib.concepts[name] = stats
            if entry.get("selection"):
                try:
                    lib.defaults[name] = SelectionDefaults.from_dict(entry["selection"])
                except (KeyError, TypeError, ValueError) as err:
                    raise BadFileError(index_path, f"not selection defaults ({err})",
                                       field=f"concepts.{name}.selection") from err
        background = typed_field(index, "background", dict, index_path, default=None)
        if background:
            path = root / _entry_file(background, index_path, "background")
            bg = ConceptStats.load(path)
            lib._check_file(bg, path)
            lib.background = bg
        return lib

    def _check_file(self, stats: ConceptStats, path: Path) -> None:
        try:
            self._check(stats)
        except ConceptMismatchError as err:
            raise ConceptMismatchError(f"{path}: {err}") from None


def _entry_file(entry: Any, index_path: Path, where: str) -> str:
    """The ``file`` of an index entry: a plain file name inside the library folder."""
    file = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(file, str) or not file or "/" in file or "\\" in file or file.startswith("."):
        raise BadFileError(index_path, f"must name a statistics file in the library folder, got {file!r}",
                           field=f"{where}.file")
    return file


# Scores and selection are part of this module's public API.
from .selection import FeatureSelection, concept_scores, quantile_linear, select_features  # noqa: E402

__all__ = ["BACKGROUND_FILE", "ConceptError", "ConceptLibrary", "ConceptMismatchError", "ConceptStats",
           "FeatureSelection", "SelectionDefaults", "TauGrid", "UnknownConceptError", "concept_scores",
           "hash_prompts", "make_slugs", "pool_tokens", "pooled_stats", "quantile_linear", "select_features"]
