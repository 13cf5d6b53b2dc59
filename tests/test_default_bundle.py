"""The shipped SAeUron bundle of the embedded default, the demo, and the scoring it relies on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from saeuron_plugin.shapescanvas import build as B
from saeuron_plugin.shapescanvas import data as sc

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
    from saeuron_plugin.benchmark.unlearning import scores

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
    search = json.loads((BUNDLE / "search.json").read_text())["tune"]
    for name in ALL_CONCEPTS:  # every concept is active exactly where its validation winner was
        assert sorted(eraser.active_hookpoints(name)) == sorted(search[name]["best"]["hookpoints"]), name
    pipe = B.load_default(str(ROOT / "checkpoints" / "shapescanvas-sd"))
    prompts, seeds = ["a red star in solid style"] * 2, [0, 1]
    from saeuron_plugin.shapescanvas.model import generate

    plain = generate(pipe, prompts, seeds, steps=4)
    with eraser.unlearn(pipe, "star") as handle:
        edited = generate(pipe, prompts, seeds, steps=4)
        assert handle.ablators[handle.hookpoints[0]].active
    assert not torch.equal(plain, edited)
    assert torch.equal(generate(pipe, prompts, seeds, steps=4), plain)


def test_demo_writes_grid_and_metrics(tmp_path):
    from PIL import Image

    from saeuron_plugin.shapescanvas.demo import run_demo

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


def test_the_search_space_of_each_domain_is_the_bundle_recipe():
    """``make bundle``'s grids as the generic tuner's search spaces: per-domain sets (a ``SearchSet``
    brings its contrast and grid), the domain contrast otherwise, stage 2 for objects only, the
    replacement stage for colours, the robustness stage everywhere."""
    cfg = B.BundleConfig()
    obj = B.search_space("star", cfg)
    assert obj.contrasts == ("domain",) and obj.refine_top == 4 and obj.target_scales == ()
    assert obj.hookpoint_sets[:2] == [{"hookpoints": [B.BLOCKS_UP1[0]]}, {"hookpoints": [B.BLOCKS_UP1[1]]}]
    assert obj.hookpoint_sets[3] == {
        "hookpoints": list(B.OBJECT_ATTN2.hookpoints),
        "contrasts": ["worst"],
        "percentiles": [99.5, 99.8, 99.9],
        "gammas": [-1.0, -2.0, -6.0],
    }
    held = list(B.HOOKPOINTS)
    settings = obj.settings(held)
    assert len(settings) == 3 * 5 * 4 + 3 * 3  # the 69 object settings of the shipped search
    assert {s["contrast"] for s in settings} == {"domain", "worst"}
    colour = B.search_space("red", cfg)
    assert colour.refine_top == 0 and colour.target_scales == (1.0, 2.0) and colour.robust_attacks == 3
    assert len(colour.settings(held)) == 3 * 3 * 2
    style = B.search_space("striped", cfg)
    assert style.refine_top == 0 and style.target_scales == ()
    # a domain without sets of its own tries every hookpoint alone
    alone = B.search_space("red", B.BundleConfig(hookpoints=held[:2], search_sets={"object": ()}))
    assert alone.hookpoint_sets == [{"hookpoints": [held[0]]}, {"hookpoints": [held[1]]}]


def test_tune_tasks_judge_labelled_validation_sets():
    """Stage 1 and stage 2 score against the captions' true labels, on validation seeds only; the
    robustness stage attacks captions of its own, never the robustness benchmark's."""
    cfg = B.BundleConfig()
    task = B.tune_task("cross", cfg)
    stage1, stage2 = task.stage_set("trials"), task.stage_set("refine")
    prompts, seeds = B.validation_set("cross", cfg.search_prompts, cfg, "search")
    assert stage1.prompts == [p.prompt for p in prompts] and stage1.seeds == seeds
    assert stage1.n_forget == 12 and all("cross" in p for p in stage1.prompts[:12])
    assert not any("cross" in p for p in stage1.prompts[12:])
    assert stage1.labels["object"] == [sc.OBJECTS.index(p.object) for p in prompts]
    assert task.stage_set("replace") == stage1  # the replacement stage judges stage 1's images
    assert stage2.n_forget == len(sc.STYLES) * len(sc.COLORS)  # every caption of the object
    assert min(stage2.seeds) >= B.REFINE_SEED and max(stage1.seeds + stage2.seeds) < 50_000  # not test
    assert task.attack_prompts[0] == "a green cross in striped style" and task.robust_seed == B.ATTACK_SEED
    from saeuron_plugin.benchmark import robustness

    benchmark = set(robustness.CAPTION.values())
    assert len(benchmark) == 3 and not benchmark & {c for cs in B.ATTACK_CAPTIONS.values() for c in cs}


