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

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from torch import nn

from ..sae.ablation import FeatureAblator
from ..sae.bundle import BundleEntry, DeviceFollowingAblator, SaeBundle, SaeWidthError, per_concept
from ..sae.concepts import ConceptLibrary, ConceptStats, TauGrid
from ..sae.model import SparseAutoencoder
from ..sae.processes import require_single_process
from ..sae.sites import BatchLoop, UnlearnHandle
from .collect import model_name, run_samples
from .hookpoints import (
    TokenMode,
    VLMHookpoint,
    check_tokens,
    cross_attention_layers,
    hookpoint_index,
    resolve_hookpoint,
)
from .hooks import install_sites
from .inputs import make_samples

TOKENS_KEY = "tokens"
"""``SaeConfig.extra`` key holding the token set an SAE reads (``image``, ``text``, ``all``)."""


def vlm_tau_grid() -> TauGrid:
    """The single-bucket grid of VLM concept statistics."""
    return TauGrid(1)


class VLMHookpointSAE(BundleEntry):
    """One hookpoint of a bundle: its SAE, the concept library made with it, the token set it reads."""

    @property
    def tokens(self) -> str | None:
        """Token set recorded with the SAE (None / ``auto``: the hookpoint's default)."""
        value = self.sae.cfg.extra.get(TOKENS_KEY)
        return None if value in (None, "auto") else str(value)


