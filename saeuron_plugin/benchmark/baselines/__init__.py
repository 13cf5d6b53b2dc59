"""Baseline unlearning methods the benchmark compares SAeUron against.

Each module exposes ``NAME`` and ``erase(pipe, concept_text, *, retain_texts=(), **hparams)``, a context
manager yielding a :class:`BaselineRun` and restoring ``pipe`` exactly on exit:

- ``negative_prompt``: CFG with the concept as the negative prompt;
- ``sld``: Safe Latent Diffusion (diffusers' ``StableDiffusionPipelineSafe``, "medium" settings);
- ``uce``: Unified Concept Editing, closed-form edit of the cross-attention K/V projections;
- ``esd``: ESD-x, fine-tuning of the cross-attention parameters (optionally cached as safetensors).

:mod:`saeuron_plugin.benchmark.baselines.presets` has the hyperparameters that make them meaningful on the
shipped ShapesCanvas model (whose text encoder never saw a concept word outside a caption).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from saeuron_plugin.benchmark.baselines import esd, negative_prompt, sld, uce
from saeuron_plugin.benchmark.baselines.base import BaselineRun

BASELINES = {m.NAME: m for m in (negative_prompt, sld, uce, esd)}

__all__ = ["BASELINES", "BaselineRun", "esd", "generate_with", "negative_prompt", "sld", "uce"]


@torch.no_grad()
def generate_with(
    run: BaselineRun,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 25,
    guidance_scale: float = 5.0,
    batch_size: int = 256,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1], one per (prompt, seed), with the baseline of ``run`` active.

    One ``torch.Generator`` per image, seeded with its seed (results do not depend on batching);
    ``run.call_kwargs`` are merged into every call; a string ``negative_prompt`` is repeated to the
    batch's length.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    pipe = run.pipe
    device = pipe.device
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk, sd = list(prompts[i : i + batch_size]), list(seeds[i : i + batch_size])
        kwargs = dict(run.call_kwargs)
        if isinstance(kwargs.get("negative_prompt"), str):
            kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(chunk)
        gens = [torch.Generator(device).manual_seed(int(s)) for s in sd]
        res = pipe(
            chunk,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=gens,
            output_type="pt",
            **kwargs,
        )
        images = res.images
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images).permute(0, 3, 1, 2)
        out.append(images.float().cpu())
    return torch.cat(out)
