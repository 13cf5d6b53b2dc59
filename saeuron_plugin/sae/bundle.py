"""SAE bundles: SAEs at named hookpoints with their concept libraries, the part every adapter shares.

A bundle is one folder per hookpoint plus a model card::

    <bundle>/<hookpoint>/cfg.json, sae.safetensors                the SAE
    <bundle>/<hookpoint>/concepts/index.json, <slug>.safetensors  its concept library (optional)
    <bundle>/README.md                                           model card

:class:`SaeBundle` loads and saves that layout (locally or through the Hugging Face Hub), knows
which concepts live where, resolves user options into :class:`~.ablation.ConceptAblation` specs
and builds the per-hookpoint :class:`~.ablation.FeatureAblator` objects. Adapters (diffusers,
transformers VLMs) subclass it and add what is model-specific: resolving hookpoints on a model,
installing hooks, the statistics pass. Tensors only: no diffusers / transformers imports here.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from ..errors import SAeUronError
from .ablation import ApplyTo, ConceptAblation, FeatureAblator
from .calibration import ThresholdCalibrator
from .io import CFG_NAME, WEIGHTS_NAME, SaeLoadError, list_hookpoint_folders, load_sae_folder, resolve_repo
from .library import ConceptLibrary
from .model import SparseAutoencoder
from .sites import CallContext, StatisticsRecorder, UnlearnHandle
from .stats import UnknownConceptError
from .tau import TauGrid

CARD_NAME = "README.md"
PerConcept = float | Mapping[str, float] | None


class SaeWidthError(SAeUronError, ValueError):
    """An SAE whose d_in differs from the width of the module it is meant for."""


class UnknownHookpointError(SAeUronError, KeyError):
    """A hookpoint the bundle has no SAE for."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


@dataclass
class BundleEntry:
    """One hookpoint of a bundle: its SAE and the concept library made with that SAE."""

    path: str
    sae: SparseAutoencoder
    library: ConceptLibrary
    calibrator: ThresholdCalibrator | None = None
    """Sees pre-activations during statistics passes when the SAE has no θ."""


