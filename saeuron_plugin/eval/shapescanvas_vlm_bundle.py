"""The SAeUron bundle of the ShapesCanvas VLM and the unlearning measurements on it.

Everything runs through the VLM adapter's own code paths:

1. ``collect_activations`` of the image tokens at LM decoder layers over fresh renders
   (collection seed), one store per layer;
2. ``train_sae`` (the core) per layer;
3. ``VLMUnlearner.add_concepts``: one statistics pass per ShapesCanvas value (images that have it,
   statistics seed) plus a background set (all of them); each value is contrasted with the other
   values of its attribute;
4. per unlearned value, a search over layer × selection (top-N) × strength on validation renders
   (validation seed, never the test seed) that keeps the forget / retain targets; the winner is
   saved as the value's selection defaults (the layer choice as ``active`` flags).

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

from ..sae.store import ActivationStore
from ..sae.train import train_sae
from ..vlm.collect import collect_activations
from ..vlm.unlearn import VLMUnlearner
from . import shapescanvas as sc
from .shapescanvas_vlm import (
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
"""Searched per value. Layer 0's attention already moves the color from the image tokens into the
question tokens, so edits of decoder-layer outputs cannot remove a color (measured by patching image
tokens: see the README); the projector output is the LM's layer-0 input."""


@dataclass
class BundleConfig:
    """Recipe of the shipped bundle; the defaults reproduce it."""

    out: str = DEFAULT_BUNDLE
    work: str = "runs/shapescanvas-vlm-bundle"
    model: str = DEFAULT_FOLDER
    hookpoints: tuple[str, ...] = HOOKPOINTS
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
    strengths: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    forget_target: float = 0.9
    same_target: float = 0.9
    other_target: float = 0.95
    seed: int = 0


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

    def meets(self, forget: float, same: float, other: float) -> bool:
        return self.forget >= forget and self.retain_same_rel >= same and self.retain_other_rel >= other

    def score(self) -> float:
        """Mean of forget and the two relative retain accuracies (the search objective)."""
        return float(np.mean([self.forget, min(1.0, self.retain_same_rel), min(1.0, self.retain_other_rel)]))


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
    )


def evaluate_unlearned(
    model: Any, processor: Any, unlearner: VLMUnlearner, value: str, renders: Renders, **options: Any
) -> Evaluation:
    """Every question about ``renders`` with ``value`` unlearned (``options``: ``apply`` overrides)."""
    with unlearner.unlearn(model, [value], **options):
        return evaluate(model, processor, renders)


# ----------------------------------------------------------------------------- building
def collect_and_train(model: Any, processor: Any, cfg: BundleConfig,
                      log: Callable[[str], None] = print) -> VLMUnlearner:
    """Image-token activations at every hookpoint (adapter collection) → one SAE per layer (core trainer)."""
    paths = list(cfg.hookpoints)
    images = random_renders(cfg.collect_images, COLLECT_SEED).pil()
    work = Path(cfg.work) / "acts"
    t = time.perf_counter()
    collect_activations(model, images, prompt("color"), processor, paths, work, batch_size=cfg.batch_size,
                        show_progress=False)
    log(f"collected {len(images)} renders at {len(paths)} hookpoints ({time.perf_counter() - t:.0f} s)")
    saes = {}
    for path in paths:
        t = time.perf_counter()
        saes[path] = train_sae(
            ActivationStore(work / path), k=cfg.k, expansion_factor=cfg.expansion_factor,
            batch_size=cfg.sae_batch_size, epochs=cfg.sae_epochs, seed=cfg.seed, hookpoint=path,
            model_family="llava", base_model=Path(cfg.model).name, progress=False,
        )
        log(f"SAE {path}: {saes[path].num_latents} latents, k={cfg.k} ({time.perf_counter() - t:.0f} s)")
    return VLMUnlearner.from_saes(saes)  # image tokens at decoder layers, every token at the projector


def add_statistics(unlearner: VLMUnlearner, model: Any, processor: Any, cfg: BundleConfig) -> None:
    """Statistics of every ShapesCanvas value (renders that show it) and the background (all renders)."""
    renders = balanced_renders(cfg.stats_repeats, STATS_SEED)
    images = renders.pil()
    q = prompt("color")
    spec: dict[str | None, tuple[Any, Any, Any]] = {None: (images, q, processor)}
    for attr in ATTRIBUTES:
        for value in sc.VOCABULARIES[attr]:
            idx = [i for i, v in enumerate(renders.labels[attr]) if v == value]
            spec[value] = ([images[i] for i in idx], q, processor)
    unlearner.add_concepts(spec, model, batch_size=cfg.batch_size)
    for attr in ATTRIBUTES:
        for value in sc.VOCABULARIES[attr]:
            contrast = [v for v in sc.VOCABULARIES[attr] if v != value]
            unlearner.set_defaults(value, contrast=contrast)


