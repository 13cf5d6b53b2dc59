"""The SAE's configuration: architecture plus provenance, and the cfg.json it round-trips through.

Its own module so that the file formats (:mod:`.io`) and the model (:mod:`.model`) both build on it
without depending on each other.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import SAeUronError

EncoderMode = Literal["topk", "threshold"]


class SaeConfigError(SAeUronError, ValueError):
    """A configuration that cannot describe a valid SAE."""


@dataclass
class SaeConfig:
    """Architecture of a sparse autoencoder plus free-form provenance metadata."""

    d_in: int
    """Width of the activations the SAE reads (e.g. 1280 for SD 1.5's ``up_blocks.1``)."""
    num_latents: int = 0
    """Dictionary size n. 0 means ``d_in * expansion_factor``."""
    expansion_factor: int = 16
    """Used only when ``num_latents`` is 0."""
    k: int = 32
    """Active latents per token for TopK encoding (and the L0 target of the threshold)."""
    encoder: EncoderMode = "topk"
    """Inference encoder: per-token ``topk`` or global ``threshold`` (BatchTopK paper)."""
    threshold: float | None = None
    """Global θ for the threshold encoder, calibrated during training or a statistics pass."""
    input_unit_norm: bool = False
    """Standardise each token (mean 0, std 1) before encoding, as some SAeUron SAEs do."""
    hookpoint: str | None = None
    """Where the activations came from, e.g. ``unet.up_blocks.1.attentions.1``."""
    model_family: str | None = None
    """Adapter family of the base model (``sd1``, ``sdxl``, ``llava`` ...)."""
    base_model: str | None = None
    """Identifier of the base model the SAE was trained on."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping (training recipe, metrics, keys from foreign cfg.json files)."""

    def __post_init__(self) -> None:
        if self.num_latents == 0 or self.num_latents is None:
            self.num_latents = int(self.d_in) * int(self.expansion_factor)
        if self.d_in <= 0:
            raise SaeConfigError(f"d_in must be positive, got {self.d_in}")
        if self.num_latents <= 0:
            raise SaeConfigError(f"num_latents must be positive, got {self.num_latents}")
        if not 0 < self.k <= self.num_latents:
            raise SaeConfigError(f"k must be in [1, num_latents={self.num_latents}], got {self.k}")
        if self.encoder not in ("topk", "threshold"):
            raise SaeConfigError(f"encoder must be 'topk' or 'threshold', got {self.encoder!r}")
        if self.encoder == "threshold" and self.threshold is None:
            raise SaeConfigError(
                "encoder='threshold' needs a calibrated `threshold`; train with the trainer "
                "(it calibrates θ) or calibrate one with `calibrate_threshold`"
            )

    _KNOWN = (
        "d_in",
        "num_latents",
        "expansion_factor",
        "k",
        "encoder",
        "threshold",
        "input_unit_norm",
        "hookpoint",
        "model_family",
        "base_model",
    )

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self._KNOWN}
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SaeConfig:
        """Build from a cfg.json dict; unknown keys (sparsify's ``multi_topk`` ...) go to ``extra``."""
        if "d_in" not in raw:
            raise SaeConfigError("cfg.json has no 'd_in': cannot tell the SAE's input width")
        if "k" not in raw:
            raise SaeConfigError("cfg.json has no 'k': cannot tell how many latents are active")
        known = {k: raw[k] for k in cls._KNOWN if k in raw and raw[k] is not None}
        for name, value in known.items():
            _check_type(name, value)
        if raw.get("num_latents") in (0, None) and "expansion_factor" not in raw:
            raise SaeConfigError("cfg.json has neither 'num_latents' nor 'expansion_factor'")
        known.setdefault("encoder", "topk")
        extra = {k: v for k, v in raw.items() if k not in cls._KNOWN}
        return cls(**known, extra=extra)

    def replace(self, **changes: Any) -> SaeConfig:
        return dataclasses.replace(self, **changes)


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "d_in": (int,),
    "num_latents": (int,),
    "expansion_factor": (int,),
    "k": (int,),
    "encoder": (str,),
    "threshold": (int, float),
    "input_unit_norm": (bool,),
    "hookpoint": (str,),
    "model_family": (str,),
    "base_model": (str,),
}


def _check_type(name: str, value: Any) -> None:
    """A cfg.json value of the wrong JSON type is refused here, naming the field (``k: "8"``,
    ``k: 8.5``, ``d_in: 32.0``, ``threshold: "abc"`` would otherwise fail far from the file)."""
    kinds = _FIELD_TYPES[name]
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        want = " or ".join(
            "an integer"
            if k is int
            else "a number"
            if k is float
            else "true/false"
            if k is bool
            else "a string"
            for k in kinds
        )
        raise SaeConfigError(f"cfg.json field {name!r} must be {want}, got {type(value).__name__} {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise SaeConfigError(f"cfg.json field {name!r} must be finite, got {value!r}")


__all__ = ["EncoderMode", "SaeConfig", "SaeConfigError"]
