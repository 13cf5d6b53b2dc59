"""Erased Stable Diffusion, ESD-x (Gandikota et al., ICCV 2023): fine-tune the cross-attention only.

Only the parameters of the UNet's cross-attention modules (``attn2`` in SD 1.x: to_q, to_k, to_v,
to_out; with ``layers="attn2_kv"`` only to_k and to_v) are trained, so that for the concept prompt c

    ε_θ(x_t, c, t)  →  ε*(x_t, c, t) = ε_orig(x_t, ∅, t) − η (ε_orig(x_t, c, t) − ε_orig(x_t, ∅, t))

(η = ``negative_guidance``), with an MSE loss and Adam, one (x_t, t) per step.

Choice of x_t (documented deviation): the paper draws x_t by running DDIM with the model being trained.
We draw it with the ORIGINAL model: for every training step a trajectory with its own noise is run with
DDIM (``sample_steps`` steps, CFG ``sample_guidance``) from pure noise up to a uniformly drawn step t.
Because the sampler and the targets only involve the frozen original model, all trajectories, the
sampled (x_t, t) and the targets ε* are computed up front in batches (one CFG pass gives both
ε_orig(x_t, ∅) and ε_orig(x_t, c) at the step where x_t is taken), and training then costs one
forward and one backward pass per step. It is also cheaper and makes the whole run a deterministic
function of (model, hyperparameters, seed).

Defaults: 200 steps at lr 1e-3, batch 1 (the paper: 1000 steps at 1e-5 for SD 1.4's 860 M-parameter
UNet). A benchmark of many concepts calls for fewer steps; our 3 M-parameter model then needs a much
larger lr. Measured on the ShapesCanvas model with the preset prompt (``presets``, e.g. "a star"),
12 prompts with the concept / 12 without, judge accuracy on the concept's domain after 200 steps:
star 1.00 -> 0.92 / 0.17 / 0.08 at lr 1e-4 / 5e-4 / 1e-3 (in-domain retain 1.00 throughout);
at 1e-3 "striped style" -> 0.42 (retain 0.92) and "red" -> 0.75 (retain 1.00). ~45 s on one CPU thread.
``prompts`` are the training prompts (cycled); default: the concept text alone, as in the paper
(on our model the bare word does nothing: use the preset).

``cache_dir``: the trained cross-attention weights are saved as
``<cache_dir>/<slug(concept)>-<hash>.safetensors`` (safetensors only) where the hash covers the
hyperparameters and a fingerprint of the UNet and text encoder weights, and are loaded on later calls
instead of training.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from saeuron_plugin.benchmark.baselines.base import (
    BaselineRun,
    cross_attention_parameters,
    encode_prompts,
    fingerprint,
    hparam_hash,
    restored_module_state,
    restored_tensors,
    slugify,
)

NAME = "esd"
FORMAT_VERSION = 1
DEFAULTS: dict[str, Any] = {
    "steps": 200,
    "lr": 1e-3,
    "negative_guidance": 1.0,
    "sample_steps": 25,
    "sample_guidance": 5.0,
    "batch_size": 1,
    "seed": 0,
    "layers": "attn2",
}
LAYERS = ("attn2", "attn2_kv")
"""Which cross-attention parameters train: all of them (ESD-x) or only the key / value projections
(the text side, the parameters UCE edits)."""


def trained_parameters(unet: torch.nn.Module, layers: str = "attn2") -> dict[str, torch.nn.Parameter]:
    """The parameters ESD-x trains for ``layers`` (one of :data:`LAYERS`)."""
    if layers not in LAYERS:
        raise ValueError(f"layers must be one of {LAYERS}, got {layers!r}")
    params = cross_attention_parameters(unet)
    if layers == "attn2_kv":
        params = {n: p for n, p in params.items() if n.endswith(("to_k.weight", "to_v.weight"))}
    return params


def cache_path(pipe, concept_text: str, cache_dir: str | Path, hparams: dict[str, Any]) -> Path:
    """Where the trained weights of (model, concept, hyperparameters) live in ``cache_dir``."""
    key = hparam_hash(
        {"concept": concept_text, "format": FORMAT_VERSION, **hparams},
        fingerprint(pipe.unet, pipe.text_encoder),
    )
    return Path(cache_dir) / f"{slugify(concept_text)}-{key}.safetensors"


@torch.no_grad()
def sample_training_points(
    pipe,
    prompts: Sequence[str],
    steps: int,
    sample_steps: int,
    sample_guidance: float,
    negative_guidance: float,
    seed: int,
    chunk: int = 32,
) -> dict[str, torch.Tensor]:
    """Per training step: x_t (from the original model's DDIM), its timestep, prompt index and ε*.

    Returns ``{"x": [S, C, h, w], "t": [S], "prompt": [S], "target": [S, C, h, w]}``.
    """
    unet, dev = pipe.unet, pipe.device
    dtype = unet.dtype
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(sample_steps, device=dev)
    timesteps = sched.timesteps
    gen = torch.Generator().manual_seed(seed)
    stop = torch.randint(0, sample_steps, (steps,), generator=gen)  # DDIM steps taken before x_t
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    noise = torch.randn(steps, unet.config.in_channels, *size, generator=gen)
    which = torch.arange(steps) % len(prompts)
    cond = encode_prompts(pipe, prompts).to(dtype)
    uncond = encode_prompts(pipe, [""]).to(dtype)

    xs = torch.empty_like(noise)
    targets = torch.empty_like(noise)
    order = torch.argsort(stop)  # chunks of similar length stop early together
    for i in range(0, steps, chunk):
        idx = order[i : i + chunk]
        b = len(idx)
        lat = (noise[idx] * sched.init_noise_sigma).to(dev, dtype)
        emb = torch.cat([uncond.expand(b, -1, -1), cond[which[idx].to(dev)]])
        for k in range(int(stop[idx].max()) + 1):
            t = timesteps[k]
            inp = sched.scale_model_input(torch.cat([lat, lat]), t)
            eps_u, eps_c = unet(inp, t, encoder_hidden_states=emb).sample.chunk(2)
            here = (stop[idx] == k).nonzero().flatten()
            if len(here):
                target = eps_u - negative_guidance * (eps_c - eps_u)
                xs[idx[here]] = lat[here.to(dev)].float().cpu()
                targets[idx[here]] = target[here.to(dev)].float().cpu()
            eps = eps_u + sample_guidance * (eps_c - eps_u)
            lat = sched.step(eps, t, lat).prev_sample
    return {"x": xs, "t": timesteps.cpu()[stop], "prompt": which, "target": targets}


def train(
    pipe,
    prompts: Sequence[str],
    *,
    steps: int,
    lr: float,
    negative_guidance: float,
    sample_steps: int,
    sample_guidance: float,
    batch_size: int,
    seed: int,
    layers: str = "attn2",
    progress: bool = True,
    desc: str = "ESD-x",
) -> dict[str, float]:
    """Run ESD-x on ``pipe.unet`` in place (cross-attention parameters only). Returns loss stats."""
    unet, dev = pipe.unet, pipe.device
    params = trained_parameters(unet, layers)
    n_points = steps * batch_size
    data = sample_training_points(
        pipe, prompts, n_points, sample_steps, sample_guidance, negative_guidance, seed
    )
    cond = encode_prompts(pipe, prompts).to(unet.dtype)
    for p in unet.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=lr)
    losses = []
    with torch.enable_grad():
        bar = tqdm(range(steps), desc=desc, disable=not progress, mininterval=2)
        for s in bar:
            sl = slice(s * batch_size, (s + 1) * batch_size)
            x = data["x"][sl].to(dev, unet.dtype)
            t = data["t"][sl].to(dev)
            emb = cond[data["prompt"][sl].to(dev)]
            pred = unet(x, t, encoder_hidden_states=emb).sample
            loss = F.mse_loss(pred.float(), data["target"][sl].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if s % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.close()
    for p in params.values():
        p.grad = None
    k = max(1, len(losses) // 10)
    return {"steps": len(losses), "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k}


@contextmanager
def erase(
    pipe,
    concept_text: str,
    *,
    retain_texts: Sequence[str] = (),
    steps: int = DEFAULTS["steps"],
    lr: float = DEFAULTS["lr"],
    negative_guidance: float = DEFAULTS["negative_guidance"],
    sample_steps: int = DEFAULTS["sample_steps"],
    sample_guidance: float = DEFAULTS["sample_guidance"],
    batch_size: int = DEFAULTS["batch_size"],
    seed: int = DEFAULTS["seed"],
    layers: str = DEFAULTS["layers"],
    prompts: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Iterator[BaselineRun]:
    """Train (or load from ``cache_dir``) ESD-x weights into ``pipe.unet`` for the block; restore on exit.

    ``retain_texts`` is not used (ESD has no preservation term). ``BaselineRun.info["cache"]`` is
    "hit", "miss" (trained and saved) or "off" (no ``cache_dir``).
    """
    del retain_texts
    prompts = list(prompts) if prompts is not None else [concept_text]
    hparams = {
        "steps": int(steps),
        "lr": float(lr),
        "negative_guidance": float(negative_guidance),
        "sample_steps": int(sample_steps),
        "sample_guidance": float(sample_guidance),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "prompts": prompts,
    }
    if layers != DEFAULTS["layers"]:  # keeps the cache keys of runs made before the option
        hparams["layers"] = layers
    params = trained_parameters(pipe.unet, layers)
    if not params:
        raise ValueError("the UNet has no cross-attention modules to fine-tune")
    path = cache_path(pipe, concept_text, cache_dir, hparams) if cache_dir is not None else None
    info: dict[str, Any] = {
        "cache": "off" if path is None else "miss",
        "cache_path": str(path) if path else None,
    }
    with restored_module_state([pipe.unet]), restored_tensors(params):
        if path is not None and path.is_file():
            state = load_file(str(path))
            if set(state) != set(params) or any(state[n].shape != p.shape for n, p in params.items()):
                raise ValueError(f"{path} does not hold this UNet's cross-attention weights")
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(state[n].to(p.device, p.dtype))
            info["cache"] = "hit"
        else:
            info["train"] = train(
                pipe,
                prompts,
                progress=progress,
                desc=f"ESD-x {concept_text!r}",
                **{k: v for k, v in hparams.items() if k != "prompts"},
            )
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file(
                    {n: p.detach().cpu().contiguous() for n, p in params.items()},
                    str(tmp),
                    metadata={
                        "concept": concept_text,
                        "method": "esd-x",
                        "hparams": json.dumps(hparams, sort_keys=True),
                    },
                )
                tmp.replace(path)
        yield BaselineRun(pipe=pipe, call_kwargs={}, info=info)
