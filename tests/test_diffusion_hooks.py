"""Editing hooks on tiny pipelines: identity, edits, τ, CFG rows, processor swaps, clean removal."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
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

from saeuron_plugin.diffusion.hookpoints import list_hookpoints
from saeuron_plugin.diffusion.hooks import HookConflictError, install_hooks
from saeuron_plugin.diffusion.timestep import TimestepTracker

BLOCK = "unet.up_blocks.1.attentions.1"
ATTN = "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2"
XL_BLOCK = "unet.up_blocks.0.attentions.1"
XL_ATTN = "unet.up_blocks.0.attentions.1.transformer_blocks.1.attn2"


def identity(x, ctx):
    return x


def add_one(x, ctx):
    return x + 1.0


def to_double(x, ctx):
    return x.double().contiguous()


class Recorder:
    """Identity editor that keeps what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, ctx):
        mask = ctx.cond_mask
        self.calls.append((tuple(x.shape), ctx.tau.clone(), None if mask is None else mask.clone()))
        return x


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline()


def generate(pipe, steps=2, guidance=7.5, prompt="a red star", **kw):
    out = pipe(
        prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kw,
    )
    return out.images


def snapshot(denoiser):
    """Hooks and processors of every module, to check that removal restores everything."""
    return {
        name: (
            dict(m._forward_hooks),
            dict(m._forward_pre_hooks),
            getattr(m, "processor", None),
            dict(m._modules).get("processor"),
            "cache_context" in m.__dict__,
        )
        for name, m in denoiser.named_modules()
    }


def assert_clean(denoiser, before):
    after = snapshot(denoiser)
    assert after.keys() == before.keys()
    for name, (hooks, pre, proc, proc_mod, ctx) in after.items():
        b_hooks, b_pre, b_proc, b_proc_mod, b_ctx = before[name]
        assert hooks.keys() == b_hooks.keys() and pre.keys() == b_pre.keys(), name
        assert proc is b_proc and proc_mod is b_proc_mod and ctx == b_ctx, name


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_identity_editor_is_bit_identical_both_mechanisms(which, request):
    pipe = request.getfixturevalue(which)
    paths = [BLOCK, ATTN] if which == "sd" else [XL_BLOCK, XL_ATTN]
    before = snapshot(pipe.unet)
    base = generate(pipe)
    with install_hooks(pipe, {p: identity for p in paths}) as hooks:
        assert all(h.calls == 0 for h in hooks.sites.values())
        out = generate(pipe)
        assert all(h.calls == 2 for h in hooks.sites.values())  # 2 steps, one fused CFG call each
    assert (out == base).all()
    assert_clean(pipe.unet, before)
    # an edited copy equal in value (another dtype, another layout) goes back exactly
    with install_hooks(pipe, {p: to_double for p in paths}):
        assert (generate(pipe) == base).all()
    for path in paths:
        with install_hooks(pipe, {path: add_one}):
            assert not (generate(pipe) == base).all(), path
    assert (generate(pipe) == base).all()
    assert_clean(pipe.unet, before)


@pytest.mark.parametrize(
    "scheduler_cls", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler]
)
@pytest.mark.parametrize("steps", [10, 25])
def test_tau_is_the_schedulers_timestep(sd, scheduler_cls, steps):
    original = sd.scheduler
    sd.scheduler = scheduler_cls.from_config(original.config)
    try:
        with install_hooks(sd, {BLOCK: identity, ATTN: identity}, record_tau=True) as hooks:
            generate(sd, steps=steps)
        expected = sd.scheduler.timesteps.float() / 1000
        for path in (BLOCK, ATTN):
            seen = hooks.seen_tau(path)
            assert len(seen) == steps
            assert torch.stack(seen).shape == (steps, 2)  # one τ per CFG row
            assert torch.allclose(torch.stack(seen), expected[:, None].expand(steps, 2))
    finally:
        sd.scheduler = original


@pytest.mark.parametrize(
    ("guidance", "prompts", "expected"),
    [
        (1.0, ["a"], [True]),
        (1.0, ["a", "b"], [True, True]),
        (7.5, ["a"], [False, True]),
        (7.5, ["a", "b"], [False, False, True, True]),
    ],
)
def test_cond_mask_follows_cfg(sd, guidance, prompts, expected):
    rec = Recorder()
    with install_hooks(sd, {BLOCK: rec}):
        generate(sd, guidance=guidance, prompt=prompts)
    assert len(rec.calls) == 2
    for shape, tau, mask in rec.calls:
        assert shape[0] == len(expected) and tau.shape == (len(expected),)
        assert mask.tolist() == expected