def test_the_shipped_search_is_reproduced_from_its_saved_trials(tmp_path, monkeypatch):
    """``make bundle --from-bundle`` on the shipped bundle: the generic tuner reuses every saved trial
    (nothing is generated or attacked) and writes the shipped defaults again, both modes."""
    from saeuron_plugin import attacks
    from saeuron_plugin.diffusion.unlearn import SAeUron
    from saeuron_plugin.tuning import search

    monkeypatch.setattr(search, "generate", lambda *a, **k: pytest.fail("generated"))
    monkeypatch.setattr(attacks, "target_latents", lambda *a, **k: pytest.fail("attacked"))
    shipped = SAeUron.from_pretrained(BUNDLE)
    cfg = B.BundleConfig(work=str(tmp_path), from_bundle=str(BUNDLE))
    eraser, source = B.starting_point(None, cfg, log=lambda _: None)
    assert source == B._recipe(cfg, B.TRAINED_FIELDS)  # the shipped bundle was built with the defaults
    for name in ALL_CONCEPTS:  # start from other defaults, so the search must write them
        eraser.set_defaults(name, percentile=90.0, gamma=-0.5, active=True, robust=True)
    judges = type("Labels", (), {"labels": {d: list(v) for d, v in sc.VOCABULARIES.items()}})()
    out = B.search_defaults(eraser, None, judges, cfg, log=lambda _: None, source=source)
    assert sorted(out) == sorted(ALL_CONCEPTS)
    for name in ALL_CONCEPTS:
        for robust in (False, True):
            assert eraser.active_hookpoints(name, robust) == shipped.active_hookpoints(name, robust), name
        for hp in eraser.where(name):
            mine = eraser.hookpoints[hp].library.selection_defaults(name)
            assert mine == shipped.hookpoints[hp].library.selection_defaults(name), (name, hp)
    # the build's own search folder now holds them: a second run resumes there, a bundle with another
    # recipe (other SAEs) would not reuse them
    assert (tmp_path / "search" / "search.json").is_file()
    other = B.BundleConfig(work=str(tmp_path), k=4)
    monkeypatch.setattr(eraser, "unlearn", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("judged")))
    with pytest.raises(RuntimeError, match="judged"):
        B.search_defaults(eraser, None, judges, other, concepts=["star"], log=lambda _: None)


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


def _fake_search(monkeypatch, eraser, score_of, clean_of=None, attack_of=None):
    """The generic tuner without images: ``score_of(stage, setting)`` gives a trial's UA = IRA = CRA,
    ``clean_of(setting)`` its clean flips and ``attack_of(setting)`` its UA under attack; returns the
    ``(stage, setting)`` calls made (stage ``search``, ``refine`` or ``attack``)."""
    import contextlib

    from saeuron_plugin import attacks
    from saeuron_plugin.tuning import search

    calls, state, installed = [], {}, []

    @contextlib.contextmanager
    def unlearn(pipe, concepts, hookpoints):
        """The setting installed; a robust candidate's lighter extra hookpoints (a nested call) make it
        a pair (the winner's setting, the extra one)."""
        (a,) = concepts
        contrast = a.contrast if isinstance(a.contrast, str) else "domain"
        installed.append(
            B.Setting(tuple(hookpoints), a.percentile, a.gamma, contrast, a.target or None, a.target_scale)
        )
        state["setting"] = installed[0] if len(installed) == 1 else tuple(installed)
        try:
            yield
        finally:
            installed.pop()
            if installed:
                state["setting"] = installed[0]
            else:
                del state["setting"]

    def generate(pipe, prompts, seeds, cfg):
        stage = "refine" if seeds[0] >= B.REFINE_SEED else "search"
        state["last"] = (stage, state.get("setting"))
        calls.append(state["last"])  # a labelled stage never generates base images (setting None)
        return torch.zeros(len(prompts), 3, 1, 1)

    def scores(judge, domain, concept, probs, reference, n_forget):
        stage, setting = state["last"]
        value = score_of(stage, setting)
        clean = clean_of(setting) if clean_of else 0.0
        return {"ua": value, "ira": value, "cra": value, "margin": 0.0, "clean_flip": clean}

    def attacked(*args, **kwargs):
        calls.append(("attack", state["setting"]))
        return {"ua_attack": attack_of(state["setting"]) if attack_of else 0.0, "attack_prompts": ["p"]}

    monkeypatch.setattr(eraser, "unlearn", unlearn)
    monkeypatch.setattr(search, "generate", generate)
    monkeypatch.setattr(search, "paired_scores", scores)
    monkeypatch.setattr(search, "ua_under_attack", attacked)
    monkeypatch.setattr(attacks, "target_latents", lambda *a, **k: None)
    return calls


