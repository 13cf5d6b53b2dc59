"""Attacks on unlearned pipelines, with gradients through the intervention (issue #20; in progress).

Built so far: the soft-prompt attack and the gradient-masking control (:mod:`.soft_prompt`), and
UnlearnDiffAtk's token-prefix attack (:mod:`.unlearndiffatk`).
"""

from .soft_prompt import (
    AttackConfig,
    attack_loss,
    generate_from_embeds,
    masked_edits,
    soft_prompt_attack,
    target_latents,
)
from .unlearndiffatk import project_to_simplex, unlearndiffatk

__all__ = [
    "AttackConfig",
    "attack_loss",
    "generate_from_embeds",
    "masked_edits",
    "project_to_simplex",
    "soft_prompt_attack",
    "target_latents",
    "unlearndiffatk",
]
