"""Equal tuning for the baselines (#22): grids every method accepts, a resumable per-concept search on
SAeUron's validation sets, and the two hyper-parameters the grids added (UCE's erase scale, ESD's layers)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from tiny_pipelines import tiny_sd_pipeline

from saeuron_plugin.benchmark.baselines import BASELINES, esd, uce
from saeuron_plugin.benchmark.baselines import search as S
from saeuron_plugin.benchmark.baselines.base import cross_attention_parameters
from saeuron_plugin.benchmark.unlearning import Protocol, method_generator
from saeuron_plugin.errors import BadFileError
from saeuron_plugin.shapescanvas.build import BundleConfig, validation_set

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "checkpoints" / "shapescanvas-sd"
JUDGES = ROOT / "checkpoints" / "shapescanvas-judges"


@pytest.mark.parametrize("method", list(BASELINES))
@pytest.mark.parametrize("concept", ["star", "striped", "red"])
def test_every_grid_setting_is_a_valid_call(method, concept):
    """Each setting binds to the method's ``erase`` once the generation-side keys are taken out."""
    grid = S.search_grid(method, concept)
    assert len(grid) >= 5 and len({json.dumps(s, sort_keys=True) for s in grid}) == len(grid)
    signature = inspect.signature(BASELINES[method].erase)
    replacements = S.replacement_grid(method, concept, grid[0])
    if method == "uce":  # the winner, then every other concept of the domain at erase scale 1 and 3
        assert replacements[0] == grid[0] and len(replacements) == 1 + 2 * len(S.replacement_targets(concept))
        assert {r["target_text"] for r in replacements[1:]} == {
            S._text(c) for c in S.replacement_targets(concept)
        }
    else:
        assert replacements == []
    for setting in grid + replacements:
        kwargs = {k: v for k, v in setting.items() if k not in ("guidance_scale", "retain")}
        signature.bind(
            None, "concept", retain_texts=S.retain_texts(concept, setting.get("retain", "domain")), **kwargs
        )


def test_retain_sets():
    assert S.retain_texts("striped") == ["solid style", "dotted style", "checkered style", "outline style"]
    assert len(S.retain_texts("red", "all")) == 16 and "red" not in S.retain_texts("red", "all")
    assert S.retain_texts("red", "none") == []
    with pytest.raises(ValueError, match="retain"):
        S.retain_texts("red", "some")


def test_uce_erase_scale_weighs_the_edit_keys():
    """erase scale s = the edit keys (and their targets) scaled by √s in the least-squares problem."""
    g = torch.Generator().manual_seed(0)
    keys = uce.EditKeys(*(torch.randn(n, 8, generator=g, dtype=torch.float64) for n in (3, 3, 5)))
    w = torch.randn(6, 8, generator=g)
    scaled = uce.EditKeys(keys.concept * 3**0.5, keys.target * 3**0.5, keys.retain)
    torch.testing.assert_close(uce.closed_form(w, keys, 1.0, 0.1, 3.0), uce.closed_form(w, scaled, 1.0, 0.1))
    # a larger erase scale matches the targets more closely against the same ridge and preserved keys
    err = [
        (uce.closed_form(w, keys, 1.0, 1.0, s) @ keys.concept.T - w.double() @ keys.target.T).norm()
        for s in (1, 10)
    ]
    assert err[1] < err[0]


def test_esd_kv_layers_train_only_key_and_value_projections():
    pipe = tiny_sd_pipeline()
    before = {n: p.detach().clone() for n, p in cross_attention_parameters(pipe.unet).items()}
    with esd.erase(pipe, "star", steps=3, sample_steps=4, lr=1e-2, layers="attn2_kv", progress=False):
        changed = {
            n for n, p in cross_attention_parameters(pipe.unet).items() if not torch.equal(p, before[n])
        }
    assert changed and all(n.endswith(("to_k.weight", "to_v.weight")) for n in changed)
    assert any(n.endswith("to_q.weight") for n in before)
    with pytest.raises(ValueError, match="layers"):
        esd.trained_parameters(pipe.unet, "all")


