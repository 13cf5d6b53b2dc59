"""The SAeUron bundle of the ShapesCanvas VLM and the unlearning measurements on it.

Everything runs through the VLM adapter's own code paths:

1. ``collect_activations`` over fresh renders (collection seed), each asked one of the three
   questions in turn, one store per hookpoint: the image tokens at the projector output and early
   decoder layers (``hookpoints``), the text tokens (the question, after the image) at the last
   decoder layer (``text_hookpoints``);
2. ``train_sae`` (the core) per hookpoint;
3. ``VLMUnlearner.add_concepts``: one statistics pass per ShapesCanvas value (images that have it,
   asked about the value's own attribute, statistics seed) plus a background set (all of them,
   every question); each value is contrasted with the other values of its attribute;
4. per unlearned value, a search over hookpoint × selection (top-N) × strength on validation
   renders (validation seed, never the test seed): the best mean of forget, retain and in-domain
   answers among the settings that meet the forget / retain targets; the winner is saved as the
   value's selection defaults (the hookpoint choice as ``active`` flags). The best setting among
   the image-token hookpoints alone is recorded too (``search.json``); the benchmark measures both.

Why text tokens: the LM is causal and the image comes first, so the question tokens read the
image inside every decoder layer; by a later layer they hold what the model saw (the shape, the
color) and the image tokens no longer matter. Editing the image tokens must therefore happen
before layer 0 reads them, where shape and style are spread over tokens and shared between values;
at the question tokens of a later layer each value has its own features.

Metrics of one unlearned value v of attribute A, with the ablation installed for every question:

* ``forget``: share of renders showing v whose A-question is no longer answered with v;
* ``retain_same_attribute``: A-accuracy on renders without v;
* ``retain_other_attributes``: accuracy on the other attributes' questions, all renders;
* ``fluency``: share of all answers that are one word of the answer vocabulary.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..sae.files import read_json_object
from ..sae.store import ActivationStore
from ..sae.train import train_sae
from ..vlm.collect import collect_activations
from ..vlm.unlearn import VLMUnlearner
from . import data as sc
from .vlm import (
    ATTRIBUTES,
    DEFAULT_FOLDER,
    Evaluation,
    Renders,
    attribute_of,
    balanced_renders,
    evaluate,
    load_vlm,
    parse_answer,
    prompt,
    random_renders,
)

DEFAULT_BUNDLE = "checkpoints/shapescanvas-vlm-saeuron"
TARGETS: tuple[str, ...] = ("red", "star", "striped")
"""The values the benchmark unlearns: one color, one shape, one style."""
COLLECT_SEED = 11_000
STATS_SEED = 21_000
VALIDATION_SEED = 31_000
TEST_SEED = 41_000


PROJECTOR = "model.multi_modal_projector"
"""The projector output: the image tokens exactly as the LM's first decoder layer reads them."""


def layer_path(i: int) -> str:
    return f"model.language_model.layers.{i}"


HOOKPOINTS: tuple[str, ...] = (PROJECTOR, *(layer_path(i) for i in range(3)))
"""Image-token hookpoints. Layer 0's attention already moves the color from the image tokens into
the question tokens, so edits of decoder-layer outputs cannot remove a color (measured by patching
image tokens: see the README); the projector output is the LM's layer-0 input."""
TEXT_HOOKPOINTS: tuple[str, ...] = (layer_path(3),)
"""Text-token hookpoints: the question tokens of the last decoder layer (a module has one SAE, so a
layer is either an image-token or a text-token hookpoint)."""


def questions(n: int) -> list[str]:
    """``n`` prompts cycling through the three questions (collection and the background set)."""
    return [prompt(ATTRIBUTES[i % len(ATTRIBUTES)]) for i in range(n)]


@dataclass
class BundleConfig:
    """Recipe of the shipped bundle; the defaults reproduce it."""

    out: str = DEFAULT_BUNDLE
    work: str = "runs/shapescanvas-vlm-bundle"
    model: str = DEFAULT_FOLDER
    hookpoints: tuple[str, ...] = HOOKPOINTS
    text_hookpoints: tuple[str, ...] = TEXT_HOOKPOINTS
    collect_images: int = 4000
    expansion_factor: int = 8
    k: int = 8
    sae_epochs: int = 8
    sae_batch_size: int = 1024
    stats_repeats: int = 2
    val_repeats: int = 1
    batch_size: int = 64
    targets: tuple[str, ...] = TARGETS
    top_n: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    strengths: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    forget_target: float = 0.9
    same_target: float = 0.9
    other_target: float = 0.95
    seed: int = 0

    def tokens(self) -> dict[str, str]:
        """Token set per hookpoint: image tokens at ``hookpoints``, text tokens at ``text_hookpoints``."""
        both = set(self.hookpoints) & set(self.text_hookpoints)
        if both:
            raise ValueError(f"{sorted(both)} listed as image- and text-token hookpoints: one SAE per module")
        return {**{p: "auto" for p in self.hookpoints}, **{p: "text" for p in self.text_hookpoints}}


