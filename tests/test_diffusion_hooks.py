"""Editing hooks on tiny pipelines: identity, edits, τ, CFG rows, processor wrapping, clean removal."""

from __future__ import annotations

import importlib.util

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
from saeuron_plugin.diffusion.hooks import (
    WRAPPED_PROCESSOR_ATTR,
    EditingAttnProcessor,
    HookConflictError,
    install_hooks,
)
from saeuron_plugin.diffusion.timestep import TimestepTracker

BLOCK = "unet.up_blocks.1.attentions.1"
ATTN = "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2"
XL_BLOCK = "unet.up_blocks.0.attentions.1"
XL_ATTN = "unet.up_blocks.0.attentions.1.transformer_blocks.1.attn2"


def identity(x, tau, cond_mask=None):
    return x


def add_one(x, tau, cond_mask=None):
    return x + 1.0


def to_double(x, tau, cond_mask=None):
    return x.double().contiguous()


class Recorder:
    """Identity editor that keeps what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, tau, cond_mask=None):
        self.calls.append((tuple(x.shape), tau.clone(), None if cond_mask is None else cond_mask.clone()))
        return x


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl_pipeline()


def generate(pipe, steps=2, guidance=7.5, prompt="a red star", **kw):
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
               generator=torch.Generator().manual_seed(0), **kw)
    return out.images


def snapshot(denoiser):
    """Hooks and processors of every module, to check that removal restores everything."""
    return {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks), getattr(m, "processor", None),
                   dict(m._modules).get("processor"), "cache_context" in m.__dict__)
            for name, m in denoiser.named_modules()}


def assert_clean(denoiser, before):
    after = snapshot(denoiser)
    assert after.keys() == before.keys()
    for name, (hooks, pre, proc, proc_mod, ctx) in after.items():
        b_hooks, b_pre, b_proc, b_proc_mod, b_ctx = before[name]
        assert hooks.keys() == b_hooks.keys() and pre.keys() == b_pre.keys(), name
        assert proc is b_proc and proc_mod is b_proc_mod and ctx == b_ctx, name
        assert WRAPPED_PROCESSOR_ATTR not in denoiser.get_submodule(name)._modules


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_identity_editor_is_bit_identical_both_mechanisms(which, request):
    pipe = request.getfixturevalue(which)
    paths = [BLOCK, ATTN] if which == "sd" else [XL_BLOCK, XL_ATTN]
    before = snapshot(pipe.unet)
    base = generate(pipe)
    with install_hooks(pipe, {p: identity for p in paths}) as hooks:
        assert all(h.calls == 0 for h in hooks.hooks.values())
        out = generate(pipe)
        assert all(h.calls == 2 for h in hooks.hooks.values())  # 2 steps, one fused CFG call each
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


@pytest.mark.parametrize("scheduler_cls",
                         [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
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


@pytest.mark.parametrize(("guidance", "prompts", "expected"), [
    (1.0, ["a"], [True]), (1.0, ["a", "b"], [True, True]),
    (7.5, ["a"], [False, True]), (7.5, ["a", "b"], [False, False, True, True])])
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
        with TimestepTracker(sd, cfg_layout=layout) as tracker, \
                install_hooks(sd, {BLOCK: rec}, tracker=tracker):
            generate(sd)
        assert (rec.calls[0][2] if expected is None else rec.calls[0][2].tolist()) == expected
    assert not sd.unet._forward_pre_hooks
    with pytest.raises(ValueError, match="cfg_layout"):
        TimestepTracker(sd, cfg_layout="bogus")


def test_processor_replaced_mid_install_is_rewrapped(sd):
    attn = sd.unet.get_submodule(ATTN[len("unet."):])
    before = snapshot(sd.unet)
    assert type(attn.processor) is AttnProcessor2_0
    base = generate(sd)
    with install_hooks(sd, {ATTN: add_one}) as hooks:
        wrapper = attn.processor
        assert type(wrapper) is EditingAttnProcessor
        assert isinstance(wrapper, AttnProcessor2_0)  # transparent to diffusers' class checks
        edited = generate(sd)
        sd.unet.set_default_attn_processor()  # would raise on an opaque wrapper class
        assert type(attn.processor) is AttnProcessor
        edited_default = generate(sd)
        assert attn.processor is wrapper and type(wrapper.inner) is AttnProcessor
        assert hooks.hooks[ATTN].rewraps == 1
    assert not (edited == base).all()
    assert torch.allclose(torch.from_numpy(edited_default), torch.from_numpy(edited), atol=1e-5)
    # removal puts back the processor that was current (the default one), not a stale original
    assert type(attn.processor) is AttnProcessor
    sd.unet.set_attn_processor(AttnProcessor2_0())
    restored = snapshot(sd.unet)
    assert {k: type(v[2]) for k, v in restored.items()} == {k: type(v[2]) for k, v in before.items()}


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


def test_standin_and_module_processors_are_wrapped(sd):
    attn: Attention = sd.unet.get_submodule(ATTN[len("unet."):])
    original = attn.processor
    try:
        standin = StandInXFormers()
        attn.set_processor(standin)
        base = generate(sd)
        rec = Recorder()
        with install_hooks(sd, {ATTN: rec}):
            assert generate(sd).tolist() == base.tolist()
            assert standin.calls == 4 and len(rec.calls) == 2
            attn.set_processor(ModuleProcessor(attn.out_dim))  # e.g. an IP-adapter load mid-install
            generate(sd)
            assert len(rec.calls) == 4
            # its weights stay registered (so .to() moves them), under another name while wrapped
            assert attn._modules[WRAPPED_PROCESSOR_ATTR] is attn.processor.inner
            assert isinstance(attn.processor, EditingAttnProcessor)
            assert not isinstance(attn.processor, torch.nn.Module)
        assert isinstance(attn.processor, ModuleProcessor) and attn._modules["processor"] is attn.processor
        assert WRAPPED_PROCESSOR_ATTR not in attn._modules
        with install_hooks(sd, {ATTN: identity}):
            assert WRAPPED_PROCESSOR_ATTR in attn._modules
            attn.set_processor(AttnProcessor2_0())  # a plain processor again: the alias goes
            generate(sd)
            assert WRAPPED_PROCESSOR_ATTR not in attn._modules and "processor" not in attn._modules
        assert type(attn.processor) is AttnProcessor2_0
    finally:
        attn.set_processor(original)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is None, reason="xformers is not installed")
def test_xformers_processor_is_wrapped(sd):  # pragma: no cover - needs xformers (and usually CUDA)
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

    def explode(x, tau, cond_mask=None):
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
                assert second.hooks[path].calls == 2
            assert (generate(sd) == once).all()
        assert not (once == base).all() and not (twice == once).all()
        assert (generate(sd) == base).all()


def test_stacked_wrappers_removed_in_any_order(sd):
    attn = sd.unet.get_submodule(ATTN[len("unet."):])
    original = attn.processor
    first = install_hooks(sd, {ATTN: identity})
    second = install_hooks(sd, {ATTN: identity}, allow_stack=True)
    sd.unet.set_default_attn_processor()
    generate(sd)
    assert first.hooks[ATTN].calls == 2 and second.hooks[ATTN].calls == 2
    first.remove()
    generate(sd)
    assert first.hooks[ATTN].calls == 2 and second.hooks[ATTN].calls == 4
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
    return pipe(**embeds, num_inference_steps=2, height=16, width=16, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kw).images


@pytest.mark.parametrize(("build", "embeds", "extra", "tokens", "mask"), [
    (tiny_pixart_pipeline, pixart_embeds, {"use_resolution_binning": False}, 16, [False, True]),  # patch 2
    (tiny_sd3_pipeline, sd3_embeds, {}, 64, [False, True]),  # patch 1
    (tiny_flux_pipeline, flux_embeds, {}, 16, [True]),  # 2x2 packing; no true CFG by default
])
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
        run_transformer(pipe, flux_embeds(), true_cfg_scale=2.0, negative_prompt_embeds=neg["prompt_embeds"],
                        negative_pooled_prompt_embeds=neg["pooled_prompt_embeds"])
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
    collect_activations(pipe, ["a red star", "a blue square"], [BLOCK, ATTN], lambda *a: got.append(a),
                        num_inference_steps=2, guidance_scale=7.5, batch_size=2, tokens_per_step=8,
                        show_progress=False)
    assert [(h, tuple(r.shape), r.device.type, r.dtype) for h, r, _ in got] == [
        (BLOCK, (2 * 2 * 8, 16), "cpu", torch.float16), (ATTN, (2 * 2 * 8, 16), "cpu", torch.float16)]
