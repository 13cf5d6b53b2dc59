"""SAeUron for diffusers pipelines: load SAE bundles, learn concepts, unlearn them at inference.

A bundle is one folder per hookpoint (the DESIGN layout, also what ``bcywinski/SAeUron`` and
sparsify write)::

    <bundle>/<hookpoint>/cfg.json, sae.safetensors         the SAE
    <bundle>/<hookpoint>/concepts/index.json, <slug>.safetensors   its concept library (optional)
    <bundle>/README.md                                    model card

Each hookpoint keeps its own SAE and concept library; a concept is unlearned at every hookpoint
whose library holds it (the reference puts objects at ``up_blocks.1.attentions.1`` and styles at
``.2``, so their libraries differ). Ablation runs through :mod:`.hooks` (block forward hooks or a
wrapping attention processor, chosen by module type) with τ from the denoiser's own timestep.

    eraser = SAeUron.from_pretrained("org/repo")          # or a local folder
    with eraser.unlearn(pipe, ["Van Gogh"]):
        image = pipe("a cat in Van Gogh style").images[0]
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

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
from .collect import Prompt, prompt_key, run_prompts
from .hookpoints import HookpointError, detect_family, resolve_hookpoint
from .hooks import InstalledHooks, install_hooks

PerConcept = float | Mapping[str, float] | None
CARD_NAME = "README.md"


class SaeWidthError(ValueError):
    """An SAE whose d_in differs from the width of the module it is meant for."""


@dataclass
class HookpointSAE:
    """One hookpoint of a bundle: its SAE and the concept library made with that SAE."""

    path: str
    sae: SparseAutoencoder
    library: ConceptLibrary
    calibrator: ThresholdCalibrator | None = None
    """Sees pre-activations during statistics passes when the SAE has no θ (:meth:`SAeUron.add_concept`)."""


class _DeviceFollowingEditor:
    """A :class:`FeatureAblator` that moves to the activations' device on first sight (``pipe.to``)."""

    def __init__(self, ablator: FeatureAblator) -> None:
        self.ablator = ablator
        self.device = ablator.sae.device

    def __call__(self, x: Tensor, tau: Tensor | float | None, cond_mask: Tensor | None = None) -> Tensor:
        if x.device != self.device:
            self.ablator.to(x.device)
            self.device = x.device
        return self.ablator(x, tau, cond_mask)


class UnlearnHandle:
    """What :meth:`SAeUron.apply` installed; :meth:`remove` (idempotent) takes all of it out."""

    def __init__(self, hooks: InstalledHooks, ablators: dict[str, FeatureAblator]) -> None:
        self.hooks = hooks
        self.ablators = ablators

    @property
    def removed(self) -> bool:
        return self.hooks.removed

    @property
    def hookpoints(self) -> list[str]:
        return list(self.ablators)

    def remove(self) -> None:
        self.hooks.remove()

    def seen_tau(self, path: str) -> list[Tensor | None]:
        """τ per denoiser call seen at ``path`` (when applied with ``record_tau=True``)."""
        return self.hooks.seen_tau(path)

    def describe(self) -> str:
        """Which latents each concept ablates, where and when."""
        return "\n".join(a.describe() for a in self.ablators.values())

    def __enter__(self) -> UnlearnHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"UnlearnHandle({state}, {', '.join(f'{p}: {a.concepts}' for p, a in self.ablators.items())})"


def _per_concept(value: PerConcept, name: str) -> float | None:
    if isinstance(value, Mapping):
        return value.get(name)
    return value


def _pipe_model_id(pipe: Any) -> str | None:
    name = getattr(getattr(pipe, "config", None), "_name_or_path", None) or getattr(
        pipe, "name_or_path", None
    )
    return str(name) if name else None


def _same_model(a: str, b: str) -> bool:
    """Model ids / paths naming the same model: equal, or the same last path component."""
    return a == b or Path(a.rstrip("/")).name == Path(b.rstrip("/")).name


