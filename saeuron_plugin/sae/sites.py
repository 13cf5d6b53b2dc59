"""The site layer every runtime shares: installed-hooks handles, the unlearn handle, the statistics
recorder. Tensors only; each adapter (diffusers, transformers VLMs, ComfyUI) supplies just how to find
a module and what time / branch / sample a call is.

* :class:`CallContext` - what the running call says about the rows an editor sees (τ per row, the
  CFG branch mask, the sample owning each token); every editor is ``editor(tokens, ctx) -> tokens``
  (:class:`Editor`), in every runtime.
* :class:`CallTracker` - the call context (pre-hook records, post-hook clears) on the top module.
* :class:`EditSite` - a forward hook showing an editor the tokens of one module's output.
* :class:`InstalledSites` - what one install call put in place (per-hookpoint *sites*, each with a
  ``remove()``, and the call-context tracker), removed together, idempotently, also from a ``with``
  block that raised.
* :class:`UnlearnHandle` - what ``apply`` returns: the installed sites plus the ablator per
  hookpoint; ``remove()``, ``describe()``, per-site counters.
* :class:`CollectResult` - what an activation collection did (either runtime).
* :class:`StatisticsRecorder` - the statistics pass at one hookpoint, an editor that never edits:
  encode the rows a call selected, average them per sample (prompt image, VLM sample), add each
  sample to the concepts it belongs to, inside a :class:`~.bundle.StatisticsTransaction` (nothing
  lands unless the whole pass succeeds). The same class serves every runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..errors import HookConflictError
from .library import ConceptLibrary


@dataclass
class CallContext:
    """What the running model call says about the token rows ``[B, ...]`` an editor is shown.

    ``tau``: normalised time per row (a [B] tensor or one float; None: the model has no time axis
    or it is unknown). ``cond_mask``: [B] bool, True on conditional CFG rows (None: unknown, every
    row counts). ``owner``: for token sets that are not one sample per row (VLM image tokens
    gathered as ``[M, d]``), a function giving the sample of each token; it is only called when
    an editor asks (:meth:`samples`), since an ablation never needs it.
    """

    tau: Tensor | float | None = None
    cond_mask: Tensor | None = None
    owner: Callable[[Tensor], Tensor] | None = None

    def tau_per_row(self, batch: int) -> Tensor | None:
        """τ as a float32 CPU tensor [batch] (None when unknown)."""
        if self.tau is None:
            return None
        tau = torch.as_tensor(self.tau, dtype=torch.float32).detach().cpu().reshape(-1)
        return tau.expand(batch) if tau.numel() == 1 else tau

    def conditional(self, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        """The conditional rows of ``tokens`` and their τ (every row when the branch is unknown)."""
        tau = self.tau_per_row(tokens.shape[0])
        if self.cond_mask is None:
            return tokens, tau
        return tokens[self.cond_mask.to(tokens.device)], None if tau is None else tau[self.cond_mask.cpu()]

    def samples(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Conditional tokens flattened ``[M, d]``, the sample of each ``[M]`` (CPU long) and τ per
        sample (None without time). Without ``owner`` each conditional row is one sample."""
        if self.owner is not None:
            return tokens.reshape(-1, tokens.shape[-1]), self.owner(tokens).cpu(), None
        rows, tau = self.conditional(tokens)
        per_row = rows[0].numel() // rows.shape[-1] if rows.shape[0] else 0
        owner = torch.arange(rows.shape[0]).repeat_interleave(per_row)
        return rows.reshape(-1, rows.shape[-1]), owner, tau


class Editor(Protocol):
    """What every site calls: ``editor(tokens, ctx) -> tokens``. Returning ``tokens`` itself means
    "unchanged" (the module output passes on as is, with no copy)."""

    def __call__(self, tokens: Tensor, ctx: CallContext) -> Tensor: ...


class Site(Protocol):
    """One installed hook at one hookpoint."""

    def remove(self) -> None: ...


