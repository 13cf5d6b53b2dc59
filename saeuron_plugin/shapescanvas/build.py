"""Build the SAeUron bundle of the embedded default model, through the adapter's own code paths.

1. ``collect_activations`` over every ShapesCanvas caption (collection seeds) at the hookpoints;
2. ``train_sae`` per hookpoint on the activation store;
3. ``SAeUron.add_concepts``: one statistics pass over every caption (statistics seeds) feeding
   every object, style and color concept, each contrasted with the other concepts of its domain;
4. a per-concept search, run by the generic tuner (:func:`~..tuning.search.tune_concept`; this module
   supplies :func:`tune_task` and :func:`search_space`), over hookpoint (or hookpoint set,
   ``search_sets``, each with its score contrast) × percentile × γ on labelled validation captions and
   seeds (never the test seeds), maximising mean(UA, IRA, CRA) as judged by the ShapesCanvas judges;
   for objects the best four are judged again on every caption of the object with fresh seeds
   (stage 2), which decides. For colours a
   replacement stage follows (``search_targets``): the winner as it is, and with each other colour
   as its target (:attr:`~..sae.spec.ConceptAblation.target`) at each α, ranked by the score, then
   by the share of forget images that are a clean image of another concept, then by the margin.
   The winners are saved as the concept's selection defaults (the hookpoint choice as ``active``
   flags).
5. a robustness stage (``robust_attacks``): the winner at its hookpoints, and with every other
   hookpoint holding the concept added (at the winner's setting, or at a lighter one of
   ``robust_extras``), each attacked with UnlearnDiffAtk (gradients through the edit) on captions,
   targets and seeds of its own (never the robustness benchmark's); the most resistant set whose
   validation score is within ``robust_tolerance`` of the winner's becomes the concept's *robust
   mode* (``robust`` flags; ``unlearn(..., robust=True)``). The default mode stays the winner.

``python examples/build_shapescanvas_bundle.py`` runs it and writes ``checkpoints/shapescanvas-saeuron``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..diffusion.collect import collect_activations
from ..diffusion.unlearn import SAeUron
from ..sae.concepts import TauGrid
from ..sae.files import read_json
from ..sae.io import atomic_write, resolve_repo
from ..sae.store import ActivationStore
from ..sae.train import TrainConfig, Trainer
from ..tuning.search import (
    DOMAIN_CONTRAST,
    ROBUST_EXTRAS,
    SEARCH_FILE,
    SearchSpace,
    TuneConfig,
    TuneTask,
    ValidationSet,
    clean_flips,
    read_search,
    tune_concept,
)
from . import data as sc
from .model import DEFAULT_GUIDANCE, DEFAULT_STEPS


def _attn2(block: str, n: int) -> tuple[str, ...]:
    return tuple(f"unet.{block}.attentions.{i}.transformer_blocks.0.attn2" for i in range(n))


class SearchSet(NamedTuple):
    """Hookpoints the search ablates together, with the contrast and grid they are tried with.

    ``None`` fields take the concept's default contrast and the domain's percentile/γ grid; a set
    with its own contrast usually needs its own grid (``worst`` selects fewer latents per percentile).
    """

    hookpoints: tuple[str, ...]
    contrast: str | None = None
    percentiles: tuple[float, ...] | None = None
    gammas: tuple[float, ...] | None = None


SetEntry = tuple[str, ...] | SearchSet
"""A ``search_sets`` entry: hookpoints (default contrast and grid) or a :class:`SearchSet`."""


def search_set(entry: Sequence[str] | SearchSet) -> SearchSet:
    """A ``search_sets`` entry as a :class:`SearchSet` (a plain tuple is just its hookpoints)."""
    if isinstance(entry, SearchSet):
        return entry
    if isinstance(entry, str):
        raise TypeError(f"a search set is a sequence of hookpoints, got the string {entry!r}")
    return SearchSet(tuple(entry))


# Where each domain is searched (validation runs, README "ShapesCanvas"). Objects: block outputs of
# up_blocks.1 (4x4), where the layout is set, and the cross-attention of down_blocks.2.attentions.0
# (8x8) with the "worst" contrast: the pooled score there picks latents one other shape shares
# (examples/experiments/object_contrast.py), attn2 edits in up_blocks.1 change nothing.
# Colors and styles: cross-attention outputs (attn2), where the prompt enters; a colour edited out of
# one *block* output comes back, because every later cross-attention reads the prompt again.
BLOCKS_UP1 = ("unet.up_blocks.1.attentions.1", "unet.up_blocks.1.attentions.2")
ATTN2_UP1 = _attn2("up_blocks.1", 3)
ATTN2_UP3 = _attn2("up_blocks.3", 3)
ATTN2_UP23 = _attn2("up_blocks.2", 3) + ATTN2_UP3
ATTN2_ALL = (
    *_attn2("down_blocks.0", 2),
    *_attn2("down_blocks.1", 2),
    *_attn2("down_blocks.2", 2),
    *ATTN2_UP1,
    *ATTN2_UP23,
    *_attn2("mid_block", 1),
)  # in the UNet's module order, as ``list_hookpoints`` gives them
HOOKPOINTS = (*BLOCKS_UP1, *ATTN2_ALL)
OBJECT_ATTN2 = SearchSet(
    _attn2("down_blocks.2", 1), contrast="worst", percentiles=(99.5, 99.8, 99.9), gammas=(-1.0, -2.0, -6.0)
)
SEARCH_SETS: dict[str, tuple[SetEntry, ...]] = {
    "object": ((BLOCKS_UP1[0],), (BLOCKS_UP1[1],), BLOCKS_UP1, OBJECT_ATTN2),
    "style": (ATTN2_UP1, ATTN2_UP23, ATTN2_ALL),
    "color": (ATTN2_UP3, ATTN2_UP23, ATTN2_ALL),
}
# Objects need more latents and stronger edits than colours and styles (first search: every object
# chose the lowest percentile; the block-output bundle before it chose γ down to -20 for them).
# Stage-2 validation then preferred p 97 and γ -1/-2 for objects, so the grid reaches down to p 95.
SEARCH_PERCENTILES = {
    "object": (95.0, 96.0, 97.0, 98.0, 99.0),
    "style": (99.0, 99.5, 99.8),
    "color": (99.0, 99.5, 99.8),
}
SEARCH_GAMMAS = {"object": (-1.0, -2.0, -6.0, -20.0), "style": (-2.0, -6.0), "color": (-2.0, -6.0)}
BASE_MODEL = "shapescanvas-sd"
COLLECT_SEED = 10_000
STATS_SEED = 20_000
VALIDATION_SEED = 30_000
REFINE_SEED = 40_000  # stage-2 validation; test images use 50_000 and up
# Objects: stage 1's 12 captions (the same for every trial) scored cross settings 100 % that the
# test seeds put at 70 %; all 30 captions of an object expose that. Styles and colours met their
# targets on stage 1 alone.
REFINE_TOP = {"object": 4}
# Colours removed alone tend to land between two colours (red → yellow-orange: UA counts it, no judge
# calls it a colour; clean rate 80 % on the test seeds). Steering the same tokens toward another
# colour gives a clean image (red → green, α 1: 24 of 24 clean on stage-2 prompts;
# examples/experiments/colour_replacement.py). Objects and styles
# were ≥ 90 % clean without it.
TARGET_SCALES = {"color": (1.0, 2.0)}
# The robustness stage attacks each concept on these captions (never the robustness benchmark's: "a red
# {} in solid style", "a blue circle in {} style", "a {} square in solid style"), with targets, attack
# seeds and judged images of their own.
ATTACK_CAPTIONS = {
    "object": ("a green {} in striped style", "a blue {} in dotted style", "a yellow {} in checkered style"),
    "style": ("a red square in {} style", "a green triangle in {} style", "a purple heart in {} style"),
    "color": ("a {} circle in dotted style", "a {} star in striped style", "a {} cross in checkered style"),
}
ATTACK_SEED = 60_000
ATTACK_IMAGES = 8


def concept_domain(name: str) -> str:
    """``object``, ``style`` or ``color`` for a ShapesCanvas concept name."""
    for domain, words in sc.VOCABULARIES.items():
        if name in words:
            return domain
    raise KeyError(f"{name!r} is not a ShapesCanvas concept; known: {list(sc.CONCEPTS)}")


def domain_contrast(name: str) -> list[str]:
    """The bundle's default score contrast of ``name``: the other concepts of its domain, pooled."""
    return [w for w in sc.VOCABULARIES[concept_domain(name)] if w != name]


