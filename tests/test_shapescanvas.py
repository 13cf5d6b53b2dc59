"""ShapesCanvas: generator, captions, shipped judges and shipped SD-shaped pipeline (the embedded default)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from saeuron_plugin.shapescanvas import data as sc
from saeuron_plugin.shapescanvas import model as dm
from saeuron_plugin.shapescanvas.judges import Judges

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
SD_DIR = ROOT / "checkpoints" / "shapescanvas-sd"
JUDGES_DIR = ROOT / "checkpoints" / "shapescanvas-judges"


@pytest.fixture(scope="module")
def judges() -> Judges:
    return Judges.from_pretrained(JUDGES_DIR)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(SD_DIR)
    p.set_progress_bar_config(disable=True)
    return p


def _all_combinations() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every combination with one shared geometry, so only the attributes differ."""
    combos = sc.combinations()
    n = len(combos)
    idx = {
        d: torch.tensor([sc.VOCABULARIES[d].index(c[i]) for c in combos]) for i, d in enumerate(sc.DOMAINS)
    }
    params = sc.ShapeParams(np.full(n, 11.0), np.full(n, 16.0), np.full(n, 16.0), np.full(n, 0.1))
    return sc.render_batch(idx["object"], idx["style"], idx["color"], params), idx


def test_vocabularies_meet_the_spec():
    assert len(sc.OBJECTS) >= 5 and len(sc.STYLES) >= 4 and len(sc.COLORS) >= 6
    assert set(sc.SYNONYMS) == set(sc.OBJECTS) | set(sc.STYLES) | set(sc.COLORS)
    assert len(sc.combinations()) == len(sc.OBJECTS) * len(sc.STYLES) * len(sc.COLORS)


def test_generator_is_deterministic_and_uint8():
    a = sc.render("star", "striped", "red", np.random.default_rng(3))
    b = sc.render("star", "striped", "red", np.random.default_rng(3))
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    s1, s2 = sc.sample_batch(16, np.random.default_rng(5)), sc.sample_batch(16, np.random.default_rng(5))
    assert torch.equal(s1.images, s2.images) and s1.captions == s2.captions
    stream = sc.batches(4, seed=1, start=7)
    assert torch.equal(next(stream).images, next(sc.batches(4, seed=1, start=7)).images)


def test_every_combination_renders_distinguishably():
    images, _ = _all_combinations()
    flat = images.flatten(1)
    dist = torch.cdist(flat, flat)
    dist.fill_diagonal_(float("inf"))
    assert dist.min() > 1.0  # L2 over 3072 values in [0, 1]: no two combinations look alike
    bg = torch.tensor(sc.BACKGROUND) / 255
    assert torch.allclose(images[:, :, 0, 0], bg.expand(len(images), 3), atol=1e-6)  # plain corner


def test_captions_and_paraphrases():
    assert sc.caption("star", "striped", "red") == "a red star in striped style"
    assert sc.caption("heart", "outline", "orange") == "an orange heart in outline style"
    assert sc.caption(None, "dotted", "blue") == "a blue shape in dotted style"
    assert sc.caption("circle", None, None) == "a circle"
    assert sc.caption(None, None, None) == ""
    assert sc.caption("star", "striped", "red", sc.PARAPHRASE_TEMPLATES[0]) == "a striped red star"
    crimson = sc.synonym_caption("star", "striped", "red", domains=("color",))
    assert crimson == "a crimson star in striped style"
    prompts = sc.benchmark_prompts()
    assert len(prompts) == 180 and prompts[0].label("object") == 0
    syn = sc.benchmark_prompts(variant="synonym")
    synonyms = {w for ws in sc.SYNONYMS.values() for w in ws}
    assert all(any(w in synonyms for w in p.prompt.split()) for p in syn)
    # held out: training captions never contain a synonym
    batch = sc.sample_batch(300, np.random.default_rng(0), p_drop=0.3, p_empty=0.1)
    words = {w for c in batch.captions for w in c.replace(",", " ").split()}
    assert not words & synonyms
    assert "" in batch.captions


def test_tokenizer_words_are_single_tokens(pipe):
    tok = pipe.tokenizer
    assert tok.model_max_length == 16
    for w in sc.caption_words():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    assert (SD_DIR / "tokenizer" / "vocab.json").exists()
    assert (SD_DIR / "tokenizer" / "merges.txt").read_text().startswith("#version: 0.2")


