"""Build the SAeUron bundle of the embedded default model, through the adapter's own code paths.

1. ``collect_activations`` over every ShapesCanvas caption (collection seeds) at the hookpoints;
2. ``train_sae`` per hookpoint on the activation store;
3. ``SAeUron.add_concepts``: one statistics pass over every caption (statistics seeds) feeding
   every object, style and color concept, each contrasted with the other concepts of its domain;
4. a per-concept search over hookpoint (or hookpoint set, ``search_sets``, each with its score
   contrast) × percentile × γ on validation seeds (never the test seeds), maximising
   mean(UA, IRA, CRA) as judged by the ShapesCanvas judges; for objects the best four are judged
   again on every caption of the object with fresh seeds (stage 2), which decides. For colours a
   replacement stage follows (``search_targets``): the winner as it is, and with each other colour
   as its target (:attr:`~..sae.spec.ConceptAblation.target`) at each α, ranked by the score, then
   by the share of forget images that are a clean image of another concept, then by the margin.
   The winners are saved as the concept's selection defaults (the hookpoint choice as ``active``
   flags).
5. a robustness stage (``robust_attacks``): the winner at its hookpoints and at every hookpoint
   holding the concept, each attacked with UnlearnDiffAtk (gradients through the edit) on captions,
   targets and seeds of its own (never the robustness benchmark's); the most resistant set whose
   validation score is within ``robust_tolerance`` of the winner's becomes the concept's *robust
   mode* (``robust`` flags; ``unlearn(..., robust=True)``). The default mode stays the winner.

``python examples/build_shapescanvas_bundle.py`` runs it and writes ``checkpoints/shapescanvas-saeuron``.
"""

from __future__ import annotations

import itertools
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
from ..sae.ablation import ConceptAblation
from ..sae.concepts import TauGrid
from ..sae.files import read_json, read_json_object
from ..sae.io import atomic_write, resolve_repo
from ..sae.store import ActivationStore
from ..sae.train import TrainConfig, Trainer
from ..tuning.search import clean_flips, replacement_rank, robust_choice, ua_under_attack
from . import shapescanvas as sc
from .default_model import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate


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
    (the winner at its hookpoints, and at every hookpoint holding the concept); 0: no such stage."""
    robust_iterations: int = 40
    """UnlearnDiffAtk's steps in the robustness stage (its published budget: 40)."""
    robust_tolerance: float = 0.05
    """The robust mode may cost at most this much validation score (mean of UA, IRA, CRA)."""
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


def search_grid(
    sets: Sequence[Sequence[str] | SearchSet], percentiles: Sequence[float], gammas: Sequence[float]
) -> list[Setting]:
    """Every set × its percentiles × its γ (a set's own grid, or the domain's), in that order."""
    grid = []
    for entry in map(search_set, sets):
        pcts = percentiles if entry.percentiles is None else entry.percentiles
        gams = gammas if entry.gammas is None else entry.gammas
        grid += [
            Setting(entry.hookpoints, float(p), float(g), entry.contrast)
            for p, g in itertools.product(pcts, gams)
        ]
    return grid


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


def evaluate_setting(
    eraser: SAeUron,
    pipe: Any,
    judges: Any,
    cfg: BundleConfig,
    name: str,
    validation: tuple[list[sc.BenchmarkPrompt], list[int]],
    setting: Setting,
) -> dict[str, Any]:
    """One trial: the validation images with ``setting`` (hookpoints, percentile, γ, contrast), judged."""
    hps, pct, gamma, contrast, target, scale = Setting(*setting)
    prompts, seeds = validation
    with eraser.unlearn(pipe, [setting_ablation(name, setting)], hookpoints=list(hps)):
        images = generate(pipe, [p.prompt for p in prompts], seeds, cfg.steps, cfg.guidance_scale)
    return {
        "hookpoints": list(hps),
        "percentile": pct,
        "gamma": gamma,
        "contrast": contrast,
        **({"target": target, "target_scale": scale} if target else {}),
        **trial_scores(judges, images, prompts, name),
    }


def trial_scores(
    judges: Any, images: torch.Tensor, prompts: Sequence[sc.BenchmarkPrompt], name: str
) -> dict[str, float]:
    """A search trial's UA / IRA / CRA, its objective ``score`` (their mean), the tie-break
    ``margin`` and ``clean_flip`` (the share of forget images the domain's judge calls another class
    with confidence ≥ 0.9), from one judge pass. Every method's search (ours and the baselines')
    ranks by these: :func:`_rank`, and :func:`replacement_rank` in the replacement stage."""
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