def concept_prompts(prompts: Sequence[sc.BenchmarkPrompt] | None = None) -> dict[str, list[str]]:
    """Every concept → the captions that contain it (each caption feeds three concepts)."""
    prompts = list(prompts or sc.benchmark_prompts())
    out: dict[str, list[str]] = {}
    for domain, words in sc.VOCABULARIES.items():
        for w in words:
            out[w] = [p.prompt for p in prompts if getattr(p, domain) == w]
    return out


@dataclass
class BundleConfig:
    """Recipe of the shipped bundle; the defaults reproduce it."""

    out: str = "checkpoints/shapescanvas-saeuron"
    work: str = "runs/shapescanvas-bundle"
    model: str = "checkpoints/shapescanvas-sd"
    judges: str = "checkpoints/shapescanvas-judges"
    hookpoints: tuple[str, ...] = HOOKPOINTS
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    collect_repeats: int = 2
    """Each caption is generated this many times (different seeds) for SAE training."""
    tokens_per_step: int | None = 16
    """Random tokens kept per image and step for training (all of them at 4x4 blocks)."""
    k: int = 8
    expansion_factor: int = 16
    train_epochs: int = 20
    batch_size: int = 2048
    tau_buckets: int = 25
    """One bucket per step of the 25-step protocol (other step counts use the nearest bucket)."""
    search_percentiles: tuple[float, ...] | dict[str, tuple[float, ...]] = field(
        default_factory=lambda: dict(SEARCH_PERCENTILES)
    )
    search_gammas: tuple[float, ...] | dict[str, tuple[float, ...]] = field(
        default_factory=lambda: dict(SEARCH_GAMMAS)
    )
    search_sets: tuple[SetEntry, ...] | dict[str, tuple[SetEntry, ...]] = field(
        default_factory=lambda: dict(SEARCH_SETS)
    )
    """Hookpoint sets the search tries, each ablated together, for every concept or per domain
    (``{"object": sets, ...}``, like the percentiles and γ); empty: every hookpoint alone. A
    :class:`SearchSet` entry brings its own contrast and grid."""
    keep_hookpoints: tuple[str, ...] = BLOCKS_UP1
    """Kept in the bundle even if no concept chose them (every other unchosen hookpoint is dropped)."""
    search_prompts: int = 12
    """Validation prompts per concept (with it) and as many without it, per search setting."""
    refine_top: int | dict[str, int] = field(default_factory=lambda: dict(REFINE_TOP))
    """Stage 2: re-judge this many best stage-1 settings on fresh validation (per domain, as the grid;
    0 or 1: stage 1 decides)."""
    refine_prompts: int = 30
    """Stage-2 prompts with the concept (every caption of an object, at most) and as many without."""
    search_targets: tuple[float, ...] | dict[str, tuple[float, ...]] = field(
        default_factory=lambda: dict(TARGET_SCALES)
    )
    """Replacement stage: the α grid, per domain as the other grids; every other concept of the domain
    is tried as the target at each α, against the winner without one (empty: no replacement stage)."""
    robust_attacks: int = 3
    """Robustness stage (the bundle's robust mode): captions attacked with UnlearnDiffAtk per candidate
    (the winner at its hookpoints, its setting at every hookpoint holding the concept, and the winner plus
    each lighter ``robust_extras`` setting at the others); 0: no such stage."""
    robust_iterations: int = 40
    """UnlearnDiffAtk's steps in the robustness stage (its published budget: 40)."""
    robust_tolerance: float = 0.05
    """The robust mode may cost at most this much validation score (mean of UA, IRA, CRA)."""
    robust_extras: tuple[tuple[float, float], ...] = ROBUST_EXTRAS
    """Robustness stage: lighter (percentile, γ) settings tried at the hookpoints beyond the winner's."""
    from_bundle: str | None = None
    """Skip steps 1-3: take the SAEs and statistics of this bundle (folder or Hub repo) and reuse its
    ``search.json`` trials where the recipe matches (re-tuning a bundle's defaults)."""
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def load_default(model: str = "checkpoints/shapescanvas-sd", device: str = "cpu") -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def collect_and_train(pipe: Any, cfg: BundleConfig, log: Callable[[str], None] = print) -> SAeUron:
    """Steps 1-2: activations of every caption (``collect_repeats`` seeds each) → one SAE per hookpoint."""
    work = Path(cfg.work)
    captions = [p.prompt for p in sc.benchmark_prompts()] * cfg.collect_repeats
    t0 = time.time()
    res = collect_activations(
        pipe,
        captions,
        list(cfg.hookpoints),
        work / "activations",
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        seed=COLLECT_SEED,
        batch_size=60,
        store_dtype=torch.float32,
        tokens_per_step=cfg.tokens_per_step,
    )
    log(
        f"collected {res.collected} prompts ({res.skipped} already stored): {res.rows} rows "
        f"in {time.time() - t0:.0f} s"
    )
    saes = {}
    for hp in cfg.hookpoints:
        store = ActivationStore(work / "activations" / hp)
        t0 = time.time()
        sae, s = Trainer(
            store,
            TrainConfig(
                k=cfg.k,
                expansion_factor=cfg.expansion_factor,
                batch_size=cfg.batch_size,
                epochs=cfg.train_epochs,
                seed=cfg.seed,
                hookpoint=hp,
                model_family="sd1",
                base_model=BASE_MODEL,
                device="cpu",
                dead_tokens_threshold=200_000,
                progress=False,
            ),
        ).fit()
        log(
            f"trained {hp}: {s.step} steps, FVU {s.last_fvu:.3f}, dead {s.dead_fraction:.1%}, "
            f"θ {s.threshold:.4g} ({time.time() - t0:.0f} s)"
        )
        saes[hp] = sae
    return SAeUron.from_saes(saes, tau_grid=TauGrid(cfg.tau_buckets))