def test_merges_match_clip_tokenizer(tmp_path):
    tok = dm.build_tokenizer(tmp_path, 16)  # raises if a word is not one token
    ids = tok("a crimson pentagram, in polka style").input_ids
    assert len(ids) == 9 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(tok("zebra", add_special_tokens=False).input_ids) > 1  # unknown words fall back to characters


def test_judges_classify_fresh_images(judges):
    batch = sc.sample_batch(200, np.random.default_rng([2024, 1]))
    pred = judges.classify(batch.images)
    assert set(pred) == set(sc.DOMAINS)
    for d in sc.DOMAINS:
        assert pred[d].dtype == torch.long and pred[d].shape == (200,)
        assert (pred[d] == batch.labels[d]).float().mean() >= 0.95, d
    probs = judges.probabilities(batch.images[:3])
    assert probs["style"].shape == (3, len(sc.STYLES))
    assert torch.allclose(probs["color"].sum(-1), torch.ones(3), atol=1e-5)
    cfg = json.loads((JUDGES_DIR / "config.json").read_text())
    assert all(v >= 0.98 for v in cfg["metrics"]["clean"].values())


def test_judges_accept_pil_and_every_combination(judges):
    from PIL import Image

    images, idx = _all_combinations()
    pils = [Image.fromarray(a) for a in sc.to_uint8(images)]
    pred = judges.classify(pils)
    for d in sc.DOMAINS:
        assert (pred[d] == idx[d]).float().mean() >= 0.97, d


def test_shipped_pipeline_structure(pipe):
    names = {n for n, _ in pipe.unet.named_modules()}
    for i in range(3):
        assert f"up_blocks.1.attentions.{i}" in names
    cfg = pipe.unet.config
    assert tuple(cfg.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert tuple(cfg.up_block_types) == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert cfg.layers_per_block == 2
    assert pipe.safety_checker is None
    assert json.loads((SD_DIR / "model_index.json").read_text())["requires_safety_checker"] is False
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_shipped_pipeline_generates(pipe):
    out = pipe(
        "a red star in striped style",
        num_inference_steps=3,
        guidance_scale=dm.DEFAULT_GUIDANCE,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    )
    img = out.images
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
    assert float(img.min()) >= 0 and float(img.max()) <= 1


def test_checkpoints_are_small_and_pickle_free():
    files = [p for p in (ROOT / "checkpoints").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 60e6
    assert not [p for p in files if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]


def test_optimizer_state_roundtrip():
    w = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([w], lr=1e-2)
    w.sum().backward()
    opt.step()
    tensors, meta = dm.optimizer_to_tensors(opt)
    json.dumps(meta)
    opt2 = torch.optim.AdamW([w], lr=1e-2)
    dm.optimizer_from_tensors(opt2, tensors, meta)
    assert torch.equal(opt2.state[w]["exp_avg"], opt.state[w]["exp_avg"])


def test_tiny_training_run_resumes(tmp_path):
    mc = dm.ModelConfig(
        vae_channels=(8, 8),
        unet_channels=(8, 8, 8, 8),
        unet_heads=1,
        text_dim=16,
        text_layers=1,
        text_heads=2,
    )
    tc = dm.TrainConfig(
        out=str(tmp_path),
        vae_steps=2,
        vae_batch=4,
        steps=4,
        stop_at=2,
        batch_size=4,
        checkpoint_every=1,
        model=mc,
        warmup=1,
    )
    torch.set_num_threads(1)
    dm.train_default_model(tc, log=lambda s: None)
    state = json.loads((tmp_path / "state" / "train_state.json").read_text())
    assert state["step"] == 2
    tc.stop_at = 3
    pipe = dm.train_default_model(tc, log=lambda s: None)
    assert json.loads((tmp_path / "state" / "train_state.json").read_text())["step"] == 3
    folder = dm.export_pipeline(pipe, tmp_path / "export")
    from diffusers import StableDiffusionPipeline

    again = StableDiffusionPipeline.from_pretrained(folder)
    assert tuple(again.unet.config.block_out_channels) == (8, 8, 8, 8)
