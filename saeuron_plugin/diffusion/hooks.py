"""Edit activations at hookpoints: block forward hooks and a wrapping attention processor.

An *editor* is any callable ``editor(tokens [B, T, C], tau, cond_mask) -> tokens`` (e.g. the
core ``FeatureAblator``). Returning ``tokens`` itself means "unchanged": the module output is
passed on as is, with no copy. τ and the conditional-row mask come from a
:class:`~.timestep.TimestepTracker` on the denoiser.

Two mechanisms, chosen by module type (see :mod:`.hookpoints`):

* :class:`BlockOutputHook` - forward hook on a ``Transformer2DModel`` or transformer block.
* :class:`AttnOutputHook` - installs an :class:`EditingAttnProcessor` on one cross-attention
  ``Attention`` (``module.set_processor``), wrapping the processor already there (SDPA,
  xformers, plain, IP-adapter...). The edit sees the processor output: post ``to_out``, before
  the residual. A pre-forward guard notices when the processor was replaced since
  (``set_default_attn_processor``, ``enable_xformers_memory_efficient_attention``, LoRA or
  IP-adapter loading) and wraps the new one before the call, so the edit never silently stops.

Installing a second hook of ours on the same module raises :class:`HookConflictError` unless
``allow_stack=True`` (then both apply, in installation order). Everything is removed by
:meth:`InstalledHooks.remove`, idempotently; the ``with`` form removes it also when generation
raises. Hooks live on modules, so pipelines made with ``from_pipe`` share them.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from diffusers.models.attention_processor import Attention
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import SAeUronError
from .hookpoints import Hookpoint, resolve_hookpoint, to_tokens
from .timestep import TimestepTracker

# Attribute under which a wrapped nn.Module processor (IP-adapter, custom diffusion) stays
# registered on its Attention while our wrapper is installed, so `.to()` still moves its weights.
WRAPPED_PROCESSOR_ATTR = "saeuron_wrapped_processor"


class Editor(Protocol):
    def __call__(self, x: Tensor, tau: Tensor | float | None, cond_mask: Tensor | None = None) -> Tensor: ...


class HookConflictError(SAeUronError, RuntimeError):
    """A hook of ours is already installed on this module."""


class _EditSite:
    """Shared part of both mechanisms: call the editor with the tracker's τ and branch mask."""

    def __init__(self, hookpoint: Hookpoint, editor: Editor, tracker: TimestepTracker,
                 record_tau: bool = False) -> None:
        self.hookpoint = hookpoint
        self.editor = editor
        self.tracker = tracker
        self.record_tau = record_tau
        self.seen_tau: list[Tensor | None] = []
        self.calls = 0

    def edit_output(self, output: Any) -> Any:
        """Editor applied to the image tokens of ``output``; ``output`` itself if unchanged."""
        tokens, restore = to_tokens(output, self.hookpoint.output_index)
        tracker = self.tracker
        tau, mask = tracker.tau, tracker.cond_mask
        if tau is not None and tau.shape[0] != tokens.shape[0]:
            raise RuntimeError(f"{self.hookpoint.path}: activation batch {tokens.shape[0]} does not match "
                               f"the denoiser batch {tau.shape[0]}")
        self.calls += 1
        if self.record_tau:
            self.seen_tau.append(None if tau is None else tau.detach().clone())
        edited = self.editor(tokens, tau, mask)
        return output if edited is tokens else restore(edited)