class StatisticsTransaction:
    """One statistics pass, all or nothing: samples go into fresh statistics, merged into the
    libraries (and θ calibration recorded) only by :meth:`commit`.

    Used as ``with bundle.statistics_pass(paths, calibrate) as txn:`` around the generation loop:
    leaving the block normally commits; an exception (a failing pipeline, Ctrl-C) leaves every
    library and calibrator exactly as it was, so no concept is left half-made (listed with
    statistics from 0 prompts) and no existing concept gains samples without its prompt count.

    The pass's editors are :attr:`recorders` (one :class:`~.sites.StatisticsRecorder` per
    hookpoint, ``extra`` per path stored with the statistics); the driver announces each batch
    with :meth:`start_batch` and closes it with :meth:`finish_batch`.
    """

    def __init__(
        self,
        bundle: SaeBundle,
        paths: Sequence[str],
        calibrate: bool | None,
        *,
        extra: Mapping[str, Mapping[str, Any]] | None = None,
        missing_hint: str = "",
        require_tau: bool = False,
        processes: Any = None,
        prompt_order: Sequence[str] = (),
    ) -> None:
        self.bundle = bundle
        self.paths = list(paths)
        self.processes = processes
        self.prompt_order = {label: i for i, label in enumerate(prompt_order)}
        self.fresh: dict[str, dict[str | None, Any]] = {p: {} for p in self.paths}
        self._saved_calibrators = {
            p: _calibrator_snapshot(bundle.hookpoints[p].calibrator) for p in self.paths
        }
        bundle.prepare_calibrators(self.paths, calibrate)
        self.committed: dict[str, dict[str | None, Any]] | None = None
        extra = extra or {}
        self.recorders = {
            p: StatisticsRecorder(bundle.hookpoints[p], self, extra.get(p), missing_hint, require_tau)
            for p in self.paths
        }

    def declare(self, names: Sequence[str | None]) -> None:
        """Make (empty) statistics for ``names`` at every hookpoint, so each exists even without rows."""
        for recorder in self.recorders.values():
            for name in names:
                recorder.stats(name)

    def start_batch(
        self,
        names: Sequence[Sequence[str | None]],
        labels: Sequence[str],
        prompts: Sequence[int] | None = None,
    ) -> None:
        """The concepts and label of each sample of the next batch, for every recorder (see
        :meth:`~.sites.StatisticsRecorder.start_batch`)."""
        for recorder in self.recorders.values():
            recorder.start_batch(names, labels, prompts)

    def finish_batch(self) -> None:
        for recorder in self.recorders.values():
            recorder.finish_batch()

    def stats(self, path: str, name: str | None) -> Any:
        """This pass's statistics for concept ``name`` (None: the background set) at ``path``."""
        fresh = self.fresh[path]
        if name not in fresh:
            library = self.bundle.hookpoints[path].library
            fresh[name] = library.new_stats("background" if name is None else name)
        return fresh[name]

    def commit(self) -> dict[str, dict[str | None, Any]]:
        """Merge the pass into the libraries; returns hookpoint → concept → the library's statistics."""
        self._pool_processes()
        out: dict[str, dict[str | None, Any]] = {}
        for path in self.paths:
            library = self.bundle.hookpoints[path].library
            out[path] = {
                name: library.set_background(stats) if name is None else library.add_stats(stats)
                for name, stats in self.fresh[path].items()
            }
        self.bundle.record_calibration(self.paths)
        self.committed = out
        return out

    def _pool_processes(self) -> None:
        """A multi-process pass (``processes`` with world > 1, each process given its share of the
        prompts): every process ends with the statistics and θ histogram of all samples, so all
        commit the same libraries. Prompts are put back in ``prompt_order``."""
        procs = self.processes
        if procs is None or procs.world == 1:
            return
        for path in self.paths:
            for stats in self.fresh[path].values():  # the same declared names, in order, everywhere
                stats.sums, stats.counts = procs.sum(stats.sums), procs.sum(stats.counts)
                if stats.prompts is not None:
                    seen = [p for part in procs.gather(stats.prompts) for p in part]
                    seen.sort(key=lambda label: self.prompt_order.get(label, len(self.prompt_order)))
                    stats.prompts, stats.num_prompts, stats.prompts_sha256 = [], 0, None
                    stats.record_prompts(seen)
            calibrator = self.bundle.hookpoints[path].calibrator
            if calibrator is not None:
                saved = self._saved_calibrators[path]
                base_hist = saved[1] if saved is not None else torch.zeros_like(calibrator.hist)
                base_above, base_tokens = (saved[2], saved[3]) if saved is not None else (0, 0)
                counts = torch.tensor([calibrator.above - base_above, calibrator.tokens - base_tokens])
                calibrator.hist = base_hist + procs.sum(calibrator.hist - base_hist)
                above, tokens = procs.sum(counts).tolist()
                calibrator.above, calibrator.tokens = base_above + above, base_tokens + tokens

    def results(self, names: Sequence[str | None]) -> dict[str, dict[str | None, Any]]:
        """After :meth:`commit`: hookpoint → concept → the library's statistics, for ``names``."""
        if self.committed is None:
            raise RuntimeError("the statistics pass did not commit")
        return {path: {name: self.committed[path][name] for name in names} for path in self.paths}

    def rollback(self) -> None:
        """Put every calibrator back as it was before the pass (the libraries were never touched)."""
        for path, saved in self._saved_calibrators.items():
            self.bundle.hookpoints[path].calibrator = _restore_calibrator(saved)

    def __enter__(self) -> StatisticsTransaction:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()


def _calibrator_snapshot(calibrator: ThresholdCalibrator | None) -> tuple[Any, ...] | None:
    if calibrator is None:
        return None
    return calibrator, calibrator.hist.clone(), calibrator.above, calibrator.tokens


def _restore_calibrator(saved: tuple[Any, ...] | None) -> ThresholdCalibrator | None:
    if saved is None:
        return None
    calibrator, hist, above, tokens = saved
    calibrator.hist, calibrator.above, calibrator.tokens = hist, above, tokens
    return calibrator


def per_concept(value: Any, name: str) -> Any:
    """``value[name]`` for a mapping (None when absent), else ``value`` itself."""
    return value.get(name) if isinstance(value, Mapping) else value


def same_model(a: str, b: str) -> bool:
    """Model ids / paths naming the same model: equal, or the same last path component."""
    return a == b or Path(a.rstrip("/")).name == Path(b.rstrip("/")).name


