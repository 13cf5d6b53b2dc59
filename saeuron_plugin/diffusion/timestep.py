"""Normalised time τ ∈ [0, 1] and the CFG branch of each denoiser call, read from the call itself.

A forward pre-hook on the denoiser (``pipe.unet`` / ``pipe.transformer``) sees the timestep the
pipeline passes and converts it per family (verified in the diffusers 0.42 pipelines):

* SD 1.x / 2.x / XL and PixArt pass the DDPM timestep t ∈ [0, num_train_timesteps): τ = t / N.
* SD3 passes sigma · N (``FlowMatchEulerDiscreteScheduler.timesteps``): τ = t / N = sigma.
* FLUX passes ``timestep / 1000`` (the transformer multiplies by 1000 again): τ = t = sigma.
* EDM schedulers (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``: Playground v2.5 on
  SDXL) pass c_noise = ``scheduler.precondition_noise(σ)`` (0.25·ln σ, negative at low noise):
  τ = (c − c(σ_min)) / (c(σ_max) − c(σ_min)), the position of ln σ in the scheduler's own range,
  computed with the scheduler's own ``precondition_noise``.

A τ outside [0, 1] (a timestep convention not listed here, or a wrong ``time_scale``) is clamped
with a warning, never silently.

τ is kept per batch row ([B], float32, on the timestep's device, no host sync). Steps are never
counted, so any scheduler, step count, img2img strength or split CFG call works.

The CFG branch (``cond_mask``, True for conditional rows) is best effort:

1. inside ``denoiser.cache_context("cond" | "uncond")`` (FLUX true-CFG makes separate calls this
   way) every row has that branch;
2. otherwise classic pipelines batch ``[uncond; cond]`` by duplicating the latents, so an even
   batch whose two halves are equal is that layout; anything else is taken as all-conditional
   (no CFG). This compares the latent halves once per denoiser call (one device sync when B is
   even) and does not depend on which pipeline object made the call (``from_pipe`` shares modules).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..sae.sites import CallTracker
from .hookpoints import detect_family, get_denoiser

CfgLayout = Literal["auto", "uncond_cond", "none", "unknown"]
# Families whose denoiser already receives t in [0, 1]; the others receive t in [0, N).
_UNIT_TIME_FAMILIES = frozenset({"flux"})


class TimestepTracker(CallTracker):
    """Record τ and the conditional-row mask of the running denoiser call.

    ``tau`` ([B] float32 or None outside a call), ``cond_mask`` ([B] bool or None when the branch
    is unknown) and ``timestep`` (raw) are plain attributes, cheap to read from hot hooks.
    Use as a context manager or call :meth:`remove`; removing twice is harmless.

    ``cfg_layout``: "auto" (see module doc), "uncond_cond" (always [uncond; cond] halves), "none"
    (every row conditional) or "unknown" (``cond_mask`` always None).
    """

    def __init__(
        self,
        pipe: Any,
        *,
        family: str | None = None,
        time_scale: float | None = None,
        cfg_layout: CfgLayout = "auto",
    ) -> None:
        if cfg_layout not in ("auto", "uncond_cond", "none", "unknown"):
            raise ValueError(f"cfg_layout must be auto, uncond_cond, none or unknown, got {cfg_layout!r}")
        self.denoiser: nn.Module = get_denoiser(pipe)
        self.family = family or detect_family(self.denoiser)
        self._scheduler_owner = None if isinstance(pipe, nn.Module) else pipe
        self._time_scale = time_scale
        self.cfg_layout = cfg_layout
        params = list(inspect.signature(self.denoiser.forward).parameters)
        self._t_pos = params.index("timestep") if "timestep" in params else 1
        self._x_name = params[0]
        self._branch: str | None = None
        self._warned_range = False
        self._checked_device = False
        self._edm_cache: tuple[tuple[int, float, float], tuple[float, float]] | None = None
        self._masks: dict[tuple[int, int, str], Tensor] = {}
        self._context_wrapper: Callable[..., Any] | None = None
        super().__init__(self.denoiser)

    # ----------------------------------------------------------- lifecycle
    def install(self) -> TimestepTracker:
        """Register the hooks (done by the constructor; again after :meth:`remove`) and observe
        ``cache_context`` (the branch name of split CFG calls)."""
        if not self.active:
            super().install()
            original = getattr(self.denoiser, "cache_context", None)
            if callable(original):
                self._context_wrapper = self._wrap_cache_context(original)
                self.denoiser.__dict__["cache_context"] = self._context_wrapper
        return self

    def remove(self) -> None:
        """Remove the hooks and the cache-context observer; idempotent."""
        super().remove()
        installed = self.denoiser.__dict__.get("cache_context")
        if self._context_wrapper is not None and installed is self._context_wrapper:
            del self.denoiser.__dict__["cache_context"]
        self._context_wrapper = None
        self._branch = None

    # ---------------------------------------------------------------- hooks
    @property
    def time_scale(self) -> float:
        """Divisor turning the denoiser's timestep into τ (read per call: schedulers can change)."""
        if self._time_scale is not None:
            return self._time_scale
        if self.family in _UNIT_TIME_FAMILIES:
            return 1.0
        scheduler = getattr(self._scheduler_owner, "scheduler", None)
        n = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
        return float(n or 1000)

    def _record(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = kwargs[self._x_name] if self._x_name in kwargs else args[0]
        t = (
            kwargs.get("timestep")
            if "timestep" in kwargs
            else (args[self._t_pos] if len(args) > self._t_pos else None)
        )
        self.timestep = t
        batch = x.shape[0]
        self.tau = None if t is None else self._normalise(t, batch, x.device)
        self.cond_mask = self._cond_mask(x, batch)

    def _clear(self) -> None:
        self.tau: Tensor | None = None
        self.cond_mask: Tensor | None = None
        self.timestep: Tensor | float | None = None

    def _edm_range(self) -> tuple[float, float] | None:
        """(c_noise at σ_min, at σ_max) when the scheduler conditions on EDM's c_noise, else None."""
        scheduler = getattr(self._scheduler_owner, "scheduler", None)
        precondition = getattr(scheduler, "precondition_noise", None)
        config = getattr(scheduler, "config", None)
        if self._time_scale is not None or not callable(precondition) or config is None:
            return None
        key = (id(scheduler), float(config.sigma_min), float(config.sigma_max))
        if self._edm_cache is None or self._edm_cache[0] != key:
            lo, hi = (float(precondition(torch.tensor(v))) for v in key[1:])
            self._edm_cache = (key, (lo, hi))
        return self._edm_cache[1]

    def _normalise(self, t: Tensor | float, batch: int, device: torch.device) -> Tensor:
        if not isinstance(t, Tensor):
            t = torch.tensor(float(t), device=device)
        edm = self._edm_range()
        tau = (t.float() - edm[0]) / (edm[1] - edm[0]) if edm else t.float() / self.time_scale
        # a range check reads τ on the host: every call on CPU, only the first call on an accelerator
        if not self._warned_range and (tau.device.type == "cpu" or not self._checked_device):
            self._checked_device = True
            if not bool(((tau >= -1e-3) & (tau <= 1 + 1e-3)).all()):
                self._warned_range = True
                warnings.warn(
                    f"{type(self.denoiser).__name__} got timestep {t.flatten()[:4].tolist()}, which maps to "
                    f"τ {tau.flatten()[:4].tolist()} outside [0, 1] (time_scale {self.time_scale:g}); τ is "
                    "clamped. Is this scheduler's timestep convention supported? Pass time_scale=... to "
                    "the tracker",
                    stacklevel=2,
                )
        tau = tau.clamp_(0.0, 1.0)  # the division made a new tensor
        if tau.dim() == 0 or tau.numel() == 1:
            return tau.reshape(1).expand(batch)
        if tau.shape[0] != batch:
            raise ValueError(f"timestep has {tau.shape[0]} values for a batch of {batch}")
        return tau.reshape(batch)

    def _cond_mask(self, x: Tensor, batch: int) -> Tensor | None:
        branch = self._branch
        if branch in ("cond", "uncond"):
            return self._mask(batch, 0 if branch == "uncond" else batch, x.device)
        layout = self.cfg_layout
        if layout == "unknown":
            return None
        if layout == "none" or batch % 2:
            return self._mask(batch, batch, x.device)
        half = batch // 2
        if layout == "uncond_cond" or torch.equal(x[:half], x[half:]):
            return self._mask(batch, half, x.device)
        return self._mask(batch, batch, x.device)

    def _mask(self, batch: int, n_cond: int, device: torch.device) -> Tensor:
        """[B] bool with the last ``n_cond`` rows True; cached (no allocation per call)."""
        key = (batch, n_cond, str(device))
        mask = self._masks.get(key)
        if mask is None:
            mask = torch.zeros(batch, dtype=torch.bool, device=device)
            mask[batch - n_cond :] = True
            self._masks[key] = mask
        return mask

    def _wrap_cache_context(self, original: Callable[..., Any]) -> Callable[..., Any]:
        """A ``cache_context`` that also records the branch name for this tracker."""

        @contextlib.contextmanager
        def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
            previous, self._branch = self._branch, name
            try:
                with original(name, *args, **kwargs):
                    yield
            finally:
                self._branch = previous

        return cache_context