def add_statistics(eraser: SAeUron, pipe: Any, cfg: BundleConfig, log: Callable[[str], None] = print) -> None:
    """Step 3: one statistics pass for all concepts; each concept contrasts with its domain's others."""
    t0 = time.time()
    eraser.add_concepts(
        concept_prompts(),
        pipe,
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        seed=STATS_SEED,
        batch_size=60,
    )
    for name in eraser.concepts:
        eraser.set_defaults(name, contrast=domain_contrast(name))
    log(f"concept statistics for {len(eraser.concepts)} concepts in {time.time() - t0:.0f} s")


# ------------------------------------------------------------------------------------------ scoring
def judge_scores(
    judges: Any,
    images: torch.Tensor,
    prompts: Sequence[sc.BenchmarkPrompt],
    concept: str,
    probs: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """UA, IRA, CRA (fractions) of ``images`` made from ``prompts`` while ``concept`` is unlearned.

    UA: images of prompts with the concept that the domain's judge does not classify as it.
    IRA: domain-judge accuracy on prompts without the concept. CRA: accuracy of the other domains'
    judges on every image. A set that is empty gives NaN. ``probs``: the judges' probabilities for
    ``images`` when already computed (then ``judges`` and ``images`` are not used).
    """
    domain = concept_domain(concept)
    pred = judges.classify(images) if probs is None else {d: p.argmax(-1) for d, p in probs.items()}
    target = sc.VOCABULARIES[domain].index(concept)
    has = _has(prompts, concept)
    own, labels = pred[domain], _labels(prompts, domain)

    def mean(x: torch.Tensor) -> float:
        return float(x.float().mean()) if x.numel() else float("nan")

    cra = [pred[d] == _labels(prompts, d) for d in sc.DOMAINS if d != domain]
    return {
        "ua": mean(own[has] != target),
        "ira": mean(own[~has] == labels[~has]),
        "cra": mean(torch.cat(cra)),
    }


def judge_margin(
    probs: dict[str, torch.Tensor], prompts: Sequence[sc.BenchmarkPrompt], concept: str
) -> float:
    """mean(UA, IRA, CRA) with the judges' probabilities ``probs`` in place of their decisions.

    The search's tie-break: on a dozen validation prompts several settings often score the same,
    and the first of them tends to sit at the edge (the weakest γ that still flips every image).
    Preferring the largest margin picks the setting that flips the concept and keeps the rest
    with the most room to spare.
    """
    domain = concept_domain(concept)
    has = _has(prompts, concept)

    def p_true(d: str) -> torch.Tensor:
        return probs[d].gather(1, _labels(prompts, d).unsqueeze(1)).squeeze(1).float()

    own = p_true(domain)
    parts = [1 - own[has], own[~has], torch.cat([p_true(d) for d in sc.DOMAINS if d != domain])]
    return sum(float(x.mean()) if x.numel() else 0.0 for x in parts) / 3


def _has(prompts: Sequence[sc.BenchmarkPrompt], concept: str) -> torch.Tensor:
    domain = concept_domain(concept)
    return torch.tensor([getattr(p, domain) == concept for p in prompts])


def _labels(prompts: Sequence[sc.BenchmarkPrompt], domain: str) -> torch.Tensor:
    return torch.tensor([p.label(domain) for p in prompts])


def split_prompts(
    concept: str, n: int, rng: np.random.Generator, prompts: Sequence[sc.BenchmarkPrompt] | None = None
) -> list[sc.BenchmarkPrompt]:
    """``n`` prompts with ``concept`` and ``n`` without it (same domain), sampled with ``rng``."""
    prompts = list(prompts or sc.benchmark_prompts())
    domain = concept_domain(concept)
    with_c = [p for p in prompts if getattr(p, domain) == concept]
    without = [p for p in prompts if getattr(p, domain) != concept]
    pick = [with_c[i] for i in rng.choice(len(with_c), min(n, len(with_c)), replace=False)]
    pick += [without[i] for i in rng.choice(len(without), min(n, len(without)), replace=False)]
    return pick


def _for_domain(value: tuple | dict[str, tuple], domain: str) -> tuple:
    """A search grid axis: the same for every concept, or ``{domain: values}`` (missing: empty)."""
    return tuple(value.get(domain, ())) if isinstance(value, dict) else tuple(value)


def _for_domain_int(value: int | dict[str, int], domain: str) -> int:
    return int(value.get(domain, 0)) if isinstance(value, dict) else int(value)


def short_set(paths: Sequence[str]) -> str:
    """``up_blocks.2.attentions.0.attn2+…`` for a log line (drops ``unet.`` and ``transformer_blocks.0.``)."""
    return "+".join(p.removeprefix("unet.").replace("transformer_blocks.0.", "") for p in paths)


class Setting(NamedTuple):
    """One point of the search grid (equal to the plain tuple of its fields)."""

    hookpoints: tuple[str, ...]
    """Ablated together."""
    percentile: float
    gamma: float
    contrast: str | None = None
    """``None``: the concept's default contrast (:func:`domain_contrast`)."""
    target: str | None = None
    """Replacement target (None: removal only)."""
    target_scale: float = 1.0


def validation_set(
    name: str, n: int, cfg: BundleConfig, stage: str = "search"
) -> tuple[list[sc.BenchmarkPrompt], list[int]]:
    """Prompts and seeds of a validation stage (``search`` or ``refine``) for ``name``; never test seeds.

    They depend on the concept's place in the vocabulary, not on the loop order, so a search of a
    few concepts draws the same prompts as a search of all.
    """
    ci = sc.CONCEPTS.index(name)
    rng = np.random.default_rng([cfg.seed, ci, 7 if stage == "search" else 11])
    prompts = split_prompts(name, n, rng)
    base = VALIDATION_SEED if stage == "search" else REFINE_SEED
    return prompts, [base + 97 * ci + i for i in range(len(prompts))]


def stage_validation(name: str, cfg: BundleConfig, stage: str) -> tuple[list[sc.BenchmarkPrompt], list[int]]:
    """A search stage's validation set: ``refine`` has its own; stage 1 (``search``, saved as
    ``trials``) and the replacement stage (``replace``) share stage 1's."""
    if stage == "refine":
        return validation_set(name, cfg.refine_prompts, cfg, "refine")
    return validation_set(name, cfg.search_prompts, cfg, "search")


def trial_scores(
    judges: Any, images: torch.Tensor, prompts: Sequence[sc.BenchmarkPrompt], name: str
) -> dict[str, float]:
    """A search trial's UA / IRA / CRA, its objective ``score`` (their mean), the tie-break
    ``margin`` and ``clean_flip`` (the share of forget images the domain's judge calls another class
    with confidence ≥ 0.9), from one judge pass. Every method's search (ours and the baselines')
    ranks by these (the baselines' search here; SAeUron's through the generic tuner's
    :func:`~..tuning.search.paired_scores` with the same true labels, which gives the same numbers)."""
    probs = judges.probabilities(images)
    s = judge_scores(judges, images, prompts, name, probs)
    return {
        **s,
        "score": (s["ua"] + s["ira"] + s["cra"]) / 3,
        "margin": judge_margin(probs, prompts, name),
        "clean_flip": clean_flip(probs, prompts, name),
    }


def clean_flip(probs: dict[str, torch.Tensor], prompts: Sequence[sc.BenchmarkPrompt], concept: str) -> float:
    """The share of images of prompts with ``concept`` that are clean flips
    (:func:`~..tuning.search.clean_flips`)."""
    domain = concept_domain(concept)
    flip = clean_flips(probs[domain], sc.VOCABULARIES[domain].index(concept))
    has = _has(prompts, concept)
    return float(flip[has].float().mean()) if bool(has.any()) else float("nan")


def replacement_targets(name: str) -> list[str]:
    """The targets a replacement stage tries for ``name``: the other concepts of its domain."""
    return [c for c in sc.VOCABULARIES[concept_domain(name)] if c != name]


def labelled(prompts: Sequence[sc.BenchmarkPrompt], seeds: Sequence[int], concept: str) -> ValidationSet:
    """A validation set of ShapesCanvas captions (those with ``concept`` first, as
    :func:`split_prompts` orders them), scored against their true labels."""
    has = _has(prompts, concept)
    n_forget = int(has.sum())
    if not bool(has[:n_forget].all()):
        raise ValueError(f"the prompts with {concept!r} must come first")
    labels = {d: _labels(prompts, d).tolist() for d in sc.DOMAINS}
    return ValidationSet([p.prompt for p in prompts], [int(s) for s in seeds], n_forget, labels)


def tune_task(name: str, cfg: BundleConfig) -> TuneTask:
    """``name``'s search as the generic tuner's task: the validation sets of :func:`stage_validation`
    with their true labels, and the robustness stage's own captions and seeds."""
    validation = labelled(*stage_validation(name, cfg, "search"), name)
    n = validation.n_forget
    return TuneTask(
        name,
        validation.prompts[:n],
        validation.prompts[n:],
        domain=concept_domain(name),
        validation=validation,
        refine=labelled(*stage_validation(name, cfg, "refine"), name),
        attack_prompts=[caption.format(name) for caption in ATTACK_CAPTIONS[concept_domain(name)]],
        attack_seed=ATTACK_SEED,
    )


def search_space(name: str, cfg: BundleConfig) -> SearchSpace:
    """``name``'s search grid (its domain's sets, percentiles, γ, stage 2, replacement and robustness
    stages) as the generic tuner's :class:`~..tuning.search.SearchSpace`; a set without a contrast
    of its own uses the domain contrast."""
    domain = concept_domain(name)
    sets = []
    for entry in map(search_set, _for_domain(cfg.search_sets, domain) or [(hp,) for hp in cfg.hookpoints]):
        own = {"contrasts": entry.contrast and [entry.contrast], **entry._asdict()}
        own.pop("contrast")
        sets.append({k: list(v) for k, v in own.items() if v is not None})
    top = _for_domain_int(cfg.refine_top, domain)
    return SearchSpace(
        hookpoint_sets=sets,
        contrasts=(DOMAIN_CONTRAST,),
        percentiles=_for_domain(cfg.search_percentiles, domain),
        gammas=_for_domain(cfg.search_gammas, domain),
        refine_top=top if top > 1 else 0,
        target_scales=_for_domain(cfg.search_targets, domain),
        robust_attacks=cfg.robust_attacks,
        robust_iterations=cfg.robust_iterations,
        robust_tolerance=cfg.robust_tolerance,
        robust_extras=cfg.robust_extras,
        attack_images=ATTACK_IMAGES,
    )


def search_defaults(
    eraser: SAeUron,
    pipe: Any,
    judges: Any,
    cfg: BundleConfig,
    concepts: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    folder: str | Path | None = None,
    source: Any = None,
) -> dict[str, Any]:
    """Step 4: each concept's search (:func:`tune_task` in :func:`search_space`) by the generic tuner
    (:func:`~..tuning.search.tune_concept`), which writes the winners as the concepts' defaults and
    every trial to ``folder/search.json`` (default ``<work>/search``) as it is judged: an interrupted
    build resumes there, and trials made from the same SAEs, statistics and validation sets are never
    judged twice. ``source``: what the SAEs and statistics were made from (default: ``cfg``'s steps
    1-3). Returns the search's records ``{concept: record}`` of ``concepts``.
    """
    folder = Path(cfg.work) / "search" if folder is None else Path(folder)
    gen = TuneConfig(cfg.steps, cfg.guidance_scale, batch_size=256, show_progress=False)
    source = _recipe(cfg, TRAINED_FIELDS) if source is None else source
    concepts = list(concepts or eraser.concepts)
    for name in concepts:
        t0 = time.time()
        best = tune_concept(
            eraser, pipe, judges, tune_task(name, cfg), search_space(name, cfg), folder, gen, log, source
        )
        log(  # the tuner has logged each stage, the robust mode included
            f"{name:10s} best {short_set(best['hookpoints'])} p={best['percentile']} γ={best['gamma']:g} "
            f"contrast {best['contrast']}{' → ' + best['target'] if best.get('target') else ''}: "
            f"UA {best['ua']:.2f} IRA {best['ira']:.2f} CRA {best['cra']:.2f} ({time.time() - t0:.0f} s)"
        )
    tuned = read_search(folder).get("tune", {})
    return {name: tuned[name] for name in concepts}


TRAINED_FIELDS = (
    "model",
    "hookpoints",
    "steps",
    "guidance_scale",
    "collect_repeats",
    "tokens_per_step",
    "k",
    "expansion_factor",
    "train_epochs",
    "batch_size",
    "tau_buckets",
    "seed",
)
"""The config fields steps 1-3 depend on; a saved result of those steps is reused only if they match."""


def _recipe(config: dict[str, Any] | BundleConfig, fields: Sequence[str]) -> dict[str, Any]:
    """The ``fields`` of a config (dataclass or saved JSON), JSON-normalised (tuples → lists) to compare."""
    values = asdict(config) if isinstance(config, BundleConfig) else config
    return json.loads(json.dumps({f: values.get(f) for f in fields}))


def trained_eraser(pipe: Any, cfg: BundleConfig, log: Callable[[str], None] = print) -> SAeUron:
    """Steps 1-3, or their saved result in ``work/trained`` when it was made with the same recipe.

    The SAEs and statistics take most of a build; saving them lets an interrupted or re-tuned build
    (a new search grid) start at the search.
    """
    folder = Path(cfg.work) / "trained"
    recipe = _recipe(cfg, TRAINED_FIELDS)
    saved = folder / "recipe.json"
    if saved.exists() and read_json(saved, "bundle recipe") == recipe:
        log(f"reusing SAEs and statistics from {folder}")
        return SAeUron.from_pretrained(folder)
    eraser = collect_and_train(pipe, cfg, log)
    add_statistics(eraser, pipe, cfg, log)
    eraser.save_pretrained(folder)
    _write_json(saved, recipe)
    return eraser


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (``sae.io``'s temp-file-and-rename): an interrupt never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))


def starting_point(pipe: Any, cfg: BundleConfig, log: Callable[[str], None] = print) -> tuple[SAeUron, Any]:
    """The SAEs and statistics to search on, and what they were made from (the search's ``source``):
    ``cfg.from_bundle``'s, whose saved trials are copied into the build's search folder wherever that
    holds none made from the same SAEs and statistics, or steps 1-3 (or their saved result)."""
    if not cfg.from_bundle:
        return trained_eraser(pipe, cfg, log), _recipe(cfg, TRAINED_FIELDS)
    path = resolve_repo(cfg.from_bundle)
    eraser = SAeUron.from_pretrained(path)
    saved = read_search(path)
    source = (
        _recipe(saved["config"], TRAINED_FIELDS) if "config" in saved else {"bundle": str(cfg.from_bundle)}
    )
    folder = Path(cfg.work) / "search"
    ours = read_search(folder)
    mine = ours.get("tune", {})
    new = {
        name: entry
        for name, entry in saved.get("tune", {}).items()
        if mine.get(name, {}).get("recipe") != entry.get("recipe")  # ours: made from other SAEs, or none
    }
    if new:
        _write_json(folder / SEARCH_FILE, {**ours, "tune": {**mine, **new}})
    log(f"searching on the SAEs and statistics of {cfg.from_bundle} ({len(new)} concepts' trials copied)")
    return eraser, source


def build_bundle(cfg: BundleConfig | None = None, log: Callable[[str], None] = print) -> Path:
    """Run steps 1-4 and write the bundle (with the search record in ``search.json``).

    The bundle is written next to ``cfg.out`` and then swapped in, so an interrupted save (or a
    re-tune of ``out`` itself with ``from_bundle=out``) never leaves a half-written or stale folder.
    """
    from .judges import Judges

    cfg = cfg or BundleConfig()
    torch.manual_seed(cfg.seed)
    pipe = load_default(cfg.model)
    judges = Judges.from_pretrained(cfg.judges)
    t0 = time.time()
    eraser, source = starting_point(pipe, cfg, log)
    search = search_defaults(eraser, pipe, judges, cfg, log=log, source=source)
    chosen = {
        p
        for name in eraser.concepts
        for robust in (False, True)
        for p in eraser.active_hookpoints(name, robust)
    }
    used = [p for p in eraser.hookpoints if p in chosen or p in cfg.keep_hookpoints]
    eraser = SAeUron([eraser.hookpoints[p] for p in used])  # drop hookpoints nobody needs
    log(f"hookpoints kept: {used}")
    out = Path(cfg.out)
    staging, old = out.with_name(out.name + ".new"), out.with_name(out.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    eraser.save_pretrained(  # float32 statistics: 18 hookpoints × 17 concepts fit the checkpoints' budget
        staging,
        metrics={"recipe": asdict(cfg), "validation_best": {k: v["best"] for k, v in search.items()}},
        stats_dtype=torch.float32,
    )
    _write_json(
        staging / SEARCH_FILE, {"config": asdict(cfg), "seconds": round(time.time() - t0), "tune": search}
    )
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    log(f"bundle written to {out} in {time.time() - t0:.0f} s")
    return out