def _shipped():
    from saeuron_plugin.shapescanvas.build import load_default
    from saeuron_plugin.shapescanvas.judges import Judges

    return load_default(str(MODEL)), Judges.from_pretrained(str(JUDGES))


def test_search_ranks_resumes_and_counts(tmp_path):
    """Stage 1 on SAeUron's validation set, stage 2 for an object; every trial saved and reused."""
    pipe, judges = _shipped()
    protocol = Protocol(steps=2)
    bundle = BundleConfig(search_prompts=1, refine_prompts=1)
    grid = [{"negative_text": "a star", "guidance_scale": g} for g in (5.0, 9.0)]

    def make(generator=method_generator, **kw):
        return S.BaselineSearch(
            "negative_prompt",
            pipe,
            judges,
            protocol,
            generator,
            out=tmp_path,
            grid=lambda m, c: grid,
            bundle=bundle,
            **kw,
        )

    search = make(log=lambda _: None)
    best = search.tune("star")
    saved = json.loads((tmp_path / "negative_prompt.json").read_text())
    entry = saved["concepts"]["star"]
    assert [t["setting"] for t in entry["search"]] == grid
    assert sorted(t["setting"]["guidance_scale"] for t in entry["refine"]) == [5.0, 9.0]  # objects: stage 2
    ranked = max(entry["refine"], key=lambda t: (t["score"], t["margin"]))
    assert best == ranked["setting"] == entry["best"]["setting"]
    for t in entry["search"] + entry["refine"]:
        assert t["score"] == pytest.approx((t["ua"] + t["ira"] + t["cra"]) / 3)
    n_search = len(validation_set("star", 1, bundle, "search")[0])
    assert search.summary(["star"]) == {
        "concepts": 1,
        "trials": 4,
        "images": 2 * n_search + 2 * len(validation_set("star", 1, bundle, "refine")[0]),
        "seconds": round(entry["seconds"]),
    }

    # a rerun judges nothing again
    def no_generation(*args, **kwargs):
        raise AssertionError("a saved trial was generated again")

    assert make(no_generation, log=lambda _: None).tune("star") == best
    # another protocol: the saved trials do not apply
    other = S.BaselineSearch(
        "negative_prompt", pipe, judges, Protocol(steps=3), method_generator, out=tmp_path, bundle=bundle
    )
    assert other.data["concepts"] == {}
    # a damaged file is named, not a bare JSON traceback
    (tmp_path / "negative_prompt.json").write_text('{"recipe": ')
    with pytest.raises(BadFileError, match=r"negative_prompt\.json.*not valid JSON"):
        make()


def test_saeuron_budget_is_read_from_the_bundle():
    summary = S.saeuron_summary(ROOT / "checkpoints" / "shapescanvas-saeuron", ["star", "red"])
    search = json.loads((ROOT / "checkpoints" / "shapescanvas-saeuron" / "search.json").read_text())["tune"]
    assert summary["trials"] == sum(
        len(search[c]["trials"]) + len(search[c].get("refine", [])) + len(search[c].get("replace", []))
        for c in ("star", "red")
    )
    assert summary["images"] > 12 * summary["trials"] and summary["seconds"] is None


def test_uce_caption_keys_map_whole_captions_without_contradictions():
    """Joint keys (several concepts at once): from the first differing token on, aligned from the end."""
    from saeuron_plugin.benchmark.baselines.base import encode_prompts, tokenize
    from saeuron_plugin.benchmark.baselines.presets import joint_caption_pairs

    pipe = tiny_sd_pipeline()
    length, eos = pipe.tokenizer.model_max_length, pipe.tokenizer.eos_token_id
    src, tgt = "a red star", "a star"
    keys = uce.caption_keys(pipe, [(src, tgt)], retain_captions=["a blue heart"])
    ids_s, ids_t = (tokenize(pipe, [x])[0].tolist() for x in (src, tgt))
    first = next(p for p in range(length) if ids_s[p] != ids_t[p])
    emb_s, emb_t = (encode_prompts(pipe, [x])[0].double() for x in (src, tgt))
    assert len(keys.concept) == length - first
    torch.testing.assert_close(keys.concept[0], emb_s[first])
    eos_s, eos_t = ids_s.index(eos), ids_t.index(eos)
    torch.testing.assert_close(keys.target[eos_s - first], emb_t[eos_t])  # EOS -> EOS
    assert keys.retain.shape == (length - 1, emb_s.shape[-1])
    with pytest.raises(ValueError, match="nothing to edit"):
        uce.caption_keys(pipe, [(src, src)])
    # ShapesCanvas: a caption with two removed concepts has one target, without both
    pairs, kept = joint_caption_pairs(["star", "striped", "red"])
    assert (
        "a red star in striped style",
        "",
    ) in pairs  # all three gone: the empty prompt, UCE's default target
    assert ("a blue star in solid style", "a blue shape in solid style") in pairs
    assert len(pairs) + len(kept) == 180 and not any(w in k.split() for k in kept for w in ("star", "red"))


