"""Edit activations at hookpoints with module forward hooks (blocks and cross-attention alike).

An *editor* is the core's :class:`~saeuron_plugin.sae.sites.Editor`, ``editor(tokens [B, T, C],
ctx) -> tokens``, with ``ctx.tau`` (per row) and ``ctx.cond_mask`` from a
:class:`~.timestep.TimestepTracker` on the denoiser. Returning ``tokens`` itself means
"unchanged": the module output is passed on as is, with no copy.

One mechanism for every hookpoint: a forward hook on the module (:class:`EditHook`). For a
cross-attention ``Attention`` this sees exactly the processor's output (``Attention.forward``
returns ``self.processor(...)``: post ``to_out``, before the residual), so it survives every
processor swap by construction (``fuse_qkv_projections``, ``set_default_attn_processor``,
xformers, LoRA or IP-adapter loading, a user restoring processors saved while it was applied) and
never touches the user's processors; diffusers' own ``AttentionProcessorSkipHook`` works the same
way. Removing the hook removes the edit, whatever happened to the processors meanwhile.

Installing a second hook of ours on the same module raises :class:`HookConflictError` unless
``allow_stack=True`` (then both apply, in installation order). Everything is removed by
:meth:`InstalledHooks.remove`, idempotently; the ``with`` form removes it also when generation
raises. Hooks live on modules, so pipelines made with ``from_pipe`` share them. Diffusers cache
hooks (FirstBlockCache, TaylorSeer, MagCache, pyramid attention broadcast...) skip block forwards,
so an edit under them would be cached or skipped: installing warns when one is active.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ..errors import HookConflictError
from ..sae.sites import CallContext, Editor, EditSite, InstalledSites
from .hookpoints import Hookpoint, get_denoiser, resolve_hookpoint, to_tokens
from .timestep import TimestepTracker

# Names of diffusers' hooks (``module._diffusers_hook.hooks``) that skip or reuse block forwards.
_CACHE_HOOK_WORDS = ("cache", "broadcast", "taylorseer")


class EditHook(EditSite):
    """Forward hook editing one module's output (feature map, token tensor, joint-stream tuple or
    an ``Attention``'s processor output) with τ and the branch mask of the running denoiser call."""

    def __init__(
        self,
        hookpoint: Hookpoint,
        editor: Editor,
        tracker: TimestepTracker,
        *,
        record_tau: bool = False,
        allow_stack: bool = False,
    ) -> None:
        self.hookpoint = hookpoint
        self.tracker = tracker
        self.record_tau = record_tau
        self.seen_tau: list[Tensor | None] = []
        super().__init__(hookpoint.path, hookpoint.module, editor, allow_stack=allow_stack)

    def select(self, output: Any) -> tuple[Tensor, Any]:
        return to_tokens(output, self.hookpoint.output_index)

    def context(self, tokens: Tensor) -> CallContext:
        tau, mask = self.tracker.tau, self.tracker.cond_mask
        if tau is not None and tau.shape[0] != tokens.shape[0]:
            raise RuntimeError(
                f"{self.path}: activation batch {tokens.shape[0]} does not match "
                f"the denoiser batch {tau.shape[0]}"
            )
        if self.record_tau:
            self.seen_tau.append(None if tau is None else tau.detach().clone())
        return CallContext(tau, mask)


def cache_hooks(denoiser: nn.Module) -> list[str]:
    """Names of active diffusers cache hooks on the denoiser or its submodules."""
    found = []
    for name, module in denoiser.named_modules():
        registry = module.__dict__.get("_diffusers_hook")
        for hook_name in getattr(registry, "hooks", {}) or {}:
            if any(word in hook_name.lower() for word in _CACHE_HOOK_WORDS):
                found.append(f"{name or type(denoiser).__name__}:{hook_name}")
    return found


InstalledHooks = InstalledSites
"""What :func:`install_hooks` returns (the core's handle; ``.tracker`` is the τ tracker)."""


def install_hooks(
    pipe: Any,
    editors: Mapping[str, Editor],
    *,
    tracker: TimestepTracker | None = None,
    record_tau: bool = False,
    allow_stack: bool = False,
) -> InstalledHooks:
    """Hook every ``hookpoint path -> editor`` of ``editors`` into ``pipe`` (a forward hook each).

    A tracker is created (and later removed) unless one is passed in. On any error, what was
    already installed is removed again.
    """
    hookpoints = [resolve_hookpoint(pipe, path) for path in editors]
    cached = cache_hooks(get_denoiser(pipe))
    if cached:
        warnings.warn(
            f"diffusers cache hooks are active ({', '.join(cached[:3])}): they skip or reuse block "
            "forwards, so the SAeUron edit is skipped or cached on those steps; disable the cache "
            "(e.g. denoiser.disable_cache()) for a faithful edit",
            stacklevel=3,
        )
    owns = tracker is None
    installed = InstalledSites(tracker if tracker is not None else TimestepTracker(pipe), owns)
    try:
        for hp in hookpoints:
            installed.sites[hp.path] = EditHook(
                hp, editors[hp.path], installed.tracker, record_tau=record_tau, allow_stack=allow_stack
            )
    except BaseException:
        installed.remove()
        raise
    return installed


__all__ = ["EditHook", "Editor", "HookConflictError", "InstalledHooks", "cache_hooks", "install_hooks"]
