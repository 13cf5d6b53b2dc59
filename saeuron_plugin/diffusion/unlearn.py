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

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..sae.ablation import FeatureAblator
from ..sae.bundle import (
    BundleEntry,
    DeviceFollowingAblator,
    SaeBundle,
    SaeWidthError,
    StatisticsTransaction,
)
from ..sae.concepts import ConceptStats
from ..sae.sites import StatisticsRecorder, UnlearnHandle
from .collect import Prompt, prompt_key, run_prompts
from .hookpoints import detect_family, resolve_hookpoint
from .hooks import install_hooks

HookpointSAE = BundleEntry
"""One hookpoint of a bundle: its SAE and its concept library (the core's :class:`BundleEntry`)."""


def _pipe_model_id(pipe: Any) -> str | None:
    config = getattr(pipe, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(pipe, "name_or_path", None)
    return str(name) if name else None


class SAeUron(SaeBundle):
    """SAEs at one or more hookpoints of a diffusers pipeline, with their concept libraries.

    Loading, saving, pushing and the concept bookkeeping come from the core
    :class:`~saeuron_plugin.sae.bundle.SaeBundle`; this class adds pipelines: hookpoint checks,
    the hooks, and the statistics pass over generated images.
    """

    title: ClassVar[str] = "SAeUron bundle"
    card_tags: ClassVar[tuple[str, ...]] = (
        "sparse-autoencoder",
        "concept-unlearning",
        "saeuron",
        "diffusers",
    )
    usage: ClassVar[str] = (
        'from saeuron_plugin import SAeUron\neraser = SAeUron.from_pretrained("<this repo>")\n'
        'with eraser.unlearn(pipe, [{concept}]):\n    image = pipe("...").images[0]'
    )

    def card_intro(self) -> str:
        return (
            "Sparse autoencoders on a diffusion model's cross-attention blocks, with concept statistics "
            "for unlearning by feature ablation (SAeUron, Cywiński & Deja 2025), made with saeuron-plugin."
        )

    def _check_pipe(self, pipe: Any, paths: Sequence[str]) -> dict[str, Any]:
        """Resolve hookpoints on ``pipe`` and check widths and the base model; path -> Hookpoint."""
        detect_family(pipe)  # raises UnsupportedModelError for other denoisers
        resolved = {}
        model_id = _pipe_model_id(pipe)
        for path in paths:
            hp = resolve_hookpoint(pipe, path)
            self.check_width(path, hp.width, "pipeline")
            self.warn_other_base_model(path, model_id, "pipeline")
            resolved[path] = hp
        return resolved

    # ------------------------------------------------------------------ unlearn
    def install_ablators(self, pipe: Any, ablators: Mapping[str, FeatureAblator], *,
                         record_tau: bool = False) -> UnlearnHandle:
        """Module hooks on ``pipe`` (checked: hookpoints, widths, base model) running the ablators with
        the denoiser's τ and CFG branch; ``record_tau`` keeps the τ each hook saw (``seen_tau``).
        Pipelines made with ``from_pipe`` share modules, so installing on both raises
        ``HookConflictError``."""
        self._check_pipe(pipe, list(ablators))
        editors = {p: DeviceFollowingAblator(a) for p, a in ablators.items()}
        return UnlearnHandle(install_hooks(pipe, editors, record_tau=record_tau), ablators)

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
        paths = self.paths(hookpoints)
        self._check_pipe(pipe, paths)
        images_per_prompt = int(pipe_kwargs.get("num_images_per_prompt", 1) or 1)
        txn = self.statistics_pass(paths, calibrate)
        passes = {}
        for path in paths:
            passes[path] = _StatisticsPass(self.hookpoints[path], images_per_prompt, txn)
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
        with torch.no_grad(), txn:  # the libraries change only if every prompt ran
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
        return txn.results(list(prompts_by_concept))


class _StatisticsPass(StatisticsRecorder):
    """Editor of the statistics pass: never edits; each conditional row (one generated image) is a
    sample of the concepts of its prompt (``batch_names``, one list per prompt of the batch)."""

    def __init__(self, entry: HookpointSAE, images_per_prompt: int, txn: StatisticsTransaction) -> None:
        super().__init__(entry, txn)
        self.images_per_prompt = images_per_prompt
        self.batch_names: list[list[str | None]] = []

    def __call__(self, x: Tensor, tau: Tensor | float | None, cond_mask: Tensor | None = None) -> Tensor:
        if tau is None:
            raise RuntimeError(f"{self.path}: no timestep seen for this call")
        rows, tau_t = x, torch.as_tensor(tau, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        if cond_mask is not None:
            rows, tau_t = x[cond_mask], tau_t[cond_mask.to(tau_t.device)]
        expected = len(self.batch_names) * self.images_per_prompt
        if rows.shape[0] and rows.shape[0] != expected:
            raise RuntimeError(
                f"{self.path}: {rows.shape[0]} conditional rows for {expected} images; "
                "the CFG layout of this pipeline is not understood (use batch_size=1)"
            )
        if rows.shape[0]:
            owner = torch.arange(rows.shape[0]).repeat_interleave(rows.shape[1])
            names = [self.batch_names[r // self.images_per_prompt] for r in range(rows.shape[0])]
            self.record(rows.reshape(-1, rows.shape[-1]), owner, names, tau_t)
        return x


__all__ = ["HookpointSAE", "SAeUron", "SaeWidthError", "UnlearnHandle"]
