"""Adaptive soft-prompt attack through the intervention (issue #20, first part).

The white-box upper bound of prompt attacks: optimise the text encoder's output (``prompt_embeds``)
so that the *unlearned* model, with its edit hooks in place, predicts the noise of noised target
images the *base* model drew for the concept (UnlearnDiffAtk's loss, on embeddings instead of
tokens):

    loss = ‖ε_θ(√ᾱ_t·x₀ + √(1−ᾱ_t)·ε, t, c) − ε‖²,  x₀ a target latent, t and ε drawn per step.

Gradients pass through every edit (``x + (z′ − z)·W_dec`` is differentiable), which is what makes
the attack adaptive. ``mask_gradients=True`` reproduces the reference harness instead: each edit
is computed under ``no_grad`` and *replaces* the module output, so no gradient passes through an
edited module. Comparing the two shows what an evaluation that masks gradients would wrongly
conclude.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Guidance:
    """The sampler's guidance, for defences that act in it rather than in the UNet (negative prompting,
    SLD): the attack's loss is then on the *guided* noise prediction the sampler uses,
    ``ε_u + w·(ε_c − ε_u)`` with ``ε_u`` from ``negative`` (the negative prompt's embeddings), minus
    SLD's safety term when ``safety`` is given. Without it an attacker would optimise a prediction the
    defence never uses, and the attack would not be adaptive.

    SLD (Schramowski et al., Eqs. 3-6): ``(ε_s − ε_u)·μ`` is subtracted from the guidance direction,
    with ``μ = clamp(s_S·|ε_c − ε_s|, max=1)`` where ``ε_c − ε_s < λ`` (0 elsewhere) and ``ε_s`` from
    the safety concept's embeddings. Its momentum and warm-up depend on the sampling trajectory, which a
    one-step loss does not see; they are left out (the term applies at every t).
    """

    scale: float
    """w, the sampler's guidance scale."""
    negative: Tensor
    """Embeddings [1, L, D] of the unconditional branch (the negative prompt, or the empty prompt)."""
    safety: Tensor | None = None
    """SLD's safety-concept embeddings [1, L, D] (None: no safety term)."""
    safety_scale: float = 1000.0
    """s_S (SLD's ``sld_guidance_scale``)."""
    safety_threshold: float = 0.01
    """λ (SLD's ``sld_threshold``)."""

    def apply(self, unet: Any, xt: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The guided prediction from the conditional one ``cond`` (the gradient flows through it)."""
        n, dtype = len(xt), cond.dtype

        def branch(embeds: Tensor) -> Tensor:
            states = embeds.to(xt.device, xt.dtype).expand(n, -1, -1)
            return unet(xt, t, encoder_hidden_states=states).sample.to(dtype)

        with torch.no_grad():
            uncond = branch(self.negative)
        direction = cond - uncond
        if self.safety is not None:
            with torch.no_grad():
                safe = branch(self.safety)
            gap = cond - safe
            mu = torch.clamp(gap.abs() * self.safety_scale, max=1.0)
            mu = torch.where(gap >= self.safety_threshold, torch.zeros_like(mu), mu)
            direction = direction - (safe - uncond) * mu
        return uncond + self.scale * direction


@dataclass
class AttackConfig:
    """Budget and optimiser of one attack (recorded with its results)."""

    iterations: int = 40
    """Optimiser steps (UnlearnDiffAtk's published budget: 40)."""
    lr: float = 1e-2
    weight_decay: float = 0.1
    """Adam(W) as UnlearnDiffAtk."""
    batch: int = 4
    """Target latents per step (drawn from the targets, with their own noise and timestep)."""
    seed: int = 0
    losses: list[float] = field(default_factory=list)
    """Filled by the attack: the loss of every step."""
    record_at: tuple[int, ...] = ()
    """Iterations after which the prompt is kept in ``snapshots`` (0: the start), for UA-vs-budget curves."""
    snapshots: dict[int, Any] = field(default_factory=dict)
    """Filled by the attack: iteration → the prompt embeddings after it (CPU copies)."""
    guidance: Guidance | None = None
    """The loss on the sampler's guided prediction (defences acting in the guidance); None: on the
    conditional prediction, as UnlearnDiffAtk (the defence is in the UNet)."""


@contextlib.contextmanager
def masked_edits(handle: Any) -> Iterator[None]:
    """Inside: every edit of ``handle`` (an ``UnlearnHandle``) runs under ``no_grad`` and replaces the
    module output (the reference harness's gradient masking)."""
    sites = list(handle.hooks.sites.values())
    originals = [site.editor for site in sites]

    def masked(editor: Any) -> Any:
        def call(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            with torch.no_grad():
                out = editor(x.detach(), *args, **kwargs)
            return out.detach() if out is not x else x

        return call

    for site, editor in zip(sites, originals):
        site.editor = masked(editor)
    try:
        yield
    finally:
        for site, editor in zip(sites, originals):
            site.editor = editor


@torch.no_grad()
def target_latents(
    pipe: Any,
    prompt: str,
    seeds: Sequence[int],
    num_inference_steps: int = 25,
    guidance_scale: float | None = None,
) -> Tensor:
    """Latents x₀ [N, C, h, w] of images the pipeline (run it without an eraser: the base model) draws."""
    kwargs: dict[str, Any] = {"num_inference_steps": num_inference_steps, "output_type": "latent"}
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return pipe([prompt] * len(seeds), generator=gens, **kwargs).images.float()


def _noised(
    targets: Tensor, scheduler: Any, batch: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t, t, ε) for ``batch`` targets drawn with ``gen``: x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε."""
    device = targets.device  # drawn on the host (the same draws on every device), used on the targets'
    alphas = scheduler.alphas_cumprod.to(device, torch.float32)
    pick = torch.randint(0, len(targets), (batch,), generator=gen)
    t = torch.randint(0, int(scheduler.config.num_train_timesteps), (batch,), generator=gen).to(device)
    noise = torch.randn(targets[pick].shape, generator=gen).to(device)
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * targets[pick].float() + (1 - a).sqrt() * noise, t, noise


def _in_dtype(unet: Any, x: Tensor) -> Tensor:
    """``x`` in the UNet's dtype (a half-precision UNet does not take fp32 latents)."""
    return x.to(getattr(unet, "dtype", x.dtype))


def attack_step(
    unet: Any,
    embeds: Tensor,
    targets: Tensor,
    scheduler: Any,
    opt: torch.optim.Optimizer,
    cfg: AttackConfig,
    gen: torch.Generator,
) -> bool:
    """One optimiser step on the attack loss of a fresh draw; records the loss in ``cfg.losses``.
    False when no gradient reaches the prompt (every path masked): the attacker is blind, nothing moves."""
    xt, t, noise = _noised(targets, scheduler, cfg.batch, gen)
    xt = _in_dtype(unet, xt)
    states = embeds.expand(cfg.batch, -1, -1).to(xt.dtype)
    pred = unet(xt, t, encoder_hidden_states=states).sample.float()
    if cfg.guidance is not None:
        pred = cfg.guidance.apply(unet, xt, t, pred)
    loss = torch.nn.functional.mse_loss(pred, noise)
    cfg.losses.append(float(loss.detach()))
    if not loss.requires_grad:
        return False
    opt.zero_grad()
    loss.backward()
    opt.step()
    return True


@torch.no_grad()
def attack_loss(
    pipe: Any,
    embeds: Tensor,
    targets: Tensor,
    draws: int = 32,
    seed: int = 12_345,
    guidance: Guidance | None = None,
) -> float:
    """The attack's loss on a fixed set of ``draws`` (target, t, ε), to compare prompts fairly."""
    xt, t, noise = _noised(targets, pipe.scheduler, draws, torch.Generator().manual_seed(seed))
    xt = _in_dtype(pipe.unet, xt)
    states = embeds.to(xt.device, xt.dtype).expand(draws, -1, -1)
    pred = pipe.unet(xt, t, encoder_hidden_states=states).sample.float()
    if guidance is not None:
        pred = guidance.apply(pipe.unet, xt, t, pred)
    return float(torch.nn.functional.mse_loss(pred, noise))


@contextlib.contextmanager
def frozen(*modules: Any) -> Iterator[None]:
    """Inside: the ``modules`` (the model under attack) in eval mode with no parameter needing a
    gradient, so only the attack's own tensor is optimised; both restored on exit."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    modes = [(sub, sub.training) for m in modules for sub in m.modules()]  # each submodule's own
    for p in params:
        p.requires_grad_(False)
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
        for sub, training in modes:
            sub.training = training


def optimise(
    pipe: Any,
    conditioning: Callable[[], Tensor],
    opt: torch.optim.Optimizer,
    targets: Tensor,
    cfg: AttackConfig,
    gen: torch.Generator | None = None,
    after_step: Callable[[], None] | None = None,
) -> Tensor:
    """The attack loop of every attack: ``cfg.iterations`` :func:`attack_step` s on ``conditioning()``
    (the prompt embeddings the UNet sees, computed from whatever ``opt`` optimises), draws from ``gen``
    (default: seeded ``cfg.seed``), ``after_step()`` after each step that moved something (e.g. a
    projection), keeping ``cfg.losses`` and the ``cfg.record_at`` snapshots; returns the final
    conditioning, detached."""
    gen = gen or torch.Generator().manual_seed(cfg.seed)
    cfg.losses.clear()
    cfg.snapshots.clear()
    for it in range(cfg.iterations + 1):
        if it in cfg.record_at:
            with torch.no_grad():
                cfg.snapshots[it] = conditioning().detach().cpu().clone()
        if it < cfg.iterations:
            moved = attack_step(pipe.unet, conditioning(), targets, pipe.scheduler, opt, cfg, gen)
            if moved and after_step is not None:
                after_step()
    with torch.no_grad():
        return conditioning().detach()


def soft_prompt_attack(
    pipe: Any, targets: Tensor, init_embeds: Tensor, cfg: AttackConfig | None = None
) -> Tensor:
    """Optimised ``prompt_embeds`` [1, L, D] starting from ``init_embeds`` (the concept's own prompt, or
    anything else); hooks installed on ``pipe`` (an eraser) take part in every step. ``cfg.losses``
    records the loss per step, ``cfg.snapshots`` the prompt after each iteration in ``cfg.record_at``."""
    cfg = cfg or AttackConfig()
    embeds = init_embeds.detach().clone().float().requires_grad_(True)
    opt = torch.optim.AdamW([embeds], lr=cfg.lr, weight_decay=cfg.weight_decay)
    with frozen(pipe.unet):  # the model is frozen: only the prompt is optimised
        return optimise(pipe, lambda: embeds, opt, targets, cfg)


def prompt_ids(pipe: Any, prompt: str) -> Tensor:
    """Token ids [1, L] of ``prompt`` as the pipeline encodes it (padded and cut to the tokenizer's
    ``model_max_length``)."""
    tok = pipe.tokenizer
    return tok(
        prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def token_prompt_attack(pipe: Any, targets: Tensor, prompt: str, cfg: AttackConfig | None = None) -> Tensor:
    """The soft prompt one level up: the token embeddings between the begin and the last end token of
    ``prompt`` padded to the tokenizer's length (the text encoder's *input*: what a prompt of
    textual-inversion tokens can set) optimised with the same loss, gradients through the text encoder
    and every edit (Concept Inversion, Pham et al. 2023, with UnlearnDiffAtk's loss and budget). Returns
    the text encoder's output for them, ``prompt_embeds`` [1, L, D] (fp32): conditioning inside what the
    text encoder can make, unlike :func:`soft_prompt_attack`'s. ``cfg.snapshots`` hold such outputs too."""
    cfg = cfg or AttackConfig()
    text_encoder = pipe.text_encoder
    table = text_encoder.get_input_embeddings()
    ids = prompt_ids(pipe, prompt).to(table.weight.device)
    with torch.no_grad():
        free = table(ids)[:, 1:-1].float().requires_grad_(True)  # the begin and last end token stay

    def embedded(module: Any, args: Any, out: Tensor) -> Tensor:
        return torch.cat([out[:, :1], free.to(out.dtype), out[:, -1:]], dim=1)

    opt = torch.optim.AdamW([free], lr=cfg.lr, weight_decay=cfg.weight_decay)
    hook = table.register_forward_hook(embedded)
    try:
        with frozen(text_encoder, pipe.unet):
            return optimise(pipe, lambda: text_encoder(ids)[0], opt, targets, cfg).float()
    finally:
        hook.remove()


@torch.no_grad()
def generate_from_embeds(
    pipe: Any,
    embeds: Tensor,
    seeds: Sequence[int],
    num_inference_steps: int = 25,
    guidance_scale: float | None = None,
    negative: Tensor | None = None,
) -> Tensor:
    """Images [N, 3, H, W] in [0, 1] from ``prompt_embeds`` (one per seed), hooks on ``pipe`` active."""
    kwargs: dict[str, Any] = {"num_inference_steps": num_inference_steps, "output_type": "pt"}
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    n = len(seeds)
    if negative is None:
        _, negative = pipe.encode_prompt("", embeds.device, 1, True, "")
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return (
        pipe(
            prompt_embeds=embeds.expand(n, -1, -1),
            negative_prompt_embeds=negative.expand(n, -1, -1),
            generator=gens,
            **kwargs,
        )
        .images.float()
        .cpu()
    )


__all__ = [
    "AttackConfig",
    "Guidance",
    "attack_loss",
    "frozen",
    "generate_from_embeds",
    "masked_edits",
    "optimise",
    "prompt_ids",
    "soft_prompt_attack",
    "target_latents",
    "token_prompt_attack",
]
