"""Attacks on unlearned pipelines, with gradients through the intervention (issue #20).

The soft-prompt attack and the gradient-masking control (:mod:`.soft_prompt`), and UnlearnDiffAtk's
token-prefix attack (:mod:`.unlearndiffatk`; ``typed_attacks`` runs it over several prompts, as the
tuners' robustness stage does).
"""

from .soft_prompt import (
    AttackConfig,
    Guidance,
    attack_loss,
    generate_from_embeds,
    masked_edits,
    soft_prompt_attack,
    target_latents,
)
from .unlearndiffatk import project_to_simplex, typed_attacks, unlearndiffatk

__all__ = [
    "AttackConfig",
    "Guidance",
    "attack_loss",
    "generate_from_embeds",
    "masked_edits",
    "project_to_simplex",
    "soft_prompt_attack",
    "target_latents",
    "typed_attacks",
    "unlearndiffatk",
]
