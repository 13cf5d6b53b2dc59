"""The shipped SAeUron bundle of the embedded default, the demo, and the scoring it relies on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from saeuron_plugin.eval import bundle as B
from saeuron_plugin.eval import shapescanvas as sc

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "checkpoints" / "shapescanvas-saeuron"
ALL_CONCEPTS = list(sc.CONCEPTS)


class FakeJudges:
    def __init__(self, pred):
        self.pred = pred

    def classify(self, images):
        return self.pred



def test_judge_scores_arithmetic():
    prompts = [
        sc.BenchmarkPrompt("", "star", "solid", "red"),
        sc.BenchmarkPrompt("", "star", "dotted", "blue"),
        sc.BenchmarkPrompt("", "heart", "solid", "red"),
        sc.BenchmarkPrompt("", "circle", "solid", "red"),
    ]
    star, heart = sc.OBJECTS.index("star"), sc.OBJECTS.index("heart")
    solid, dotted = sc.STYLES.index("solid"), sc.STYLES.index("dotted")
    red, blue = sc.COLORS.index("red"), sc.COLORS.index("blue")
    pred = {
        "object": torch.tensor([star, heart, heart, star]),  # 1 of 2 stars erased; 1 of 2 others right
        "style": torch.tensor([solid, dotted, dotted, solid]),  # 3 of 4 right
        "color": torch.tensor([red, blue, red, red]),
    }  # 4 of 4 right
    s = B.judge_scores(FakeJudges(pred), None, prompts, "star")
    assert s == {"ua": 0.5, "ira": 0.5, "cra": 7 / 8}
    probs = {d: torch.nn.functional.one_hot(v, len(sc.VOCABULARIES[d])).float() for d, v in pred.items()}
    assert B.judge_scores(None, None, prompts, "star", probs) == s  # from probabilities: argmax


def test_judge_margin_uses_probabilities():
    """The search's tie-break: mean of (1 − p(concept) on its images, p(true) elsewhere, p(true) across)."""
    prompts = [sc.BenchmarkPrompt("", obj, "solid", "red") for obj in ("star", "heart")]
    star, heart = sc.OBJECTS.index("star"), sc.OBJECTS.index("heart")
    obj = torch.zeros(2, len(sc.OBJECTS))
    obj[0, star], obj[0, heart] = 0.25, 0.75  # the star image: p(star) 0.25
    obj[1, heart] = 0.5  # the heart image: p(heart) 0.5
    style = torch.full((2, len(sc.STYLES)), 0.0)
    style[:, sc.STYLES.index("solid")] = 1.0
    color = torch.full((2, len(sc.COLORS)), 0.0)
    color[:, sc.COLORS.index("red")] = 0.5
    margin = B.judge_margin({"object": obj, "style": style, "color": color}, prompts, "star")
    assert margin == pytest.approx((0.75 + 0.5 + 0.75) / 3)


def test_concept_prompts_and_splits():
    cp = B.concept_prompts()
    assert sorted(cp) == sorted(ALL_CONCEPTS)
    assert len(cp["star"]) == len(sc.STYLES) * len(sc.COLORS) and all("star" in p for p in cp["star"])
    assert len(cp["striped"]) == len(sc.OBJECTS) * len(sc.COLORS)
    pick = B.split_prompts("red", 5, np.random.default_rng(0))
    assert [p.color == "red" for p in pick] == [True] * 5 + [False] * 5
    assert B.concept_domain("striped") == "style"
    with pytest.raises(KeyError, match="not a ShapesCanvas concept"):
        B.concept_domain("van gogh")


def test_shipped_bundle_covers_every_concept_and_ablates():
    from saeuron_plugin import SAeUron

    eraser = SAeUron.from_pretrained(BUNDLE)
    assert sorted(eraser.concepts) == sorted(ALL_CONCEPTS)
    search = json.loads((BUNDLE / "search.json").read_text())["search"]
    for name in ALL_CONCEPTS:  # every concept is active exactly where its validation winner was
        assert sorted(eraser.active_hookpoints(name)) == sorted(search[name]["best"]["hookpoints"]), name
    pipe = B.load_default(str(ROOT / "checkpoints" / "shapescanvas-sd"))
    prompts, seeds = ["a red star in solid style"] * 2, [0, 1]
    from saeuron_plugin.eval.default_model import generate

    plain = generate(pipe, prompts, seeds, steps=4)
    with eraser.unlearn(pipe, "star") as handle:
        edited = generate(pipe, prompts, seeds, steps=4)
        assert handle.ablators[handle.hookpoints[0]].active
    assert not torch.equal(plain, edited)
    assert torch.equal(generate(pipe, prompts, seeds, steps=4), plain)