JUDGES = type(
    "Labels",
    (),
    {"labels": {d: list(v) for d, v in sc.VOCABULARIES.items()}, "probabilities": lambda self, images: None},
)()


def _search(eraser, cfg, concepts, tmp_path):
    return B.search_defaults(eraser, None, JUDGES, cfg, concepts, lambda _: None, tmp_path / "search")


def test_refinement_picks_among_the_finalists_on_fresh_validation(monkeypatch, tmp_path):
    """Stage 2 re-judges the best ``refine_top`` stage-1 settings on other seeds and decides there;
    the winner becomes the default (``active`` where it ablates), with the domain contrast."""
    from saeuron_plugin.diffusion.unlearn import SAeUron

    eraser = SAeUron.from_pretrained(BUNDLE)
    a, b = B.BLOCKS_UP1
    stage1 = {-2.0: 1.0, -6.0: 0.9, -20.0: 0.1}  # γ -2 looks perfect on the small validation set ...
    stage2 = {-2.0: 0.7, -6.0: 0.95}  # ... but γ -6 is better on the larger one
    calls = _fake_search(
        monkeypatch, eraser, lambda stage, s: (stage1 if stage == "search" else stage2)[s.gamma]
    )
    cfg = B.BundleConfig(
        search_sets={"object": ((a,),), "color": ((a,),)},
        search_percentiles=(99.0,),
        search_gammas=(-2.0, -6.0, -20.0),
        refine_top={"object": 2},
        search_targets={},
        robust_attacks=0,
    )
    out = _search(eraser, cfg, ["cross", "red"], tmp_path)
    assert all(setting is not None for _, setting in calls)  # scored against labels: no base images
    refined = [c for c in calls if c[0] == "refine"]
    assert refined == [
        ("refine", B.Setting((a,), 99.0, -2.0, "domain")),
        ("refine", B.Setting((a,), 99.0, -6.0, "domain")),
    ]
    assert out["cross"]["best"]["gamma"] == -6.0 and len(out["cross"]["refine"]) == 2
    assert eraser.active_hookpoints("cross") == [a] and b not in eraser.active_hookpoints("cross")
    assert eraser.hookpoints[a].library.selection_defaults("cross").contrast == B.domain_contrast("cross")
    assert "refine" not in out["red"] and out["red"]["best"]["gamma"] == -2.0  # colours: stage 1 decides


def test_search_resumes_and_reuses_saved_trials(monkeypatch, tmp_path):
    """Trials saved in the build's search folder are not judged again; a wider grid runs only its new
    points; another validation size judges everything again."""
    from saeuron_plugin.diffusion.unlearn import SAeUron

    eraser = SAeUron.from_pretrained(BUNDLE)
    a = B.BLOCKS_UP1[0]
    calls = _fake_search(monkeypatch, eraser, lambda stage, s: 0.5)
    cfg = B.BundleConfig(
        search_sets={"object": ((a,),)},
        search_percentiles=(99.0,),
        search_gammas=(-2.0, -6.0),
        refine_top={"object": 2},
        robust_attacks=0,
    )
    _search(eraser, cfg, ["cross"], tmp_path)
    assert len(calls) == 4
    calls.clear()
    cfg.search_gammas = (-2.0, -6.0, -1.0)  # a wider grid: only the new point runs (ties: grid order)
    _search(eraser, cfg, ["cross"], tmp_path)
    assert calls == [("search", B.Setting((a,), 99.0, -1.0, "domain"))]
    calls.clear()
    cfg.refine_prompts = 10  # another stage-2 set: stage 2 runs again, stage 1's trials are kept
    _search(eraser, cfg, ["cross"], tmp_path)
    assert [stage for stage, _ in calls] == ["refine", "refine"]
    calls.clear()
    cfg.search_prompts = 6  # another stage-1 set: stage 1 again; the same finalists keep their stage 2
    _search(eraser, cfg, ["cross"], tmp_path)
    assert [stage for stage, _ in calls] == ["search"] * 3