class SaeBundle:
    """SAEs at one or more hookpoints with their concept libraries (see the module docstring)."""

    entry_class: ClassVar[type[BundleEntry]] = BundleEntry
    title: ClassVar[str] = "SAE bundle"
    """Name used in messages, the model card and commit messages."""
    card_tags: ClassVar[tuple[str, ...]] = ("sparse-autoencoder", "concept-unlearning", "saeuron")
    usage: ClassVar[str] = ""
    """Usage snippet of the model card; ``{cls}`` and ``{concept}`` are filled in."""

    def __init__(self, hookpoints: Mapping[str, BundleEntry] | Sequence[BundleEntry]) -> None:
        items = hookpoints.values() if isinstance(hookpoints, Mapping) else hookpoints
        self.hookpoints: dict[str, Any] = {h.path: h for h in items}
        if not self.hookpoints:
            raise ValueError(f"a {self.title} needs at least one hookpoint SAE")

    # ------------------------------------------------------------------ build
    @classmethod
    def default_tau_grid(cls) -> TauGrid:
        return TauGrid()

    @classmethod
    def from_saes(cls, saes: Mapping[str, SparseAutoencoder], *, tau_grid: TauGrid | None = None) -> Any:
        """A bundle from ``hookpoint path -> SAE`` with empty concept libraries."""
        out = []
        for path, sae in saes.items():
            sae.cfg.hookpoint = sae.cfg.hookpoint or path
            library = ConceptLibrary.for_sae(sae, tau_grid=tau_grid or cls.default_tau_grid(), hookpoint=path)
            out.append(cls.entry_class(path, sae, library))
        return cls(out)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike[str],
        *,
        hookpoints: Sequence[str] | None = None,
        revision: str | None = None,
        device: torch.device | str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        token: str | bool | None = None,
        local_files_only: bool | None = None,
        tau_grid: TauGrid | None = None,
    ) -> Any:
        """Load every hookpoint folder of a local bundle or a Hugging Face Hub repo (or only ``hookpoints``).

        Hub repos are fetched with ``snapshot_download`` (SAE files, concept libraries and the card
        only), honouring the cache and ``HF_HUB_OFFLINE``. A folder without ``concepts/`` (e.g.
        ``bcywinski/SAeUron``, which released no statistics) gets an empty library on ``tau_grid``
        (default: the adapter's). SAE math runs in fp32.
        """
        subs = list(hookpoints) if hookpoints else ["*"]
        patterns = [CARD_NAME, CFG_NAME, WEIGHTS_NAME, "concepts/*"]
        patterns += [f"{s}/{f}" for s in subs for f in (CFG_NAME, WEIGHTS_NAME, "concepts/*")]
        root = resolve_repo(
            path_or_repo_id,
            allow_patterns=patterns,
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )
        available = list_hookpoint_folders(root)
        if not available and (root / CFG_NAME).is_file():  # a single SAE folder naming its hookpoint
            sae = load_sae_folder(root, sae_class=SparseAutoencoder, device=device, dtype=torch.float32)
            if not sae.cfg.hookpoint:
                raise SaeLoadError(
                    f"{root} holds one SAE whose cfg.json names no hookpoint; put it in a "
                    "folder named after its hookpoint"
                )
            return cls([cls._load_entry(root, sae.cfg.hookpoint, sae, tau_grid)])
        wanted = list(hookpoints) if hookpoints else available
        missing = [h for h in wanted if h not in available]
        if missing or not wanted:
            raise SaeLoadError(
                f"no SAE folder for hookpoint(s) {missing} in {path_or_repo_id} ({root}); "
                f"available: {available or 'none (no <hookpoint>/cfg.json found)'}"
            )
        return cls(
            [
                cls._load_entry(
                    root / name,
                    name,
                    load_sae_folder(
                        root / name,
                        sae_class=SparseAutoencoder,
                        device=device,
                        dtype=torch.float32,
                        hookpoint=name,
                    ),
                    tau_grid,
                )
                for name in wanted
            ]
        )

    @classmethod
    def _load_entry(
        cls, folder: Path, path: str, sae: SparseAutoencoder, tau_grid: TauGrid | None
    ) -> BundleEntry:
        if (folder / "concepts" / "index.json").is_file():
            library = ConceptLibrary.load(folder, sae)
            if library.hookpoint and library.hookpoint != path:
                raise SaeLoadError(
                    f"{folder}: concept library was made at {library.hookpoint!r}, the folder is {path!r}"
                )
        else:
            library = ConceptLibrary.for_sae(sae, tau_grid=tau_grid or cls.default_tau_grid(), hookpoint=path)
        return cls.entry_class(path, sae, library)

    # ---------------------------------------------------------------- inspect
    @property
    def concepts(self) -> list[str]:
        """Every concept some hookpoint can unlearn, in library order."""
        return list(dict.fromkeys(n for h in self.hookpoints.values() for n in h.library.names))

    def where(self, concept: str) -> list[str]:
        """Hookpoints whose library holds ``concept``."""
        return [p for p, h in self.hookpoints.items() if concept in h.library]

    def default_hookpoint(self, concept: str) -> str:
        """The hookpoint whose selection defaults describe ``concept``'s default mode: the first where it
        is active (a hookpoint only the robust mode uses may hold a lighter setting), else the first
        holding it."""
        where = self.where(concept)
        active = [p for p in where if self.hookpoints[p].library.selection_defaults(concept).active]
        return (active or where)[0]

    def active_hookpoints(self, concept: str, robust: bool = False) -> list[str]:
        """Hookpoints where ``concept`` is ablated by default (its library there marks it ``active``), or
        in the robust mode (marked ``robust``; see :attr:`.library.SelectionDefaults.robust`)."""
        return [
            p
            for p in self.where(concept)
            if self.hookpoints[p].library.selection_defaults(concept).ablated(robust)
        ]

    def _describe_entry(self, entry: BundleEntry) -> str:
        return f"d_in={entry.sae.d_in}, n={entry.sae.num_latents}, {len(entry.library)} concepts"

    def __repr__(self) -> str:
        parts = [f"{p} ({self._describe_entry(h)})" for p, h in self.hookpoints.items()]
        return f"{type(self).__name__}({'; '.join(parts)})"

    def check_known(self, names: Sequence[str | None]) -> None:
        """Raise :class:`UnknownConceptError` (listing the known ones) for a name no library holds."""
        known = self.concepts
        for name in names:
            if name is not None and name not in known:
                raise UnknownConceptError(name, known)

    def paths(self, hookpoints: Sequence[str] | None) -> list[str]:
        """``hookpoints`` (all when None), each checked to be in the bundle."""
        paths = list(hookpoints) if hookpoints else list(self.hookpoints)
        unknown = [p for p in paths if p not in self.hookpoints]
        if unknown:
            raise UnknownHookpointError(
                f"this bundle has no SAE for {unknown}; it has {list(self.hookpoints)}"
            )
        return paths

    def check_width(self, path: str, width: int, what: str = "model", noun: str = "width") -> None:
        """Raise :class:`SaeWidthError` unless the SAE at ``path`` reads ``width``-wide activations."""
        sae = self.hookpoints[path].sae
        if width != sae.d_in:
            raise SaeWidthError(
                f"the SAE for {path} reads {sae.d_in}-wide activations (d_in={sae.d_in}), but "
                f"this {what}'s {path} outputs {noun} {width}: the SAE was made for another model"
            )

    def warn_other_base_model(self, path: str, model_id: str | None, what: str = "model") -> None:
        """Warn when the SAE at ``path`` was trained on another base model than ``model_id``."""
        base = self.hookpoints[path].sae.cfg.base_model
        if base and model_id and not same_model(base, model_id):
            warnings.warn(
                f"the SAE for {path} was trained on {base!r}, this {what} is {model_id!r}; "
                "features may not mean the same here",
                stacklevel=4,
            )

    def set_defaults(self, concept: str, *, hookpoints: Sequence[str] | None = None, **defaults: Any) -> None:
        """Set a concept's selection defaults (percentile, top_n, gamma, rule, active, ...) where held."""
        self.check_known([concept])
        for path in hookpoints or self.where(concept):
            self.hookpoints[path].library.set_selection_defaults(concept, **defaults)

    def prepare_calibrators(self, paths: Sequence[str], calibrate: bool | None) -> None:
        """Give each entry a θ calibrator for the coming statistics pass (default: SAEs without θ)."""
        for path in paths:
            entry = self.hookpoints[path]
            if calibrate or (calibrate is None and entry.sae.cfg.threshold is None):
                entry.calibrator = entry.calibrator or ThresholdCalibrator(entry.sae)
            else:
                entry.calibrator = None

    def statistics_pass(
        self, paths: Sequence[str], calibrate: bool | None, **options: Any
    ) -> StatisticsTransaction:
        """A transaction for one statistics pass at ``paths`` (see :class:`StatisticsTransaction`)."""
        return StatisticsTransaction(self, paths, calibrate, **options)

    def record_calibration(self, paths: Sequence[str]) -> None:
        """Store the calibrated θ of each entry that had a calibrator in its library."""
        for path in paths:
            entry = self.hookpoints[path]
            if entry.calibrator is not None:
                entry.library.record_threshold(entry.calibrator)

    # ---------------------------------------------------------------- ablation
    def plan(
        self,
        concepts: str | Sequence[str | ConceptAblation],
        *,
        strength: PerConcept = None,
        percentile: PerConcept = None,
        top_n: int | Mapping[str, int] | None = None,
        rule: str | None = None,
        hookpoints: Sequence[str] | None = None,
        target: str | Mapping[str, str] | None = None,
        robust: bool = False,
    ) -> dict[str, list[ConceptAblation]]:
        """Hookpoint → the concepts to ablate there, with the user's overrides.

        A concept goes to every hookpoint whose library holds it and marks it ``active`` (all that
        hold it when ``hookpoints`` is given explicitly). ``robust=True``: the hookpoints its tuner
        chose to hold against adaptive prompt attacks instead (where it chose any; see
        :attr:`.library.SelectionDefaults.robust`). Overrides apply to every concept or per
        concept (a dict). ``target`` replaces instead of only removing (``{"red": "green"}``; ``""``
        switches a bundle's default target off; see :attr:`.spec.ConceptAblation.target`).
        """
        specs_in = [concepts] if isinstance(concepts, str | ConceptAblation) else list(concepts)
        if not specs_in:
            raise ValueError("no concepts to unlearn")
        specs: list[ConceptAblation] = []
        for spec in specs_in:
            if isinstance(spec, str):
                top = per_concept(top_n, spec)
                spec = ConceptAblation(
                    spec,
                    strength=per_concept(strength, spec),
                    percentile=None if top is not None else per_concept(percentile, spec),
                    top_n=top,
                    rule=rule,
                    target=per_concept(target, spec),
                )
            specs.append(spec)
        self.check_known([s.concept for s in specs])
        self.check_known([s.target for s in specs if s.target])
        paths = self.paths(hookpoints) if hookpoints is not None else list(self.hookpoints)
        targets = {}
        for path in paths:
            lib = self.hookpoints[path].library
            here = [
                s
                for s in specs
                if s.concept in lib
                and (hookpoints is not None or lib.selection_defaults(s.concept).ablated(robust))
            ]
            if here:
                targets[path] = here
        placed = {s.concept for here in targets.values() for s in here}
        idle = [s.concept for s in specs if s.concept not in placed]
        if idle and hookpoints is None:
            raise ValueError(
                f"{idle} are inactive at every hookpoint of this bundle (selection default "
                "active=False); pass hookpoints=... to ablate them anyway"
            )
        if not targets:
            raise ValueError(f"none of {[s.concept for s in specs]} is held at hookpoints {hookpoints}")
        return targets

    def resolve(
        self, concepts: str | Sequence[str | ConceptAblation], **overrides: Any
    ) -> dict[str, list[Any]]:
        """:meth:`plan` with every option resolved against the libraries (hookpoint → resolved specs):
        checks names, strengths, percentiles before any model is loaded or hooked."""
        return {
            path: [spec.resolve(self.hookpoints[path].library) for spec in specs]
            for path, specs in self.plan(concepts, **overrides).items()
        }

    def ablators(
        self,
        targets: Mapping[str, Sequence[ConceptAblation]],
        *,
        encoder: Literal["topk", "threshold"] | None = None,
        apply_to: ApplyTo = "all",
        legacy_error_sign: bool = False,
    ) -> dict[str, FeatureAblator]:
        """One :class:`FeatureAblator` per hookpoint of ``targets`` (see :meth:`plan`); each knows every
        concept the call removes, so a target removed at another hookpoint is dropped too."""
        removed = {s.concept for specs in targets.values() for s in specs}
        return {
            path: FeatureAblator(
                self.hookpoints[path].sae,
                self.hookpoints[path].library,
                specs,
                encoder=encoder,
                apply_to=apply_to,
                legacy_error_sign=legacy_error_sign,
                also_removed=removed,
            )
            for path, specs in targets.items()
        }

    def apply(
        self,
        model: Any,
        concepts: str | Sequence[str | ConceptAblation],
        *,
        strength: PerConcept = None,
        percentile: PerConcept = None,
        top_n: int | Mapping[str, int] | None = None,
        rule: str | None = None,
        encoder: Literal["topk", "threshold"] | None = None,
        apply_to: ApplyTo = "all",
        hookpoints: Sequence[str] | None = None,
        legacy_error_sign: bool = False,
        target: str | Mapping[str, str] | None = None,
        robust: bool = False,
        **install: Any,
    ) -> UnlearnHandle:
        """Install the ablation of ``concepts`` on ``model``; returns a handle whose ``remove()`` undoes it.

        ``strength`` (γ = −strength for the reference rule), ``percentile``, ``top_n`` and ``rule``
        override the library defaults, for all concepts or per concept (a dict); so does ``target``,
        the concept to steer toward instead of only removing (``{"red": "green"}``). ``robust=True``
        ablates each concept at the hookpoints its tuner chose against adaptive prompt attacks
        (:attr:`.library.SelectionDefaults.robust`; more hooks, so a little slower).
        ``encoder="threshold"`` uses the fast subset encoder (needs θ in the SAE or the library).
        ``apply_to="cond"`` edits only rows of the conditional CFG branch (where the runtime knows
        it). ``hookpoints`` restricts where concepts are ablated (and ablates concepts marked
        inactive there, with the defaults stored there: at a hookpoint only the robust mode uses, the
        robust mode's setting, which a tuner may have made lighter). Everything else goes to the
        adapter's :meth:`install_ablators` (diffusers: ``record_tau``; VLMs: ``tokens``,
        ``allow_stack``). Installing on modules that already carry an ablation raises
        ``HookConflictError``.
        """
        targets = self.plan(
            concepts,
            strength=strength,
            percentile=percentile,
            top_n=top_n,
            rule=rule,
            hookpoints=hookpoints,
            target=target,
            robust=robust,
        )
        ablators = self.ablators(
            targets, encoder=encoder, apply_to=apply_to, legacy_error_sign=legacy_error_sign
        )
        return self.install_ablators(model, ablators, **install)

    def install_ablators(
        self, model: Any, ablators: Mapping[str, FeatureAblator], **options: Any
    ) -> UnlearnHandle:  # pragma: no cover - adapters
        """Check ``model`` and hook one ablator per hookpoint into it (each adapter implements this)."""
        raise NotImplementedError(f"{type(self).__name__} has no runtime to install ablators into")

    @contextlib.contextmanager
    def unlearn(
        self, model: Any, concepts: str | Sequence[str | ConceptAblation], **options: Any
    ) -> Iterator[Any]:
        """Context manager form of ``apply``: the ablation is removed on exit, also after an error."""
        handle = self.apply(model, concepts, **options)
        try:
            yield handle
        finally:
            handle.remove()

    # ------------------------------------------------------------------- save
    def save_pretrained(
        self,
        folder: str | os.PathLike[str],
        *,
        include_prompts: bool = True,
        card: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        stats_dtype: torch.dtype = torch.float64,
    ) -> Path:
        """Write ``<folder>/<hookpoint>/{cfg.json, sae.safetensors, concepts/}`` and a model card.

        ``stats_dtype=torch.float32`` halves the concept statistics (for shipping many hookpoints);
        they load back as float64 but no longer merge exactly with new samples.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for path, entry in self.hookpoints.items():
            entry.sae.save_pretrained(folder / path)
            if len(entry.library) or entry.library.background is not None:
                entry.library.save(folder / path, include_prompts, stats_dtype)
        (folder / CARD_NAME).write_text(card or self.model_card(metrics), encoding="utf-8")
        return folder

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> str:
        """Upload the bundle (same layout as :meth:`save_pretrained`); returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="saeuron-push-") as tmp:
            self.save_pretrained(tmp, metrics=metrics)
            message = commit_message or (
                f"Upload {self.title} ({len(self.concepts)} concepts, {len(self.hookpoints)} hookpoints)"
            )
            info = api.upload_folder(
                repo_id=repo_id, folder_path=tmp, revision=revision, commit_message=message
            )
        return str(getattr(info, "commit_url", info))

    # ------------------------------------------------------------------- card
    def card_intro(self) -> str:
        return (
            "Sparse autoencoders with concept statistics for unlearning by feature ablation "
            "(SAeUron, Cywiński & Deja 2025), made with saeuron-plugin."
        )

    def card_columns(self, entry: BundleEntry) -> dict[str, str]:
        """Extra per-hookpoint columns of the card's table (adapters add theirs)."""
        cfg = entry.sae.cfg
        theta = cfg.threshold if cfg.threshold is not None else entry.library.calibrated_threshold
        return {"θ": "-" if theta is None else f"{theta:.4g}"}

    def model_card(self, metrics: Mapping[str, Any] | None = None) -> str:
        """A Hub model card: YAML metadata, the hookpoints, the concepts and how to use the bundle."""
        entries = list(self.hookpoints.values())
        bases = sorted({h.sae.cfg.base_model for h in entries if h.sae.cfg.base_model})
        lines = ["---", "library_name: saeuron-plugin", f"tags: [{', '.join(self.card_tags)}]"]
        if bases:
            lines.append(f"base_model: {bases[0]}")
        first = repr(self.concepts[0]) if self.concepts else "..."
        lines += [
            "license: apache-2.0",
            "---",
            "",
            f"# {self.title}",
            "",
            self.card_intro(),
            "",
            "```python",
            self.usage.format(cls=type(self).__name__, concept=first),
            "```",
            "",
        ]
        extra = list(self.card_columns(entries[0]))
        head = ["hookpoint", "d_in", "latents", "k", "encoder", *extra, "concepts"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for path, h in self.hookpoints.items():
            cfg = h.sae.cfg
            cols = self.card_columns(h)
            lines.append(
                f"| `{path}` | {cfg.d_in} | {cfg.num_latents} | {cfg.k} | {cfg.encoder} | "
                + "".join(f"{cols[c]} | " for c in extra)
                + f"{len(h.library)} |"
            )
        lines += [
            "",
            "## Concepts",
            "",
            "| concept | hookpoints (✓ active; robust: also in the robust mode) | prompts | defaults |",
            "|---|---|---|---|",
        ]
        for name in self.concepts:
            where = self.where(name)
            lib = self.hookpoints[self.default_hookpoint(name)].library
            d = lib.selection_defaults(name)
            sel = f"top {d.top_n}" if d.top_n is not None else f"p={d.percentile}"
            if d.target:
                sel += f", → {d.target} (α={d.target_scale:g})"
            marks = []
            for w in where:
                here = self.hookpoints[w].library.selection_defaults(name)
                robust = ""
                if here.ablated(robust=True) and not here.active:
                    own = (here.percentile, here.top_n, here.gamma) != (d.percentile, d.top_n, d.gamma)
                    robust = f" (robust: γ={here.gamma:g}, p={here.percentile})" if own else " (robust)"
                marks.append(f"`{w}`" + (" ✓" if here.active else "") + robust)
            lines.append(
                f"| {name} | {', '.join(marks)} | {lib.get(name).num_prompts} | "
                f"{d.rule} γ={d.gamma:g}, {sel} |"
            )
        if metrics:
            lines += ["", "## Metrics", "", "```json", json.dumps(metrics, indent=2, default=str), "```"]
        return "\n".join(lines) + "\n"


class DeviceFollowingAblator:
    """The :class:`~.sites.Editor` running a :class:`FeatureAblator` with the call's τ and CFG rows,
    moving it to the activations' device on first sight (``model.to``)."""

    def __init__(self, ablator: FeatureAblator) -> None:
        self.ablator = ablator
        self.device = ablator.sae.device

    def __call__(self, tokens: torch.Tensor, ctx: CallContext) -> torch.Tensor:
        if tokens.device != self.device:
            self.ablator.to(tokens.device)
            self.device = tokens.device
        return self.ablator(tokens, ctx)


__all__ = [
    "CARD_NAME",
    "BundleEntry",
    "DeviceFollowingAblator",
    "SaeBundle",
    "SaeWidthError",
    "UnknownHookpointError",
    "per_concept",
    "same_model",
]