def test_cond_mask_layout_overrides(sd):
    for layout, expected in (("unknown", None), ("none", [True, True])):
        rec = Recorder()
        with (
            TimestepTracker(sd, cfg_layout=layout) as tracker,
            install_hooks(sd, {BLOCK: rec}, tracker=tracker),
        ):
            generate(sd)
        assert (rec.calls[0][2] if expected is None else rec.calls[0][2].tolist()) == expected
    assert not sd.unet._forward_pre_hooks
    with pytest.raises(ValueError, match="cfg_layout"):
        TimestepTracker(sd, cfg_layout="bogus")


def test_processor_replaced_mid_install_keeps_the_edit_and_is_never_touched(sd):
    attn = sd.unet.get_submodule(ATTN[len("unet.") :])
    assert type(attn.processor) is AttnProcessor2_0
    base = generate(sd)
    with install_hooks(sd, {ATTN: add_one}):
        assert type(attn.processor) is AttnProcessor2_0  # the user's processor is never wrapped
        edited = generate(sd)
        sd.unet.set_default_attn_processor()
        assert type(attn.processor) is AttnProcessor
        edited_default = generate(sd)
    assert not (edited == base).all()
    assert torch.allclose(torch.from_numpy(edited_default), torch.from_numpy(edited), atol=1e-5)
    assert type(attn.processor) is AttnProcessor  # removal leaves the processor the user set
    assert torch.allclose(torch.from_numpy(generate(sd)), torch.from_numpy(base), atol=1e-5)
    sd.unet.set_attn_processor(AttnProcessor2_0())


class StandInXFormers:
    """Stands in for XFormersAttnProcessor (not installable here): same maths, its own class."""

    def __init__(self):
        self.calls = 0
        self.inner = AttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        self.calls += 1
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class ModuleProcessor(torch.nn.Module):
    """An nn.Module processor with weights, like IP-adapter processors."""

    def __init__(self, dim):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(dim))
        self.inner = AttnProcessor2_0()

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask) * self.scale


def test_standin_and_module_processors_are_edited_in_place(sd):
    attn: Attention = sd.unet.get_submodule(ATTN[len("unet.") :])
    original = attn.processor
    try:
        standin = StandInXFormers()
        attn.set_processor(standin)
        base = generate(sd)
        rec = Recorder()
        with install_hooks(sd, {ATTN: rec}):
            assert generate(sd).tolist() == base.tolist()
            assert standin.calls == 4 and len(rec.calls) == 2
            module_processor = ModuleProcessor(attn.out_dim)
            attn.set_processor(module_processor)  # e.g. an IP-adapter load mid-install
            generate(sd)
            assert len(rec.calls) == 4
            assert attn.processor is module_processor and attn._modules["processor"] is module_processor
        assert attn.processor is module_processor and attn._modules["processor"] is module_processor
    finally:
        attn.set_processor(original)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is None, reason="xformers is not installed")
def test_xformers_processor_is_edited(sd):  # pragma: no cover - needs xformers (and usually CUDA)
    base = generate(sd)
    try:
        sd.enable_xformers_memory_efficient_attention()
        with install_hooks(sd, {ATTN: identity}):
            assert torch.allclose(torch.from_numpy(generate(sd)), torch.from_numpy(base), atol=1e-3)
        with install_hooks(sd, {ATTN: add_one}):
            assert not torch.allclose(torch.from_numpy(generate(sd)), torch.from_numpy(base), atol=1e-3)
    finally:
        sd.disable_xformers_memory_efficient_attention()
        sd.unet.set_attn_processor(AttnProcessor2_0())


def test_hooks_removed_when_editor_raises(sd):
    before = snapshot(sd.unet)

    def explode(x, ctx):
        raise RuntimeError("boom")

    for path in (BLOCK, ATTN):
        editors = {path: explode, "unet.mid_block.attentions.0": identity}
        with pytest.raises(RuntimeError, match="boom"), install_hooks(sd, editors):
            generate(sd)
        assert_clean(sd.unet, before)
    hooks = install_hooks(sd, {BLOCK: identity, ATTN: identity})
    hooks.remove()
    hooks.remove()  # idempotent
    assert_clean(sd.unet, before)


