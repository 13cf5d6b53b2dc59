"""SAeUron for transformers vision-language models: SAE bundles, concept statistics, ablation.

The same bundle layout as the diffusers adapter, with hookpoint names relative to the
``*ForConditionalGeneration`` model (see :mod:`.hookpoints`)::

    <bundle>/<hookpoint>/cfg.json, sae.safetensors                  the SAE (cfg.extra["tokens"]: token set)
    <bundle>/<hookpoint>/concepts/index.json, <slug>.safetensors    its concept library (one τ bucket)
    <bundle>/README.md                                             model card

Concept statistics (SAUCE-style, scored as SAeUron) come from image sets with and without the
concept: each (image, prompt) sample runs once; at each hookpoint the selected tokens are
encoded, averaged per sample and summed per concept (``TauGrid(1)``: VLMs have no time axis).
At inference the core :class:`~saeuron_plugin.sae.ablation.FeatureAblator` edits the selected
tokens of each hookpoint output during ``generate()`` or any forward.

    unlearner = VLMUnlearner.from_pretrained("org/repo")      # or a local folder
    with unlearner.unlearn(model, ["red"]):
        ids = model.generate(**inputs, max_new_tokens=20)
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
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..sae.ablation import ConceptAblation, FeatureAblator
from ..sae.calibration import ThresholdCalibrator
from ..sae.concepts import ConceptLibrary, ConceptStats, TauGrid, UnknownConceptError
from ..sae.io import (
    CFG_NAME,
    WEIGHTS_NAME,
    SaeLoadError,
    list_hookpoint_folders,
    load_sae_folder,
    resolve_repo,
)
from ..sae.model import SparseAutoencoder
from .collect import model_name, run_samples
from .hookpoints import (
    HookpointError,
    TokenMode,
    VLMHookpoint,
    check_tokens,
    cross_attention_layers,
    hookpoint_index,
    resolve_hookpoint,
)
from .hooks import InstalledHooks, TokenSite, install_sites
from .inputs import make_samples

PerConcept = float | Mapping[str, float] | None
CARD_NAME = "README.md"
TOKENS_KEY = "tokens"
"""``SaeConfig.extra`` key holding the token set an SAE reads (``image``, ``text``, ``all``)."""


class SaeWidthError(ValueError):
    """An SAE whose d_in differs from the width of the hookpoint it is meant for."""


def vlm_tau_grid() -> TauGrid:
    """The single-bucket grid of VLM concept statistics."""
    return TauGrid(1)


@dataclass
class VLMHookpointSAE:
    """One hookpoint of a bundle: its SAE, the concept library made with it, the token set it reads."""

    path: str
    sae: SparseAutoencoder
    library: ConceptLibrary
    calibrator: ThresholdCalibrator | None = None

    @property
    def tokens(self) -> str | None:
        """Token set recorded with the SAE (None / ``auto``: the hookpoint's default)."""
        value = self.sae.cfg.extra.get(TOKENS_KEY)
        return None if value in (None, "auto") else str(value)


class _DeviceFollowingEditor:
    """Calls a :class:`FeatureAblator` on the selected tokens, moving it to their device on first sight."""

    def __init__(self, ablator: FeatureAblator) -> None:
        self.ablator = ablator
        self.device = ablator.sae.device

    def __call__(self, tokens: Tensor, site: TokenSite) -> Tensor:
        if tokens.device != self.device:
            self.ablator.to(tokens.device)
            self.device = tokens.device
        return self.ablator(tokens)


class UnlearnHandle:
    """What :meth:`VLMUnlearner.apply` installed; :meth:`remove` (idempotent) takes all of it out."""

    def __init__(
        self, hooks: InstalledHooks, ablators: dict[str, FeatureAblator], tokens: dict[str, str]
    ) -> None:
        self.hooks = hooks
        self.ablators = ablators
        self.tokens = tokens

    @property
    def removed(self) -> bool:
        return self.hooks.removed

    @property
    def hookpoints(self) -> list[str]:
        return list(self.ablators)

    def edits(self, path: str) -> int:
        """Calls at ``path`` where the ablation changed something."""
        return self.hooks.sites[path].edits

    def remove(self) -> None:
        self.hooks.remove()

    def describe(self) -> str:
        return "\n".join(f"{a.describe()} [tokens: {self.tokens[p]}]" for p, a in self.ablators.items())

    def __enter__(self) -> UnlearnHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"UnlearnHandle({state}, {', '.join(f'{p}: {a.concepts}' for p, a in self.ablators.items())})"


def _per_concept(value: Any, name: str) -> Any:
    return value.get(name) if isinstance(value, Mapping) else value


def _same_model(a: str, b: str) -> bool:
    return a == b or Path(a.rstrip("/")).name == Path(b.rstrip("/")).name


class VLMUnlearner:
    """SAEs at one or more hookpoints of a VLM, with their concept libraries."""

    def __init__(self, hookpoints: Mapping[str, VLMHookpointSAE] | Sequence[VLMHookpointSAE]) -> None:
        items = hookpoints.values() if isinstance(hookpoints, Mapping) else hookpoints
        self.hookpoints: dict[str, VLMHookpointSAE] = {h.path: h for h in items}
        if not self.hookpoints:
            raise ValueError("a VLMUnlearner bundle needs at least one hookpoint SAE")
        for h in self.hookpoints.values():
            if h.library.tau_grid.num_buckets != 1:
                raise ValueError(
                    f"{h.path}: VLM concept statistics use one τ bucket, this library has "
                    f"{h.library.tau_grid.num_buckets}"
                )

    # ------------------------------------------------------------------ build
    @classmethod
    def from_saes(
        cls, saes: Mapping[str, SparseAutoencoder], *, tokens: str | Mapping[str, str] | None = None
    ) -> VLMUnlearner:
        """A bundle from ``hookpoint path -> SAE`` with empty concept libraries (see :meth:`add_concept`).

        ``tokens`` records the token set each SAE reads (default: what its cfg says, else ``auto``).
        """
        out = []
        for path, sae in saes.items():
            sae.cfg.hookpoint = sae.cfg.hookpoint or path
            mode = _per_concept(tokens, path) if tokens is not None else None
            if mode is not None:
                sae.cfg.extra[TOKENS_KEY] = mode
            out.append(
                VLMHookpointSAE(
                    path, sae, ConceptLibrary.for_sae(sae, tau_grid=vlm_tau_grid(), hookpoint=path)
                )
            )
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
    ) -> VLMUnlearner:
        """Load every hookpoint folder of a local bundle or a Hub repo (or only ``hookpoints``).

        Hub repos are fetched with ``snapshot_download`` (SAE files, concept libraries and the
        card only), honouring the cache and ``HF_HUB_OFFLINE``. SAE math runs in fp32.
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
        if not available and (root / CFG_NAME).is_file():
            sae = load_sae_folder(root, device=device, dtype=torch.float32)
            if not sae.cfg.hookpoint:
                raise SaeLoadError(
                    f"{root} holds one SAE whose cfg.json names no hookpoint; put it in a folder "
                    "named after its hookpoint (e.g. model.language_model.layers.8/)"
                )
            return cls([cls._load_hookpoint(root, sae.cfg.hookpoint, sae)])
        wanted = list(hookpoints) if hookpoints else available
        missing = [h for h in wanted if h not in available]
        if missing or not wanted:
            raise SaeLoadError(
                f"no SAE folder for hookpoint(s) {missing} in {path_or_repo_id} ({root}); "
                f"available: {available or 'none (no <hookpoint>/cfg.json found)'}"
            )
        return cls(
            [
                cls._load_hookpoint(
                    root / name,
                    name,
                    load_sae_folder(root / name, device=device, dtype=torch.float32, hookpoint=name),
                )
                for name in wanted
            ]
        )

    @staticmethod
    def _load_hookpoint(folder: Path, path: str, sae: SparseAutoencoder) -> VLMHookpointSAE:
        if (folder / "concepts" / "index.json").is_file():
            library = ConceptLibrary.load(folder, sae)
            if library.hookpoint and library.hookpoint != path:
                raise SaeLoadError(
                    f"{folder}: concept library was made at {library.hookpoint!r}, the folder is {path!r}"
                )
        else:
            library = ConceptLibrary.for_sae(sae, tau_grid=vlm_tau_grid(), hookpoint=path)
        return VLMHookpointSAE(path, sae, library)

    # ---------------------------------------------------------------- inspect
    @property
    def concepts(self) -> list[str]:
        """Every concept some hookpoint can unlearn, in library order."""
        return list(dict.fromkeys(n for h in self.hookpoints.values() for n in h.library.names))

    def where(self, concept: str) -> list[str]:
        """Hookpoints whose library holds ``concept``."""
        return [p for p, h in self.hookpoints.items() if concept in h.library]

    def __repr__(self) -> str:
        parts = [
            f"{p} (d_in={h.sae.d_in}, n={h.sae.num_latents}, tokens={h.tokens or 'auto'}, "
            f"{len(h.library)} concepts)"
            for p, h in self.hookpoints.items()
        ]
        return f"VLMUnlearner({'; '.join(parts)})"

    def _check_known(self, names: Sequence[str]) -> None:
        known = self.concepts
        for name in names:
            if name not in known:
                raise UnknownConceptError(name, known)

    def _paths(self, hookpoints: Sequence[str] | None) -> list[str]:
        paths = list(hookpoints) if hookpoints else list(self.hookpoints)
        unknown = [p for p in paths if p not in self.hookpoints]
        if unknown:
            raise HookpointError(f"this bundle has no SAE for {unknown}; it has {list(self.hookpoints)}")
        return paths

    def check_model(
        self,
        model: nn.Module,
        paths: Sequence[str] | None = None,
        tokens: str | Mapping[str, str] | None = None,
    ) -> dict[str, tuple[VLMHookpoint, TokenMode]]:
        """Resolve hookpoints on ``model``; check widths, token sets and the base model.

        Raises :class:`~.hookpoints.UnsupportedModelError`, :class:`~.hookpoints.HookpointError`
        or :class:`SaeWidthError` with the valid choices; returns path → (hookpoint, token set).
        """
        index = hookpoint_index(model)  # raises UnsupportedModelError
        name = model_name(model)
        out = {}
        for path in paths if paths is not None else list(self.hookpoints):
            hp = resolve_hookpoint(model, path, index)
            entry = self.hookpoints[path]
            sae = entry.sae
            if hp.width != sae.d_in:
                raise SaeWidthError(
                    f"the SAE for {path} reads {sae.d_in}-wide activations (d_in={sae.d_in}), but "
                    f"this model's {path} outputs hidden size {hp.width}: the SAE was made for "
                    "another model"
                )
            wanted = _per_concept(tokens, path) if tokens is not None else entry.tokens
            mode = check_tokens(hp, wanted, model)
            if hp.family == "mllama" and hp.kind == "decoder":
                cross = cross_attention_layers(model)
                if cross and hp.index is not None and hp.index < cross[0]:
                    warnings.warn(
                        f"{path} comes before Mllama's first cross-attention layer ({cross[0]}): its "
                        "activations do not depend on the image",
                        stacklevel=3,
                    )
            base = sae.cfg.base_model
            if base and name and not _same_model(base, name):
                warnings.warn(
                    f"the SAE for {path} was trained on {base!r}, this model is {name!r}; features may "
                    "not mean the same here",
                    stacklevel=3,
                )
            out[path] = (hp, mode)
        return out

    # ---------------------------------------------------------------- unlearn
    def apply(
        self,
        model: nn.Module,
        concepts: str | Sequence[str | ConceptAblation],
        *,
        strength: PerConcept = None,
        percentile: PerConcept = None,
        top_n: int | Mapping[str, int] | None = None,
        rule: str | None = None,
        encoder: Literal["topk", "threshold"] | None = None,
        tokens: str | Mapping[str, str] | None = None,
        hookpoints: Sequence[str] | None = None,
        legacy_error_sign: bool = False,
        allow_stack: bool = False,
    ) -> UnlearnHandle:
        """Install the ablation of ``concepts`` on ``model``; the handle's ``remove()`` undoes it.

        ``strength`` (γ = −strength), ``percentile``, ``top_n`` and ``rule`` override the library
        defaults, for all concepts or per concept (a dict). ``tokens`` overrides the token set
        edited at each hookpoint (default: the one the SAE was made for). ``hookpoints`` limits
        where concepts are ablated (and ablates concepts marked inactive there).
        """
        specs = [concepts] if isinstance(concepts, str | ConceptAblation) else list(concepts)
        if not specs:
            raise ValueError("no concepts to unlearn")
        resolved: list[ConceptAblation] = []
        for spec in specs:
            if isinstance(spec, str):
                top = _per_concept(top_n, spec)
                spec = ConceptAblation(
                    spec,
                    strength=_per_concept(strength, spec),
                    percentile=None if top is not None else _per_concept(percentile, spec),
                    top_n=top,
                    rule=rule,
                )
            resolved.append(spec)
        self._check_known([s.concept for s in resolved])
        paths = self._paths(hookpoints) if hookpoints is not None else list(self.hookpoints)
        targets = {
            p: [
                s
                for s in resolved
                if s.concept in self.hookpoints[p].library
                and (
                    hookpoints is not None or self.hookpoints[p].library.selection_defaults(s.concept).active
                )
            ]
            for p in paths
        }
        targets = {p: s for p, s in targets.items() if s}
        placed = {s.concept for at in targets.values() for s in at}
        idle = [s.concept for s in resolved if s.concept not in placed]
        if idle and hookpoints is None:
            raise ValueError(
                f"{idle} are inactive at every hookpoint of this bundle (selection default "
                "active=False); pass hookpoints=... to ablate them anyway"
            )
        if not targets:
            raise ValueError(f"none of {[s.concept for s in resolved]} is held at hookpoints {hookpoints}")
        checked = self.check_model(model, list(targets), tokens)
        ablators = {
            p: FeatureAblator(
                self.hookpoints[p].sae,
                self.hookpoints[p].library,
                at,
                encoder=encoder,
                legacy_error_sign=legacy_error_sign,
            )
            for p, at in targets.items()
        }
        modes = {p: checked[p][1] for p in targets}
        hooks = install_sites(
            model, {p: _DeviceFollowingEditor(a) for p, a in ablators.items()}, modes, allow_stack=allow_stack
        )
        return UnlearnHandle(hooks, ablators, modes)

    @contextlib.contextmanager
    def unlearn(
        self, model: nn.Module, concepts: str | Sequence[str | ConceptAblation], **options: Any
    ) -> Iterator[UnlearnHandle]:
        """Context manager form of :meth:`apply`: the ablation is removed on exit, also after an error."""
        handle = self.apply(model, concepts, **options)
        try:
            yield handle
        finally:
            handle.remove()

    # --------------------------------------------------------------- concepts
    def add_concept(
        self,
        name: str | None,
        images: Sequence[Any] | Any | None,
        prompts: Sequence[str] | str | None,
        model: nn.Module,
        processor_or_inputs: Any,
        *,
        contrast: str | list[str] | None = None,
        **options: Any,
    ) -> dict[str, ConceptStats]:
        """Statistics pass for concept ``name`` (None: the background set) over (image, prompt) samples.

        ``processor_or_inputs``: the model's processor (then ``images`` and ``prompts`` are
        processed; one prompt for all images or one per image) or prepared inputs (a list of
        per-sample dicts or one batched dict; ``prompts`` then only label them). Every sample runs
        once; at each hookpoint the latents of its selected tokens are averaged and added to the
        concept's sums. Calling again adds samples (exact merge). ``contrast`` sets the concept's
        default contrast set. Other options as :meth:`add_concepts`. Returns hookpoint → stats.
        """
        out = self.add_concepts({name: (images, prompts, processor_or_inputs)}, model, **options)
        if name is not None and contrast is not None:
            self.set_defaults(name, hookpoints=list(out), contrast=contrast)
        return {path: stats[name] for path, stats in out.items()}

    def add_concepts(
        self,
        samples_by_concept: Mapping[str | None, tuple[Any, Any, Any]],
        model: nn.Module,
        *,
        hookpoints: Sequence[str] | None = None,
        tokens: str | Mapping[str, str] | None = None,
        batch_size: int = 1,
        calibrate: bool | None = None,
        add_image_token: bool = True,
        show_progress: bool = False,
    ) -> dict[str, dict[str | None, ConceptStats]]:
        """Statistics pass for several concepts: ``{name: (images, prompts, processor_or_inputs)}``.

        Key None is the background set. ``tokens`` overrides the hookpoints' token sets (and is
        recorded in the SAE config, since the ablation should edit the tokens the statistics saw).
        ``calibrate`` (default: when the SAE has no θ) calibrates the threshold encoder's θ on the
        same pre-activations. Returns hookpoint → concept → statistics.
        """
        paths = self._paths(hookpoints)
        checked = self.check_model(model, paths, tokens)
        for path in paths:  # check everything before changing anything
            mode, made = checked[path][1], _library_tokens(self.hookpoints[path].library)
            if made and made != {mode}:
                raise ValueError(
                    f"{path}: the concept statistics there were made from {sorted(made)} tokens, this pass "
                    f"would read {mode!r} tokens; use the same token set (tokens=...) or a fresh library"
                )
        for path in paths:
            entry = self.hookpoints[path]
            entry.sae.cfg.extra[TOKENS_KEY] = checked[path][1]
            if calibrate or (calibrate is None and entry.sae.cfg.threshold is None):
                entry.calibrator = entry.calibrator or ThresholdCalibrator(entry.sae)
            else:
                entry.calibrator = None
        passes = {p: _StatisticsPass(self.hookpoints[p], checked[p][1]) for p in paths}
        for name, spec in samples_by_concept.items():
            if not isinstance(spec, tuple | list) or len(spec) != 3:
                raise TypeError(f"concept {name!r}: expected (images, prompts, processor_or_inputs)")
            samples = make_samples(*spec)
            processor = spec[2] if samples[0].inputs is None else None
            for p in passes.values():
                p.stats(name)
                p.name = name
                p.batch_labels = []

            def start(chunk: list[int], samples: list[Any] = samples) -> None:
                for p in passes.values():
                    p.batch_labels = [samples[i].label for i in chunk]

            def end(chunk: list[int]) -> None:
                for p in passes.values():
                    p.finish_batch()

            run_samples(
                model,
                samples,
                passes,
                {p: checked[p][1] for p in paths},
                processor=processor,
                batch_size=batch_size,
                add_image_token=add_image_token,
                show_progress=show_progress,
                desc=f"concept {'background' if name is None else name}",
                on_batch_start=start,
                on_batch_end=end,
            )
        out: dict[str, dict[str | None, ConceptStats]] = {}
        for path, p in passes.items():
            entry = self.hookpoints[path]
            if entry.calibrator is not None:
                entry.library.record_threshold(entry.calibrator)
            out[path] = {name: p.stats(name) for name in samples_by_concept}
        return out

    def set_defaults(self, concept: str, *, hookpoints: Sequence[str] | None = None, **defaults: Any) -> None:
        """Set a concept's selection defaults (percentile, top_n, gamma, rule, ...) where it is held."""
        self._check_known([concept])
        for path in hookpoints or self.where(concept):
            self.hookpoints[path].library.set_selection_defaults(concept, **defaults)

    # ------------------------------------------------------------------- save
    def save_pretrained(
        self,
        folder: str | os.PathLike[str],
        *,
        include_prompts: bool = True,
        card: str | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write ``<folder>/<hookpoint>/{cfg.json, sae.safetensors, concepts/}`` and a model card."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for path, entry in self.hookpoints.items():
            entry.sae.save_pretrained(folder / path)
            if len(entry.library) or entry.library.background is not None:
                entry.library.save(folder / path, include_prompts)
        (folder / CARD_NAME).write_text(card or model_card(self, metrics), encoding="utf-8")
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
        with tempfile.TemporaryDirectory(prefix="saeuron-vlm-push-") as tmp:
            self.save_pretrained(tmp, metrics=metrics)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                revision=revision,
                commit_message=commit_message
                or f"Upload SAeUron VLM bundle ({len(self.concepts)} "
                f"concepts, {len(self.hookpoints)} hookpoints)",
            )
        return str(getattr(info, "commit_url", info))