class CallTracker:
    """Call context of the top module (a denoiser, a VLM): a forward pre-hook records what the call
    is (:meth:`_record`: τ and CFG branch, token layout...), a forward hook clears it afterwards
    (``always_call``: also when the call raised), so a stale record is never used.

    Subclasses implement :meth:`_record` and :meth:`_clear`. Removing twice is harmless;
    :meth:`install` registers again after :meth:`remove`.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._handles: list[RemovableHandle] = []
        self._clear()
        self.install()

    @property
    def active(self) -> bool:
        """Whether the hooks are installed."""
        return bool(self._handles)

    def install(self) -> CallTracker:
        if not self._handles:
            self._handles = [
                self.module.register_forward_pre_hook(self._record, with_kwargs=True),
                self.module.register_forward_hook(lambda *_: self._clear(), always_call=True),
            ]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._clear()

    def _record(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise NotImplementedError

    def _clear(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> CallTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class EditSite:
    """A forward hook on one module that shows an editor the tokens of its output.

    Subclasses say which tokens (:meth:`select`: the tokens and how to put edited ones back, or
    None to skip this call) and what the call context is (:meth:`context`, from their runtime's
    tracker); the editor is called as ``editor(tokens, ctx)``. An edit that returns its input
    object means "unchanged": the module output passes on as is. One site per module unless
    ``allow_stack`` (then both apply, in order); ``prepend`` runs it before the module's other
    forward hooks.
    """

    def __init__(
        self,
        path: str,
        module: nn.Module,
        editor: Editor,
        *,
        allow_stack: bool = False,
        prepend: bool = False,
    ) -> None:
        if not allow_stack and any(isinstance(h, EditSite) for h in module._forward_hooks.values()):
            raise HookConflictError(
                f"{path} already has an editing hook installed (remove it first, or "
                "pass allow_stack=True to apply both)"
            )
        self.path = path
        self.editor = editor
        self.calls = self.edits = 0
        self._handle: RemovableHandle | None = module.register_forward_hook(self, prepend=prepend)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        self.calls += 1
        selected = self.select(output)
        if selected is None:
            return output
        tokens, restore = selected
        edited = self.editor(tokens, self.context(tokens))
        if edited is tokens:
            return output
        self.edits += 1
        return restore(edited)

    def select(self, output: Any) -> tuple[Tensor, Callable[[Tensor], Any]] | None:
        raise NotImplementedError

    def context(self, tokens: Tensor) -> CallContext:
        raise NotImplementedError

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class InstalledSites:
    """Every site one install call put in place; :meth:`remove` undoes all of it (idempotent).

    ``tracker`` is the adapter's call-context tracker (diffusers: τ and CFG branch of the denoiser
    call; VLMs: the token layout of the model call); it is removed with the sites when the install
    created it (``owns_tracker``).
    """

    def __init__(self, tracker: Any = None, owns_tracker: bool = True) -> None:
        self.tracker = tracker
        self.sites: dict[str, Any] = {}
        self._owns_tracker = owns_tracker
        self.removed = False

    def remove(self) -> None:
        for site in reversed(list(self.sites.values())):
            site.remove()
        if self._owns_tracker and self.tracker is not None:
            self.tracker.remove()
        self.removed = True

    def seen_tau(self, path: str) -> list[Tensor | None]:
        """τ per call the site at ``path`` saw (sites installed with ``record_tau=True``)."""
        return self.sites[path].seen_tau

    def __enter__(self) -> InstalledSites:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class UnlearnHandle:
    """What ``apply`` installed; :meth:`remove` (idempotent) takes all of it out.

    ``notes`` adds a per-hookpoint remark to :meth:`describe` (the VLM adapter's token set).
    """

    def __init__(
        self, hooks: InstalledSites, ablators: Mapping[str, Any], notes: Mapping[str, str] | None = None
    ) -> None:
        self.hooks = hooks
        self.ablators = dict(ablators)
        self.notes = dict(notes or {})

    @property
    def removed(self) -> bool:
        return self.hooks.removed

    @property
    def hookpoints(self) -> list[str]:
        return list(self.ablators)

    def edits(self, path: str) -> int:
        """Calls at ``path`` where the ablation changed something."""
        return int(self.hooks.sites[path].edits)

    def seen_tau(self, path: str) -> list[Tensor | None]:
        """τ per call seen at ``path`` (when installed with ``record_tau=True``)."""
        return self.hooks.seen_tau(path)

    def remove(self) -> None:
        self.hooks.remove()

    def describe(self) -> str:
        """Which latents each concept ablates, where and when."""
        return "\n".join(
            a.describe() + (f" [{self.notes[p]}]" if p in self.notes else "")
            for p, a in self.ablators.items()
        )

    def __enter__(self) -> UnlearnHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "active"
        return f"UnlearnHandle({state}, {', '.join(f'{p}: {a.concepts}' for p, a in self.ablators.items())})"


@dataclass
class BatchLoop:
    """How a runtime's generation loop reports and what it calls around each batch (collection, the
    statistics pass): one progress bar over the items, ``on_batch_start`` / ``on_batch_end`` with
    the batch's key (diffusers: the ``(index, prompt)`` pairs; VLMs: the sample indices)."""

    desc: str = "generate"
    show_progress: bool = True
    on_batch_start: Callable[[Any], None] | None = None
    on_batch_end: Callable[[Any], None] | None = None

    def each(self, batches: Any, total: int, unit: str, key: Callable[[Any], Any] = lambda b: b) -> Any:
        """Yield each batch between its two callbacks; the bar advances by ``len(key(batch))``."""
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=self.desc, unit=unit, disable=not self.show_progress) as bar:
            # callers iterate inside ``contextlib.closing``, so an error closes the bar at once
            for batch in batches:
                if self.on_batch_start is not None:
                    self.on_batch_start(key(batch))
                yield batch
                if self.on_batch_end is not None:
                    self.on_batch_end(key(batch))
                bar.update(len(key(batch)))


@dataclass
class CollectResult:
    """What a collection run did: prompts / samples run, skipped as already stored, rows per hookpoint."""

    collected: int = 0
    skipped: int = 0
    rows: dict[str, int] = field(default_factory=dict)


