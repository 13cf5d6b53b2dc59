"""Attacks on unlearned pipelines, with gradients through the intervention (issue #20).

The soft-prompt attack, its token-level form (``token_prompt_attack``: the text encoder's input, as a
textual inversion) and the gradient-masking control (:mod:`.soft_prompt`), and UnlearnDiffAtk's
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
    token_prompt_attack,
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
    "token_prompt_attack",
    "typed_attacks",
    "unlearndiffatk",
]