def test_demo_writes_grid_and_metrics(tmp_path):
    from PIL import Image

    from saeuron_plugin.eval.demo import run_demo

    metrics = run_demo(
        ["star"],
        tmp_path,
        bundle=str(BUNDLE),
        model=str(ROOT / "checkpoints" / "shapescanvas-sd"),
        judges_path=str(ROOT / "checkpoints" / "shapescanvas-judges"),
        prompts_per_set=2,
        steps=3,
        show=2,
        log=lambda *_: None,
    )
    assert Image.open(tmp_path / "grid.png").size[0] > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    star = saved["concepts"]["star"]
    assert star["images"] == 4 and set(star["unlearned"]) == {"ua", "ira", "cra"}
    assert saved == json.loads(json.dumps(metrics))



def test_search_tries_hookpoint_sets_and_saves_the_winner(monkeypatch):
    """``search_sets`` ablates hookpoints together; the winning set becomes the ``active`` defaults."""
    import contextlib

    from saeuron_plugin.diffusion.unlearn import SAeUron

    eraser = SAeUron.from_pretrained(BUNDLE)
    paths = list(eraser.hookpoints)[:3]
    sets = ((paths[0],), (paths[1], paths[2]))
    tried = []

    @contextlib.contextmanager
    def unlearn(pipe, name, hookpoints, percentile, strength):  # records instead of hooking a pipeline
        tried.append((name, hookpoints, -strength))
        yield

    scores = iter([0.2, 0.5, 0.9, 0.1])  # the third trial (the pair, γ = -2) scores best
    monkeypatch.setattr(eraser, "unlearn", unlearn)
    monkeypatch.setattr(B, "generate", lambda *a: None)
    monkeypatch.setattr(B, "judge_scores", lambda *a: dict.fromkeys(("ua", "ira", "cra"), next(scores)))
    monkeypatch.setattr(B, "judge_margin", lambda *a: 0.0)
    judges = type("NoJudges", (), {"probabilities": staticmethod(lambda images: None)})()
    cfg = B.BundleConfig(hookpoints=tuple(paths), search_sets=sets, search_percentiles=(99.0,),
                         search_gammas=(-2.0, -6.0), search_prompts=1)
    out = B.search_defaults(eraser, None, judges, cfg, concepts=["red"], log=lambda _: None)
    assert tried == [("red", [paths[0]], -2.0), ("red", [paths[0]], -6.0),
                     ("red", list(sets[1]), -2.0), ("red", list(sets[1]), -6.0)]
    best = out["red"]["best"]
    assert best["hookpoints"] == list(sets[1]) and best["gamma"] == -2.0
    assert [p for p in eraser.active_hookpoints("red") if p in paths] == list(sets[1])

    # per-domain sets: colors use theirs; a domain without sets tries every hookpoint alone
    tried.clear()
    scores = iter([0.5] * 8)
    cfg.search_sets, cfg.search_gammas = {"color": (tuple(paths[:2]),)}, (-2.0,)
    B.search_defaults(eraser, None, judges, cfg, concepts=["red", "star"], log=lambda _: None)
    assert tried == [("red", paths[:2], -2.0)] + [("star", [p], -2.0) for p in paths]


def test_trained_steps_are_reused_only_for_the_same_recipe(tmp_path, monkeypatch):
    """An interrupted or re-tuned build starts at the search when steps 1-3 ran with the same recipe."""
    from saeuron_plugin.diffusion.unlearn import SAeUron

    runs = []

    def collect_and_train(pipe, cfg, log):
        runs.append(cfg.k)
        return SAeUron.from_pretrained(BUNDLE)

    monkeypatch.setattr(B, "collect_and_train", collect_and_train)
    monkeypatch.setattr(B, "add_statistics", lambda *a, **k: None)
    cfg = B.BundleConfig(work=str(tmp_path))
    first = B.trained_eraser(None, cfg, log=lambda _: None)
    again = B.trained_eraser(None, cfg, log=lambda _: None)
    assert runs == [cfg.k] and list(again.hookpoints) == list(first.hookpoints)
    cfg.search_gammas = (-1.0,)  # the search grid is not part of steps 1-3
    B.trained_eraser(None, cfg, log=lambda _: None)
    cfg.k = 4
    B.trained_eraser(None, cfg, log=lambda _: None)
    assert runs == [8, 4]