class SAeUron:
    """SAEs at one or more hookpoints of a diffusers pipeline, with their concept libraries."""

    def __init__(self, hookpoints: Mapping[str, HookpointSAE] | Sequence[HookpointSAE]) -> None:
        items = hookpoints.values() if isinstance(hookpoints, Mapping) else hookpoints
        self.hookpoints: dict[str, HookpointSAE] = {h.path: h for h in items}
        if not self.hookpoints:
            raise ValueError("an SAeUron bundle needs at least one hookpoint SAE")

    # ------------------------------------------------------------------ build
    @classmethod
    def from_saes(cls, saes: Mapping[str, SparseAutoencoder], *, tau_grid: TauGrid | None = None) -> SAeUron:
        """A bundle from ``hookpoint path -> SAE`` with empty concept libraries (see :meth:`add_concept`)."""
        out = []
        for path, sae in saes.items():
            sae.cfg.hookpoint = sae.cfg.hookpoint or path
            out.append(
                HookpointSAE(path, sae, ConceptLibrary.for_sae(sae, tau_grid=tau_grid, hookpoint=path))
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
        tau_grid: TauGrid | None = None,
    ) -> SAeUron:
        """Load every hookpoint folder of a local bundle or a Hugging Face Hub repo (or only ``hookpoints``).

        Hub repos are fetched with ``snapshot_download`` (SAE files, concept libraries and the card
        only), honouring the cache and ``HF_HUB_OFFLINE``. A folder without ``concepts/`` (e.g.
        ``bcywinski/SAeUron``, which released no statistics) gets an empty library on the
        ``tau_grid`` given (default 50 buckets). SAE math runs in fp32.
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
            sae = load_sae_folder(root, device=device, dtype=torch.float32)
            if not sae.cfg.hookpoint:
                raise SaeLoadError(
                    f"{root} holds one SAE whose cfg.json names no hookpoint; put it in a "
                    "folder named after its hookpoint (e.g. unet.up_blocks.1.attentions.1/)"
                )
            return cls([cls._load_hookpoint(root, sae.cfg.hookpoint, sae, tau_grid)])
        wanted = list(hookpoints) if hookpoints else available
        missing = [h for h in wanted if h not in available]
        if missing or not wanted:
            raise SaeLoadError(
                f"no SAE folder for hookpoint(s) {missing} in {path_or_repo_id} ({root}); "
                f"available: {available or 'none (no <hookpoint>/cfg.json found)'}"
            )
        loaded = []
        for name in wanted:
            sae = load_sae_folder(root / name, device=device, dtype=torch.float32, hookpoint=name)
            loaded.append(cls._load_hookpoint(root / name, name, sae, tau_grid))
        return cls(loaded)

    @staticmethod
    def _load_hookpoint(
        folder: Path, path: str, sae: SparseAutoencoder, tau_grid: TauGrid | None
    ) -> HookpointSAE:
        if (folder / "concepts" / "index.json").is_file():
            library = ConceptLibrary.load(folder, sae)
            if library.hookpoint and library.hookpoint != path:
                raise SaeLoadError(
                    f"{folder}: concept library was made at {library.hookpoint!r}, the folder is {path!r}"
                )
        else:
            library = ConceptLibrary.for_sae(sae, tau_grid=tau_grid, hookpoint=path)
        return HookpointSAE(path, sae, library)

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
            f"{p} (d_in={h.sae.d_in}, n={h.sae.num_latents}, {len(h.library)} concepts)"
            for p, h in self.hookpoints.items()
        ]
        return f"SAeUron({'; '.join(parts)})"

    def _check_known(self, names: Sequence[str]) -> None:
        known = self.concepts
        for name in names:
            if name not in known:
                raise UnknownConceptError(name, known)

    def _check_pipe(self, pipe: Any, paths: Sequence[str]) -> dict[str, Any]:
        """Resolve hookpoints on ``pipe`` and check widths and the base model; path -> Hookpoint."""
        detect_family(pipe)  # raises UnsupportedModelError for other denoisers
        resolved = {}
        model_id = _pipe_model_id(pipe)
        for path in paths:
            hp = resolve_hookpoint(pipe, path)
            sae = self.hookpoints[path].sae
            if hp.width != sae.d_in:
                raise SaeWidthError(
                    f"the SAE for {path} reads {sae.d_in}-wide activations, but this pipeline's "
                    f"{path} outputs width {hp.width}: the SAE was made for another model"
                )
            base = sae.cfg.base_model
            if base and model_id and not _same_model(base, model_id):
                warnings.warn(
                    f"the SAE for {path} was trained on {base!r}, this pipeline is {model_id!r}; "
                    "features may not mean the same here",
                    stacklevel=3,
                )
            resolved[path] = hp
        return resolved

    # ------------------------------------------------------------------ unlearn
    def apply(
        self,
        pipe: Any,
        concepts: str | Sequence[str | ConceptAblation],
        *,
        strength: PerConcept = None,
        percentile: PerConcept = None,
        top_n: int | Mapping[str, int] | None = None,
        rule: str | None = None,
        encoder: Literal["topk", "threshold"] | None = None,
        apply_to: Literal["all", "cond", "uncond"] = "all",
        hookpoints: Sequence[str] | None = None,
        legacy_error_sign: bool = False,
        record_tau: bool = False,
    ) -> UnlearnHandle:
        """Install the ablation of ``concepts`` on ``pipe``; returns a handle whose ``remove()`` undoes it.

        ``strength`` (γ = −strength for the reference rule), ``percentile`` and ``top_n`` override
        the library defaults, for all concepts or per concept (a dict). ``encoder="threshold"``
        uses the fast subset encoder (needs θ in the SAE or the library). ``apply_to="cond"``
        edits only conditional CFG rows. ``hookpoints`` restricts where concepts are ablated.
        Installing on modules that already carry an ablation raises ``HookConflictError`` (also for
        pipelines made with ``from_pipe``, which share modules).
        """
        specs = [concepts] if isinstance(concepts, str | ConceptAblation) else list(concepts)
        if not specs:
            raise ValueError("no concepts to unlearn")
        resolved_specs: list[ConceptAblation] = []
        for spec in specs:
            if isinstance(spec, str):
                n = spec
                top = top_n.get(n) if isinstance(top_n, Mapping) else top_n
                spec = ConceptAblation(
                    n,
                    strength=_per_concept(strength, n),
                    percentile=None if top is not None else _per_concept(percentile, n),
                    top_n=top,
                    rule=rule,
                )
            resolved_specs.append(spec)
        self._check_known([s.concept for s in resolved_specs])
        if hookpoints is not None:
            unknown = [h for h in hookpoints if h not in self.hookpoints]
            if unknown:
                raise HookpointError(f"this bundle has no SAE for {unknown}; it has {list(self.hookpoints)}")
        targets = {
            path: [
                s
                for s in resolved_specs
                if s.concept in h.library
                and (hookpoints is not None or h.library.selection_defaults(s.concept).active)
            ]
            for path, h in self.hookpoints.items()
            if hookpoints is None or path in hookpoints
        }
        targets = {p: s for p, s in targets.items() if s}
        placed = {s.concept for specs_at in targets.values() for s in specs_at}
        idle = [s.concept for s in resolved_specs if s.concept not in placed]
        if idle and hookpoints is None:
            raise ValueError(
                f"{idle} are inactive at every hookpoint of this bundle (selection default "
                f"active=False); pass hookpoints=... to ablate them anyway"
            )
        if not targets:
            raise ValueError(
                f"none of {[s.concept for s in resolved_specs]} is held at hookpoints {hookpoints}"
            )
        self._check_pipe(pipe, list(targets))
        ablators = {}
        for path, path_specs in targets.items():
            entry = self.hookpoints[path]
            ablators[path] = FeatureAblator(
                entry.sae,
                entry.library,
                path_specs,
                encoder=encoder,
                apply_to=apply_to,
                legacy_error_sign=legacy_error_sign,
            )
        editors = {p: _DeviceFollowingEditor(a) for p, a in ablators.items()}
        return UnlearnHandle(install_hooks(pipe, editors, record_tau=record_tau), ablators)

    @contextlib.contextmanager
    def unlearn(
        self, pipe: Any, concepts: str | Sequence[str | ConceptAblation], **options: Any
    ) -> Iterator[UnlearnHandle]:
        """Context manager form of :meth:`apply`: the ablation is removed on exit, also after an error."""
        handle = self.apply(pipe, concepts, **options)
        try:
            yield handle
        finally:
            handle.remove()

    # --------------------------------------------------------------- concepts
    def add_concept(
        self,
        name: str | None,
        prompts: Sequence[Prompt],
        pipe: Any,
        **options: Any,
    ) -> dict[str, ConceptStats]:
        """Run the statistics pass for concept ``name`` (None: the background set) over ``prompts``.

        Each prompt is generated once; at every denoising step the conditional rows at each
        hookpoint are encoded, averaged over tokens and added to the concept's per-τ sums. Calling
        again with the same name adds samples (exact merge). Options as :meth:`add_concepts`.
        Returns the updated statistics per hookpoint.
        """
        if not prompts:
            raise ValueError("add_concept needs at least one prompt")
        contrast = options.pop("contrast", None)
        out = self.add_concepts({name: prompts}, pipe, **options)
        if name is not None and contrast is not None:
            self.set_defaults(name, hookpoints=list(out), contrast=contrast)
        return {path: stats[name] for path, stats in out.items()}

    def add_concepts(
        self,
        prompts_by_concept: Mapping[str | None, Sequence[Prompt]],
        pipe: Any,
        *,
        hookpoints: Sequence[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        seed: int = 0,
        batch_size: int = 1,
        calibrate: bool | None = None,
        show_progress: bool = True,
        **pipe_kwargs: Any,
    ) -> dict[str, dict[str | None, ConceptStats]]:
        """Statistics pass for several concepts at once (key None: the background set).

        A prompt listed under several concepts ("a red star in striped style" for "red", "star"
        and "striped") is generated once and its samples feed each of them. ``calibrate``
        (default: when the SAE has no θ) also calibrates the threshold encoder's θ on the same
        pre-activations and records it in the library. Returns hookpoint → concept → statistics.
        """
        labels: dict[str, list[str | None]] = {}
        unique: list[Prompt] = []
        for name, prompts in prompts_by_concept.items():
            if not prompts:
                raise ValueError(f"concept {name!r} needs at least one prompt")
            for prompt in prompts:
                key = prompt if isinstance(prompt, str) else prompt_key(0, prompt)
                if key not in labels:
                    labels[key] = []
                    unique.append(prompt)
                if name not in labels[key]:
                    labels[key].append(name)
        paths = list(hookpoints) if hookpoints else list(self.hookpoints)
        unknown = [p for p in paths if p not in self.hookpoints]
        if unknown:
            raise HookpointError(f"this bundle has no SAE for {unknown}; it has {list(self.hookpoints)}")
        self._check_pipe(pipe, paths)
        images_per_prompt = int(pipe_kwargs.get("num_images_per_prompt", 1) or 1)
        passes = {}
        for path in paths:
            entry = self.hookpoints[path]
            if calibrate or (calibrate is None and entry.sae.cfg.threshold is None):
                entry.calibrator = entry.calibrator or ThresholdCalibrator(entry.sae)
            else:
                entry.calibrator = None
            passes[path] = _StatisticsPass(entry, images_per_prompt)
            for name in prompts_by_concept:
                passes[path].stats(name)  # exists even if a pass sees no rows

        def names_of(batch: list[tuple[int, Prompt]]) -> list[list[str | None]]:
            return [labels[p if isinstance(p, str) else prompt_key(0, p)] for _, p in batch]

        def start(batch: list[tuple[int, Prompt]]) -> None:
            for stats_pass in passes.values():
                stats_pass.batch_names = names_of(batch)

        def record(batch: list[tuple[int, Prompt]]) -> None:
            for (i, prompt), names in zip(batch, names_of(batch)):
                label = prompt if isinstance(prompt, str) else f"<prompt {prompt_key(i, prompt)}>"
                for stats_pass in passes.values():
                    for name in names:
                        stats_pass.stats(name).record_prompts([label])

        what = ", ".join("background" if n is None else str(n) for n in list(prompts_by_concept)[:3])
        more = f" +{len(prompts_by_concept) - 3}" if len(prompts_by_concept) > 3 else ""
        with torch.no_grad():
            run_prompts(
                pipe,
                list(enumerate(unique)),
                passes,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                batch_size=batch_size,
                seed=seed,
                show_progress=show_progress,
                desc=f"concepts {what}{more}",
                on_batch_start=start,
                on_batch_end=record,
                **pipe_kwargs,
            )
        out: dict[str, dict[str | None, ConceptStats]] = {}
        for path, stats_pass in passes.items():
            entry = self.hookpoints[path]
            if entry.calibrator is not None:
                entry.library.record_threshold(entry.calibrator)
            out[path] = {name: stats_pass.stats(name) for name in prompts_by_concept}
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
        with tempfile.TemporaryDirectory(prefix="saeuron-push-") as tmp:
            self.save_pretrained(tmp, metrics=metrics)
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                revision=revision,
                commit_message=commit_message
                or f"Upload SAeUron bundle ({len(self.concepts)} "
                f"concepts, {len(self.hookpoints)} hookpoints)",
            )
        return str(getattr(info, "commit_url", info))


class _StatisticsPass:
    """Editor for the statistics pass: never edits; adds token-averaged latents of conditional rows
    to the concepts of the prompt each row belongs to (``batch_names``, one list per prompt)."""

    def __init__(self, entry: HookpointSAE, images_per_prompt: int) -> None:
        self.entry = entry
        self.images_per_prompt = images_per_prompt
        self.batch_names: list[list[str | None]] = []

    def stats(self, name: str | None) -> ConceptStats:
        lib = self.entry.library
        if name is None:
            if lib.background is None:
                lib.background = lib.new_stats("background")
            return lib.background
        if name not in lib:
            lib.add_stats(lib.new_stats(name))
        return lib.get(name)

    def __call__(self, x: Tensor, tau: Tensor | float | None, cond_mask: Tensor | None = None) -> Tensor:
        if tau is None:
            raise RuntimeError(f"{self.entry.path}: no timestep seen for this call")
        rows = x
        tau_t = torch.as_tensor(tau, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        if cond_mask is not None:
            rows, tau_t = x[cond_mask], tau_t[cond_mask.to(tau_t.device)]
        if rows.shape[0] == 0:
            return x
        expected = len(self.batch_names) * self.images_per_prompt
        if rows.shape[0] != expected:
            raise RuntimeError(
                f"{self.entry.path}: {rows.shape[0]} conditional rows for {expected} images; "
                "the CFG layout of this pipeline is not understood (use batch_size=1)"
            )
        sae, lib = self.entry.sae, self.entry.library
        pooled = lib.encode_pooled(sae, rows.detach().to(sae.device, torch.float32), self.entry.calibrator)
        tau_t = tau_t.cpu()
        owner = torch.arange(rows.shape[0]) // self.images_per_prompt
        for name in dict.fromkeys(n for names in self.batch_names for n in names):
            sel = torch.tensor([name in self.batch_names[int(o)] for o in owner])
            self.stats(name).update(pooled[sel.to(pooled.device)], tau_t[sel])
        return x


def model_card(eraser: SAeUron, metrics: Mapping[str, Any] | None = None) -> str:
    """A Hub model card: YAML metadata, the hookpoints, the concepts and how to use the bundle."""
    bases = sorted({h.sae.cfg.base_model for h in eraser.hookpoints.values() if h.sae.cfg.base_model})
    lines = [
        "---",
        "library_name: saeuron-plugin",
        "tags: [sparse-autoencoder, concept-unlearning, saeuron, diffusers]",
    ]
    if bases:
        lines.append(f"base_model: {bases[0]}")
    lines += [
        "license: apache-2.0",
        "---",
        "",
        "# SAeUron bundle",
        "",
        "Sparse autoencoders on a diffusion model's cross-attention blocks, with concept statistics for "
        "unlearning by feature ablation (SAeUron, Cywiński & Deja 2025), made with saeuron-plugin.",
        "",
        "```python",
        "from saeuron_plugin import SAeUron",
        'eraser = SAeUron.from_pretrained("<this repo>")',
        f"with eraser.unlearn(pipe, [{eraser.concepts[0]!r}]):"
        if eraser.concepts
        else "with eraser.unlearn(pipe, [...]):",
        '    image = pipe("...").images[0]',
        "```",
        "",
        "| hookpoint | d_in | latents | k | encoder | θ | concepts |",
        "|---|---|---|---|---|---|---|",
    ]
    for path, h in eraser.hookpoints.items():
        cfg = h.sae.cfg
        theta = cfg.threshold if cfg.threshold is not None else h.library.calibrated_threshold
        lines.append(
            f"| `{path}` | {cfg.d_in} | {cfg.num_latents} | {cfg.k} | {cfg.encoder} | "
            f"{'-' if theta is None else f'{theta:.4g}'} | {len(h.library)} |"
        )
    lines += ["", "## Concepts", "", "| concept | hookpoints | prompts | defaults |", "|---|---|---|---|"]
    for name in eraser.concepts:
        where = eraser.where(name)
        lib = eraser.hookpoints[where[0]].library
        d = lib.selection_defaults(name)
        sel = f"top {d.top_n}" if d.top_n is not None else f"p={d.percentile}"
        lines.append(
            f"| {name} | {', '.join(f'`{w}`' for w in where)} | {lib.get(name).num_prompts} | "
            f"{d.rule} γ={d.gamma:g}, {sel} |"
        )
    if metrics:
        lines += ["", "## Metrics", "", "```json", _json(metrics), "```"]
    return "\n".join(lines) + "\n"


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, default=str)


__all__ = ["HookpointSAE", "SAeUron", "SaeWidthError", "UnlearnHandle", "model_card"]