def test_failed_install_rolls_back(sd):
    before = snapshot(sd.unet)
    with pytest.raises(KeyError, match="valid hookpoints"):
        install_hooks(sd, {BLOCK: identity, "unet.nope": identity})
    with install_hooks(sd, {ATTN: identity}), pytest.raises(HookConflictError):
        install_hooks(sd, {BLOCK: identity, ATTN: identity})
    assert_clean(sd.unet, before)


def test_double_install_raises_or_stacks(sd):
    base = generate(sd)
    for path in (BLOCK, ATTN):
        with install_hooks(sd, {path: add_one}):
            with pytest.raises(HookConflictError, match="already has"):
                install_hooks(sd, {path: add_one})
            once = generate(sd)
            with install_hooks(sd, {path: add_one}, allow_stack=True) as second:
                twice = generate(sd)
                assert second.sites[path].calls == 2
            assert (generate(sd) == once).all()
        assert not (once == base).all() and not (twice == once).all()
        assert (generate(sd) == base).all()


def test_stacked_wrappers_removed_in_any_order(sd):
    attn = sd.unet.get_submodule(ATTN[len("unet.") :])
    original = attn.processor
    first = install_hooks(sd, {ATTN: identity})
    second = install_hooks(sd, {ATTN: identity}, allow_stack=True)
    sd.unet.set_default_attn_processor()
    generate(sd)
    assert first.sites[ATTN].calls == 2 and second.sites[ATTN].calls == 2
    first.remove()
    generate(sd)
    assert first.sites[ATTN].calls == 2 and second.sites[ATTN].calls == 4
    second.remove()
    assert type(attn.processor) is AttnProcessor
    attn.set_processor(original)


def test_from_pipe_shares_hooks_and_leaves_nothing(sd):
    before = snapshot(sd.unet)
    base = generate(sd)
    derived = StableDiffusionPipeline.from_pipe(sd)
    derived.set_progress_bar_config(disable=True)
    with install_hooks(derived, {BLOCK: add_one, ATTN: add_one}):
        edited_derived = generate(derived)
        edited_source = generate(sd)  # same module objects: the source is edited too
    assert (edited_derived == edited_source).all() and not (edited_source == base).all()
    assert (generate(derived) == base).all() and (generate(sd) == base).all()
    assert_clean(sd.unet, before)


def test_tracker_outside_a_call_and_removal(sd):
    tracker = TimestepTracker(sd)
    assert tracker.tau is None and tracker.family == "sd1" and tracker.active
    rec = Recorder()
    with install_hooks(sd, {BLOCK: rec}, tracker=tracker):
        generate(sd)
        assert tracker.tau is None  # reset after every denoiser call
    assert tracker.active  # a passed-in tracker belongs to the caller
    tracker.remove()
    tracker.remove()
    assert not sd.unet._forward_pre_hooks and not sd.unet._forward_hooks


# ------------------------------------------------------------------ transformer families
def run_transformer(pipe, embeds, **kw):
    return pipe(
        **embeds,
        num_inference_steps=2,
        height=16,
        width=16,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
        **kw,
    ).images


@pytest.mark.parametrize(
    ("build", "embeds", "extra", "tokens", "mask"),
    [
        (
            tiny_pixart_pipeline,
            pixart_embeds,
            {"use_resolution_binning": False},
            16,
            [False, True],
        ),  # patch 2
        (tiny_sd3_pipeline, sd3_embeds, {}, 64, [False, True]),  # patch 1
        (tiny_flux_pipeline, flux_embeds, {}, 16, [True]),  # 2x2 packing; no true CFG by default
    ],
)
def test_transformer_families_identity_edit_and_tau(build, embeds, extra, tokens, mask):
    pipe = build()
    before = snapshot(pipe.transformer)
    base = run_transformer(pipe, embeds(), **extra)
    for hp in list_hookpoints(pipe):
        rec = Recorder()
        with install_hooks(pipe, {hp.path: rec}, record_tau=True) as hooks:
            assert torch.equal(run_transformer(pipe, embeds(), **extra), base)
        # one row per CFG branch, image tokens only
        assert [shape for shape, _, _ in rec.calls] == [(len(mask), tokens, hp.width)] * 2
        assert [m.tolist() for _, _, m in rec.calls] == [mask] * 2
        taus = torch.stack([t[0] for t in hooks.seen_tau(hp.path)])
        assert torch.allclose(taus, pipe.scheduler.timesteps.float() / 1000)
        if not isinstance(pipe.scheduler, DDIMScheduler):  # flow models: τ is the sigma
            assert torch.allclose(taus, pipe.scheduler.sigmas[:2].float())
        with install_hooks(pipe, {hp.path: add_one}):
            assert not torch.equal(run_transformer(pipe, embeds(), **extra), base), hp.path
    assert_clean(pipe.transformer, before)