def search_value(
    unlearner: VLMUnlearner, model: Any, processor: Any, value: str, val: Renders, base: Evaluation,
    cfg: BundleConfig, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Layer × top-N × strength on validation renders; the best setting that meets the targets wins
    (else the best score). Returns the winner and every tried setting."""
    tried = []
    for path, top_n, strength in itertools.product(unlearner.hookpoints, cfg.top_n, cfg.strengths):
        ev = evaluate_unlearned(model, processor, unlearner, value, val, hookpoints=[path], top_n=top_n,
                                strength=strength)
        s = scores(value, base, ev)
        ok = s.meets(cfg.forget_target, cfg.same_target, cfg.other_target)
        tried.append({"hookpoint": path, "top_n": top_n, "strength": strength, "meets": ok, **asdict(s)})
    best = max(tried, key=lambda r: (r["meets"], _objective(r), -r["strength"], -r["top_n"]))
    log(f"{value}: {best['hookpoint']} top_n={best['top_n']} strength={best['strength']} "
        f"forget {best['forget']:.3f} same {best['retain_same_rel']:.3f} other {best['retain_other_rel']:.3f}"
        f" ({len(tried)} settings)")
    return {"best": best, "tried": tried}


def _objective(r: Mapping[str, Any]) -> float:
    return float(np.mean([r["forget"], min(1.0, r["retain_same_rel"]), min(1.0, r["retain_other_rel"])]))


def set_winner(unlearner: VLMUnlearner, value: str, best: Mapping[str, Any]) -> None:
    """Save a search winner as selection defaults; the concept is active at the winning layer only."""
    for path in unlearner.where(value):
        unlearner.set_defaults(value, hookpoints=[path], top_n=int(best["top_n"]), percentile=None,
                               gamma=-float(best["strength"]), active=path == best["hookpoint"])


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

Top-K SAEs (×{cfg.expansion_factor}, k = {cfg.k}) on the image tokens of
{list(cfg.hookpoints)} of `{cfg.model}` (the projector output is the image tokens as decoder layer 0
reads them), with concept statistics for every ShapesCanvas value (objects, colors,
styles; each contrasted with the other values of its attribute, one τ bucket).

```python
from saeuron_plugin.eval.shapescanvas_vlm import load_vlm, ask
from saeuron_plugin.vlm import VLMUnlearner
model, processor = load_vlm("{cfg.model}")
unlearner = VLMUnlearner.from_pretrained("{cfg.out}")
with unlearner.unlearn(model, ["red"]):
    print(ask(model, processor, [image], "color"))
```

Selection defaults (searched on validation renders, seed {VALIDATION_SEED}; test renders use seed
{TEST_SEED}). Values not listed keep the library defaults and are active at every layer.

| value | layer | top-N | strength | forget (val) | same attribute (rel.) | other attributes (rel.) |
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

    def to_json(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "unlearned": {
                v: {
                    "forget": s.forget,
                    "retain_same_attribute": s.retain_same_attribute,
                    "retain_other_attributes": s.retain_other_attributes,
                    "fluency": s.fluency,
                    "retain_same_attribute_rel": s.retain_same_rel,
                    "retain_other_attributes_rel": s.retain_other_rel,
                    "retain_other_attributes_on_target": s.retain_other_on_target,
                }
                for v, s in self.unlearned.items()
            },
            "protocol": self.protocol,
        }


def run_benchmark(
    model_folder: str = DEFAULT_FOLDER, bundle: str = DEFAULT_BUNDLE, targets: Sequence[str] = TARGETS,
    repeats: int = 5, seed: int = TEST_SEED,
) -> BenchmarkResult:
    """Test renders (every combination ``repeats`` times, ``seed``): base and per-value unlearned scores."""
    model, processor = load_vlm(model_folder)
    unlearner = VLMUnlearner.from_pretrained(bundle)
    test = balanced_renders(repeats, seed)
    base = evaluate(model, processor, test)
    out = {v: scores(v, base, evaluate_unlearned(model, processor, unlearner, v, test)) for v in targets}
    protocol = {
        "test_renders": len(test),
        "test_seed": seed,
        "questions_per_render": len(ATTRIBUTES),
        "base_fluency": base.fluency(),
        "model": model_folder,
        "bundle": bundle,
        "selection": "the bundle's saved defaults (searched on validation renders, seed "
                     f"{VALIDATION_SEED})",
    }
    return BenchmarkResult({a: base.accuracy(a) for a in ATTRIBUTES}, out, protocol)


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