def _key(trial: dict[str, Any]) -> Setting:
    """A saved trial's setting (trials saved before contrasts were searched used the default)."""
    return Setting(
        tuple(trial["hookpoints"]),
        float(trial["percentile"]),
        float(trial["gamma"]),
        trial.get("contrast"),
        trial.get("target"),
        float(trial.get("target_scale", 1.0)),
    )


def _rank(trial: dict[str, Any]) -> tuple[float, float]:
    return trial["score"], trial["margin"]


def replacement_targets(name: str) -> list[str]:
    """The targets a replacement stage tries for ``name``: the other concepts of its domain."""
    return [c for c in sc.VOCABULARIES[concept_domain(name)] if c != name]


def run_trials(
    eraser: SAeUron,
    pipe: Any,
    judges: Any,
    cfg: BundleConfig,
    name: str,
    stage: str,
    settings: Sequence[Setting],
    done: Sequence[dict[str, Any]] = (),
) -> tuple[list[dict[str, Any]], int]:
    """Judge every setting on the ``stage``'s validation set; trials in ``done`` are reused, not rerun.

    Returns the trials in ``settings`` order and how many were reused.
    """
    validation = stage_validation(name, cfg, stage)
    known = {_key(t): t for t in done}
    trials = [
        known[s] if s in known else evaluate_setting(eraser, pipe, judges, cfg, name, validation, s)
        for s in settings
    ]
    return trials, sum(s in known for s in settings)


def set_winner(
    eraser: SAeUron, name: str, trial: dict[str, Any], robust: Sequence[str] | None = None
) -> None:
    """Make ``trial``'s setting ``name``'s defaults at every hookpoint; active only at its hookpoints,
    and in the robust mode at ``robust`` (None: as active).

    The contrast is always written: a re-tuned bundle may hold another winner's contrast.
    """
    contrast = trial.get("contrast") or domain_contrast(name)
    for hp in eraser.hookpoints:
        eraser.set_defaults(
            name,
            hookpoints=[hp],
            percentile=trial["percentile"],
            top_n=None,
            gamma=trial["gamma"],
            contrast=contrast,
            target=trial.get("target"),
            target_scale=float(trial.get("target_scale", 1.0)),
            active=hp in trial["hookpoints"],
            robust=None if robust is None else hp in robust,
        )


def setting_ablation(name: str, setting: Setting) -> ConceptAblation:
    """The ablation spec of a search setting (its hookpoints go to ``unlearn(hookpoints=...)``)."""
    _, pct, gamma, contrast, target, scale = Setting(*setting)
    return ConceptAblation(
        name, percentile=pct, gamma=gamma, contrast=contrast, target=target or "", target_scale=scale
    )


def attack_targets(pipe: Any, name: str, cfg: BundleConfig) -> dict[str, torch.Tensor]:
    """Per robustness-stage caption: latents of the images the untouched model draws for it."""
    from ..attacks import target_latents

    seeds = range(ATTACK_SEED, ATTACK_SEED + ATTACK_IMAGES)
    return {
        caption.format(name): target_latents(pipe, caption.format(name), seeds, cfg.steps, cfg.guidance_scale)
        for caption in ATTACK_CAPTIONS[concept_domain(name)][: cfg.robust_attacks]
    }


def attacked_ua(
    eraser: SAeUron,
    pipe: Any,
    judges: Any,
    cfg: BundleConfig,
    name: str,
    setting: Setting,
    targets: dict[str, torch.Tensor],
) -> dict[str, Any]:
    """UA under UnlearnDiffAtk against ``setting`` (gradients through the edit), mean over the stage's
    captions, each attacked prompt judged on its own seeds; and the prompts the attack typed."""
    with eraser.unlearn(pipe, [setting_ablation(name, setting)], hookpoints=list(setting.hookpoints)):
        return ua_under_attack(
            pipe,
            judges,
            name,
            concept_domain(name),
            targets,
            lambda prompts, seeds: generate(pipe, prompts, seeds, cfg.steps, cfg.guidance_scale),
            iterations=cfg.robust_iterations,
            seed=ATTACK_SEED,
            judge_seeds=[ATTACK_SEED + 1000 + j for j in range(ATTACK_IMAGES)],
        )


