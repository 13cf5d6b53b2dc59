"""The shipped SAeUron bundle of the embedded default, the demo, and the scoring it relies on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from saeuron_plugin.eval import shapescanvas as sc
from saeuron_plugin.eval import shapescanvas_build as B

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
BUNDLE = ROOT / "checkpoints" / "shapescanvas-saeuron"
ALL_CONCEPTS = list(sc.CONCEPTS)


class FakeJudges:
    """Judges that answer fixed decisions (``pred``) or probabilities (``probs``)."""

    def __init__(self, pred=None, probs=None):
        self.pred, self.probs = pred, probs

    def classify(self, images):
        return self.pred if self.probs is None else {d: p.argmax(-1) for d, p in self.probs.items()}

    def probabilities(self, images):
        return self.probs


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


def test_quality_scores_count_clean_and_in_domain_images():
    """clean: some class of the domain at >= 0.9; in-domain: another class of it at >= 0.9 (#22)."""
    from saeuron_plugin.eval.unlearning import scores

    prompts = [sc.BenchmarkPrompt("", o, "solid", "red") for o in ("star", "star", "star", "heart")]
    n = len(sc.OBJECTS)
    star, heart = sc.OBJECTS.index("star"), sc.OBJECTS.index("heart")

    def row(index, p):
        out = torch.full((n,), (1 - p) / (n - 1))
        out[index] = p
        return out

    obj = torch.stack([row(heart, 0.95), row(star, 0.99), row(heart, 0.5), row(heart, 0.97)])
    probs = {
        d: torch.nn.functional.one_hot(torch.zeros(4, dtype=torch.long), len(v)).float()
        for d, v in sc.VOCABULARIES.items()
    }
    probs["object"] = obj
    s = scores(FakeJudges(probs=probs), None, prompts, "star")
    assert s["ua"] == pytest.approx(2 / 3)  # star images 0 and 2 are not called star
    assert s["clean_forget"] == pytest.approx(2 / 3)  # image 2 (0.5) is debris
    assert s["in_domain"] == pytest.approx(1 / 3)  # only image 0 is confidently another shape
    assert s["clean_retain"] == 1.0


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
    def unlearn(pipe, concepts, hookpoints):  # records instead of hooking a pipeline
        (ablation,) = concepts
        assert ablation.percentile == 99.0 and ablation.contrast is None  # the concept's own contrast
        tried.append((ablation.concept, hookpoints, ablation.gamma))
        yield

    scores = iter([0.2, 0.5, 0.9, 0.1])  # the third trial (the pair, γ = -2) scores best
    monkeypatch.setattr(eraser, "unlearn", unlearn)
    monkeypatch.setattr(B, "generate", lambda *a: None)
    monkeypatch.setattr(B, "judge_scores", lambda *a: dict.fromkeys(("ua", "ira", "cra"), next(scores)))
    monkeypatch.setattr(B, "judge_margin", lambda *a: 0.0)
    monkeypatch.setattr(B, "clean_flip", lambda *a: 0.0)
    judges = type("NoJudges", (), {"probabilities": staticmethod(lambda images: None)})()
    cfg = B.BundleConfig(
        hookpoints=tuple(paths),
        search_sets=sets,
        search_percentiles=(99.0,),
        search_gammas=(-2.0, -6.0),
        search_prompts=1,
        refine_top=0,
        search_targets={},
        robust_attacks=0,
    )
    out = B.search_defaults(eraser, None, judges, cfg, concepts=["red"], log=lambda _: None)
    assert tried == [
        ("red", [paths[0]], -2.0),
        ("red", [paths[0]], -6.0),
        ("red", list(sets[1]), -2.0),
        ("red", list(sets[1]), -6.0),
    ]
    best = out["red"]["best"]
    assert best["hookpoints"] == list(sets[1]) and best["gamma"] == -2.0
    assert [p for p in eraser.active_hookpoints("red") if p in paths] == list(sets[1])

    # per-domain sets: colors use theirs; a domain without sets tries every hookpoint alone
    tried.clear()
    scores = iter([0.5] * 8)
    cfg.search_sets, cfg.search_gammas = {"color": (tuple(paths[:2]),)}, (-2.0,)
    B.search_defaults(eraser, None, judges, cfg, concepts=["red", "star"], log=lambda _: None)
    assert tried == [("red", paths[:2], -2.0)] + [("star", [p], -2.0) for p in paths]


def test_a_search_set_brings_its_own_contrast_and_grid(monkeypatch):
    """A ``SearchSet`` is tried with its contrast and grid; the winner's contrast becomes the default."""
    from saeuron_plugin.diffusion.unlearn import SAeUron

    eraser = SAeUron.from_pretrained(BUNDLE)
    a, b = list(eraser.hookpoints)[:2]
    calls = _fake_trials(monkeypatch, lambda _, s: 0.9 if (s.contrast, s.gamma) == ("worst", -1.0) else 0.5)
    sets = ((a,), B.SearchSet((b,), contrast="worst", percentiles=(99.9,), gammas=(-1.0, -2.0)))
    cfg = B.BundleConfig(
        hookpoints=(a, b),
        search_sets={"object": sets},
        search_percentiles=(99.0,),
        search_gammas=(-6.0,),
        refine_top=0,
        robust_attacks=0,
    )
    out = B.search_defaults(eraser, None, None, cfg, concepts=["cross"], log=lambda _: None)
    assert [s for _, s in calls] == [
        B.Setting((a,), 99.0, -6.0, None),
        B.Setting((b,), 99.9, -1.0, "worst"),
        B.Setting((b,), 99.9, -2.0, "worst"),
    ]
    assert out["cross"]["best"]["contrast"] == "worst"
    assert eraser.active_hookpoints("cross") == [b]
    assert eraser.hookpoints[b].library.selection_defaults("cross").contrast == "worst"

    # a re-tune whose winner has no contrast of its own restores the domain's contrast, and a trial
    # saved before contrasts were searched counts as the default contrast (not rerun)
    old = {"trials": [dict(t) for t in out["cross"]["trials"]]}
    old["trials"][0].pop("contrast")
    old["trials"][0]["score"] = 1.0
    calls.clear()
    B.search_defaults(
        eraser, None, None, cfg, concepts=["cross"], log=lambda _: None, previous={"cross": old}
    )
    assert calls == [] and eraser.active_hookpoints("cross") == [a]
    assert eraser.hookpoints[b].library.selection_defaults("cross").contrast == B.domain_contrast("cross")
    with pytest.raises(TypeError, match="sequence of hookpoints"):
        B.search_grid([a], (99.0,), (-2.0,))


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


def _fake_trials(monkeypatch, score_of, clean_of=None, attack_of=None):
    """Replace image generation + judging by ``score_of(stage, setting)`` and the robustness stage's
    attacks by ``attack_of(setting)`` (UA under attack; default 0); returns the calls made."""
    calls = []

    def attacked(eraser, pipe, judges, cfg, name, setting, targets):
        calls.append(("attack", setting))
        return {"ua_attack": attack_of(setting) if attack_of else 0.0, "attack_prompts": ["p"]}

    monkeypatch.setattr(B, "attack_targets", lambda *a: {})
    monkeypatch.setattr(B, "attacked_ua", attacked)

    def evaluate(eraser, pipe, judges, cfg, name, validation, setting):
        stage = "search" if validation[1][0] < B.REFINE_SEED else "refine"
        calls.append((stage, setting))
        score = score_of(stage, setting)
        setting = B.Setting(*setting)
        return {
            "hookpoints": list(setting.hookpoints),
            "percentile": setting.percentile,
            "gamma": setting.gamma,
            "contrast": setting.contrast,
            **({"target": setting.target, "target_scale": setting.target_scale} if setting.target else {}),
            "ua": score,
            "ira": score,
            "cra": score,
            "score": score,
            "margin": 0.0,
            "clean_flip": clean_of(setting) if clean_of else 0.0,
        }

    monkeypatch.setattr(B, "evaluate_setting", evaluate)
    return calls


def test_refinement_picks_among_the_finalists_on_fresh_validation(monkeypatch):
    """Stage 2 re-judges the best ``refine_top`` stage-1 settings on other seeds and decides there."""
    from saeuron_plugin.diffusion.unlearn import SAeUron

    eraser = SAeUron.from_pretrained(BUNDLE)
    a, b = B.BLOCKS_UP1
    stage1 = {-2.0: 1.0, -6.0: 0.9, -20.0: 0.1}  # γ -2 looks perfect on the small validation set ...
    stage2 = {-2.0: 0.7, -6.0: 0.95}  # ... but γ -6 is better on the larger one
    calls = _fake_trials(monkeypatch, lambda stage, s: (stage1 if stage == "search" else stage2)[s[2]])
    cfg = B.BundleConfig(
        search_sets={"object": ((a,),)},
        search_percentiles=(99.0,),
        search_gammas=(-2.0, -6.0, -20.0),
        refine_top={"object": 2},
        search_targets={},
        robust_attacks=0,
    )
    out = B.search_defaults(eraser, None, None, cfg, concepts=["cross", "red"], log=lambda _: None)
    refined = [c for c in calls if c[0] == "refine"]
    assert refined == [("refine", B.Setting((a,), 99.0, -2.0)), ("refine", B.Setting((a,), 99.0, -6.0))]
    assert out["cross"]["best"]["gamma"] == -6.0 and len(out["cross"]["refine"]) == 2
    assert eraser.active_hookpoints("cross") == [a] and b not in eraser.active_hookpoints("cross")
    assert "refine" not in out["red"] and out["red"]["best"]["gamma"] == -2.0  # colours: stage 1 decides
    prompts, seeds = B.validation_set("cross", cfg.refine_prompts, cfg, "refine")
    assert sum(p.object == "cross" for p in prompts) == len(sc.STYLES) * len(sc.COLORS)  # every caption
    assert min(seeds) >= B.REFINE_SEED and max(seeds) < 50_000  # never the test seeds


def test_search_reuses_saved_trials_and_resumes(monkeypatch, tmp_path):
    """Trials of a matching saved search are not rerun; a changed validation size reruns them."""
    from saeuron_plugin.diffusion.unlearn import SAeUron

    eraser = SAeUron.from_pretrained(BUNDLE)
    a = B.BLOCKS_UP1[0]
    calls = _fake_trials(monkeypatch, lambda stage, s: 0.5)
    cfg = B.BundleConfig(
        search_sets={"object": ((a,),)},
        search_percentiles=(99.0,),
        search_gammas=(-2.0, -6.0),
        refine_top={"object": 2},
        robust_attacks=0,
    )
    saved_progress = []
    first = B.search_defaults(
        eraser,
        None,
        None,
        cfg,
        concepts=["cross"],
        log=lambda _: None,
        on_concept=lambda r: saved_progress.append(json.loads(json.dumps(r))),
    )
    assert len(calls) == 4 and saved_progress[-1]["cross"]["best"] == first["cross"]["best"]
    saved = {"config": json.loads(json.dumps(B.asdict(cfg))), "search": saved_progress[-1]}

    calls.clear()
    cfg.search_gammas = (-2.0, -6.0, -1.0)  # a wider grid: only the new point runs (ties: grid order)
    B.search_defaults(
        eraser,
        None,
        None,
        cfg,
        concepts=["cross"],
        log=lambda _: None,
        previous=B.reusable_search(saved, cfg),
    )
    assert calls == [("search", B.Setting((a,), 99.0, -1.0))]

    cfg.refine_prompts = 10  # stage-2 trials belong to the old refinement size; stage 1 still matches
    assert "refine" not in B.reusable_search(saved, cfg)["cross"]
    cfg.search_prompts = 6
    assert B.reusable_search(saved, cfg) == {}

    # the build resumes from its progress file on top of the bundle it re-tunes
    cfg = B.BundleConfig(work=str(tmp_path), from_bundle=str(BUNDLE))
    progress = {"config": B.asdict(cfg), "search": {"cross": {"trials": []}}}
    B._write_json(tmp_path / B.SEARCH_PROGRESS, progress)
    start, previous = B.starting_point(None, cfg, log=lambda _: None)
    assert sorted(start.concepts) == sorted(ALL_CONCEPTS)
    assert previous["cross"] == {"trials": []} and previous["red"]["trials"]  # progress overrides search.json


def test_colours_get_a_replacement_stage_ranked_by_clean_flips(monkeypatch):
    """The winner, alone and with each other colour as its target at each α, judged on stage 1's
    set; equal scores are separated by clean flips, and the chosen target becomes the default."""
    from saeuron_plugin.diffusion.unlearn import SAeUron

    eraser = SAeUron.from_pretrained(BUNDLE)
    a = B.ATTN2_UP3
    clean = {None: 0.5, ("green", 1.0): 1.0, ("blue", 2.0): 0.9}
    calls = _fake_trials(
        monkeypatch,
        lambda stage, s: 0.5 if s.target == "purple" else 1.0,  # equal scores but one target
        lambda s: clean.get(s.target and (s.target, s.target_scale), 0.0),
    )
    cfg = B.BundleConfig(
        search_sets={"color": (a,)},
        search_percentiles=(99.0,),
        search_gammas=(-2.0,),
        search_targets={"color": (1.0, 2.0)},
        robust_attacks=0,
    )
    out = B.search_defaults(eraser, None, None, cfg, concepts=["red"], log=lambda _: None)
    replaced = [s for stage, s in calls][1:]
    assert replaced[0] == B.Setting(a, 99.0, -2.0) and len(replaced) == 1 + 5 * 2
    assert {s.target for s in replaced[1:]} == {"green", "blue", "yellow", "purple", "orange"}
    assert all(stage == "search" for stage, _ in calls)  # stage 1's validation set
    best = out["red"]["best"]
    assert (best["target"], best["target_scale"]) == ("green", 1.0)
    defaults = eraser.hookpoints[a[0]].library.selection_defaults("red")
    assert (defaults.target, defaults.target_scale) == ("green", 1.0)
    # a re-tune reuses the stage, and a winner without a target clears a saved one
    calls.clear()
    clean[None] = 1.0
    previous = {"red": {"trials": out["red"]["trials"], "replace": out["red"]["replace"][1:]}}
    out = B.search_defaults(eraser, None, None, cfg, concepts=["red"], log=lambda _: None, previous=previous)
    assert [s for _, s in calls] == [B.Setting(a, 99.0, -2.0)] and "target" not in out["red"]["best"]
    assert eraser.hookpoints[a[0]].library.selection_defaults("red").target is None


def test_the_robustness_stage_widens_the_hookpoints_only_within_the_tolerance(monkeypatch):
    """The winner is attacked at its hookpoints and at every hookpoint holding the concept; the wider
    set becomes the robust mode when it resists better and costs ≤ the tolerance in validation score.
    The default mode keeps the winner's hookpoints; saved robust trials are reused."""
    from saeuron_plugin.diffusion.unlearn import SAeUron

    eraser = SAeUron.from_pretrained(BUNDLE)
    a = B.BLOCKS_UP1[0]
    everywhere = tuple(eraser.where("cross"))
    wide_score = {"value": 0.97}
    calls = _fake_trials(
        monkeypatch,
        lambda stage, s: wide_score["value"] if len(s.hookpoints) > 1 else 1.0,
        attack_of=lambda s: 0.9 if len(s.hookpoints) > 1 else 0.3,
    )
    cfg = B.BundleConfig(
        search_sets={"object": ((a,),)},
        search_percentiles=(99.0,),
        search_gammas=(-2.0,),
        refine_top=0,
        robust_tolerance=0.05,
    )
    out = B.search_defaults(eraser, None, None, cfg, concepts=["cross"], log=lambda _: None)
    wide = B.Setting(everywhere, 99.0, -2.0)
    assert calls == [
        ("search", B.Setting((a,), 99.0, -2.0)),
        ("attack", B.Setting((a,), 99.0, -2.0)),
        ("search", wide),  # judged on the validation set that chose the winner
        ("attack", wide),
    ]
    assert out["cross"]["robust_best"]["hookpoints"] == list(everywhere)
    assert eraser.active_hookpoints("cross") == [a]  # the default mode is unchanged
    assert eraser.active_hookpoints("cross", robust=True) == list(everywhere)
    handle = eraser.plan("cross", robust=True)
    assert sorted(handle) == sorted(everywhere) and list(eraser.plan("cross")) == [a]

    # too costly: the robust mode stays at the winner's hookpoints; the saved trials are not rerun
    calls.clear()
    previous = {"cross": {"trials": out["cross"]["trials"]}}
    wide_score["value"] = 0.9
    out = B.search_defaults(
        eraser, None, None, cfg, concepts=["cross"], log=lambda _: None, previous=previous
    )
    assert [c[0] for c in calls] == ["attack", "search", "attack"]
    assert eraser.active_hookpoints("cross", robust=True) == [a]
    calls.clear()
    previous["cross"]["robust"] = out["cross"]["robust"]
    B.search_defaults(eraser, None, None, cfg, concepts=["cross"], log=lambda _: None, previous=previous)
    assert calls == []
    saved = {"config": json.loads(json.dumps(B.asdict(cfg))), "search": out}
    assert "robust" in B.reusable_search(saved, cfg)["cross"]
    cfg.robust_iterations = 10  # another attack budget: the robust trials run again
    assert "robust" not in B.reusable_search(saved, cfg)["cross"]


def test_the_robustness_stage_attacks_through_the_edit_on_the_shipped_model():
    """``attacked_ua`` end to end at a tiny budget: UnlearnDiffAtk against the setting, its typed
    prompts judged; the captions are never the robustness benchmark's."""
    from saeuron_plugin.diffusion.unlearn import SAeUron
    from saeuron_plugin.eval.judges import Judges

    eraser = SAeUron.from_pretrained(BUNDLE)
    pipe = B.load_default()
    cfg = B.BundleConfig(steps=3, robust_attacks=1, robust_iterations=2)
    targets = B.attack_targets(pipe, "red", cfg)
    assert (
        list(targets) == ["a red circle in dotted style"]
        and targets["a red circle in dotted style"].shape[0] == 8
    )
    setting = B.Setting(tuple(eraser.active_hookpoints("red")), 99.5, -2.0)
    judges = Judges.from_pretrained(ROOT / "checkpoints" / "shapescanvas-judges")
    out = B.attacked_ua(eraser, pipe, judges, cfg, "red", setting, targets)
    assert 0.0 <= out["ua_attack"] <= 1.0
    assert len(out["attack_prompts"]) == 1 and out["attack_prompts"][0].endswith(
        "a red circle in dotted style"
    )
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import robustness
    finally:
        sys.path.pop(0)
    benchmark = set(robustness.CAPTION.values())
    assert len(benchmark) == 3 and not benchmark & {c for cs in B.ATTACK_CAPTIONS.values() for c in cs}
