"""SAeUron on tiny diffusers pipelines: statistics pass, ablation, τ keying, hooks lifecycle, bundles."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from safetensors.torch import save_file
from tiny_pipelines import (
    flux_embeds,
    pixart_embeds,
    sd3_embeds,
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)

from saeuron_plugin import SAeUron
from saeuron_plugin.diffusion.hookpoints import HookpointError, UnsupportedModelError
from saeuron_plugin.diffusion.hooks import HookConflictError
from saeuron_plugin.diffusion.unlearn import SaeWidthError
from saeuron_plugin.sae.bundle import UnknownHookpointError
from saeuron_plugin.sae.concepts import ConceptStats, TauGrid, UnknownConceptError
from saeuron_plugin.sae.model import SaeConfig, SparseAutoencoder

BLOCK = "unet.up_blocks.1.attentions.1"
ATTN = "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2"
XL_BLOCK = "unet.up_blocks.0.attentions.1"
XL_ATTN = "unet.up_blocks.0.attentions.1.transformer_blocks.1.attn2"
RED = ["a red star", "a red square", "a red circle"]
BLUE = ["a blue star", "a blue square", "a blue circle"]
STEPS = 3


def random_sae(d_in: int, n: int = 64, k: int = 4, seed: int = 0, **cfg) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=d_in, num_latents=n, k=k, **cfg))
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
    return sae


def make_eraser(pipe, paths, **add_kwargs) -> SAeUron:
    widths = {p: _width(pipe, p) for p in paths}
    eraser = SAeUron.from_saes(
        {p: random_sae(widths[p], seed=i) for i, p in enumerate(paths)}, tau_grid=TauGrid(10)
    )
    for name, prompts in (("red", RED), ("blue", BLUE)):
        eraser.add_concept(name, prompts, pipe, num_inference_steps=STEPS, show_progress=False, **add_kwargs)
    return eraser


def _width(pipe, path):
    from saeuron_plugin.diffusion.hookpoints import resolve_hookpoint

    return resolve_hookpoint(pipe, path).width


def images(pipe, prompt="a red star", steps=STEPS, seed=0, **kw):
    out = pipe(
        prompt,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **kw,
    )
    return out.images


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def sd_eraser(sd):
    return make_eraser(sd, [BLOCK, ATTN])


# ------------------------------------------------------------------------------- statistics
def test_statistics_pass_counts_conditional_rows_per_step(sd, sd_eraser):
    for path in (BLOCK, ATTN):
        lib = sd_eraser.hookpoints[path].library
        stats = lib.get("red")
        assert stats.prompts == RED and stats.num_prompts == 3
        assert stats.total_count == 3 * STEPS  # one pooled sample per prompt and step (cond half only)
        sd.scheduler.set_timesteps(STEPS)
        buckets = lib.tau_grid.index(sd.scheduler.timesteps.float() / 1000)
        assert torch.equal(stats.counts.nonzero().flatten(), buckets.sort().values)
        assert lib.calibrated_threshold is not None and lib.calibrated_threshold > 0  # SAE had no θ
    assert sd_eraser.concepts == ["red", "blue"]


def test_statistics_equal_manual_encoding(sd):
    """The pass stores the token average of the SAE's TopK code of the block output's cond half."""
    eraser = SAeUron.from_saes({BLOCK: random_sae(16)}, tau_grid=TauGrid(10))
    eraser.add_concept("red", RED[:1], sd, num_inference_steps=2, guidance_scale=7.5, show_progress=False)
    seen = []
    from saeuron_plugin.diffusion.hooks import install_hooks

    def spy(x, ctx):
        seen.append((x[ctx.cond_mask].clone(), float(ctx.tau[0])))
        return x

    with install_hooks(sd, {BLOCK: spy}):
        sd(
            RED[0],
            num_inference_steps=2,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
    sae, lib = eraser.hookpoints[BLOCK].sae, eraser.hookpoints[BLOCK].library
    stats = lib.get("red")
    for x, tau in seen:
        k = lib.tau_grid.nearest(tau)
        expected = sae.encode(x).double().mean(dim=1).squeeze(0)
        assert torch.allclose(stats.sums[k], expected, atol=1e-6)


# ------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("path", [BLOCK, ATTN])
def test_nothing_selected_is_bit_identical_and_concept_changes_images(sd, sd_eraser, path):
    plain = images(sd)
    with sd_eraser.unlearn(sd, ["red"], top_n=0, hookpoints=[path]):
        same = images(sd)
    assert torch.equal(plain, same)
    with sd_eraser.unlearn(sd, ["red"], top_n=4, strength=20.0, hookpoints=[path]) as handle:
        changed = images(sd)
        assert handle.ablators[path].active
    assert not torch.equal(plain, changed)
    assert torch.equal(images(sd), plain)  # removed on exit


def test_sdxl_identity_and_edit_with_both_mechanisms():
    xl = tiny_sdxl_pipeline()
    eraser = make_eraser(xl, [XL_BLOCK, XL_ATTN])
    plain = images(xl)
    for path in (XL_BLOCK, XL_ATTN):
        with eraser.unlearn(xl, "red", top_n=0, hookpoints=[path]):
            assert torch.equal(images(xl), plain)
        with eraser.unlearn(xl, "red", top_n=4, strength=20.0, hookpoints=[path]):
            assert not torch.equal(images(xl), plain)


# ---------------------------------------------------------------------------------------- τ keying
def planted_eraser(sd, latent: int, from_bucket: int) -> SAeUron:
    """Concept "late" differs from "rest" only on ``latent`` in buckets ≥ ``from_bucket``."""
    sae = random_sae(16)
    eraser = SAeUron.from_saes({BLOCK: sae}, tau_grid=TauGrid(10))
    lib = eraser.hookpoints[BLOCK].library
    n, counts = sae.num_latents, torch.full((10,), 4, dtype=torch.long)
    base = torch.full((10, n), 1e-3, dtype=torch.float64)
    late = base.clone()
    late[from_bucket:, latent] = 1.0
    for name, sums in (("late", late), ("rest", base)):
        lib.add_stats(
            ConceptStats(name, n, lib.tau_grid, lib.sae_fingerprint, sae.d_in, sums=sums * 4, counts=counts)
        )
    return eraser


def most_active_latent(sd, sae) -> int:
    from saeuron_plugin.diffusion.hooks import install_hooks

    fired = torch.zeros(sae.num_latents)

    def spy(x, ctx):
        fired.add_((sae.encode(x.reshape(-1, x.shape[-1])) > 0).float().sum(0))
        return x

    with install_hooks(sd, {BLOCK: spy}):
        images(sd, steps=4)
    return int(fired.argmax())


class ChangeSpy:
    """Wraps an ablator and records, per call, the bucket it used and whether it changed x."""

    def __init__(self, ablator):
        self.ablator, self.calls = ablator, []

    def __call__(self, x, ctx):
        out = self.ablator(x, ctx)
        self.calls.append(
            (self.ablator.bucket_of(ctx.tau), float(ctx.tau[0]), out is not x and not torch.equal(out, x))
        )
        return out

    def __getattr__(self, name):
        return getattr(self.ablator, name)


@pytest.mark.parametrize("steps", [10, 25])
def test_ablation_is_keyed_by_tau_not_by_call_count(sd, steps):
    latent = most_active_latent(sd, random_sae(16))
    eraser = planted_eraser(sd, latent, from_bucket=5)
    with eraser.unlearn(sd, "late", percentile=90.0, strength=5.0, record_tau=True) as handle:
        spy = ChangeSpy(handle.ablators[BLOCK])
        handle.hooks.sites[BLOCK].editor.ablator = spy
        images(sd, steps=steps, guidance_scale=7.5)
    sd.scheduler.set_timesteps(steps)
    expected_tau = (sd.scheduler.timesteps.float() / 1000).tolist()
    assert [t for _, t, _ in spy.calls] == pytest.approx(expected_tau)
    assert [float(t[0]) for t in handle.seen_tau(BLOCK)] == pytest.approx(expected_tau)
    # edits happen only at τ ≥ 0.5 (buckets 5..9), whatever the number of steps
    assert all(b == TauGrid(10).nearest(t) for b, t, _ in spy.calls)
    assert not any(changed for b, _, changed in spy.calls if b < 5)
    assert any(changed for b, _, changed in spy.calls if b >= 5)


@pytest.mark.parametrize(
    "scheduler_cls", [EulerDiscreteScheduler, DPMSolverMultistepScheduler, DDIMScheduler]
)
@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_schedulers_guidance_and_batches(sd, sd_eraser, scheduler_cls, guidance):
    original = sd.scheduler
    sd.scheduler = scheduler_cls.from_config(original.config)
    try:
        prompts = ["a red star", "a blue circle"]
        kw = dict(guidance_scale=guidance, num_images_per_prompt=2)
        plain = images(sd, prompts, steps=4, **kw)
        with sd_eraser.unlearn(sd, "red", top_n=4, strength=20.0, hookpoints=[BLOCK], record_tau=True) as h:
            edited = images(sd, prompts, steps=4, **kw)
        sd.scheduler.set_timesteps(4)
        expected = (sd.scheduler.timesteps.float() / 1000).tolist()
        seen = h.seen_tau(BLOCK)
        batch = 4 * (2 if guidance > 1 else 1)
        assert all(t.shape == (batch,) for t in seen)
        assert [float(t[0]) for t in seen] == pytest.approx(expected, abs=1e-6)
        assert not torch.equal(plain, edited)
        # per-row: the edit of image 0 does not depend on the other images of the batch
        with sd_eraser.unlearn(sd, "red", top_n=4, strength=20.0, hookpoints=[BLOCK]):
            alone = images(sd, prompts[0], steps=4, guidance_scale=guidance, num_images_per_prompt=2)
        assert torch.allclose(alone, edited[:2], atol=1e-4)
    finally:
        sd.scheduler = original


# ------------------------------------------------------------------------------------ lifecycle
def test_hooks_gone_after_exit_also_on_error(sd, sd_eraser):
    denoiser = sd.unet
    attn = denoiser.get_submodule(ATTN.removeprefix("unet."))
    block = denoiser.get_submodule(BLOCK.removeprefix("unet."))
    processor, n_block_hooks, n_unet_pre = (
        attn.processor,
        len(block._forward_hooks),
        len(denoiser._forward_pre_hooks),
    )

    class Boom(RuntimeError):
        pass

    def explode(*args):
        raise Boom

    with pytest.raises(Boom), sd_eraser.unlearn(sd, ["red", "blue"], top_n=2):
        assert attn.processor is processor and len(attn._forward_hooks) == 1  # a module hook, never a wrapper
        sd("a red star", num_inference_steps=2, callback_on_step_end=explode)
    assert attn.processor is processor
    assert len(block._forward_hooks) == n_block_hooks
    assert len(denoiser._forward_pre_hooks) == n_unet_pre
    handle = sd_eraser.apply(sd, "red")
    handle.remove()
    handle.remove()  # idempotent
    assert attn.processor is processor and len(block._forward_hooks) == n_block_hooks


def test_double_install_and_from_pipe_share_modules(sd, sd_eraser):
    from diffusers import StableDiffusionPipeline

    plain = images(sd)
    with sd_eraser.unlearn(sd, "red", top_n=4, strength=20.0):
        with pytest.raises(HookConflictError):
            sd_eraser.apply(sd, "blue")
        derived = StableDiffusionPipeline.from_pipe(sd)
        with pytest.raises(HookConflictError):
            sd_eraser.apply(derived, "blue")  # same modules: would double-apply
        derived.set_progress_bar_config(disable=True)
        assert not torch.equal(images(derived), plain)
    assert torch.equal(images(derived), plain) and torch.equal(images(sd), plain)


def test_set_default_attn_processor_after_install_keeps_ablating(sd, sd_eraser):
    plain = images(sd)
    with sd_eraser.unlearn(sd, "red", top_n=4, strength=20.0, hookpoints=[ATTN]):
        first = images(sd)
        sd.unet.set_default_attn_processor()  # replaces every processor; the module hook stays
        again = images(sd)
    assert not torch.equal(first, plain)
    assert torch.allclose(first, again, atol=1e-5)  # still ablating
    assert torch.allclose(images(sd), plain, atol=1e-5)


def test_pipe_to_dtype_after_install(sd_eraser):
    pipe = tiny_sd_pipeline()
    with sd_eraser.unlearn(pipe, "red", top_n=4, strength=20.0, hookpoints=[BLOCK]) as handle:
        ref = images(pipe)
        pipe.to(torch.bfloat16)
        try:
            out = images(pipe)
        finally:
            pipe.to(torch.float32)
        assert handle.ablators[BLOCK].sae.dtype == torch.float32
    assert out.dtype == torch.float32 or out.dtype == torch.bfloat16
    assert torch.isfinite(out.float()).all()
    assert (out.float() - ref).abs().mean() < 0.1


# --------------------------------------------------------------------------------------- bundles
def test_save_load_roundtrip_and_model_card(sd, sd_eraser, tmp_path):
    sd_eraser.set_defaults("red", top_n=4, gamma=-20.0)
    sd_eraser.save_pretrained(tmp_path / "bundle")
    card = (tmp_path / "bundle" / "README.md").read_text()
    assert "library_name: saeuron-plugin" in card and "| red |" in card
    loaded = SAeUron.from_pretrained(tmp_path / "bundle")
    assert set(loaded.hookpoints) == {BLOCK, ATTN} and loaded.concepts == ["red", "blue"]
    with sd_eraser.unlearn(sd, "red") as _:
        a = images(sd)
    with loaded.unlearn(sd, "red"):
        b = images(sd)
    assert torch.equal(a, b)
    assert not torch.equal(a, images(sd))
    only = SAeUron.from_pretrained(tmp_path / "bundle", hookpoints=[BLOCK])
    assert list(only.hookpoints) == [BLOCK]


def test_hub_bundle_loads_offline_from_cache(sd_eraser, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo, commit = "org/tiny-bundle", "0" * 40
    snap = cache / "models--org--tiny-bundle" / "snapshots" / commit
    sd_eraser.save_pretrained(snap)
    (cache / "models--org--tiny-bundle" / "refs").mkdir(parents=True)
    (cache / "models--org--tiny-bundle" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = SAeUron.from_pretrained(repo, cache_dir=cache)
    assert loaded.concepts == ["red", "blue"] and set(loaded.hookpoints) == {BLOCK, ATTN}
    from saeuron_plugin.sae.io import SaeLoadError

    with pytest.raises(SaeLoadError, match="HF_HUB_OFFLINE"):
        SAeUron.from_pretrained("org/not-cached", cache_dir=cache)


def test_bcywinski_layout_folder_runs_on_a_32_wide_pipeline(tmp_path):
    """A folder as bcywinski/SAeUron ships it: sparsify cfg keys, no concepts, no θ."""
    d, n = 32, 128
    folder = tmp_path / "SAeUron" / BLOCK
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, d, generator=g)
    w = w / w.norm(dim=1, keepdim=True)
    save_file(
        {
            "encoder.weight": w.clone(),
            "encoder.bias": torch.zeros(n),
            "W_dec": w.clone(),
            "b_dec": torch.zeros(d),
        },
        str(folder / "sae.safetensors"),
    )
    (folder / "cfg.json").write_text(
        json.dumps(
            {
                "expansion_factor": 4,
                "normalize_decoder": True,
                "num_latents": 0,
                "k": 8,
                "multi_topk": False,
                "d_in": d,
            }
        )
    )
    eraser = SAeUron.from_pretrained(tmp_path / "SAeUron")
    assert eraser.concepts == [] and eraser.hookpoints[BLOCK].sae.cfg.threshold is None
    pipe = tiny_sd_pipeline(channels=(32, 32))
    eraser.add_concept("red", RED, pipe, num_inference_steps=2, show_progress=False)
    eraser.add_concept("blue", BLUE, pipe, num_inference_steps=2, show_progress=False)
    plain = images(pipe, steps=2)
    with eraser.unlearn(pipe, "red", top_n=8, strength=20.0):
        assert not torch.equal(images(pipe, steps=2), plain)
    # θ calibrated during the statistics pass makes the fast threshold encoder usable
    assert eraser.hookpoints[BLOCK].library.calibrated_threshold > 0
    with eraser.unlearn(pipe, "red", top_n=8, strength=20.0, encoder="threshold"):
        assert not torch.equal(images(pipe, steps=2), plain)


# -------------------------------------------------------------------------- transformer families
@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_transformer_families_learn_and_ablate(family):
    pipe, embeds, path = {
        "pixart": (tiny_pixart_pipeline, pixart_embeds, "transformer.transformer_blocks.1"),
        "sd3": (tiny_sd3_pipeline, sd3_embeds, "transformer.transformer_blocks.0"),
        "flux": (tiny_flux_pipeline, flux_embeds, "transformer.single_transformer_blocks.0"),
    }[family]
    pipe = pipe()
    extra = {"height": 16, "width": 16}
    if family == "pixart":
        extra["use_resolution_binning"] = False
    prompts_a = [embeds(seed=i) for i in range(2)]
    prompts_b = [embeds(seed=100 + i) for i in range(2)]
    eraser = SAeUron.from_saes({path: random_sae(_width(pipe, path))}, tau_grid=TauGrid(10))
    eraser.add_concept("a", prompts_a, pipe, num_inference_steps=2, show_progress=False, **extra)
    eraser.add_concept("b", prompts_b, pipe, num_inference_steps=2, show_progress=False, **extra)
    assert eraser.hookpoints[path].library.get("a").total_count > 0

    def run():
        return pipe(
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
            **prompts_a[0],
            **extra,
        ).images

    plain = run()
    with eraser.unlearn(pipe, "a", top_n=0):
        assert torch.equal(run(), plain)
    with eraser.unlearn(pipe, "a", top_n=4, strength=20.0):
        assert not torch.equal(run(), plain)


# ------------------------------------------------------------------------------------ bad input
def test_bad_inputs_give_clear_errors(sd, sd_eraser):
    with pytest.raises(UnknownConceptError, match="Did you mean 'red'"):
        sd_eraser.apply(sd, "rde")
    with pytest.raises(UnknownHookpointError, match="no SAE for"):
        sd_eraser.apply(sd, "red", hookpoints=["unet.mid_block.attentions.0"])
    # width mismatch: the SAE reads 16, this pipeline's block is 32 wide
    wide = tiny_sd_pipeline(channels=(32, 32))
    with pytest.raises(SaeWidthError, match=r"reads 16-wide.*outputs width 32"):
        sd_eraser.apply(wide, "red")
    # the hookpoint does not exist in this pipeline
    eraser = SAeUron.from_saes({"unet.up_blocks.3.attentions.0": random_sae(16)})
    with pytest.raises(HookpointError, match="valid hookpoints"):
        eraser.add_concept("x", ["a"], sd, num_inference_steps=1, show_progress=False)
    # unsupported family
    with pytest.raises(UnsupportedModelError):
        sd_eraser.apply(torch.nn.Linear(2, 2), "red")
    # SAE trained on another base model: a warning, not an error
    other = SAeUron.from_saes({BLOCK: random_sae(16, base_model="stabilityai/sdxl-base")})
    sd.register_to_config(_name_or_path="runwayml/stable-diffusion-v1-5")
    with pytest.warns(UserWarning, match="trained on 'stabilityai/sdxl-base'"):
        other.add_concept("x", ["a"], sd, num_inference_steps=1, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd_eraser.apply(sd, "red").remove()  # no base model recorded: no warning
    with pytest.raises(ValueError, match="at least one prompt"):
        sd_eraser.add_concept("x", [], sd)


def test_add_concepts_routes_shared_prompts_and_batches(sd):
    """One pass for several concepts equals separate passes; batching does not change statistics."""
    prompts = {
        "red": ["a red star", "a red square"],
        "star": ["a red star", "a blue star"],
        None: ["a thing"],
    }
    one = SAeUron.from_saes({BLOCK: random_sae(16)}, tau_grid=TauGrid(10))
    one.add_concepts(
        prompts, sd, num_inference_steps=2, batch_size=2, show_progress=False, guidance_scale=7.5
    )
    sep = SAeUron.from_saes({BLOCK: random_sae(16)}, tau_grid=TauGrid(10))
    for name, ps in prompts.items():
        # same seeds as the joint pass: prompt i of the joint pass has seed i
        order = ["a red star", "a red square", "a blue star", "a thing"]
        for p in ps:
            sep.add_concept(
                name,
                [p],
                sd,
                num_inference_steps=2,
                seed=order.index(p),
                show_progress=False,
                guidance_scale=7.5,
            )
    a, b = one.hookpoints[BLOCK].library, sep.hookpoints[BLOCK].library
    for name in ("red", "star"):
        assert a.get(name).prompts == b.get(name).prompts
        assert torch.equal(a.get(name).counts, b.get(name).counts)
        assert torch.allclose(a.get(name).sums, b.get(name).sums, atol=1e-5)
    assert torch.allclose(a.background.sums, b.background.sums, atol=1e-5)


def test_inactive_defaults_keep_a_concept_to_its_hookpoint(sd, sd_eraser):
    sd_eraser.set_defaults("blue", hookpoints=[ATTN], active=False)
    try:
        with sd_eraser.unlearn(sd, "blue") as handle:
            assert handle.hookpoints == [BLOCK]
        with sd_eraser.unlearn(sd, "blue", hookpoints=[ATTN]) as handle:
            assert handle.hookpoints == [ATTN]
        sd_eraser.set_defaults("blue", hookpoints=[BLOCK], active=False)
        with pytest.raises(ValueError, match="inactive at every hookpoint"):
            sd_eraser.apply(sd, "blue")
    finally:
        sd_eraser.set_defaults("blue", active=True)


def test_the_robust_mode_uses_its_own_hookpoints_and_survives_a_save(sd, sd_eraser, tmp_path):
    """``robust=True`` ablates where the tuner marked ``robust`` (unset: where ``active``); the marks
    are saved with the bundle and shown on its card."""
    sd_eraser.set_defaults("blue", hookpoints=[ATTN], active=False)
    try:
        with sd_eraser.unlearn(sd, "blue", robust=True) as handle:
            assert handle.hookpoints == [BLOCK]  # no robust marks yet: as active
        sd_eraser.set_defaults("blue", hookpoints=[ATTN], robust=True)
        with sd_eraser.unlearn(sd, "blue", robust=True) as handle:
            assert sorted(handle.hookpoints) == sorted([BLOCK, ATTN])
        with sd_eraser.unlearn(sd, "blue") as handle:
            assert handle.hookpoints == [BLOCK]  # the default mode is unchanged
        sd_eraser.save_pretrained(tmp_path / "bundle")
        again = SAeUron.from_pretrained(tmp_path / "bundle")
        assert sorted(again.active_hookpoints("blue", robust=True)) == sorted([BLOCK, ATTN])
        assert again.active_hookpoints("blue") == [BLOCK]
        assert f"`{ATTN}` (robust)" in again.model_card()
    finally:
        sd_eraser.set_defaults("blue", active=True, robust=None)


def test_statistics_count_each_prompt_once_with_several_images_per_prompt(sd):
    eraser = SAeUron.from_saes({BLOCK: random_sae(_width(sd, BLOCK))}, tau_grid=TauGrid(10))
    out = eraser.add_concept(
        "red", RED[:2], sd, num_inference_steps=2, num_images_per_prompt=2, show_progress=False
    )
    stats = out[BLOCK]
    assert stats.num_prompts == 2 and stats.prompts == RED[:2]
    assert stats.total_count == 2 * 2 * 2  # prompts x images x steps


def test_a_target_removed_at_another_hookpoint_is_dropped(sd):
    """red → blue by default; when the same call also removes blue, even where only another hookpoint
    ablates blue, red is only removed (its target would bring back what the user removes)."""
    eraser = make_eraser(sd, [BLOCK, ATTN])
    eraser.set_defaults("red", target="blue")
    eraser.set_defaults("red", hookpoints=[ATTN], active=False)  # red at BLOCK only
    eraser.set_defaults("blue", hookpoints=[BLOCK], active=False)  # blue at ATTN only
    alone = eraser.ablators(eraser.plan(["red"]))
    assert [a.target for a in alone[BLOCK].ablations] == ["blue"]
    both = eraser.ablators(eraser.plan(["red", "blue"]))
    assert list(both) == [BLOCK, ATTN]
    assert [a.target for a in both[BLOCK].ablations] == [None] and both[BLOCK]._member is None