def test_colours_get_a_replacement_stage_ranked_by_clean_flips(monkeypatch, tmp_path):
    """The winner, alone and with each other colour as its target at each α, judged on stage 1's
    set; equal scores are separated by clean flips, and the chosen target becomes the default."""
    from saeuron_plugin.diffusion.unlearn import SAeUron

    eraser = SAeUron.from_pretrained(BUNDLE)
    a = B.ATTN2_UP3
    clean = {None: 0.5, ("green", 1.0): 1.0, ("blue", 2.0): 0.9}
    calls = _fake_search(
        monkeypatch,
        eraser,
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
    out = _search(eraser, cfg, ["red"], tmp_path)
    replaced = [s for stage, s in calls][1:]
    assert replaced[0] == B.Setting(a, 99.0, -2.0, "domain") and len(replaced) == 1 + 5 * 2
    assert {s.target for s in replaced[1:]} == {"green", "blue", "yellow", "purple", "orange"}
    assert all(stage == "search" for stage, _ in calls)  # stage 1's validation set
    best = out["red"]["best"]
    assert (best["target"], best["target_scale"]) == ("green", 1.0)
    defaults = eraser.hookpoints[a[0]].library.selection_defaults("red")
    assert (defaults.target, defaults.target_scale) == ("green", 1.0)


def test_the_robustness_stage_widens_the_hookpoints_only_within_the_tolerance(monkeypatch, tmp_path):
    """The winner is attacked at its hookpoints and at every hookpoint holding the concept; the wider
    set becomes the robust mode when it resists better and costs ≤ the tolerance in validation score.
    The default mode keeps the winner's hookpoints; saved robust trials are reused while the attack
    budget is the same."""
    from saeuron_plugin.diffusion.unlearn import SAeUron

    eraser = SAeUron.from_pretrained(BUNDLE)
    a = B.BLOCKS_UP1[0]
    everywhere = tuple(eraser.where("cross"))
    wide_score = {"value": 0.97}
    calls = _fake_search(
        monkeypatch,
        eraser,
        lambda stage, s: wide_score["value"] if len(s.hookpoints) > 1 else 1.0,
        attack_of=lambda s: 0.9 if len(s.hookpoints) > 1 else 0.3,
    )
    cfg = B.BundleConfig(
        search_sets={"object": ((a,),)},
        search_percentiles=(99.0,),
        search_gammas=(-2.0,),
        refine_top=0,
        robust_tolerance=0.05,
        robust_extras=(),  # the lighter candidates: test_the_robustness_stage_tries_lighter_extras
    )
    out = _search(eraser, cfg, ["cross"], tmp_path)
    plain, wide = B.Setting((a,), 99.0, -2.0, "domain"), B.Setting(everywhere, 99.0, -2.0, "domain")
    assert calls == [("search", plain), ("search", wide), ("attack", plain), ("attack", wide)]
    assert out["cross"]["robust_best"]["hookpoints"] == list(everywhere)
    assert eraser.active_hookpoints("cross") == [a]  # the default mode is unchanged
    assert eraser.active_hookpoints("cross", robust=True) == list(everywhere)
    assert sorted(eraser.plan("cross", robust=True)) == sorted(everywhere) and list(eraser.plan("cross")) == [
        a
    ]
    calls.clear()
    _search(eraser, cfg, ["cross"], tmp_path)
    assert calls == []  # every trial reused
    cfg.robust_iterations = 10  # another attack budget: the attacks run again, the trials do not
    _search(eraser, cfg, ["cross"], tmp_path)
    assert calls == [("attack", plain), ("attack", wide)]
    calls.clear()
    cfg.robust_attacks = 2  # other attack prompts: again
    _search(eraser, cfg, ["cross"], tmp_path)
    assert calls == [("attack", plain), ("attack", wide)]
    calls.clear()
    cfg.robust_attacks = 0  # no robustness stage: no robust mode left over from the runs before
    out = _search(eraser, cfg, ["cross"], tmp_path)
    assert calls == [] and "robust_best" not in out["cross"]
    assert eraser.active_hookpoints("cross", robust=True) == [a]


def test_the_robustness_stage_tries_lighter_extras_and_stores_them_for_the_robust_mode_only(
    monkeypatch, tmp_path
):
    """With ``robust_extras`` the stage also tries the winner at its hookpoints plus a lighter edit at
    every other hookpoint holding the concept. When that one resists best within the tolerance, the
    robust mode ablates there with the lighter percentile and γ, the default mode keeps the winner's
    hookpoints and setting, and the bundle keeps both across a save."""
    from saeuron_plugin.diffusion.unlearn import SAeUron
    from saeuron_plugin.tuning import search

    eraser = SAeUron.from_pretrained(BUNDLE)
    a = B.BLOCKS_UP1[0]
    everywhere = tuple(eraser.where("cross"))
    others = tuple(hp for hp in everywhere if hp != a)
    plain = B.Setting((a,), 99.0, -6.0, "domain")
    wide = B.Setting(everywhere, 99.0, -6.0, "domain")
    light = (plain, B.Setting(others, 99.9, -1.0, "domain"))
    ua = {plain: 0.3, wide: 0.9, light: 1.0}
    calls = _fake_search(
        monkeypatch,
        eraser,
        lambda stage, s: {wide: 0.8}.get(s, 0.99),  # the winner's setting everywhere costs too much
        attack_of=lambda s: ua.get(s, 0.0),
    )
    cfg = B.BundleConfig(
        search_sets={"object": ((a,),)},
        search_percentiles=(99.0,),
        search_gammas=(-6.0,),
        refine_top=0,
        robust_extras=((99.9, -1.0), (99.0, -6.0)),  # the second is the winner's own: not tried twice
    )
    out = _search(eraser, cfg, ["cross"], tmp_path)
    assert [s for stage, s in calls if stage == "attack"] == [plain, wide, light]
    chosen = out["cross"]["robust_best"]
    assert chosen["extra"] == {"hookpoints": list(others), "percentile": 99.9, "gamma": -1.0}
    assert chosen["hookpoints"] == [a]
    assert search.robust_hookpoints(chosen) == [a, *others]
    bundle = SAeUron.from_pretrained(eraser.save_pretrained(tmp_path / "bundle"))
    for erased in (eraser, bundle):
        assert erased.active_hookpoints("cross") == [a]
        assert sorted(erased.active_hookpoints("cross", robust=True)) == sorted(everywhere)
        at = {hp: erased.hookpoints[hp].library.selection_defaults("cross") for hp in everywhere}
        assert (at[a].percentile, at[a].gamma) == (99.0, -6.0)
        assert all((at[hp].percentile, at[hp].gamma) == (99.9, -1.0) for hp in others)
        row = next(line for line in erased.model_card().splitlines() if line.startswith("| cross |"))
        assert f"`{a}` ✓" in row and "(robust: γ=-1, p=99.9)" in row and "γ=-6, p=99.0 |" in row
    calls.clear()
    _search(eraser, cfg, ["cross"], tmp_path)
    assert calls == []  # every trial, the lighter one included, is reused


def test_the_tuner_scores_labelled_sets_as_the_baselines_search_does():
    """SAeUron's trials (the generic tuner's ``paired_scores`` against true labels) and the baselines'
    (``trial_scores``) are the same objective: the same numbers from the same probabilities."""
    from saeuron_plugin.tuning.search import paired_scores

    cfg = B.BundleConfig()
    for name in ("star", "striped", "red"):
        prompts, seeds = B.validation_set(name, cfg.search_prompts, cfg, "search")
        labelled = B.labelled(prompts, seeds, name)
        gen = torch.Generator().manual_seed(sc.CONCEPTS.index(name))
        probs = {
            d: torch.softmax(3 * torch.randn(len(prompts), len(v), generator=gen), -1)
            for d, v in sc.VOCABULARIES.items()
        }
        reference = {d: torch.tensor(v) for d, v in labelled.labels.items()}
        theirs = B.trial_scores(FakeJudges(probs=probs), None, prompts, name)
        ours = paired_scores(JUDGES, B.concept_domain(name), name, probs, reference, labelled.n_forget)
        for key in ("ua", "ira", "cra", "margin", "clean_flip"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-6), (name, key)
