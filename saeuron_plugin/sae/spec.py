"""The ablation spec: which rule, how strong, which latents (per concept), resolved against a library.

:class:`ConceptAblation` is what a user asks for (every field optional: the library's selection
defaults fill the gaps); :meth:`ConceptAblation.resolve` checks it (finite strength, percentile in
[0, 100], ...) and returns a :class:`ResolvedAblation`, which :class:`~.ablation.FeatureAblator`
turns into per-τ-bucket plans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor

from ..errors import NonFiniteError
from .library import ConceptLibrary


class AblationRule(StrEnum):
    """What an active selected latent becomes (see the module docstring)."""

    REFERENCE = "reference"
    ZERO = "zero"
    CLAMP = "clamp"


@dataclass
class ConceptAblation:
    """One concept to unlearn; fields left None come from the library's defaults for it.

    ``strength`` is the user-facing knob of the reference rule: γ = −strength (1 is the paper's
    style setting; objects used 5–30). Give ``gamma`` or ``strength``, not conflicting values.
    Zero and clamp ignore both. ``percentile`` and ``top_n`` are exclusive.
    """

    concept: str
    percentile: float | None = None
    top_n: int | None = None
    gamma: float | None = None
    strength: float | None = None
    rule: AblationRule | str | None = None
    clamp_value: float | None = None
    contrast: str | list[str] | None = None
    target: str | None = None
    """Replace rather than only remove: on every token where this concept's edit fires, also add
    ``target_scale`` · (μ(τ, D_target) − μ(τ, D_concept))·W_dec, the decoded difference of the two
    concepts' mean latents at the token's τ bucket (e.g. ``red`` → ``green``). ``None``: the
    library's default (usually none); ``""``: none, whatever the default."""
    target_scale: float | None = None
    """α of ``target`` (1 by default)."""

    def resolve(self, library: ConceptLibrary) -> ResolvedAblation:
        d = library.selection_defaults(self.concept)
        if self.percentile is not None and self.top_n is not None:
            raise ValueError(f"{self.concept!r}: give `percentile` or `top_n`, not both")
        if self.top_n is not None or self.percentile is not None:
            percentile, top_n = self.percentile, self.top_n
        else:
            percentile, top_n = (None, d.top_n) if d.top_n is not None else (d.percentile, None)
        if self.gamma is not None and self.strength is not None and self.gamma != -self.strength:
            raise ValueError(
                f"{self.concept!r}: gamma={self.gamma} contradicts strength={self.strength} "
                "(gamma = -strength)"
            )
        gamma = (
            self.gamma
            if self.gamma is not None
            else (-self.strength if self.strength is not None else d.gamma)
        )
        rule = AblationRule(self.rule or d.rule)
        clamp_value = self.clamp_value if self.clamp_value is not None else d.clamp_value
        _check_finite(self.concept, "gamma (= -strength)", gamma, MAX_ABS_GAMMA)
        _check_finite(self.concept, "clamp_value", clamp_value, MAX_ABS_GAMMA)
        if percentile is not None and not 0 <= float(percentile) <= 100:
            raise ValueError(f"{self.concept!r}: percentile must be in [0, 100], got {percentile}")
        if top_n is not None and (isinstance(top_n, bool) or int(top_n) != top_n or top_n < 0):
            raise ValueError(f"{self.concept!r}: top_n must be a non-negative integer, got {top_n!r}")
        if rule is AblationRule.REFERENCE and not gamma < 0:
            raise ValueError(
                f"{self.concept!r}: the reference rule needs gamma < 0 (strength > 0), got "
                f"gamma={gamma}; to leave a concept alone, do not list it"
            )
        if rule is AblationRule.CLAMP and clamp_value > 0:
            raise ValueError(f"{self.concept!r}: clamp_value must be ≤ 0, got {clamp_value}")
        target = (self.target if self.target is not None else d.target) or None
        target_scale = float(self.target_scale if self.target_scale is not None else d.target_scale)
        _check_finite(self.concept, "target_scale", target_scale, MAX_ABS_GAMMA)
        if target is not None:
            if target == self.concept:
                raise ValueError(f"{self.concept!r}: the target must be another concept, not itself")
            library.get(target)  # UnknownConceptError (with the known names) if the library lacks it
        return ResolvedAblation(
            self.concept,
            rule,
            percentile,
            top_n,
            float(gamma),
            float(clamp_value),
            self.contrast if self.contrast is not None else d.contrast,
            target,
            target_scale,
        )


MAX_ABS_GAMMA = 1e3
"""Largest |γ| (strength) accepted: the field tunes γ in −1 … −30; beyond ~1e3 the scaled latents
overflow half-precision activations downstream and the images turn to NaN."""


def _check_finite(concept: str, name: str, value: float, limit: float) -> None:
    if not math.isfinite(float(value)) or abs(float(value)) > limit:
        raise NonFiniteError(f"{concept!r}: {name} must be finite and at most {limit:g} in size, got {value}")


@dataclass(frozen=True)
class ResolvedAblation:
    """A :class:`ConceptAblation` with every default filled in."""

    concept: str
    rule: AblationRule
    percentile: float | None
    top_n: int | None
    gamma: float
    clamp_value: float
    contrast: str | list[str]
    target: str | None = None
    target_scale: float = 1.0

    def affine(self, mu_c: Tensor) -> tuple[Tensor, Tensor]:
        """The rule as z′ = a·z + b for latents with concept means ``mu_c``: (a, b)."""
        if self.rule is AblationRule.REFERENCE:
            return self.gamma * mu_c, torch.zeros_like(mu_c)
        value = 0.0 if self.rule is AblationRule.ZERO else self.clamp_value
        return torch.zeros_like(mu_c), torch.full_like(mu_c, value)


__all__ = ["MAX_ABS_GAMMA", "AblationRule", "ConceptAblation", "ResolvedAblation"]