class BlockOutputHook(_EditSite):
    """Forward hook editing a block's output (feature map, token tensor or joint-stream tuple)."""

    def __init__(self, hookpoint: Hookpoint, editor: Editor, tracker: TimestepTracker, *,
                 record_tau: bool = False, allow_stack: bool = False) -> None:
        super().__init__(hookpoint, editor, tracker, record_tau)
        module = hookpoint.module
        if not allow_stack and any(isinstance(h, BlockOutputHook) for h in module._forward_hooks.values()):
            raise HookConflictError(f"{hookpoint.path} already has an editing hook installed (remove it "
                                    "first, or pass allow_stack=True to apply both)")
        self._handle: RemovableHandle | None = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        return self.edit_output(output)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class EditingAttnProcessor:
    """Attention processor that runs the wrapped processor and edits its output.

    To diffusers' class checks (``set_default_attn_processor`` accepts only known processor
    classes) it reports the wrapped processor's class as its ``__class__``; ``type()`` still tells
    the truth. ``Attention.forward`` filters keyword arguments by the processor's ``__call__``
    signature, so the wrapper exposes the wrapped processor's signature.
    """

    def __init__(self, inner: Any, site: _EditSite) -> None:
        self.site = site
        self.set_inner(inner)

    def set_inner(self, inner: Any) -> None:
        self.inner = inner

        def call_view(*args: Any, **kwargs: Any) -> Any:  # what inspect sees; calls go to type().__call__
            return EditingAttnProcessor.__call__(self, *args, **kwargs)

        with contextlib.suppress(TypeError, ValueError):  # no signature: keep the generic one
            call_view.__signature__ = inspect.signature(inner.__call__)  # type: ignore[attr-defined]
        self.__dict__["__call__"] = call_view

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        inner = self.__dict__.get("inner")
        if inner is None or isinstance(inner, nn.Module):
            return EditingAttnProcessor
        return inner.__class__

    def __call__(self, attn: Attention, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.site.edit_output(self.inner(attn, hidden_states, *args, **kwargs))

    def __repr__(self) -> str:
        return f"EditingAttnProcessor({self.inner!r}, hookpoint={self.site.hookpoint.path!r})"


def _chain(processor: Any) -> list[Any]:
    """The processor and, through our wrappers, everything it wraps (outermost first)."""
    chain = [processor]
    while type(chain[-1]) is EditingAttnProcessor:
        chain.append(chain[-1].inner)
    return chain


def _sync_alias(module: nn.Module) -> None:
    """Register the nn.Module processor at the bottom of our wrappers under an alias, or drop it.

    ``Attention.set_processor`` unregisters a module processor when a plain object replaces it;
    while our wrapper sits on top, the alias keeps its weights in ``.to()`` / ``state_dict``.
    """
    chain = _chain(module.processor)
    if len(chain) > 1 and isinstance(chain[-1], nn.Module):
        module._modules[WRAPPED_PROCESSOR_ATTR] = chain[-1]
    else:
        module._modules.pop(WRAPPED_PROCESSOR_ATTR, None)


class AttnOutputHook(_EditSite):
    """Install an :class:`EditingAttnProcessor` on one ``Attention`` and keep it installed."""

    def __init__(self, hookpoint: Hookpoint, editor: Editor, tracker: TimestepTracker, *,
                 record_tau: bool = False, allow_stack: bool = False) -> None:
        super().__init__(hookpoint, editor, tracker, record_tau)
        module = hookpoint.module
        if not isinstance(module, Attention):
            raise TypeError(f"{hookpoint.path} is a {type(module).__name__}, not an Attention module")
        if not allow_stack and any(type(p) is EditingAttnProcessor for p in _chain(module.processor)):
            raise HookConflictError(f"{hookpoint.path} already has an editing processor installed (remove it "
                                    "first, or pass allow_stack=True to apply both)")
        self.module = module
        self.wrapper = EditingAttnProcessor(module.processor, self)
        self.rewraps = 0
        self._install_wrapper()
        self._guard: RemovableHandle | None = module.register_forward_pre_hook(self._check)

    def _install_wrapper(self) -> None:
        self.module.set_processor(self.wrapper)  # pops an nn.Module processor from _modules ...
        _sync_alias(self.module)  # ... so keep it registered under another name

    def _check(self, module: nn.Module, args: Any) -> None:
        """Pre-forward guard: re-wrap if our wrapper left the processor chain."""
        processor = module.processor
        if processor is self.wrapper:
            return
        if any(p is self.wrapper for p in _chain(processor)):
            return
        self.wrapper.set_inner(processor)
        self.rewraps += 1
        self._install_wrapper()

    def remove(self) -> None:
        """Take the wrapper out; the processor it wraps (the latest one) goes back in place."""
        if self._guard is None:
            return
        self._guard.remove()
        self._guard = None
        module, wrapper = self.module, self.wrapper
        chain = _chain(module.processor)
        if chain[0] is wrapper:
            module._modules.pop(WRAPPED_PROCESSOR_ATTR, None)
            module.set_processor(wrapper.inner)
        else:  # stacked under another wrapper, or replaced since the last call: splice out if present
            for outer in chain[:-1]:
                if outer.inner is wrapper:
                    outer.set_inner(wrapper.inner)
                    break
        _sync_alias(module)


class InstalledHooks:
    """Every hook one :func:`install_hooks` call put in place; :meth:`remove` undoes all of it."""

    def __init__(self, tracker: TimestepTracker, owns_tracker: bool) -> None:
        self.tracker = tracker
        self.hooks: dict[str, BlockOutputHook | AttnOutputHook] = {}
        self._owns_tracker = owns_tracker
        self.removed = False

    def remove(self) -> None:
        """Remove hooks, restore processors and drop the tracker (if ours); idempotent."""
        for hook in reversed(list(self.hooks.values())):
            hook.remove()
        if self._owns_tracker:
            self.tracker.remove()
        self.removed = True

    def seen_tau(self, path: str) -> list[Tensor | None]:
        """τ tensors the hook at ``path`` saw (with ``record_tau=True``), one per call."""
        return self.hooks[path].seen_tau

    def __enter__(self) -> InstalledHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def install_hooks(pipe: Any, editors: Mapping[str, Editor], *, tracker: TimestepTracker | None = None,
                  record_tau: bool = False, allow_stack: bool = False) -> InstalledHooks:
    """Hook every ``hookpoint path -> editor`` of ``editors`` into ``pipe``.

    The mechanism follows the module type: ``Attention`` → wrapping processor, blocks → forward
    hook. A tracker is created (and later removed) unless one is passed in. On any error, what
    was already installed is removed again.
    """
    hookpoints = [resolve_hookpoint(pipe, path) for path in editors]
    owns = tracker is None
    installed = InstalledHooks(tracker if tracker is not None else TimestepTracker(pipe), owns)
    try:
        for hp in hookpoints:
            cls: Callable[..., BlockOutputHook | AttnOutputHook] = (
                AttnOutputHook if hp.kind == "attn" else BlockOutputHook)
            installed.hooks[hp.path] = cls(hp, editors[hp.path], installed.tracker,
                                           record_tau=record_tau, allow_stack=allow_stack)
    except BaseException:
        installed.remove()
        raise
    return installed