# ----------------------------------------------------------------------------- metrics
@dataclass
class UnlearnedScores:
    """Measurements of one unlearned value (fractions); ``*_rel`` are relative to the base model."""

    forget: float
    retain_same_attribute: float
    retain_other_attributes: float
    fluency: float
    retain_same_rel: float
    retain_other_rel: float
    retain_other_on_target: float
    in_domain: float = float("nan")
    """Share of the target attribute's answers on renders with the value that are still a word of
    that attribute (red → "blue" is; red → "outline" or no word is not)."""

    def meets(self, forget: float, same: float, other: float) -> bool:
        return self.forget >= forget and self.retain_same_rel >= same and self.retain_other_rel >= other


def scores(value: str, base: Evaluation, edited: Evaluation) -> UnlearnedScores:
    """Forget / retain / fluency of ``edited`` (answers with ``value`` unlearned) against ``base``."""
    attr = attribute_of(value)
    has = np.array([v == value for v in edited.labels[attr]])
    said = np.array([parse_answer(a) == value for a in edited.answers[attr]])
    others = [a for a in ATTRIBUTES if a != attr]
    other_now = np.concatenate([edited.correct(a) for a in others])
    other_base = np.concatenate([base.correct(a) for a in others])
    other_on_target = np.concatenate([edited.correct(a)[has] for a in others])
    same_now = edited.accuracy(attr, ~has)
    same_base = base.accuracy(attr, ~has)
    return UnlearnedScores(
        forget=float(1.0 - said[has].mean()),
        retain_same_attribute=same_now,
        retain_other_attributes=float(other_now.mean()),
        fluency=edited.fluency(),
        retain_same_rel=same_now / max(same_base, 1e-9),
        retain_other_rel=float(other_now.mean()) / max(float(other_base.mean()), 1e-9),
        retain_other_on_target=float(other_on_target.mean()),
        in_domain=float(
            np.mean(
                [
                    parse_answer(a) in sc.VOCABULARIES[attr]
                    for a, h in zip(edited.answers[attr], has, strict=True)
                    if h
                ]
            )
        ),
    )


def evaluate_unlearned(
    model: Any, processor: Any, unlearner: VLMUnlearner, value: str, renders: Renders, **options: Any
) -> Evaluation:
    """Every question about ``renders`` with ``value`` unlearned (``options``: ``apply`` overrides)."""
    with unlearner.unlearn(model, [value], **options):
        return evaluate(model, processor, renders)


# ----------------------------------------------------------------------------- building
def collect_and_train(
    model: Any, processor: Any, cfg: BundleConfig, log: Callable[[str], None] = print
) -> VLMUnlearner:
    """Activations at every hookpoint (adapter collection) → one SAE per hookpoint (core trainer)."""
    tokens = cfg.tokens()
    paths = list(tokens)
    images = random_renders(cfg.collect_images, COLLECT_SEED).pil()
    work = Path(cfg.work) / "acts"
    t = time.perf_counter()
    collect_activations(
        model,
        images,
        questions(len(images)),
        processor,
        paths,
        work,
        tokens=tokens,
        batch_size=cfg.batch_size,
        show_progress=False,
    )
    log(f"collected {len(images)} renders at {len(paths)} hookpoints ({time.perf_counter() - t:.0f} s)")
    saes = {}
    for path in paths:
        t = time.perf_counter()
        saes[path] = train_sae(
            ActivationStore(work / path),
            k=cfg.k,
            expansion_factor=cfg.expansion_factor,
            batch_size=cfg.sae_batch_size,
            epochs=cfg.sae_epochs,
            seed=cfg.seed,
            hookpoint=path,
            model_family="llava",
            base_model=Path(cfg.model).name,
            progress=False,
        )
        log(f"SAE {path}: {saes[path].num_latents} latents, k={cfg.k} ({time.perf_counter() - t:.0f} s)")
    return VLMUnlearner.from_saes(saes)