def test_grids_show_before_and_after_for_each_method(tmp_path):
    """One labelled grid per method: each domain's first concept, its captions with and without it."""
    from PIL import Image

    from saeuron_plugin.benchmark.unlearning import GRID_IMAGES, grid_concepts, write_grids

    assert grid_concepts(["red", "star", "blue", "striped", "square"]) == ["red", "star", "striped"]
    protocol = Protocol(steps=2, others=3)
    setting = {"negative_text": "a star", "guidance_scale": 5.0}
    paths = write_grids(
        ["none", "negative_prompt"],
        tmp_path,
        concepts=["star"],
        protocol=protocol,
        tuned={"negative_prompt": {"star": setting}},
        model=str(MODEL),
        log=lambda _: None,
    )
    assert [p.name for p in paths] == ["none.png", "negative_prompt.png"]
    with Image.open(paths[1]) as grid:
        width, height = grid.size
    # six forget images in a row (two rows: before, after), then the three retained captions
    assert width >= GRID_IMAGES * 32 and height > 4 * 32


def test_uce_gets_the_colour_replacement_stage_ranked_by_clean_flips(tmp_path):
    """For a colour, UCE's winner is judged again alone and with each other colour as its anchor text
    on stage 1's validation set; the stage decides by (score, clean flips, margin) and is counted."""
    from saeuron_plugin.tuning.search import replacement_rank

    pipe, judges = _shipped()
    bundle = BundleConfig(search_prompts=1, refine_prompts=1)
    search = S.BaselineSearch(
        "uce",
        pipe,
        judges,
        Protocol(steps=2),
        method_generator,
        out=tmp_path,
        grid=lambda m, c: [{"erase_scale": 1.0, "retain": "domain", "preserve_scale": 1.0}],
        bundle=bundle,
        log=lambda _: None,
    )
    best = search.tune("red")
    entry = search.data["concepts"]["red"]
    assert "refine" not in entry and len(entry["replace"]) == 11
    assert entry["replace"][0]["setting"] == entry["search"][0]["setting"]  # the winner, judged again
    assert best == max(entry["replace"], key=replacement_rank)["setting"]
    assert all(0.0 <= t["clean_flip"] <= 1.0 for t in entry["replace"])
    n = len(validation_set("red", 1, bundle, "search")[0])
    assert search.summary(["red"])["trials"] == 12 and search.summary(["red"])["images"] == 12 * n


def _trial(setting, score, ua):
    scores = {"ua": ua, "ira": 1.0, "cra": 1.0, "score": score, "margin": score}
    return {"setting": setting, "images": 4, **scores}


def test_robust_candidates_are_the_winner_then_the_strongest_within_the_tolerance():
    """From the stage that chose the winner (the last one run), at most four, strongest first."""
    search = [_trial({"erase_scale": s}, 0.99, 1.0) for s in (7.0, 8.0)]  # an earlier stage: ignored
    refine = [
        _trial({"erase_scale": 1.0}, 0.90, 0.70),  # the winner
        _trial({"erase_scale": 2.0}, 0.88, 0.80),
        _trial({"erase_scale": 3.0}, 0.86, 0.95),
        _trial({"erase_scale": 4.0}, 0.84, 1.00),  # outside 0.05
        _trial({"erase_scale": 5.0}, 0.89, 0.75),
        _trial({"erase_scale": 6.0}, 0.87, 0.72),
    ]
    entry = {"search": search, "refine": refine, "best": refine[0]}
    picked = [t["setting"]["erase_scale"] for t in S.robust_candidates(entry, 0.05)]
    assert picked == [1.0, 3.0, 2.0, 5.0]
    assert [t["setting"]["erase_scale"] for t in S.robust_candidates(entry, 0.05, count=2)] == [1.0, 3.0]
    assert [t["setting"]["erase_scale"] for t in S.robust_candidates(entry, 0.0)] == [1.0]


