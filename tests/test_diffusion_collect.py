"""Activation collection from tiny pipelines into the store or a streaming sink."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import (
    flux_embeds,
    pixart_embeds,
    sd3_embeds,
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
)

from saeuron_plugin.diffusion.collect import collect_activations, prompt_key
from saeuron_plugin.diffusion.hooks import install_hooks
from saeuron_plugin.sae.store import ActivationStore

BLOCK = "unet.up_blocks.1.attentions.1"
ATTN = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2"
PROMPTS = ["a red star", "a blue square in striped style", "a green circle"]
TOKENS = 64  # 16 px images → 8x8 latents; up_blocks.1 runs at full latent resolution
STEPS = 2


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline()


class Sink:
    def __init__(self):
        self.got = []

    def __call__(self, hookpoint, rows, tau):
        self.got.append((hookpoint, rows, tau))


def read_all(store):
    x, tau = zip(*store.iter_batches(10_000, shuffle=False, with_tau=True, dtype=torch.float32))
    return torch.cat(x), torch.cat(tau)


def test_collect_into_store_with_tau_and_resume(sd, tmp_path):
    store = ActivationStore.create(tmp_path / "acts", d_in=16, dtype=torch.float32)
    res = collect_activations(
        sd,
        PROMPTS,
        [BLOCK],
        store,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        batch_size=2,
        show_progress=False,
    )
    assert (res.collected, res.skipped, res.rows[BLOCK]) == (3, 0, 3 * STEPS * TOKENS)
    reopened = ActivationStore(tmp_path / "acts")
    assert len(reopened) == 3 * STEPS * TOKENS
    assert reopened.keys == {prompt_key(i, p) for i, p in enumerate(PROMPTS)}
    x, tau = read_all(reopened)
    sd.scheduler.set_timesteps(STEPS)
    expected_tau = (sd.scheduler.timesteps.float() / 1000).repeat_interleave(TOKENS).repeat(3)
    assert torch.allclose(tau, expected_tau)

    # rows are the conditional CFG half of the block output, prompt by prompt, step by step
    seen = []

    def grab(x, ctx):
        seen.append(x[ctx.cond_mask].clone())
        return x

    with install_hooks(sd, {BLOCK: grab}):
        sd(
            PROMPTS[1],
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            output_type="latent",
            generator=torch.Generator().manual_seed(1),
        )  # image i is seeded seed + i
    assert torch.allclose(x[STEPS * TOKENS : 2 * STEPS * TOKENS], torch.cat(seen).reshape(-1, 16), atol=1e-5)

    # a re-run skips what is stored and collects only the new prompt
    res = collect_activations(
        sd,
        [*PROMPTS, "a yellow star"],
        [BLOCK],
        reopened,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        show_progress=False,
    )
    assert (res.collected, res.skipped, res.rows[BLOCK]) == (1, 3, STEPS * TOKENS)
    assert len(ActivationStore(tmp_path / "acts")) == 4 * STEPS * TOKENS


def test_batching_does_not_change_rows(sd):
    sinks = [Sink(), Sink()]
    for sink, batch in zip(sinks, (1, 3)):
        collect_activations(
            sd,
            PROMPTS,
            [BLOCK],
            sink,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            batch_size=batch,
            show_progress=False,
        )
    one, three = (torch.cat([r for _, r, _ in s.got]) for s in sinks)
    assert one.shape == (3 * STEPS * TOKENS, 16)
    assert torch.allclose(one, three, atol=1e-5)


def test_two_hookpoints_one_pass_into_folder(sd, tmp_path):
    calls = []
    sd.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        res = collect_activations(
            sd,
            PROMPTS[:2],
            [BLOCK, ATTN],
            tmp_path,
            num_inference_steps=STEPS,
            guidance_scale=7.5,
            show_progress=False,
        )
    finally:
        sd.unet._forward_pre_hooks.clear()
    assert len(calls) == 2 * STEPS  # one generation per prompt for both hookpoints
    assert res.rows == {BLOCK: 2 * STEPS * TOKENS, ATTN: 2 * STEPS * TOKENS}
    for path in (BLOCK, ATTN):
        store = ActivationStore(tmp_path / path)
        assert len(store) == 2 * STEPS * TOKENS and store.metadata["hookpoint"] == path
        assert store.metadata["model_family"] == "sd1" and store.dtype == torch.float16
    res = collect_activations(
        sd, PROMPTS[:2], [BLOCK, ATTN], tmp_path, num_inference_steps=STEPS, show_progress=False
    )
    assert (res.collected, res.skipped) == (0, 2)


def test_stream_subsample_and_uncond_rows(sd):
    sink = Sink()
    res = collect_activations(
        sd,
        PROMPTS,
        [BLOCK],
        sink,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        tokens_per_step=5,
        batch_size=2,
        seed=3,
        show_progress=False,
    )
    assert [(h, r.shape, t.shape) for h, r, t in sink.got] == [
        (BLOCK, (2 * STEPS * 5, 16), (2 * STEPS * 5,)),
        (BLOCK, (STEPS * 5, 16), (STEPS * 5,)),
    ]
    assert res.rows[BLOCK] == 3 * STEPS * 5
    again = Sink()
    collect_activations(
        sd,
        PROMPTS,
        [BLOCK],
        again,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        tokens_per_step=5,
        batch_size=2,
        seed=3,
        show_progress=False,
    )
    assert all(torch.equal(a[1], b[1]) for a, b in zip(sink.got, again.got))  # seeded subsample

    both = Sink()
    collect_activations(
        sd,
        PROMPTS[:1],
        [BLOCK],
        both,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        cond_only=False,
        show_progress=False,
    )
    assert both.got[0][1].shape == (2 * STEPS * TOKENS, 16)
    none = Sink()
    collect_activations(
        sd, PROMPTS[:2], [BLOCK], none, num_inference_steps=STEPS, guidance_scale=1.0, show_progress=False
    )
    assert [r.shape for _, r, _ in none.got] == [(STEPS * TOKENS, 16)] * 2  # no CFG: all rows conditional


def test_collect_errors_leave_pipeline_clean(sd, tmp_path):
    store = ActivationStore.create(tmp_path / "one", d_in=16)
    with pytest.raises(ValueError, match="several hookpoints"):
        collect_activations(sd, PROMPTS, [BLOCK, ATTN], store, show_progress=False)
    with pytest.raises(KeyError, match="valid hookpoints"):
        collect_activations(sd, PROMPTS, ["unet.nope"], store, show_progress=False)
    with pytest.raises(TypeError, match="store must be"):
        collect_activations(sd, PROMPTS, [BLOCK], 42, show_progress=False)
    with pytest.raises(ValueError, match="d_in"):  # a store of the wrong width fails on append
        collect_activations(
            sd,
            PROMPTS[:1],
            [ATTN],
            {ATTN: ActivationStore.create(tmp_path / "w", d_in=7)},
            num_inference_steps=STEPS,
            show_progress=False,
        )
    assert not sd.unet._forward_pre_hooks and not sd.unet._forward_hooks
    assert "cache_context" not in sd.unet.__dict__
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in sd.unet.modules())


@pytest.mark.parametrize(
    ("build", "embeds", "extra", "path", "rows"),
    [
        (
            tiny_pixart_pipeline,
            pixart_embeds,
            {"use_resolution_binning": False},
            "transformer.transformer_blocks.1",
            16,
        ),
        (tiny_sd3_pipeline, sd3_embeds, {}, "transformer.transformer_blocks.1", 64),
        (tiny_flux_pipeline, flux_embeds, {}, "transformer.single_transformer_blocks.0", 16),
    ],
)
def test_transformer_families_collect(build, embeds, extra, path, rows, tmp_path):
    pipe = build()
    prompts = [embeds(seed=s) for s in range(3)]
    sink = Sink()
    res = collect_activations(
        pipe,
        prompts,
        [path],
        sink,
        num_inference_steps=STEPS,
        batch_size=2,
        height=16,
        width=16,
        show_progress=False,
        **extra,
    )
    assert res.rows[path] == 3 * STEPS * rows
    x = torch.cat([r for _, r, _ in sink.got])
    tau = torch.cat([t for _, _, t in sink.got])
    assert x.shape == (3 * STEPS * rows, 16) and ((tau >= 0) & (tau <= 1)).all() and tau.max() > 0
    store = ActivationStore.create(tmp_path / "s", d_in=16)
    collect_activations(
        pipe,
        prompts[:2],
        [path],
        store,
        num_inference_steps=STEPS,
        height=16,
        width=16,
        show_progress=False,
        **extra,
    )
    res = collect_activations(
        pipe,
        prompts,
        [path],
        store,
        num_inference_steps=STEPS,
        height=16,
        width=16,
        show_progress=False,
        **extra,
    )
    assert (res.collected, res.skipped) == (1, 2)
