"""UnlearnDiffAtk (Zhang et al., ECCV 2024), the published protocol, through the intervention.

k prefix tokens are a relaxed one-hot over the tokenizer's vocabulary: a weight row per token,
projected onto the probability simplex after every step, whose embedding is the weighted mix of
token embeddings. The loss is the soft-prompt attack's (:mod:`.soft_prompt`): the unlearned model's
noise prediction on noised target latents the base model drew. Adam(W), lr 1e-2, weight decay 0.1,
40 iterations by default; at the end each prefix token is discretised to its heaviest vocabulary
entry and the attack returns a plain text prompt anyone can type.

The relaxed tokens enter the text encoder through a forward hook on its token-embedding module
(transformers' CLIP text model takes ``input_ids`` only), so any CLIP text encoder works.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .soft_prompt import AttackConfig, frozen, optimise, prompt_ids


def project_to_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of ``v`` onto the probability simplex (sort-based, exact)."""
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    ks = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / ks) > 0).sum(-1, keepdim=True).clamp_min(1)
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    return (v - theta).clamp_min(0)


class _PrefixEmbeddings:
    """Forward hook on the token-embedding module: positions 1..k become ``weights @ E``."""

    def __init__(self, embedding: torch.nn.Embedding, weights: Tensor) -> None:
        self.weights = weights
        self.handle = embedding.register_forward_hook(self)

    def __call__(self, module: torch.nn.Embedding, args: Any, output: Tensor) -> Tensor:
        k = self.weights.shape[0]
        soft = (self.weights @ module.weight).unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :1], soft.to(output.dtype), output[:, 1 + k :]], dim=1)


def _prefixed_ids(pipe: Any, prompt: str, k: int) -> Tensor:
    """Token ids [1, L]: BOS, k placeholders (replaced by the hook), then the prompt's tokens."""
    ids = prompt_ids(pipe, prompt)[0]
    placeholder = torch.full((k,), int(ids[1]), dtype=ids.dtype)
    return torch.cat([ids[:1], placeholder, ids[1:]])[: len(ids)].unsqueeze(0)


def unlearndiffatk(
    pipe: Any, targets: Tensor, prompt: str, cfg: AttackConfig | None = None, prefix_tokens: int = 5
) -> str:
    """A prompt ``"<k tokens> <prompt>"`` optimised against ``pipe`` (with whatever eraser is applied)
    to bring back what ``targets`` show; ``cfg.losses`` records the relaxed loss per step."""
    cfg = cfg or AttackConfig(lr=1e-2)
    text_encoder, unet = pipe.text_encoder, pipe.unet
    embedding = text_encoder.get_input_embeddings()
    vocab = embedding.weight.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed)  # the start, then the attack's draws
    start = project_to_simplex(torch.rand(prefix_tokens, vocab, generator=gen))
    weights = start.to(embedding.weight.device).requires_grad_(True)
    opt = torch.optim.AdamW([weights], lr=cfg.lr, weight_decay=cfg.weight_decay)
    ids = _prefixed_ids(pipe, prompt, prefix_tokens).to(embedding.weight.device)

    @torch.no_grad()
    def project() -> None:
        weights.copy_(project_to_simplex(weights))

    hook = _PrefixEmbeddings(embedding, weights)
    try:
        with frozen(text_encoder, unet):
            optimise(pipe, lambda: text_encoder(ids)[0], opt, targets, cfg, gen=gen, after_step=project)
    finally:
        hook.handle.remove()
    tokens = weights.detach().argmax(-1).tolist()
    prefix = pipe.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return f"{prefix} {prompt}".strip()


def typed_attacks(
    pipe: Any,
    targets: Mapping[str, Tensor],
    *,
    iterations: int = 40,
    seed: int = 0,
    prefix_tokens: int = 5,
) -> list[str]:
    """UnlearnDiffAtk at its published settings (Adam(W) lr 1e-2, weight decay 0.1, batch 8) against
    whatever eraser ``pipe`` has, once per prompt of ``targets`` (prompt → target latents the untouched
    model drew for it), attack ``i`` seeded ``seed + i``: the typed prompts. What a tuner's robustness
    stage measures a candidate setting with."""
    return [
        unlearndiffatk(
            pipe,
            latents,
            prompt,
            AttackConfig(iterations=iterations, lr=1e-2, batch=8, seed=seed + i),
            prefix_tokens=prefix_tokens,
        )
        for i, (prompt, latents) in enumerate(targets.items())
    ]


__all__ = ["project_to_simplex", "typed_attacks", "unlearndiffatk"]
