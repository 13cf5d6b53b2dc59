"""Diagnostics capture on a diffusers pipeline: base and unlearned twins in one generation.

:func:`run_pairs` generates every prompt twice in the same call (same seed): the base twin and
the twin the editors change (:class:`~saeuron_plugin.sae.probes.PairedEditor`). Observers
(:class:`~saeuron_plugin.sae.probes.PairObserver`, module forward hooks installed after the edit)
reduce every block output and every cross-attention output to scalar metrics of both twins and
their drift, keyed by sample and τ bucket. :class:`AttentionProbe` adds the attention maps of each
cross-attention ``Attention``, recomputed from the module's own ``to_q`` / ``to_k`` on the inputs
a forward hook sees (no processor is replaced, and the edit hook on the same module is unaffected).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from ..sae.diagnostics import SampleMetrics
from ..sae.probes import PairedEditor, PairedRun, PairLayout, PairObserver
from ..sae.sites import Editor
from ..sae.tau import TauGrid
from .collect import quiet_pipeline
from .hookpoints import detect_family, list_hookpoints, resolve_hookpoint
from .hooks import install_hooks
from .timestep import TimestepTracker


@dataclass
class DiagnoseConfig:
    """How a diagnostics run generates and what it observes."""

    num_inference_steps: int = 25
    guidance_scale: float | None = None
    """None: the pipeline's default."""
    batch_size: int = 8
    """Sample pairs per pipeline call (each call runs 2× that many images)."""
    seed: int = 0
    """Sample i uses a generator seeded ``seed + i`` (both twins)."""
    tau_buckets: int = 5
    """τ buckets of the per-block tables and heatmaps."""
    sites: Sequence[str] | None = None
    """Hookpoints observed (default: every block and cross-attention of the denoiser)."""
    attention: bool = True
    """Also the attention maps of every observed cross-attention (from its own projections)."""
    images: bool = False
    """Decode the images of both twins (for a judge); otherwise latents only."""
    show_progress: bool = True


class AttentionProbe:
    """Forward hook (with kwargs) on a cross-attention ``Attention``: its attention probabilities
    ``softmax(q kᵀ · scale)`` per head, from ``to_q`` on the hidden states and ``to_k`` on the
    encoder states it was called with, for the conditional rows; handed to ``observer``."""

    def __init__(self, module: nn.Module, observer: PairObserver, tracker: TimestepTracker) -> None:
        for name in ("to_q", "to_k", "heads"):
            if not hasattr(module, name):
                raise TypeError(f"{observer.site}: not a diffusers Attention (no {name})")
        self.module = module
        self.observer = observer
        self.tracker = tracker
        self._handle: RemovableHandle | None = module.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if not isinstance(hidden, Tensor) or not isinstance(context, Tensor):
            return  # self-attention call or an unknown signature: nothing to probe
        mask = self.tracker.cond_mask
        tau = self.tracker.tau
        if mask is not None:
            hidden, context = hidden[mask.to(hidden.device)], context[mask.to(context.device)]
            tau = None if tau is None else tau[mask.to(tau.device)]
        self.observer.observe_attention(self.probabilities(hidden, context), tau)

    @torch.no_grad()
    def probabilities(self, hidden: Tensor, context: Tensor) -> Tensor:
        """Attention maps ``[B, heads, Tq, Tk]`` (float32)."""
        attn = self.module
        if hidden.dim() == 4:  # [B, C, H, W] inputs of some UNet blocks
            hidden = hidden.flatten(2).transpose(1, 2)
        if getattr(attn, "norm_cross", None) and hasattr(attn, "norm_encoder_hidden_states"):
            context = attn.norm_encoder_hidden_states(context)
        q, k = attn.to_q(hidden).float(), attn.to_k(context).float()
        heads = int(attn.heads)
        q = q.unflatten(-1, (heads, -1)).transpose(1, 2)
        k = k.unflatten(-1, (heads, -1)).transpose(1, 2)
        scale = float(getattr(attn, "scale", q.shape[-1] ** -0.5))
        return (q @ k.transpose(-1, -2) * scale).softmax(-1)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _cfg_layout(pipe: Any, guidance_scale: float | None) -> str:
    """How the denoiser batch is laid out: twins share seeds, so the tracker's automatic test (equal
    halves mean CFG) would take [base, edited] twins for [uncond, cond] without CFG; decide from the
    guidance scale (the pipeline's default when None) instead. FLUX never doubles its batch."""
    if detect_family(pipe) == "flux":
        return "none"
    if guidance_scale is None:
        param = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
        guidance_scale = param.default if param is not None and param.default is not param.empty else 1.0
    return "uncond_cond" if float(guidance_scale) > 1.0 else "none"