def add_statistics(unlearner: VLMUnlearner, model: Any, processor: Any, cfg: BundleConfig) -> None:
    """Statistics of every ShapesCanvas value (renders that show it, asked about its attribute) and
    the background (all renders, every question). Image tokens come before the question, so the
    question changes only the text-token statistics."""
    renders = balanced_renders(cfg.stats_repeats, STATS_SEED)
    images = renders.pil()
    spec: dict[str | None, tuple[Any, Any, Any]] = {None: (images, questions(len(images)), processor)}
    for attr in ATTRIBUTES:
        for value in sc.VOCABULARIES[attr]:
            idx = [i for i, v in enumerate(renders.labels[attr]) if v == value]
            spec[value] = ([images[i] for i in idx], prompt(attr), processor)
    unlearner.add_concepts(spec, model, tokens=cfg.tokens(), batch_size=cfg.batch_size)
    for attr in ATTRIBUTES:
        for value in sc.VOCABULARIES[attr]:
            contrast = [v for v in sc.VOCABULARIES[attr] if v != value]
            unlearner.set_defaults(value, contrast=contrast)


def search_value(
    unlearner: VLMUnlearner,
    model: Any,
    processor: Any,
    value: str,
    val: Renders,
    base: Evaluation,
    cfg: BundleConfig,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Hookpoint × top-N × strength on validation renders; the best setting that meets the targets
    wins (else the best score). Returns the winner, the winner among image-token hookpoints and
    every tried setting."""
    tried = []
    for path, top_n, strength in itertools.product(unlearner.hookpoints, cfg.top_n, cfg.strengths):
        ev = evaluate_unlearned(
            model, processor, unlearner, value, val, hookpoints=[path], top_n=top_n, strength=strength
        )
        s = scores(value, base, ev)
        ok = s.meets(cfg.forget_target, cfg.same_target, cfg.other_target)
        tried.append({"hookpoint": path, "top_n": top_n, "strength": strength, "meets": ok, **asdict(s)})

    def winner(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return max(rows, key=lambda r: (r["meets"], _objective(r), -r["strength"], -r["top_n"]))

    best = winner(tried)
    best_image = winner([r for r in tried if r["hookpoint"] in cfg.hookpoints])
    for name, row in (("best", best), ("best on image tokens", best_image)):
        log(
            f"{value} {name}: {row['hookpoint']} top_n={row['top_n']} strength={row['strength']} forget "
            f"{row['forget']:.3f} same {row['retain_same_rel']:.3f} other {row['retain_other_rel']:.3f}"
        )
    return {"best": best, "best_image_tokens": best_image, "tried": tried}


def _objective(r: Mapping[str, Any]) -> float:
    """The search objective: mean of forget, the two relative retain accuracies and in-domain
    answers (an unlearned "star" should be answered with another shape, not with nothing)."""
    return float(
        np.mean(
            [r["forget"], min(1.0, r["retain_same_rel"]), min(1.0, r["retain_other_rel"]), r["in_domain"]]
        )
    )


def set_winner(unlearner: VLMUnlearner, value: str, best: Mapping[str, Any]) -> None:
    """Save a search winner as selection defaults; the concept is active at the winning layer only."""
    for path in unlearner.where(value):
        unlearner.set_defaults(
            value,
            hookpoints=[path],
            top_n=int(best["top_n"]),
            percentile=None,
            gamma=-float(best["strength"]),
            active=path == best["hookpoint"],
        )


def build_bundle(cfg: BundleConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Collect, train, statistics, search on validation renders, save ``cfg.out`` (+ ``search.json``)."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model, processor = load_vlm(cfg.model)
    unlearner = collect_and_train(model, processor, cfg, log)
    add_statistics(unlearner, model, processor, cfg)
    log(f"statistics: {len(unlearner.concepts)} concepts ({time.perf_counter() - start:.0f} s so far)")
    val = balanced_renders(cfg.val_repeats, VALIDATION_SEED)
    base = evaluate(model, processor, val)
    search = {}
    for value in cfg.targets:
        search[value] = search_value(unlearner, model, processor, value, val, base, cfg, log)
        set_winner(unlearner, value, search[value]["best"])
    out = Path(cfg.out)
    unlearner.save_pretrained(out, include_prompts=False, card=bundle_card(cfg, search))
    record = {"config": asdict(cfg), "search": search, "build_seconds": time.perf_counter() - start}
    (out / "search.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    log(f"bundle written to {out} ({record['build_seconds'] / 60:.1f} min)")
    return record


def bundle_card(cfg: BundleConfig, search: Mapping[str, Any]) -> str:
    """README.md of the bundle: what it is, how it was made, the chosen defaults."""
    rows = "\n".join(
        f"| {v} | {r['best']['hookpoint']} | {r['best']['top_n']} | {r['best']['strength']} | "
        f"{r['best']['forget']:.3f} | {r['best']['retain_same_rel']:.3f} | "
        f"{r['best']['retain_other_rel']:.3f} |"
        for v, r in search.items()
    )
    return f"""---
library_name: saeuron-plugin
tags: [sparse-autoencoder, concept-unlearning, saeuron, vision-language-model, transformers]
base_model: {Path(cfg.model).name}
---
# SAeUron VLM bundle for the ShapesCanvas VLM

Top-K SAEs (×{cfg.expansion_factor}, k = {cfg.k}) of `{cfg.model}` on the image tokens of
{list(cfg.hookpoints)} (the projector output is the image tokens as decoder layer 0 reads them) and
on the text tokens (the question) of {list(cfg.text_hookpoints)}, with concept statistics for every
ShapesCanvas value (objects, colors, styles; each asked about its own attribute and contrasted with
the other values of that attribute, one τ bucket).

```python
from saeuron_plugin.shapescanvas.vlm import load_vlm, ask
from saeuron_plugin.vlm import VLMUnlearner
model, processor = load_vlm("{cfg.model}")
unlearner = VLMUnlearner.from_pretrained("{cfg.out}")
with unlearner.unlearn(model, ["red"]):
    print(ask(model, processor, [image], "color"))
```

Selection defaults (searched on validation renders, seed {VALIDATION_SEED}; test renders use seed
{TEST_SEED}). Values not listed keep the library defaults and are active at every layer.

| value | hookpoint | top-N | strength | forget (val) | same attribute (rel.) | other attributes (rel.) |
|---|---|---|---|---|---|---|
{rows}

Built by `python examples/build_shapescanvas_vlm_bundle.py`; `search.json` holds every tried setting.
"""


# ----------------------------------------------------------------------------- benchmark
@dataclass
class BenchmarkResult:
    """Base accuracy per attribute and the scores of each unlearned value on the test renders."""

    base: dict[str, float]
    unlearned: dict[str, UnlearnedScores]
    protocol: dict[str, Any] = field(default_factory=dict)
    image_tokens: dict[str, UnlearnedScores] = field(default_factory=dict)
    """The same values with the search's best setting among image-token hookpoints only."""
    image_settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def row(s: UnlearnedScores) -> dict[str, float]:
            return {
                "forget": s.forget,
                "retain_same_attribute": s.retain_same_attribute,
                "retain_other_attributes": s.retain_other_attributes,
                "fluency": s.fluency,
                "in_domain": s.in_domain,
                "retain_same_attribute_rel": s.retain_same_rel,
                "retain_other_attributes_rel": s.retain_other_rel,
                "retain_other_attributes_on_target": s.retain_other_on_target,
            }

        return {
            "base": self.base,
            "unlearned": {v: row(s) for v, s in self.unlearned.items()},
            "unlearned_image_tokens": {
                v: {**row(s), "setting": self.image_settings[v]} for v, s in self.image_tokens.items()
            },
            "protocol": self.protocol,
        }


def run_benchmark(
    model_folder: str = DEFAULT_FOLDER,
    bundle: str = DEFAULT_BUNDLE,
    targets: Sequence[str] = TARGETS,
    repeats: int = 5,
    seed: int = TEST_SEED,
) -> BenchmarkResult:
    """Test renders (every combination ``repeats`` times, ``seed``): base and per-value unlearned scores."""
    model, processor = load_vlm(model_folder)
    unlearner = VLMUnlearner.from_pretrained(bundle)
    test = balanced_renders(repeats, seed)
    base = evaluate(model, processor, test)
    out = {v: scores(v, base, evaluate_unlearned(model, processor, unlearner, v, test)) for v in targets}
    search_file = Path(bundle) / "search.json"
    search = read_json_object(search_file, "bundle search file")["search"] if search_file.is_file() else {}
    settings = {
        v: {k: search[v]["best_image_tokens"][k] for k in ("hookpoint", "top_n", "strength")}
        for v in targets
        if "best_image_tokens" in search.get(v, {})
    }
    image = {
        v: scores(
            v,
            base,
            evaluate_unlearned(
                model,
                processor,
                unlearner,
                v,
                test,
                hookpoints=[c["hookpoint"]],
                top_n=c["top_n"],
                strength=c["strength"],
            ),
        )
        for v, c in settings.items()
    }
    protocol = {
        "test_renders": len(test),
        "test_seed": seed,
        "questions_per_render": len(ATTRIBUTES),
        "base_fluency": base.fluency(),
        "model": model_folder,
        "bundle": bundle,
        "defaults_at": {v: unlearner.active_hookpoints(v) for v in targets},
        "selection": f"the bundle's saved defaults (searched on validation renders, seed {VALIDATION_SEED})",
    }
    return BenchmarkResult({a: base.accuracy(a) for a in ATTRIBUTES}, out, protocol, image, settings)


__all__ = [
    "TARGETS",
    "BenchmarkResult",
    "BundleConfig",
    "UnlearnedScores",
    "add_statistics",
    "build_bundle",
    "collect_and_train",
    "evaluate_unlearned",
    "layer_path",
    "run_benchmark",
    "scores",
    "search_value",
]
