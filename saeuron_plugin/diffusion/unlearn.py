"""SAeUron for diffusers pipelines: load SAE bundles, learn concepts, unlearn them at inference.

A bundle is one folder per hookpoint (the DESIGN layout, also what ``bcywinski/SAeUron`` and
sparsify write)::

    <bundle>/<hookpoint>/cfg.json, sae.safetensors         the SAE
    <bundle>/<hookpoint>/concepts/index.json, <slug>.safetensors   its concept library (optional)
    <bundle>/README.md                                    model card

Each hookpoint keeps its own SAE and concept library; a concept is unlearned at every hookpoint
whose library holds it (the reference puts objects at ``up_blocks.1.attentions.1`` and styles at
``.2``, so their libraries differ). Ablation runs through :mod:`.hooks` (a module forward hook on
blocks and cross-attention alike) with τ from the denoiser's own timestep.

    eraser = SAeUron.from_pretrained("org/repo")          # or a local folder
    with eraser.unlearn(pipe, ["Van Gogh"]):
        image = pipe("a cat in Van Gogh style").images[0]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from ..sae.ablation import FeatureAblator
from ..sae.bundle import BundleEntry, DeviceFollowingAblator, SaeBundle, SaeWidthError
from ..sae.concepts import ConceptStats
from ..sae.processes import Processes
from ..sae.sites import BatchLoop, UnlearnHandle
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
    card_tags: ClassVar[tuple[str, ...]] = (*SaeBundle.card_tags, "diffusers")
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
    def install_ablators(
        self, pipe: Any, ablators: Mapping[str, FeatureAblator], *, record_tau: bool = False
    ) -> UnlearnHandle:
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
        names: dict[str, list[str | None]] = {}  # prompt key -> the concepts it feeds
        unique: list[Prompt] = []
        for name, prompts in prompts_by_concept.items():
            if not prompts:
                raise ValueError(f"concept {name!r} needs at least one prompt")
            for prompt in prompts:
                key = prompt if isinstance(prompt, str) else prompt_key(0, prompt)
                if key not in names:
                    names[key] = []
                    unique.append(prompt)
                if name not in names[key]:
                    names[key].append(name)
        paths = self.paths(hookpoints)
        self._check_pipe(pipe, paths)
        images = int(pipe_kwargs.get("num_images_per_prompt", 1) or 1)
        procs = Processes.current()

        def label(i: int, p: Prompt) -> str:
            return p if isinstance(p, str) else f"<prompt {prompt_key(i, p)}>"

        order = [label(i, p) for i, p in enumerate(unique)]
        txn = self.statistics_pass(paths, calibrate, require_tau=True, processes=procs, prompt_order=order)
        txn.declare(list(prompts_by_concept))

        def start(batch: list[tuple[int, Prompt]]) -> None:  # one sample per generated image
            keys = [(p if isinstance(p, str) else prompt_key(0, p), label(i, p)) for i, p in batch]
            txn.start_batch(
                [names[k] for k, _ in keys for _ in range(images)],
                [name for _, name in keys for _ in range(images)],
                prompts=range(0, len(keys) * images, images),  # each prompt counts once
            )

        what = ", ".join("background" if n is None else str(n) for n in list(prompts_by_concept)[:3])
        more = f" +{len(prompts_by_concept) - 3}" if len(prompts_by_concept) > 3 else ""
        with torch.no_grad(), txn:  # the libraries change only if every prompt ran
            desc = f"concepts {what}{more}"
            loop = BatchLoop(desc, show_progress and procs.main, start, lambda _: txn.finish_batch())
            run_prompts(
                pipe,
                procs.share(list(enumerate(unique))),  # every process its share; the pass pools them
                txn.recorders,
                loop,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                batch_size=batch_size,
                seed=seed,
                **pipe_kwargs,
            )
        return txn.results(list(prompts_by_concept))


__all__ = ["HookpointSAE", "SAeUron", "SaeWidthError", "UnlearnHandle"]