def robust_stage(
    eraser: SAeUron,
    pipe: Any,
    judges: Any,
    cfg: BundleConfig,
    name: str,
    best: dict[str, Any],
    stage: str,
    done: Sequence[dict[str, Any]] = (),
) -> tuple[list[dict[str, Any]], int]:
    """The winner at its hookpoints and at every hookpoint holding ``name``, each attacked
    (:func:`attacked_ua`); the wider set is also judged on the validation set of ``stage`` (the one
    that chose the winner). Trials in ``done`` are reused. Returns the trials and how many were reused."""
    plain = _key(best)
    wide = plain._replace(hookpoints=tuple(eraser.where(name)))
    settings = [plain] if set(wide.hookpoints) == set(plain.hookpoints) else [plain, wide]
    known = {_key(t): t for t in done}
    trials, targets = [], None
    for setting in settings:
        if setting in known:
            trials.append(known[setting])
            continue
        targets = targets if targets is not None else attack_targets(pipe, name, cfg)
        scored = (
            best
            if setting == plain
            else evaluate_setting(
                eraser, pipe, judges, cfg, name, stage_validation(name, cfg, stage), setting
            )
        )
        trials.append({**scored, **attacked_ua(eraser, pipe, judges, cfg, name, setting, targets)})
    return trials, sum(s in known for s in settings)


