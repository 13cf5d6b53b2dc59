"""Safe Latent Diffusion (Schramowski et al., CVPR 2023) with the concept as the "safety concept".

Route: diffusers 0.42.1 still ships ``StableDiffusionPipelineSafe`` (under
``diffusers.pipelines.deprecated``, last maintained for 0.33.1) and it accepts our SD 1.x components
with ``safety_checker=None``, ``feature_extractor=None``, ``requires_safety_checker=False``. We build it
from the same module objects as ``pipe`` (nothing copied) and set ``safety_concept = concept_text``.
The SLD update is the library's (Eqs. 3-8 of the paper): a third UNet pass on the concept embedding,
an element-wise, thresholded, momentum-accumulated guidance term subtracted from the CFG direction
after the warm-up steps.

A thin subclass adds two things only: ``output_type="pt"`` returns a float tensor [B, 3, H, W] like
``StableDiffusionPipeline`` (the deprecated pipeline knows only "pil" and numpy), and the warm-up can
be given as a fraction of the number of inference steps (``sld_warmup_fraction``).

Defaults = the paper's "medium" configuration (``SafetyConfig.MEDIUM``: s_S = 1000, λ = 0.01,
s_m = 0.3, β_m = 0.4, δ = 10 warm-up steps of 50). Our protocol runs 25 DDIM steps, so the warm-up is
kept proportional: δ = 0.2 · num_inference_steps (5 of 25). Pass ``sld_warmup_steps`` to fix it instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from diffusers import StableDiffusionPipelineSafe
from diffusers.utils import logging as dlogging

from saeuron_plugin.benchmark.baselines.base import BaselineRun

NAME = "sld"

# The paper's "medium" hyperparameters; warm-up as the fraction 10 / 50 of the sampling steps.
MEDIUM: dict[str, float] = {
    "sld_guidance_scale": 1000.0,
    "sld_warmup_fraction": 10 / 50,
    "sld_threshold": 0.01,
    "sld_momentum_scale": 0.3,
    "sld_mom_beta": 0.4,
}


class SafeLatentDiffusionPipeline(StableDiffusionPipelineSafe):
    """``StableDiffusionPipelineSafe`` with ``output_type="pt"`` and a fractional warm-up."""

    def __call__(
        self, *args, output_type: str | None = "pil", sld_warmup_fraction: float | None = None, **kwargs
    ):
        if sld_warmup_fraction is not None and kwargs.get("sld_warmup_steps") is None:
            steps = kwargs.get("num_inference_steps", 50)
            kwargs["sld_warmup_steps"] = round(sld_warmup_fraction * steps)
        want_pt = output_type == "pt"
        out = super().__call__(*args, output_type="np" if want_pt else output_type, **kwargs)
        if want_pt:
            if isinstance(out, tuple):
                return (torch.from_numpy(out[0]).permute(0, 3, 1, 2), *out[1:])
            out.images = torch.from_numpy(out.images).permute(0, 3, 1, 2)
        return out


def build_safe_pipeline(pipe, concept_text: str) -> SafeLatentDiffusionPipeline:
    """An SLD pipeline over ``pipe``'s own modules (shared, not copied), ``concept_text`` as the concept."""
    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # silence the "deprecated pipeline" warning of every construction
    try:
        safe = SafeLatentDiffusionPipeline(
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            unet=pipe.unet,
            scheduler=pipe.scheduler,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=getattr(pipe, "image_encoder", None),
            requires_safety_checker=False,
        )
    finally:
        dlogging.set_verbosity(level)
    safe.safety_concept = concept_text
    safe.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return safe


@contextmanager
def erase(
    pipe,
    concept_text: str,
    *,
    retain_texts: Sequence[str] = (),
    safety_concept: str | None = None,
    sld_guidance_scale: float = MEDIUM["sld_guidance_scale"],
    sld_warmup_fraction: float = MEDIUM["sld_warmup_fraction"],
    sld_warmup_steps: int | None = None,
    sld_threshold: float = MEDIUM["sld_threshold"],
    sld_momentum_scale: float = MEDIUM["sld_momentum_scale"],
    sld_mom_beta: float = MEDIUM["sld_mom_beta"],
) -> Iterator[BaselineRun]:
    """Yield an SLD pipeline sharing ``pipe``'s modules; ``retain_texts`` is not used by SLD.

    The safety concept is ``safety_concept or concept_text`` (a well-formed prompt for the concept can
    be given as ``safety_concept``, see :mod:`saeuron_plugin.benchmark.baselines.presets`).

    SLD needs classifier-free guidance (``guidance_scale > 1``); with ``guidance_scale <= 1`` the
    library silently disables safety guidance. The library's constructor may rewrite the scheduler's
    config (``steps_offset``, ``clip_sample``) and the UNet's (``sample_size`` of pre-0.9 checkpoints);
    both config dicts are restored on exit.
    """
    del retain_texts
    saved = [(m, m._internal_dict) for m in (pipe.scheduler, pipe.unet) if hasattr(m, "_internal_dict")]
    try:
        safe = build_safe_pipeline(pipe, safety_concept or concept_text)
        kwargs = {
            "sld_guidance_scale": sld_guidance_scale,
            "sld_threshold": sld_threshold,
            "sld_momentum_scale": sld_momentum_scale,
            "sld_mom_beta": sld_mom_beta,
        }
        if sld_warmup_steps is not None:
            kwargs["sld_warmup_steps"] = int(sld_warmup_steps)
        else:
            kwargs["sld_warmup_fraction"] = sld_warmup_fraction
        yield BaselineRun(
            pipe=safe, call_kwargs=kwargs, info={"route": "diffusers StableDiffusionPipelineSafe"}
        )
    finally:
        for m, d in saved:
            m._internal_dict = d