def test_the_baselines_robustness_stage_attacks_each_candidate_and_keeps_the_most_resistant(
    tmp_path, monkeypatch
):
    """SAeUron's stage for UCE: each candidate applied and attacked on the attack captions with the
    bundle config's budget, saved as it is measured, the most resistant within the tolerance kept
    (``saved_best(..., robust=True)``), and nothing attacked again on a rerun."""
    import contextlib

    from saeuron_plugin import attacks
    from saeuron_plugin.shapescanvas.build import ATTACK_CAPTIONS, ATTACK_SEED

    bundle = BundleConfig(robust_attacks=2, robust_iterations=3)
    applied, measured = [], []

    @contextlib.contextmanager
    def generator(method, pipe, concept, protocol, presets=None, setting=None):
        applied.append(setting["erase_scale"])
        yield lambda prompts, seeds: None

    resistance = {1.0: 0.5, 2.0: 0.9, 3.0: 1.0, 5.0: 0.6}  # 3.0 resists most but scores too low

    def fake_attack(pipe, judge, concept, domain, targets, gen, *, iterations, seed, judge_seeds):
        measured.append((sorted(targets), iterations, seed, list(judge_seeds)))
        return {"ua_attack": resistance[applied[-1]], "attack_prompts": ["typed"]}

    from saeuron_plugin.tuning import search as tuning_search

    monkeypatch.setattr(tuning_search, "ua_under_attack", fake_attack)
    drawn = []

    def fake_targets(pipe, prompt, seeds, steps, guidance):
        drawn.append((prompt, list(seeds), steps, guidance))
        return prompt

    monkeypatch.setattr(attacks, "target_latents", fake_targets)
    make = lambda gen: S.BaselineSearch(  # noqa: E731
        "uce", None, None, Protocol(steps=2), gen, out=tmp_path, bundle=bundle, log=lambda _: None
    )
    search = make(generator)
    refine = [
        _trial({"erase_scale": 1.0}, 0.90, 0.70),
        _trial({"erase_scale": 2.0}, 0.87, 0.80),
        _trial({"erase_scale": 3.0}, 0.80, 0.95),
        _trial({"erase_scale": 5.0}, 0.89, 0.75),
    ]
    search.data["concepts"]["star"] = {"seconds": 0.0, "refine": refine, "best": refine[0]}
    assert search.robust_stage("star") == {"erase_scale": 2.0}
    assert applied == [1.0, 2.0, 5.0]
    captions = sorted(c.format("star") for c in ATTACK_CAPTIONS["object"][:2])
    assert measured == [(captions, 3, ATTACK_SEED, list(range(ATTACK_SEED + 1_000, ATTACK_SEED + 1_008)))] * 3
    seeds = list(range(ATTACK_SEED, ATTACK_SEED + 8))  # SAeUron's stage: targets from the attack seed on
    assert sorted(drawn) == [(c, seeds, 2, Protocol().guidance_scale) for c in captions]
    assert S.saved_best("uce", "star", tmp_path, robust=True) == {"erase_scale": 2.0}
    assert S.saved_best("uce", "star", tmp_path) == {"erase_scale": 1.0}  # the clean winner stays

    def no_generation(*args, **kwargs):
        raise AssertionError("a saved attack trial was measured again")

    assert make(no_generation).robust_stage("star") == {"erase_scale": 2.0}
    entry = search.data["concepts"]["star"]
    assert entry["seconds"] == 0.0 and entry["robust_seconds"] >= 0.0  # the attacks are not search time
    with pytest.raises(ValueError, match="no robustness stage"):
        S.BaselineSearch("sld", None, None, Protocol(steps=2), generator, out=tmp_path).robust_stage("star")