class VLMUnlearner(SaeBundle):
    """SAEs at one or more hookpoints of a VLM, with their concept libraries.

    Loading, saving, pushing and the concept bookkeeping come from the core
    :class:`~saeuron_plugin.sae.bundle.SaeBundle`; this class adds models: hookpoint and token
    checks, the hooks, and the statistics pass over (image, prompt) samples.
    """

    entry_class: ClassVar[type[BundleEntry]] = VLMHookpointSAE
    title: ClassVar[str] = "SAeUron VLM bundle"
    card_tags: ClassVar[tuple[str, ...]] = (*SaeBundle.card_tags, "vision-language-model", "transformers")
    usage: ClassVar[str] = (
        "from saeuron_plugin import VLMUnlearner\n"
        'unlearner = VLMUnlearner.from_pretrained("<this repo>")\n'
        "with unlearner.unlearn(model, [{concept}]):\n"
        "    ids = model.generate(**inputs, max_new_tokens=32)"
    )

    def __init__(self, hookpoints: Mapping[str, BundleEntry] | Sequence[BundleEntry]) -> None:
        super().__init__(hookpoints)
        for h in self.hookpoints.values():
            if h.library.tau_grid.num_buckets != 1:
                raise ValueError(
                    f"{h.path}: VLM concept statistics use one τ bucket, this library has "
                    f"{h.library.tau_grid.num_buckets}"
                )

    @classmethod
    def default_tau_grid(cls) -> TauGrid:
        return vlm_tau_grid()

    @classmethod
    def from_saes(
        cls,
        saes: Mapping[str, SparseAutoencoder],
        *,
        tokens: str | Mapping[str, str] | None = None,
        tau_grid: TauGrid | None = None,
    ) -> VLMUnlearner:
        """A bundle from ``hookpoint path -> SAE`` with empty concept libraries (see :meth:`add_concept`).

        ``tokens`` records the token set each SAE reads (default: what its cfg says, else ``auto``).
        """
        for path, sae in saes.items():
            mode = per_concept(tokens, path) if tokens is not None else None
            if mode is not None:
                sae.cfg.extra[TOKENS_KEY] = mode
        return super().from_saes(saes, tau_grid=vlm_tau_grid())

    def _describe_entry(self, entry: BundleEntry) -> str:
        return f"{super()._describe_entry(entry)}, tokens={entry.tokens or 'auto'}"

    def card_intro(self) -> str:
        families = sorted(
            {h.sae.cfg.model_family for h in self.hookpoints.values() if h.sae.cfg.model_family}
        )
        return (
            "Sparse autoencoders on a vision-language model's activations, with concept statistics for "
            "unlearning by feature ablation (SAeUron scores, SAUCE-style edit of image/text tokens), made "
            "with saeuron-plugin." + (f" Model family: {', '.join(families)}." if families else "")
        )

    def card_columns(self, entry: BundleEntry) -> dict[str, str]:
        return {**super().card_columns(entry), "tokens": entry.tokens or "auto"}

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
            self.check_width(path, hp.width, "model", "hidden size")
            wanted = per_concept(tokens, path) if tokens is not None else entry.tokens
            mode = check_tokens(hp, wanted, model)
            if hp.family == "mllama" and hp.kind == "decoder":
                cross = cross_attention_layers(model)
                if cross and hp.index is not None and hp.index < cross[0]:
                    warnings.warn(
                        f"{path} comes before Mllama's first cross-attention layer ({cross[0]}): its "
                        "activations do not depend on the image",
                        stacklevel=3,
                    )
            self.warn_other_base_model(path, name)
            out[path] = (hp, mode)
        return out

    # ---------------------------------------------------------------- unlearn
    def install_ablators(
        self,
        model: nn.Module,
        ablators: Mapping[str, FeatureAblator],
        *,
        tokens: str | Mapping[str, str] | None = None,
        allow_stack: bool = False,
    ) -> UnlearnHandle:
        """Token-site hooks on ``model`` (checked: hookpoints, widths, token sets, base model) running the
        ablators on the selected tokens. ``tokens`` overrides the token set edited at each hookpoint
        (default: the one the SAE was made for)."""
        checked = self.check_model(model, list(ablators), tokens)
        modes = {p: checked[p][1] for p in ablators}
        hooks = install_sites(
            model, {p: DeviceFollowingAblator(a) for p, a in ablators.items()}, modes, allow_stack=allow_stack
        )
        return UnlearnHandle(hooks, ablators, {p: f"tokens: {m}" for p, m in modes.items()})

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
        require_single_process("The VLM statistics pass")
        paths = self.paths(hookpoints)
        checked = self.check_model(model, paths, tokens)
        for path in paths:  # check everything before changing anything
            mode, made = checked[path][1], _library_tokens(self.hookpoints[path].library)
            if made and made != {mode}:
                raise ValueError(
                    f"{path}: the concept statistics there were made from {sorted(made)} tokens, this pass "
                    f"would read {mode!r} tokens; use the same token set (tokens=...) or a fresh library"
                )
        modes = {p: checked[p][1] for p in paths}
        txn = self.statistics_pass(
            paths,
            calibrate,
            extra={p: {TOKENS_KEY: m} for p, m in modes.items()},
            missing_hint=" (does the prompt contain the image placeholder? are image "
            "tokens what this hookpoint reads?)",
        )
        with txn:  # the libraries and SAE configs change only if every sample ran
            for name, spec in samples_by_concept.items():
                if not isinstance(spec, tuple | list) or len(spec) != 3:
                    raise TypeError(f"concept {name!r}: expected (images, prompts, processor_or_inputs)")
                samples = make_samples(*spec)
                txn.declare([name])

                def start(chunk: list[int], samples: list[Any] = samples, name: str | None = name) -> None:
                    txn.start_batch([[name]] * len(chunk), [samples[i].label for i in chunk])

                desc = f"concept {'background' if name is None else name}"
                loop = BatchLoop(desc, show_progress, start, lambda _: txn.finish_batch())
                run_samples(
                    model,
                    samples,
                    txn.recorders,
                    modes,
                    loop,
                    batch_size=batch_size,
                    processor=spec[2] if samples[0].inputs is None else None,
                    add_image_token=add_image_token,
                )
            for path in paths:  # the ablation must edit the tokens the statistics saw
                self.hookpoints[path].sae.cfg.extra[TOKENS_KEY] = modes[path]
        return txn.results(list(samples_by_concept))


def _library_tokens(library: ConceptLibrary) -> set[str]:
    """Token sets recorded with a library's statistics (empty for statistics from elsewhere)."""
    stats = [*library.concepts.values(), *([library.background] if library.background is not None else [])]
    return {str(s.extra[TOKENS_KEY]) for s in stats if s.total_count and s.extra.get(TOKENS_KEY)}


__all__ = [
    "TOKENS_KEY",
    "SaeWidthError",
    "UnlearnHandle",
    "VLMHookpointSAE",
    "VLMUnlearner",
    "vlm_tau_grid",
]
