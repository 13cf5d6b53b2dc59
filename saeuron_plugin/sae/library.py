"""The concept library of one SAE at one hookpoint: its concepts' statistics, a background set,
selection defaults per concept, and the ``concepts/`` folder they are saved in::

    <folder>/concepts/<slug>.safetensors   "sums" [buckets, n] f64, "counts" [buckets] i64, JSON header
    <folder>/concepts/index.json           name → file, prompts, selection defaults, calibrated θ
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import BadFileError, MissingFileError
from .files import read_json_object, typed_field
from .stats import (
    FORMAT_VERSION,
    ConceptError,
    ConceptMismatchError,
    ConceptStats,
    UnknownConceptError,
    _means,
    _tau_grid,
    _version,
    pool_tokens,
    pooled_stats,
)
from .tau import TauGrid

if TYPE_CHECKING:
    from .calibration import ThresholdCalibrator
    from .model import SparseAutoencoder

INDEX_FORMAT = "saeuron-concepts"
BACKGROUND_FILE = "_background.safetensors"  # slugs never start with "_", so no clash


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
    target: str | None = None
    """Concept to steer toward where this one is removed (see :attr:`.spec.ConceptAblation.target`)."""
    target_scale: float = 1.0
    """α of the target replacement."""
    active: bool = True
    """False: the statistics stay (as contrast and gate) but adapters ablate the concept at this
    hookpoint only when asked for this hookpoint explicitly (e.g. styles at one block, objects at another)."""
    robust: bool | None = None
    """Ablated here in the *robust* mode (``apply(..., robust=True)``), the hookpoints a tuner chose to
    hold against adaptive prompt attacks (often more than the ``active`` ones); None: as ``active``."""

    def ablated(self, robust: bool = False) -> bool:
        """Whether the concept is ablated at this hookpoint by default, in the default or the robust mode."""
        return self.robust if robust and self.robust is not None else self.active

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SelectionDefaults:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


_RESERVED = {
    "con",
    "prn",
    "aux",
    "nul",
    *(f"com{i}" for i in range(1, 10)),
    *(f"lpt{i}" for i in range(1, 10)),
}


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

    def __init__(
        self,
        num_latents: int,
        *,
        tau_grid: TauGrid | None = None,
        sae_fingerprint: str | None = None,
        d_in: int | None = None,
        hookpoint: str | None = None,
    ) -> None:
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
    def for_sae(
        cls, sae: SparseAutoencoder, *, tau_grid: TauGrid | None = None, hookpoint: str | None = None
    ) -> ConceptLibrary:
        return cls(
            sae.num_latents,
            tau_grid=tau_grid,
            sae_fingerprint=sae.fingerprint(),
            d_in=sae.d_in,
            hookpoint=hookpoint or sae.cfg.hookpoint,
        )

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
        return (
            f"ConceptLibrary({len(self)} concepts{bg}, n={self.num_latents}, "
            f"buckets={self.tau_grid.num_buckets}, sae={self.sae_fingerprint})"
        )

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
        return ConceptStats(
            name=name,
            num_latents=self.num_latents,
            tau_grid=self.tau_grid,
            sae_fingerprint=self.sae_fingerprint,
            d_in=self.d_in,
            hookpoint=self.hookpoint,
        )

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

    def accumulate(
        self, name: str, latents: Tensor, tau: Tensor | float | None, prompts: Iterable[str] | None = None
    ) -> ConceptStats:
        """Add samples to concept ``name`` (created on first use). ``latents`` [B, n] or [B, T..., n]."""
        stats = self.concepts.get(name)
        if stats is None:
            stats = self.concepts[name] = self.new_stats(name)
        stats.update(latents, tau)
        if prompts is not None:
            stats.record_prompts(prompts)
        return stats

    def accumulate_background(
        self, latents: Tensor, tau: Tensor | float | None, prompts: Iterable[str] | None = None
    ) -> ConceptStats:
        if self.background is None:
            self.background = self.new_stats("background")
        self.background.update(latents, tau)
        if prompts is not None:
            self.background.record_prompts(prompts)
        return self.background

    @staticmethod
    @torch.no_grad()
    def encode_pooled(
        sae: SparseAutoencoder, x: Tensor, calibrator: ThresholdCalibrator | None = None
    ) -> Tensor:
        """SAE code of activations ``x`` [B, T..., d] (or [B, d]) averaged over tokens: [B, n] fp32.

        A ``calibrator`` sees the same pre-activations (one encoder pass for both).
        """
        pre = sae.pre_acts(x)
        if calibrator is not None:
            calibrator.update_pre(pre)
        z = sae.activate(pre)
        return z.float() if x.dim() == 2 else pool_tokens(z)

    @torch.no_grad()
    def accumulate_activations(
        self,
        name: str | None,
        sae: SparseAutoencoder,
        x: Tensor,
        tau: Tensor | float | None,
        *,
        prompts: Iterable[str] | None = None,
        calibrator: ThresholdCalibrator | None = None,
    ) -> None:
        """Encode activations ``x`` [B, T..., d] with ``sae``, average over tokens, accumulate.

        ``name=None`` feeds the background set. A ``calibrator`` sees the same pre-activations
        (one encoder pass for both); store its result with :meth:`record_threshold`.
        """
        latents = self.encode_pooled(sae, x, calibrator)
        if name is None:
            self.accumulate_background(latents, tau, prompts)
        else:
            self.accumulate(name, latents, tau, prompts)

    def record_threshold(
        self, calibrator: ThresholdCalibrator | float, target_l0: float | None = None
    ) -> float:
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
    def pooled_means(
        self, names: Iterable[str], *, include_background: bool = False, fill_empty: bool = True
    ) -> Tensor:
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
                f"this SAE has d_in={sae.d_in}, n={sae.num_latents}"
            )
        if fingerprint and self.sae_fingerprint is not None:
            fp = sae.fingerprint()
            if fp != self.sae_fingerprint:
                raise ConceptMismatchError(
                    f"concept statistics were made with another SAE (fingerprint {self.sae_fingerprint}, "
                    f"this SAE {fp}); recompute them with `saeuron concept` for this SAE"
                )

    # -------------------------------------------------------------------- io
    def slugs(self) -> dict[str, str]:
        return make_slugs(self.names)

    def save(
        self, folder: str | Path, include_prompts: bool = True, stats_dtype: torch.dtype = torch.float64
    ) -> Path:
        """Write ``folder/concepts/<slug>.safetensors`` and ``folder/concepts/index.json``
        (``stats_dtype``: see :meth:`ConceptStats.save`)."""
        out = Path(folder) / "concepts"
        out.mkdir(parents=True, exist_ok=True)
        slugs = self.slugs()
        entries: dict[str, Any] = {}
        for name, stats in self.concepts.items():
            file = f"{slugs[name]}.safetensors"
            stats.save(out / file, include_prompts, stats_dtype)
            entries[name] = {
                "file": file,
                "prompts": stats.prompts if include_prompts else None,
                "prompts_sha256": stats.prompts_sha256,
                "num_prompts": stats.num_prompts,
                "samples": stats.total_count,
                "selection": self.selection_defaults(name).to_dict(),
            }
        background = None
        if self.background is not None:
            self.background.save(out / BACKGROUND_FILE, include_prompts, stats_dtype)
            background = {
                "file": BACKGROUND_FILE,
                "num_prompts": self.background.num_prompts,
                "prompts_sha256": self.background.prompts_sha256,
            }
        index = {
            "format": INDEX_FORMAT,
            "version": FORMAT_VERSION,
            "sae_fingerprint": self.sae_fingerprint,
            "d_in": self.d_in,
            "num_latents": self.num_latents,
            "hookpoint": self.hookpoint,
            "tau_grid": self.tau_grid.to_dict(),
            "calibrated_threshold": self.calibrated_threshold,
            "calibration": self.calibration,
            "background": background,
            "concepts": entries,
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
            raise MissingFileError(
                f"no concept library at {folder} (expected {folder / 'concepts' / 'index.json'})"
            )
        index = read_json_object(index_path, "concept library index")
        if index.get("format") != INDEX_FORMAT or _version(index, index_path) > FORMAT_VERSION:
            raise ConceptError(
                f"{index_path}: unsupported format {index.get('format')!r} v{index.get('version')}"
            )
        lib = cls(
            typed_field(index, "num_latents", int, index_path, positive=True),
            tau_grid=_tau_grid(index, index_path),
            sae_fingerprint=typed_field(index, "sae_fingerprint", str, index_path, default=None),
            d_in=typed_field(index, "d_in", int, index_path, default=None, positive=True),
            hookpoint=typed_field(index, "hookpoint", str, index_path, default=None),
        )
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
                    raise BadFileError(
                        index_path, f"not selection defaults ({err})", field=f"concepts.{name}.selection"
                    ) from err
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
        raise BadFileError(
            index_path,
            f"must name a statistics file in the library folder, got {file!r}",
            field=f"{where}.file",
        )
    return file


__all__ = ["BACKGROUND_FILE", "INDEX_FORMAT", "ConceptLibrary", "SelectionDefaults", "make_slugs"]