class StatisticsRecorder:
    """The statistics pass at one hookpoint: an :class:`Editor` that never edits.

    Before each batch the driver says which concepts each sample of the batch feeds and how it is
    labelled (:meth:`start_batch`); every call then encodes the conditional tokens once (the
    entry's θ calibrator sees the same pre-activations), averages them per sample
    (:meth:`CallContext.samples`) and adds the means, with the sample's τ, to the pass's
    statistics (:meth:`~.bundle.StatisticsTransaction.stats`). :meth:`finish_batch` checks that
    every sample was seen and records the prompts. ``extra`` is stored with each concept's
    statistics (the VLM token set); ``missing_hint`` ends the error for a sample with no tokens;
    ``require_tau`` refuses a call without a timestep even for a one-bucket library (diffusers).
    """

    def __init__(
        self,
        entry: Any,
        txn: Any,
        extra: Mapping[str, Any] | None = None,
        missing_hint: str = "",
        require_tau: bool = False,
    ) -> None:
        self.entry = entry
        self.txn = txn
        self.extra = dict(extra or {})
        self.missing_hint = missing_hint
        self.require_tau = require_tau
        self.names: list[list[str | None]] = []
        self.labels: list[str] = []
        self.prompts: list[int] = []
        self._seen: set[int] = set()

    @property
    def path(self) -> str:
        return self.entry.path

    def stats(self, name: str | None) -> Any:
        """This pass's (uncommitted) statistics for ``name`` (None: the background set)."""
        stats = self.txn.stats(self.entry.path, name)
        for key, value in self.extra.items():
            stats.extra.setdefault(key, value)
        return stats

    def start_batch(
        self,
        names: Sequence[Sequence[str | None]],
        labels: Sequence[str],
        prompts: Sequence[int] | None = None,
    ) -> None:
        """The concepts and the label of each sample of the next batch (one entry per sample);
        ``prompts``: the samples whose labels count as prompts (default: every sample; diffusers
        passes the first image of each prompt, so ``num_images_per_prompt`` does not multiply them)."""
        self.names, self.labels, self._seen = [list(n) for n in names], list(labels), set()
        self.prompts = list(range(len(self.labels))) if prompts is None else list(prompts)

    def __call__(self, tokens: Tensor, ctx: CallContext) -> Tensor:
        rows, owner, tau = ctx.samples(tokens)
        if tau is None and (self.require_tau or self.entry.library.tau_grid.num_buckets > 1):
            raise RuntimeError(f"{self.path}: no timestep seen for this call (run outside the denoiser?)")
        if rows.shape[0] and int(owner.max()) >= len(self.names):
            raise RuntimeError(
                f"{self.path}: rows of {int(owner.max()) + 1} samples for a batch of "
                f"{len(self.names)}; the batch layout is not understood (use batch_size=1)"
            )
        if rows.shape[0]:
            self._seen.update(self.record(rows, owner, self.names, tau))
        return tokens

    def finish_batch(self) -> None:
        """Check every sample of the batch had tokens here; record each concept's prompts."""
        missing = [self.labels[i] for i in range(len(self.labels)) if i not in self._seen]
        if missing:
            raise RuntimeError(
                f"{self.path}: no selected tokens for samples {missing[:3]}{self.missing_hint}"
            )
        for name in dict.fromkeys(n for names in self.names for n in names):
            self.stats(name).record_prompts([self.labels[i] for i in self.prompts if name in self.names[i]])
        self.names, self.labels, self.prompts = [], [], []

    @torch.no_grad()
    def record(
        self, rows: Tensor, owner: Tensor, names: Sequence[Sequence[str | None]], tau: Tensor | None = None
    ) -> list[int]:
        """Add rows [M, d] of samples ``owner`` [M] (indices into ``names`` / ``tau``); returns the
        samples that had rows."""
        sae = self.entry.sae
        flat = rows.detach().reshape(-1, rows.shape[-1]).to(sae.device, torch.float32)
        z = ConceptLibrary.encode_pooled(sae, flat, self.entry.calibrator)  # 2-D: per-row latents [M, n]
        owner = owner.to(z.device)
        sums = torch.zeros(len(names), z.shape[-1], dtype=torch.float64, device=z.device)
        sums.index_add_(0, owner, z.double())
        counts = torch.bincount(owner, minlength=len(names)).cpu()
        present = (counts > 0).nonzero().flatten().tolist()
        means = (sums[present] / counts[present].to(sums.device).unsqueeze(1)).float().cpu()
        sample_tau = None if tau is None else tau.detach().float().cpu()[present]
        for name in dict.fromkeys(n for i in present for n in names[i]):
            sel = torch.tensor([name in names[i] for i in present])
            self.stats(name).update(means[sel], None if sample_tau is None else sample_tau[sel])
        return present


__all__ = [
    "BatchLoop",
    "CallContext",
    "CallTracker",
    "CollectResult",
    "EditSite",
    "Editor",
    "InstalledSites",
    "Site",
    "StatisticsRecorder",
    "UnlearnHandle",
]