def search_defaults(
    eraser: SAeUron,
    pipe: Any,
    judges: Any,
    cfg: BundleConfig,
    concepts: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    previous: dict[str, Any] | None = None,
    on_concept: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Step 4: per concept, the (hookpoint set, percentile, γ) maximising mean(UA, IRA, CRA) on validation.

    Stage 1 tries the whole grid on ``search_prompts`` validation prompts. Where ``refine_top`` asks
    for it, stage 2 re-judges the best few on ``refine_prompts`` fresh prompts and seeds and picks
    among them there: the stage-1 maximum over many noisy trials overstates its winner (a setting
    that scored 12/12 can be a 70 % setting), and independent data removes that bias.

    ``previous``: an earlier search's ``{concept: {"trials": [...], "refine": [...]}}`` made with the
    same SAEs, statistics and validation sets (see :func:`reusable_search`); its trials are reused
    instead of generated again. ``on_concept(results)`` runs after each concept (to save progress).
    """
    results: dict[str, Any] = {}
    for name in concepts or eraser.concepts:
        domain = concept_domain(name)
        old = (previous or {}).get(name, {})
        sets = _for_domain(cfg.search_sets, domain) or tuple((hp,) for hp in cfg.hookpoints)
        grid = search_grid(
            sets, _for_domain(cfg.search_percentiles, domain), _for_domain(cfg.search_gammas, domain)
        )
        t0 = time.time()
        trials, reused = run_trials(eraser, pipe, judges, cfg, name, "search", grid, old.get("trials", ()))
        best = max(trials, key=_rank)  # the first of equals, in grid order
        decided = "search"  # the validation set that chose the winner (replace shares stage 1's)
        record: dict[str, Any] = {"trials": trials}
        top = _for_domain_int(cfg.refine_top, domain)
        if top > 1:
            finalists = [_key(t) for t in sorted(trials, key=_rank, reverse=True)[:top]]
            record["refine"], again = run_trials(
                eraser, pipe, judges, cfg, name, "refine", finalists, old.get("refine", ())
            )
            reused += again
            best = max(record["refine"], key=_rank)
            decided = "refine"
        scales = _for_domain(cfg.search_targets, domain)
        if scales:
            plain = _key(best)._replace(target=None, target_scale=1.0)
            candidates = [plain] + [
                plain._replace(target=t, target_scale=float(a))
                for t in replacement_targets(name)
                for a in scales
            ]
            record["replace"], again = run_trials(
                eraser, pipe, judges, cfg, name, "replace", candidates, old.get("replace", ())
            )
            reused += again
            best = max(record["replace"], key=replacement_rank)
            decided = "search"
        record["best"] = best
        robust = None
        if cfg.robust_attacks > 0:
            record["robust"], again = robust_stage(
                eraser, pipe, judges, cfg, name, best, decided, old.get("robust", ())
            )
            reused += again
            record["robust_best"] = robust_choice(record["robust"], cfg.robust_tolerance)
            robust = record["robust_best"]["hookpoints"]
        set_winner(eraser, name, best, robust)
        results[name] = record
        chosen = record.get("robust_best")
        log(
            f"{name:10s} best {short_set(best['hookpoints'])} p={best['percentile']} γ={best['gamma']:g}"
            f"{' contrast ' + best['contrast'] if best.get('contrast') else ''}"
            f"{' → ' + best['target'] if best.get('target') else ''}: "
            f"UA {best['ua']:.2f} IRA {best['ira']:.2f} CRA {best['cra']:.2f}"
            f"{' (stage 2)' if 'refine' in record else ''}"
            + (
                f"; robust mode at {len(chosen['hookpoints'])} hookpoints, UA under attack "
                f"{chosen['ua_attack']:.2f} (at its own: {record['robust'][0]['ua_attack']:.2f})"
                if chosen
                else ""
            )
            + f" ({time.time() - t0:.0f} s, {reused} trials reused)"
        )
        if on_concept is not None:
            on_concept(results)
    return results


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


SEARCH_FIELDS = (*TRAINED_FIELDS, "search_prompts")
"""Stage-1 trials of a saved search are reused only if these match (same SAEs, statistics, validation)."""
REFINE_FIELDS = (*SEARCH_FIELDS, "refine_prompts")
ROBUST_FIELDS = (*REFINE_FIELDS, "robust_attacks", "robust_iterations")
SEARCH_PROGRESS = "search-progress.json"
"""Saved in ``work`` after each searched concept; an interrupted build resumes from it."""


def reusable_search(saved: dict[str, Any] | None, cfg: BundleConfig) -> dict[str, Any]:
    """The trials of a saved search (``search.json`` or a build's progress file) that ``cfg`` reproduces.

    Stage-1 trials when steps 1-3 and the validation size match; stage-2 trials when the refinement
    size matches too. Anything else gives ``{}`` (the search runs again).
    """
    if not saved or "config" not in saved:
        return {}
    old = saved["config"]
    if _recipe(old, SEARCH_FIELDS) != _recipe(cfg, SEARCH_FIELDS):
        return {}
    keep_refine = _recipe(old, REFINE_FIELDS) == _recipe(cfg, REFINE_FIELDS)
    out = {}
    for name, r in saved.get("search", {}).items():
        out[name] = {"trials": r.get("trials", [])}
        if keep_refine and "refine" in r:
            out[name]["refine"] = r["refine"]
        if "replace" in r:  # on stage 1's validation set; trials are keyed by their whole setting
            out[name]["replace"] = r["replace"]
        if "robust" in r and _recipe(old, ROBUST_FIELDS) == _recipe(cfg, ROBUST_FIELDS):
            out[name]["robust"] = r["robust"]
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    return read_json_object(path, "bundle search file") if path.is_file() else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (``sae.io``'s temp-file-and-rename): an interrupt never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))


def starting_point(pipe: Any, cfg: BundleConfig, log: Callable[[str], None] = print) -> tuple[SAeUron, dict]:
    """The SAEs and statistics to search on, and the trials that need not run again.

    ``cfg.from_bundle``: an existing bundle and its ``search.json``; otherwise steps 1-3 (or their
    saved result). An interrupted search's progress file in ``work`` is reused on top of either.
    """
    previous: dict[str, Any] = {}
    if cfg.from_bundle:
        source = resolve_repo(cfg.from_bundle)
        eraser = SAeUron.from_pretrained(source)
        previous = reusable_search(_read_json(source / "search.json"), cfg)
        log(
            f"searching on the SAEs and statistics of {cfg.from_bundle} "
            f"({len(previous)} concepts' trials reusable)"
        )
    else:
        eraser = trained_eraser(pipe, cfg, log)
    progress = reusable_search(_read_json(Path(cfg.work) / SEARCH_PROGRESS), cfg)
    if progress:
        log(f"resuming the search: {len(progress)} concepts already searched")
    return eraser, {**previous, **progress}


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
    eraser, previous = starting_point(pipe, cfg, log)
    record = {"config": asdict(cfg)}
    search = search_defaults(
        eraser,
        pipe,
        judges,
        cfg,
        log=log,
        previous=previous,
        on_concept=lambda r: _write_json(Path(cfg.work) / SEARCH_PROGRESS, {**record, "search": r}),
    )
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
    _write_json(staging / "search.json", {**record, "seconds": round(time.time() - t0), "search": search})
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    log(f"bundle written to {out} in {time.time() - t0:.0f} s")
    return out