class _StatisticsPass:
    """Callback of the statistics pass: never edits; encodes the selected tokens, averages them per
    sample and adds each sample to the current concept (``name``), labelled by ``batch_labels``."""

    def __init__(self, entry: VLMHookpointSAE, tokens: str) -> None:
        self.entry = entry
        self.tokens = tokens
        self.name: str | None = None
        self.batch_labels: list[str] = []
        self.seen: set[int] = set()

    def stats(self, name: str | None) -> ConceptStats:
        lib = self.entry.library
        if name is None:
            if lib.background is None:
                lib.background = lib.new_stats("background")
            stats = lib.background
        else:
            if name not in lib:
                lib.add_stats(lib.new_stats(name))
            stats = lib.get(name)
        stats.extra.setdefault(TOKENS_KEY, self.tokens)
        return stats

    def __call__(self, selected: Tensor, site: TokenSite) -> Tensor:
        sae, lib = self.entry.sae, self.entry.library
        flat = selected.detach().reshape(-1, selected.shape[-1]).to(sae.device, torch.float32)
        owner = site.sample_index(selected).to(sae.device)
        z = lib.encode_pooled(sae, flat, self.entry.calibrator)  # 2-D input: per-token latents [M, n]
        b = len(self.batch_labels)
        sums = torch.zeros(b, z.shape[-1], dtype=torch.float64, device=z.device).index_add_(
            0, owner, z.double()
        )
        counts = torch.bincount(owner, minlength=b)
        present = (counts > 0).nonzero().flatten().tolist()
        pooled = sums[present] / counts[present].unsqueeze(1)
        self.stats(self.name).update(pooled.float().cpu(), None)
        self.seen.update(present)
        return selected

    def finish_batch(self) -> None:
        missing = [self.batch_labels[i] for i in range(len(self.batch_labels)) if i not in self.seen]
        self.seen = set()
        if missing:
            raise RuntimeError(
                f"{self.entry.path}: no selected tokens for samples {missing[:3]} (does the prompt "
                "contain the image placeholder? are image tokens what this hookpoint reads?)"
            )
        self.stats(self.name).record_prompts(self.batch_labels)


