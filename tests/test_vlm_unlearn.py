"""VLM adapter end to end on tiny random LLaVA, Qwen2-VL, Mllama and Idefics3 models (offline).

collect → train (core ``train_sae``) → concept statistics (image sets with / without the concept)
→ ablation during ``generate()``: identity when nothing is selected, cached = uncached, batched
left-padded = single runs, logits change when the concept's features fire, hooks removed on exit
and on errors, bundles round-trip through save/load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch

torch.set_num_threads(1)

from tiny_vlms import BUILDERS, TinyVLM, image  # noqa: E402

from saeuron_plugin.sae.store import ActivationStore  # noqa: E402
from saeuron_plugin.sae.train import train_sae  # noqa: E402
from saeuron_plugin.vlm.collect import collect_activations  # noqa: E402
from saeuron_plugin.vlm.unlearn import VLMUnlearner  # noqa: E402

PROMPT = "what is in the image ?"
# Mllama: a decoder layer after the first cross-attention layer (1), text tokens (REFERENCE §5)
LAYER = {
    "llava": "model.language_model.layers.1",
    "qwen2_vl": "model.language_model.layers.1",
    "mllama": "model.language_model.layers.2",
    "idefics3": "model.text_model.layers.1",
}
FAMILIES = list(BUILDERS)
NEW = 5


@dataclass
class Setup:
    vlm: TinyVLM
    unlearner: VLMUnlearner
    path: str
    store_rows: int

    @property
    def model(self) -> Any:
        return self.vlm.model

    def gen(self, inputs: dict[str, Any], **kw: Any) -> torch.Tensor:
        opts = dict(
            max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, suppress_tokens=[self.vlm.image_token_id]
        )
        with torch.no_grad():
            return self.model.generate(**inputs, **{**opts, **kw})

    def logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(**inputs, use_cache=False).logits


def red_images(n: int, start: int = 100) -> list[Any]:
    return [image("red", seed=start + i) for i in range(n)]


def other_images(n: int, start: int = 200) -> list[Any]:
    colors = ["blue", "green", "yellow", "gray", "white"]
    return [image(colors[i % len(colors)], seed=start + i) for i in range(n)]


def _build(family: str, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    vlm = BUILDERS[family]()
    path = LAYER[family]
    folder = tmp_path_factory.mktemp(f"acts-{family}")
    imgs = red_images(4, 10) + other_images(8, 20)
    result = collect_activations(
        vlm.model, imgs, PROMPT, vlm.processor, [path], folder, batch_size=3, show_progress=False
    )
    store = ActivationStore(folder / path)
    assert store.metadata["tokens"] == ("text" if family == "mllama" else "image")
    sae = train_sae(
        store,
        k=4,
        expansion_factor=4,
        batch_size=32,
        steps=30,
        progress=False,
        device="cpu",
        dead_tokens_threshold=10**9,
        hookpoint=path,
        model_family=family,
    )
    unlearner = VLMUnlearner.from_saes({path: sae})
    unlearner.add_concept("red", red_images(4), PROMPT, vlm.model, vlm.processor, batch_size=2)
    unlearner.add_concept(None, other_images(6), PROMPT, vlm.model, vlm.processor, batch_size=2)
    return Setup(vlm, unlearner, path, result.rows[path])


_CACHE: dict[str, Setup] = {}


@pytest.fixture(params=FAMILIES)
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    family = request.param
    if family not in _CACHE:
        _CACHE[family] = _build(family, tmp_path_factory)
    return _CACHE[family]


def _no_hooks(model: Any) -> bool:
    """None of our hooks left (transformers 5.x keeps output-capturing hooks of its own on layers)."""
    from saeuron_plugin.vlm.hooks import InputTracker, TokenSite

    def ours(hook: Any) -> bool:
        return isinstance(hook, TokenSite) or isinstance(getattr(hook, "__self__", None), InputTracker)

    return all(
        not any(ours(h) for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))
        and "_saeuron_vlm_sites" not in m.__dict__
        for m in model.modules()
    )


# ------------------------------------------------------------------------- collection
def test_collect_rows_and_resume(setup: Setup, tmp_path):
    vlm = setup.vlm
    imgs = red_images(2) + other_images(1)
    res = collect_activations(
        vlm.model, imgs, PROMPT, vlm.processor, [setup.path], tmp_path, show_progress=False
    )
    inputs = vlm.inputs(imgs, [PROMPT] * 3)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    image_tokens = int(((ids == vlm.image_token_id) & mask).sum())
    expected = int((mask & (ids != vlm.image_token_id)).sum()) if vlm.family == "mllama" else image_tokens
    assert res.rows[setup.path] == expected and res.collected == 3
    again = collect_activations(
        vlm.model, imgs, PROMPT, vlm.processor, [setup.path], tmp_path, show_progress=False
    )
    assert again.skipped == 3 and again.collected == 0
    assert len(ActivationStore(tmp_path / setup.path)) == expected
    assert _no_hooks(vlm.model)


# ------------------------------------------------------------------------- ablation
def test_nothing_selected_is_exact_identity(setup: Setup):
    vlm = setup.vlm
    inputs = vlm.inputs([image("red", seed=5)], [PROMPT])
    base = setup.gen(inputs)
    base_logits = setup.logits(inputs)
    with setup.unlearner.unlearn(setup.model, ["red"], top_n=0) as handle:
        assert torch.equal(setup.gen(inputs), base)
        assert torch.equal(setup.logits(inputs), base_logits)
        assert handle.edits(setup.path) == 0
    with setup.unlearner.unlearn(setup.model, "red", percentile=100.0):
        assert torch.equal(setup.gen(inputs), base)
    assert _no_hooks(setup.model)


def test_concept_features_change_logits(setup: Setup):
    vlm = setup.vlm
    inputs = vlm.inputs([image("red", seed=7)], [PROMPT])
    base = setup.logits(inputs)
    with setup.unlearner.unlearn(setup.model, "red", top_n=3, strength=30) as handle:
        edited = setup.logits(inputs)
        assert handle.edits(setup.path) == 1
    assert not torch.allclose(base, edited, atol=1e-4)
    assert torch.equal(setup.logits(inputs), base)  # removed on exit


def test_cached_equals_uncached_and_prefill_only(setup: Setup):
    vlm = setup.vlm
    inputs = vlm.inputs([image("red", seed=8)], ["describe the color ?"])
    assert torch.equal(setup.gen(inputs, use_cache=True), setup.gen(inputs, use_cache=False))
    with setup.unlearner.unlearn(setup.model, "red", top_n=3, strength=30) as handle:
        cached = setup.gen(inputs, use_cache=True)
        site = handle.hooks.sites[setup.path]
        calls_cached = site.calls
        callbacks_cached = site.edits
        uncached = setup.gen(inputs, use_cache=False)
    assert torch.equal(cached, uncached)
    assert calls_cached == NEW  # prefill + NEW - 1 decode steps
    if vlm.family != "mllama":  # image tokens: edited on the prefill pass only
        assert callbacks_cached == 1


def test_batched_left_padded_matches_single(setup: Setup):
    vlm = setup.vlm
    imgs = [image("red", seed=30), image("blue", seed=31), image("red", seed=32)]
    prompts = ["what is in the image ?", "describe it", "what color is the shape in this picture ?"]
    batch = vlm.inputs(imgs, prompts)
    assert (batch["attention_mask"][:, 0] == 0).any()  # really left-padded
    with setup.unlearner.unlearn(setup.model, "red", top_n=3, strength=30):
        together = setup.gen(batch)[:, -NEW:]
        alone = torch.cat([setup.gen(vlm.inputs([im], [p]))[:, -NEW:] for im, p in zip(imgs, prompts)])
    assert torch.equal(together, alone)
    plain_together = setup.gen(batch)[:, -NEW:]
    plain_alone = torch.cat([setup.gen(vlm.inputs([im], [p]))[:, -NEW:] for im, p in zip(imgs, prompts)])
    assert torch.equal(plain_together, plain_alone)


def test_hooks_removed_on_exit_and_errors(setup: Setup):
    model = setup.model
    with pytest.raises(RuntimeError, match="boom"), setup.unlearner.unlearn(model, "red", top_n=3):
        assert not _no_hooks(model)
        raise RuntimeError("boom")
    assert _no_hooks(model)
    bad = setup.vlm.inputs([image("red", seed=1)], [PROMPT])
    bad["input_ids"] = bad["input_ids"] + 1000  # out of the vocabulary: the embedding raises mid-forward
    handle = setup.unlearner.apply(model, "red", top_n=3)
    with pytest.raises(Exception):  # noqa: B017 - whatever the model raises
        setup.logits(bad)
    assert not handle.hooks.tracker.in_call  # the post-hook ran although forward failed
    handle.remove()
    handle.remove()  # idempotent
    assert _no_hooks(model)


def test_statistics_do_not_depend_on_batch_size(setup: Setup):
    vlm = setup.vlm
    imgs = red_images(3, 300)
    prompts = ["what is in the image ?", "describe it", "what color is this shape ?"]
    stats = []
    for bs in (1, 3):
        u = VLMUnlearner.from_saes({setup.path: setup.unlearner.hookpoints[setup.path].sae})
        stats.append(u.add_concept("c", imgs, prompts, vlm.model, vlm.processor, batch_size=bs)[setup.path])
    assert stats[0].counts.tolist() == stats[1].counts.tolist() == [3]
    assert torch.allclose(stats[0].sums, stats[1].sums, atol=1e-4)


# ------------------------------------------------------------------------- bundles
def test_save_load_round_trip(setup: Setup, tmp_path):
    vlm = setup.vlm
    setup.unlearner.set_defaults("red", top_n=3, gamma=-30.0)
    out = setup.unlearner.save_pretrained(tmp_path / "bundle")
    folder = out / setup.path
    for name in (
        "cfg.json",
        "sae.safetensors",
        "concepts/index.json",
        "concepts/red.safetensors",
        "concepts/_background.safetensors",
    ):
        assert (folder / name).is_file(), name
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["hookpoint"] == setup.path and cfg["model_family"] == vlm.family
    assert cfg["tokens"] == ("text" if vlm.family == "mllama" else "image")
    assert "VLMUnlearner" in (out / "README.md").read_text()
    loaded = VLMUnlearner.from_pretrained(out)
    assert loaded.concepts == ["red"] and list(loaded.hookpoints) == [setup.path]
    a, b = setup.unlearner.hookpoints[setup.path], loaded.hookpoints[setup.path]
    assert a.sae.fingerprint() == b.sae.fingerprint() and b.tokens == a.tokens
    assert torch.equal(a.library.get("red").sums, b.library.get("red").sums)
    assert b.library.tau_grid.num_buckets == 1
    inputs = vlm.inputs([image("red", seed=9)], [PROMPT])
    with setup.unlearner.unlearn(setup.model, "red"):
        want = setup.logits(inputs)
    with loaded.unlearn(setup.model, "red"):
        got = setup.logits(inputs)
    assert torch.equal(want, got)


def test_image_only_ablation_leaves_text_tokens_untouched(tmp_path_factory):
    setup = _CACHE.get("llava") or _build("llava", tmp_path_factory)
    _CACHE["llava"] = setup
    vlm, model = setup.vlm, setup.model
    layer = model.get_submodule(setup.path)
    inputs = vlm.inputs([image("red", seed=11)], [PROMPT])
    seen: list[torch.Tensor] = []
    probe = layer.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))  # runs after ours
    try:
        setup.logits(inputs)
        with setup.unlearner.unlearn(model, "red", top_n=3, strength=30, tokens="image"):
            probe.remove()  # re-register so it runs after the ablation hook
            probe = layer.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
            setup.logits(inputs)
    finally:
        probe.remove()
    before, after = seen
    img = inputs["input_ids"] == vlm.image_token_id
    assert torch.equal(before[~img], after[~img])
    assert not torch.equal(before[img], after[img])


def test_projector_and_vision_hookpoints_batch_invariant(tmp_path_factory):
    """Packed Qwen vision outputs ([N, d]) and batched LLaVA vision rows are split per sample."""
    from saeuron_plugin.sae.model import SaeConfig, SparseAutoencoder

    for family, paths in {
        "qwen2_vl": ["model.visual.merger", "model.visual.blocks.0"],
        "llava": ["model.multi_modal_projector", "model.vision_tower.encoder.layers.0"],
    }.items():
        vlm = BUILDERS[family]()
        saes = {}
        for i, p in enumerate(paths):
            width = 32 if "merger" in p or "projector" in p else 16
            sae = SparseAutoencoder(SaeConfig(d_in=width, num_latents=4 * width, k=4))
            sae.reset_parameters(torch.Generator().manual_seed(i))
            saes[p] = sae
        imgs = red_images(3, 1)
        prompts = ["what is in the image ?", "describe it", "a big red square ?"]
        results = []
        for bs in (1, 3):
            u = VLMUnlearner.from_saes(dict(saes))
            results.append(u.add_concept("c", imgs, prompts, vlm.model, vlm.processor, batch_size=bs))
        for p in paths:
            assert results[0][p].counts.tolist() == [3]
            assert torch.allclose(results[0][p].sums, results[1][p].sums, atol=1e-4), (family, p)
        u.add_concept(None, other_images(3), PROMPT, vlm.model, vlm.processor)
        inputs = vlm.inputs([image("red", seed=1)], [PROMPT])
        with torch.no_grad():
            base = vlm.model(**inputs).logits
            for p in paths:  # one at a time: an edit upstream changes what fires downstream
                with u.unlearn(vlm.model, "c", top_n=4, strength=30, hookpoints=[p]) as handle:
                    edited = vlm.model(**inputs).logits
                assert handle.edits(p) == 1, (family, p)
                assert not torch.allclose(base, edited), (family, p)
            assert torch.equal(vlm.model(**inputs).logits, base)


def test_prepared_inputs_equal_processor_path(tmp_path_factory):
    setup = _CACHE.get("qwen2_vl") or _build("qwen2_vl", tmp_path_factory)
    _CACHE["qwen2_vl"] = setup
    vlm = setup.vlm
    imgs = red_images(2, 400)
    sae = setup.unlearner.hookpoints[setup.path].sae
    per_sample = [vlm.inputs([im], [PROMPT]) for im in imgs]
    a = VLMUnlearner.from_saes({setup.path: sae}).add_concept("c", imgs, PROMPT, vlm.model, vlm.processor)
    b = VLMUnlearner.from_saes({setup.path: sae}).add_concept(
        "c", None, None, vlm.model, per_sample, batch_size=2
    )
    assert torch.allclose(a[setup.path].sums, b[setup.path].sums, atol=1e-5)
    assert b[setup.path].num_prompts == 2
    # the same label for every sample (one prompt string for prepared inputs): still one prompt each
    c = VLMUnlearner.from_saes({setup.path: sae}).add_concept(
        "c", None, PROMPT, vlm.model, per_sample, batch_size=2
    )
    assert c[setup.path].num_prompts == 2


def test_token_set_is_recorded_and_enforced(tmp_path_factory):
    setup = _CACHE.get("llava") or _build("llava", tmp_path_factory)
    _CACHE["llava"] = setup
    lib = setup.unlearner.hookpoints[setup.path].library
    assert lib.get("red").extra["tokens"] == "image" and lib.background.extra["tokens"] == "image"
    with pytest.raises(ValueError, match=r"made from \['image'\] tokens.*'text'"):
        setup.unlearner.add_concept(
            "more", red_images(1), PROMPT, setup.model, setup.vlm.processor, tokens="text"
        )
    assert _no_hooks(setup.model)


def test_push_to_hub_uploads_the_bundle_layout(tmp_path_factory, monkeypatch):
    import huggingface_hub

    setup = _CACHE.get("llava") or _build("llava", tmp_path_factory)
    _CACHE["llava"] = setup
    calls: dict[str, Any] = {}

    class FakeApi:
        def __init__(self, token: Any = None) -> None:
            calls["token"] = token

        def create_repo(self, repo_id: str, private: Any = None, exist_ok: bool = False) -> None:
            calls["repo"] = repo_id

        def upload_folder(
            self, repo_id: str, folder_path: str, revision: Any = None, commit_message: str = ""
        ):
            from pathlib import Path

            root = Path(folder_path)
            calls["files"] = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = setup.unlearner.push_to_hub("org/vlm-bundle", token="t")
    assert url == "https://hub/org/vlm-bundle/commit/1" and calls["repo"] == "org/vlm-bundle"
    p = setup.path
    assert {
        "README.md",
        f"{p}/cfg.json",
        f"{p}/sae.safetensors",
        f"{p}/concepts/index.json",
        f"{p}/concepts/red.safetensors",
    } <= set(calls["files"])


def test_lazy_package_export():
    import saeuron_plugin

    assert saeuron_plugin.VLMUnlearner is VLMUnlearner