def default_sites(pipe: Any) -> list[str]:
    """Every block and cross-attention hookpoint of the denoiser."""
    return [hp.path for hp in list_hookpoints(pipe)]


def run_pairs(
    pipe: Any,
    prompts: Sequence[str] | Tensor,
    editors: Mapping[str, Editor],
    cfg: DiagnoseConfig | None = None,
    *,
    saes: Mapping[str, Any] | None = None,
    desc: str = "diagnose",
) -> PairedRun:
    """Generate every prompt (strings, or ``prompt_embeds`` ``[N, L, D]``) as a base / edited pair
    and measure both at every observed site. ``editors``: hookpoint → editor (e.g. the bundle's
    ablators; ``{}`` gives two identical twins). ``saes``: hookpoint → SAE, for the FVU
    off-distribution score at those sites."""
    import time

    cfg = cfg or DiagnoseConfig()
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    n = len(prompts)
    if n == 0:
        raise ValueError("no prompts to diagnose")
    sites = list(cfg.sites) if cfg.sites is not None else default_sites(pipe)
    resolved = {s: resolve_hookpoint(pipe, s) for s in sites}  # bad paths fail before generating
    layout = PairLayout()
    store = SampleMetrics(n, cfg.tau_buckets)
    grid = TauGrid(cfg.tau_buckets)
    observers = {s: PairObserver(s, store, layout, grid, (saes or {}).get(s)) for s in sites}
    base_images: list[Tensor] = []
    edited_images: list[Tensor] = []
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:  # everything installed is removed, also after an error
        tracker = TimestepTracker(pipe, cfg_layout=_cfg_layout(pipe, cfg.guidance_scale))
        stack.callback(tracker.remove)
        stack.enter_context(quiet_pipeline(pipe))
        edits = {p: PairedEditor(e, layout) for p, e in editors.items()}
        stack.enter_context(install_hooks(pipe, edits, tracker=tracker))
        stack.enter_context(install_hooks(pipe, observers, tracker=tracker, allow_stack=True))
        if cfg.attention:
            for s, hp in resolved.items():
                if hp.kind == "attn":
                    stack.callback(AttentionProbe(hp.module, observers[s], tracker).remove)
        for first in tqdm(
            range(0, n, cfg.batch_size), desc=desc, unit="batch", disable=not cfg.show_progress
        ):
            chunk = prompts[first : first + cfg.batch_size]
            layout.pairs, layout.offset = len(chunk), first
            gens = [torch.Generator().manual_seed(cfg.seed + first + j) for j in range(len(chunk))]
            kwargs: dict[str, Any] = {
                "num_inference_steps": cfg.num_inference_steps,
                "generator": gens
                + [torch.Generator().manual_seed(cfg.seed + first + j) for j in range(len(chunk))],
                "output_type": "pt" if cfg.images else "latent",
            }
            if cfg.guidance_scale is not None:
                kwargs["guidance_scale"] = cfg.guidance_scale
            if isinstance(chunk, Tensor):
                kwargs["prompt_embeds"] = torch.cat([chunk, chunk])
            else:
                kwargs["prompt"] = list(chunk) * 2
            with torch.no_grad():
                images = pipe(**kwargs).images
            if cfg.images:
                images = torch.as_tensor(images).float().cpu()
                base_images.append(images[: len(chunk)])
                edited_images.append(images[len(chunk) :])
    return PairedRun(
        metrics=store,
        order=list(layout.order) + [s for s in sites if s not in layout.order],
        edited_sites=list(editors),
        base_images=torch.cat(base_images) if base_images else None,
        edited_images=torch.cat(edited_images) if edited_images else None,
        seconds=time.perf_counter() - start,
        info={
            "num_inference_steps": cfg.num_inference_steps,
            "guidance_scale": cfg.guidance_scale,
            "samples": n,
            "seed": cfg.seed,
            "tau_buckets": cfg.tau_buckets,
        },
    )


__all__ = ["AttentionProbe", "DiagnoseConfig", "PairedRun", "default_sites", "run_pairs"]