def _library_tokens(library: ConceptLibrary) -> set[str]:
    """Token sets recorded with a library's statistics (empty for statistics from elsewhere)."""
    stats = [*library.concepts.values(), *([library.background] if library.background is not None else [])]
    return {str(s.extra[TOKENS_KEY]) for s in stats if s.total_count and s.extra.get(TOKENS_KEY)}


def model_card(unlearner: VLMUnlearner, metrics: Mapping[str, Any] | None = None) -> str:
    """A Hub model card: YAML metadata, the hookpoints, the concepts and how to use the bundle."""
    bases = sorted({h.sae.cfg.base_model for h in unlearner.hookpoints.values() if h.sae.cfg.base_model})
    families = sorted(
        {h.sae.cfg.model_family for h in unlearner.hookpoints.values() if h.sae.cfg.model_family}
    )
    lines = [
        "---",
        "library_name: saeuron-plugin",
        "tags: [sparse-autoencoder, concept-unlearning, saeuron, vision-language-model, transformers]",
    ]
    if bases:
        lines.append(f"base_model: {bases[0]}")
    first = repr(unlearner.concepts[0]) if unlearner.concepts else "..."
    lines += [
        "license: apache-2.0",
        "---",
        "",
        "# SAeUron VLM bundle",
        "",
        "Sparse autoencoders on a vision-language model's activations, with concept statistics for "
        "unlearning by feature ablation (SAeUron scores, SAUCE-style edit of image/text tokens), made with "
        "saeuron-plugin." + (f" Model family: {', '.join(families)}." if families else ""),
        "",
        "```python",
        "from saeuron_plugin import VLMUnlearner",
        'unlearner = VLMUnlearner.from_pretrained("<this repo>")',
        f"with unlearner.unlearn(model, [{first}]):",
        "    ids = model.generate(**inputs, max_new_tokens=32)",
        "```",
        "",
        "| hookpoint | d_in | latents | k | encoder | tokens | concepts |",
        "|---|---|---|---|---|---|---|",
    ]
    for path, h in unlearner.hookpoints.items():
        cfg = h.sae.cfg
        lines.append(
            f"| `{path}` | {cfg.d_in} | {cfg.num_latents} | {cfg.k} | {cfg.encoder} | "
            f"{h.tokens or 'auto'} | {len(h.library)} |"
        )
    lines += ["", "## Concepts", "", "| concept | hookpoints | samples | defaults |", "|---|---|---|---|"]
    for name in unlearner.concepts:
        where = unlearner.where(name)
        lib = unlearner.hookpoints[where[0]].library
        d = lib.selection_defaults(name)
        sel = f"top {d.top_n}" if d.top_n is not None else f"p={d.percentile}"
        lines.append(
            f"| {name} | {', '.join(f'`{w}`' for w in where)} | {lib.get(name).num_prompts} | "
            f"{d.rule} γ={d.gamma:g}, {sel} |"
        )
    if metrics:
        lines += ["", "## Metrics", "", "```json", json.dumps(metrics, indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


__all__ = [
    "TOKENS_KEY",
    "SaeWidthError",
    "UnlearnHandle",
    "VLMHookpointSAE",
    "VLMUnlearner",
    "model_card",
    "vlm_tau_grid",
]
