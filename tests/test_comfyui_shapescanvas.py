"""The shipped ShapesCanvas default in ComfyUI: its UNet loaded into ComfyUI's UNetModel (a matching
unet_config, weights mapped with ``comfy.utils.unet_to_diffusers``), the shipped SAE bundle on it.

* the Unlearn node's UNet outputs equal the diffusers hooked UNet's at the same τ, within the two
  implementations' own fp32 rounding measured in the same test (``assert_edit_parity``);
* a KSampler-style run (ComfyUI's own sampling code: ``comfy.sample.sample``, DDIM, 10 steps, ~10 s) with
  the node unlearns a style as the diffusers adapter does on the same prompts and seeds: the style
  judge's UA is high in both and close, and the images themselves nearly coincide;
* the Concept Detector sees the style's features fire more on images of that style, and names it as
  the strongest style on most of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_comfyui_support import (  # noqa: F401  (keep_global_rng: an autouse fixture)
    ROOT,
    assert_edit_parity,
    comfy_denoised,
    diffusers_denoised,
    keep_global_rng,
    require_comfyui,
)

from saeuron_plugin.comfyui import core

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = ROOT / "checkpoints" / "shapescanvas-sd"
JUDGES = ROOT / "checkpoints" / "shapescanvas-judges"
SHIPPED = ROOT / "checkpoints" / "shapescanvas-saeuron"
STEPS, CFG = 10, 5.0


def bundle_folder() -> Path:
    """The shipped bundle; ``SAEURON_COMFYUI_BUNDLE`` may point at another one (development)."""
    env = os.environ.get("SAEURON_COMFYUI_BUNDLE")
    return Path(env) if env else SHIPPED


@pytest.fixture(scope="module")
def setup():
    require_comfyui()
    folder = bundle_folder()
    if not (MODEL / "unet").is_dir() or not folder.is_dir():
        pytest.skip(f"the ShapesCanvas default ({MODEL}) or its SAE bundle ({folder}) is not built")
    from saeuron_plugin import SAeUron
    from saeuron_plugin.comfyui.diffusers_unet import load_diffusers_unet
    from saeuron_plugin.shapescanvas.build import load_default

    pipe = load_default(str(MODEL))
    bundle = SAeUron.from_pretrained(folder)
    model = load_diffusers_unet(
        pipe.unet, scheduler_config=pipe.scheduler.config, latent_scale=pipe.vae.config.scaling_factor
    )
    return pipe, bundle, model


def style_of(bundle) -> str:
    from saeuron_plugin.shapescanvas import data as sc

    return "striped" if "striped" in bundle.concepts else next(c for c in bundle.concepts if c in sc.STYLES)


def test_shapescanvas_unet_in_comfyui_equals_diffusers(setup):
    pipe, bundle, model = setup
    style = style_of(bundle)
    prompts = [f"a red star in {style} style", "a blue circle in solid style"]
    pe, ne = pipe.encode_prompt(prompts, "cpu", 1, True, [""] * 2)
    pos, neg = [[pe, {}]], [[ne, {}]]
    sigmas = model.get_model_object("model_sampling").sigmas
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    patched = core.unlearn(model, bundle, style)
    effect = 0.0
    for t in (901, 501, 101):
        plain_ours = comfy_denoised(model, x, t, pos, neg, CFG).detach()
        plain_ref = diffusers_denoised(pipe.unet, x, t, pe, ne, CFG, sigmas)
        # the same weights in two implementations: equal up to fp32 rounding (|x| ≈ a few units here)
        assert float((plain_ours - plain_ref).abs().max()) < 1e-3 * float(plain_ref.abs().max())
        with bundle.unlearn(pipe, [style]):
            ref = diffusers_denoised(pipe.unet, x, t, pe, ne, CFG, sigmas)
        ours = comfy_denoised(patched, x, t, pos, neg, CFG)
        m = assert_edit_parity(ours, ref, plain_ours, plain_ref, min_edit=0.0)
        effect = max(effect, m["edit"])
    assert effect > 1e-2


def test_shapescanvas_ksampler_unlearns_the_style_like_diffusers(setup):
    import comfy.sample

    from saeuron_plugin.comfyui.detector import detect
    from saeuron_plugin.shapescanvas import data as sc
    from saeuron_plugin.shapescanvas.judges import Judges
    from saeuron_plugin.shapescanvas.model import generate

    pipe, bundle, model = setup
    style = style_of(bundle)
    other = next(s for s in sc.STYLES if s != style)
    judges = Judges.from_pretrained(JUDGES)
    label = sc.STYLES.index(style)
    prompts = [sc.caption(o, style, c) for o, c in zip(sc.OBJECTS, sc.COLORS)] * 2
    seeds = list(range(len(prompts)))

    def ua(images: torch.Tensor) -> float:
        return float((judges.classify(images)["style"] != label).float().mean())

    base_d = generate(pipe, prompts, seeds, STEPS, CFG)
    with bundle.unlearn(pipe, [style]):
        unlearned_d = generate(pipe, prompts, seeds, STEPS, CFG)

    def comfy_run(m, texts):
        pe, ne = pipe.encode_prompt(texts, "cpu", 1, True, [""] * len(texts))
        latent = torch.zeros(len(texts), 4, 16, 16)
        noise = torch.cat([comfy.sample.prepare_noise(latent[:1], s) for s in seeds[: len(texts)]])
        out = comfy.sample.sample(
            m,
            noise,
            STEPS,
            CFG,
            "ddim",
            "ddim_uniform",
            [[pe, {}]],
            [[ne, {}]],
            latent,
            disable_pbar=True,
            seed=0,
        )
        with torch.no_grad():
            images = (pipe.vae.decode(out).sample / 2 + 0.5).clamp(0, 1)
        return images, out, [[pe, {}]]

    base_c, base_latent, pos = comfy_run(model, prompts)
    unlearned_c, _, _ = comfy_run(core.unlearn(model, bundle, style), prompts)
    numbers = {"diffusers": (ua(base_d), ua(unlearned_d)), "comfyui": (ua(base_c), ua(unlearned_c))}
    for name, (before, after) in numbers.items():
        assert before <= 0.25, (name, numbers)  # the untouched model draws the style ...
        assert after >= 0.6, (name, numbers)  # ... which the unlearned one mostly no longer does
    assert abs(numbers["comfyui"][1] - numbers["diffusers"][1]) <= 0.2, numbers
    # ComfyUI's DDIM from the same seeds follows the diffusers trajectory: nearly the same images
    assert float((base_c - base_d).abs().mean()) < 0.02
    assert float((unlearned_c - unlearned_d).abs().mean()) < 0.03
    # the detector sees the style fire more on its own images than on another style's
    other_prompts = [sc.caption(o, other, c) for o, c in zip(sc.OBJECTS, sc.COLORS)]
    _, other_latent, other_pos = comfy_run(model, other_prompts)
    styles = ",".join(sc.STYLES)
    report = detect(model, bundle, pos, {"samples": base_latent}, concepts=styles, steps=5).per_image()
    off_style = detect(
        model, bundle, other_pos, {"samples": other_latent}, concepts=style, steps=5
    ).per_image()[style]
    assert sum(report[style]) / len(report[style]) > sum(off_style) / len(off_style)
    strongest = [max(sc.STYLES, key=lambda s, i=i: report[s][i]) for i in range(len(prompts))]
    assert strongest.count(style) >= 2 * len(prompts) // 3, strongest