def test_flux_true_cfg_branches_from_cache_context():
    pipe = tiny_flux_pipeline()
    neg = flux_embeds(seed=5)
    rec = Recorder()
    with install_hooks(pipe, {"transformer.single_transformer_blocks.0": rec}):
        assert "cache_context" in pipe.transformer.__dict__
        run_transformer(
            pipe,
            flux_embeds(),
            true_cfg_scale=2.0,
            negative_prompt_embeds=neg["prompt_embeds"],
            negative_pooled_prompt_embeds=neg["pooled_prompt_embeds"],
        )
    assert "cache_context" not in pipe.transformer.__dict__
    assert [m.tolist() for _, _, m in rec.calls] == [[True], [False], [True], [False]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_identity_tau_and_collect():
    from saeuron_plugin.diffusion.collect import collect_activations

    pipe = tiny_sd_pipeline().to("cuda", torch.float16)
    base = generate(pipe)
    rec = Recorder()
    with install_hooks(pipe, {BLOCK: to_double, ATTN: rec}, record_tau=True) as hooks:
        assert (generate(pipe) == base).all()
    tau = hooks.seen_tau(BLOCK)[0]
    assert tau.device.type == "cuda" and tau.dtype == torch.float32
    assert rec.calls[0][2].device.type == "cuda" and rec.calls[0][2].tolist() == [False, True]
    with install_hooks(pipe, {BLOCK: add_one, ATTN: add_one}):
        assert not (generate(pipe) == base).all()
    got = []
    collect_activations(
        pipe,
        ["a red star", "a blue square"],
        [BLOCK, ATTN],
        lambda *a: got.append(a),
        num_inference_steps=2,
        guidance_scale=7.5,
        batch_size=2,
        tokens_per_step=8,
        show_progress=False,
    )
    assert [(h, tuple(r.shape), r.device.type, r.dtype) for h, r, _ in got] == [
        (BLOCK, (2 * 2 * 8, 16), "cpu", torch.float16),
        (ATTN, (2 * 2 * 8, 16), "cpu", torch.float16),
    ]


# ------------------------------------------------------------------ issue #18: processors, time
def _attn_case(which):
    """(pipeline, its cross-attention hookpoint, a deterministic run returning a tensor)."""
    if which == "pixart":
        pipe = tiny_pixart_pipeline()
        return (
            pipe,
            "transformer.transformer_blocks.0.attn2",
            lambda: run_transformer(pipe, pixart_embeds(), use_resolution_binning=False),
        )
    pipe = tiny_sd_pipeline() if which == "sd" else tiny_sdxl_pipeline()
    return pipe, ATTN if which == "sd" else XL_ATTN, lambda: torch.from_numpy(generate(pipe))


@pytest.mark.parametrize("which", ["sd", "sdxl", "pixart"])
def test_processor_swaps_while_applied_leave_no_edit_after_removal(which):
    """fuse_qkv_projections() while applied, unfuse after exit: bit-identical to the plain run;
    restoring processors saved while applied: no edit either (the old processor wrapper failed both)."""
    pipe, path, run = _attn_case(which)
    denoiser = pipe.unet if which != "pixart" else pipe.transformer
    original = dict(denoiser.attn_processors)
    plain = run()
    try:
        with install_hooks(pipe, {path: add_one}):
            denoiser.fuse_qkv_projections()
            saved = dict(denoiser.attn_processors)
            edited = run()
        fused_plain = run()  # the hook is gone, the fused processors stay
        assert not torch.equal(edited, fused_plain)
        denoiser.unfuse_qkv_projections()
        assert torch.equal(run(), plain)
        denoiser.set_attn_processor(saved)
        assert torch.equal(run(), fused_plain)
    finally:
        denoiser.set_attn_processor(original)


def test_edm_scheduler_on_sdxl_moves_tau_with_sigma(sdxl):
    from diffusers import EDMEulerScheduler

    from saeuron_plugin.sae.concepts import TauGrid

    original = sdxl.scheduler
    sdxl.scheduler = EDMEulerScheduler()
    try:
        rec = Recorder()
        with _no_warning(), install_hooks(sdxl, {XL_BLOCK: rec}, record_tau=True) as hooks:
            generate(sdxl, steps=8)
        taus = torch.stack([t[0] for t in hooks.seen_tau(XL_BLOCK)])
        sigmas = sdxl.scheduler.sigmas[:8].float()
        expected = (sigmas.log() - math.log(0.002)) / (math.log(80.0) - math.log(0.002))
        assert torch.allclose(taus, expected, atol=1e-5)
        assert bool((taus[1:] < taus[:-1]).all()) and float(taus.min()) >= 0 and float(taus.max()) <= 1
        assert len(set(TauGrid(10).index(taus).tolist())) >= 5  # several buckets, not all in bucket 0
    finally:
        sdxl.scheduler = original


class _no_warning:
    """Fail if a warning is raised inside the block."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def test_tau_outside_the_unit_range_warns_and_clamps(sd):
    rec = Recorder()
    tracker = TimestepTracker(sd, time_scale=100.0)
    with (
        pytest.warns(UserWarning, match=r"outside \[0, 1\]"),
        tracker,
        install_hooks(sd, {BLOCK: rec}, tracker=tracker),
    ):
        generate(sd)
    assert all(float(tau.max()) <= 1.0 for _, tau, _ in rec.calls)


def test_sd2_v_prediction_and_img2img_tau(sd):
    """SD 2.x v-prediction (DDPM timesteps, 1024-d text) and img2img (a partial schedule) key τ by
    the denoiser's own timestep: img2img at strength 0.5 starts halfway down the schedule."""
    from diffusers import StableDiffusionImg2ImgPipeline

    from saeuron_plugin.diffusion.hookpoints import detect_family

    v = tiny_sd_pipeline(cross_attention_dim=1024)
    v.scheduler = DDIMScheduler.from_config(v.scheduler.config, prediction_type="v_prediction")
    assert detect_family(v) == "sd2"
    with install_hooks(v, {ATTN: Recorder()}, record_tau=True) as hooks:
        generate(v, steps=4)
    taus = torch.stack([t[0] for t in hooks.seen_tau(ATTN)])
    assert torch.allclose(taus, v.scheduler.timesteps.float() / 1000)
    img2img = StableDiffusionImg2ImgPipeline(**sd.components)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 16, 16)
    with install_hooks(img2img, {BLOCK: Recorder()}, record_tau=True) as hooks:
        img2img(
            "a red star",
            image=image,
            strength=0.5,
            num_inference_steps=10,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
    taus = torch.stack([t[0] for t in hooks.seen_tau(BLOCK)])
    assert len(taus) == 5 and float(taus.max()) < 0.55  # 5 of 10 steps, from mid-schedule down
    assert torch.allclose(taus, img2img.scheduler.timesteps[-5:].float() / 1000)


def test_pixart_sigma_and_its_cross_attention_hookpoints():
    from diffusers import PixArtSigmaPipeline

    alpha = tiny_pixart_pipeline()
    pipe = PixArtSigmaPipeline(**alpha.components)
    pipe.set_progress_bar_config(disable=True)
    paths = [hp.path for hp in list_hookpoints(pipe)]
    assert "transformer.transformer_blocks.0.attn2" in paths and "transformer.transformer_blocks.1" in paths
    base = run_transformer(pipe, pixart_embeds(), use_resolution_binning=False)
    rec = Recorder()
    with install_hooks(pipe, {"transformer.transformer_blocks.1.attn2": rec}, record_tau=True) as hooks:
        assert torch.equal(run_transformer(pipe, pixart_embeds(), use_resolution_binning=False), base)
    taus = torch.stack([t[0] for t in hooks.seen_tau("transformer.transformer_blocks.1.attn2")])
    assert torch.allclose(taus, pipe.scheduler.timesteps.float() / 1000)
    with install_hooks(pipe, {"transformer.transformer_blocks.1.attn2": add_one}):
        assert not torch.equal(run_transformer(pipe, pixart_embeds(), use_resolution_binning=False), base)


def test_active_diffusers_cache_hook_warns(sd):
    from diffusers.hooks import HookRegistry, ModelHook

    registry = HookRegistry.check_if_exists_or_initialize(sd.unet.up_blocks[1])
    registry.register_hook(ModelHook(), "first_block_cache_stand_in")
    try:
        with pytest.warns(UserWarning, match="cache hooks are active"), install_hooks(sd, {BLOCK: identity}):
            pass
    finally:
        registry.remove_hook("first_block_cache_stand_in")
