"""Forward hooks that show an editor the selected tokens of a VLM hookpoint.

:class:`InputTracker` is a forward pre-hook on the top model: for every call (the prefill of
``generate()``, each decode step, a plain forward) it records ``input_ids`` and the attention
mask, from which the token sets follow: image tokens (``input_ids == image_token_id``), text
tokens (the other non-padding ones) and all non-padding tokens. A forward hook on the top model
(``always_call``) clears the record after the call, so a stale record is never used.

:class:`TokenSite` is a forward hook on one hookpoint module. It gathers the selected tokens of
the output as ``[M, d]`` (decoder layers: the mask over [B, T]; projector and vision layers:
every token) and calls the core editor ``editor(tokens, ctx)`` (``ctx.samples`` gives the sample
of each token, :meth:`TokenSite.sample_index`). An editor that returns ``tokens`` itself means
"unchanged" and the module output passes through untouched; otherwise the edited rows are
written back into a copy. With a KV cache, decode steps see one new (text) token, so an edit of
image tokens happens on the prefill pass only; without a cache every step recomputes the whole
sequence and edits the same positions the same way, so both give the same tokens.

Site hooks are prepended, so they run before any other forward hook of the module (transformers
5.x captures ``hidden_states`` with hooks of its own, and LLaVA takes its image features from
them): everything downstream sees the edited output. Everything is removed by
:meth:`InstalledHooks.remove` (idempotent, also after errors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import HookConflictError
from ..sae.sites import CallContext, CallTracker, Editor, EditSite, InstalledSites
from .hookpoints import (
    HookpointIndex,
    TokenMode,
    VLMHookpoint,
    check_tokens,
    hookpoint_index,
    image_token_id,
    resolve_hookpoint,
    to_hidden,
)


class InputTracker(CallTracker):
    """Pre-hook on the top model recording the token layout of the current call."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.image_token_id = image_token_id(model)
        self.calls = 0
        super().__init__(model)

    def _record(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], Tensor) else None)
        embeds = kwargs.get("inputs_embeds")
        mask = kwargs.get("attention_mask")
        self.input_ids = ids if isinstance(ids, Tensor) else None
        ref = self.input_ids if self.input_ids is not None else embeds
        if isinstance(ref, Tensor) and ref.dim() >= 2:
            self.batch_size, self.seq_len = int(ref.shape[0]), int(ref.shape[1])
        else:
            self.batch_size = self.seq_len = None
        self.attention_mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        self.in_call = True
        self.calls += 1

    def _clear(self) -> None:
        self.input_ids: Tensor | None = None
        self.attention_mask: Tensor | None = None
        self.batch_size: int | None = None
        self.seq_len: int | None = None
        self.in_call = False

    # ------------------------------------------------------------------ masks
    def valid(self) -> Tensor | None:
        """[B, T] bool, False on padding (None: no mask given, every token is real)."""
        if self.attention_mask is None or self.seq_len is None:
            return None
        return self.attention_mask[:, -self.seq_len :].bool()

    def image_mask(self, path: str) -> Tensor:
        if self.input_ids is None:
            raise RuntimeError(
                f"{path}: image/text token selection needs `input_ids` (the call passed "
                "inputs_embeds only); use tokens='all' or pass input_ids"
            )
        if self.image_token_id is None:
            raise RuntimeError(f"{path}: the model config has no image_token_id")
        return self.input_ids == self.image_token_id

    def token_mask(self, mode: TokenMode, path: str) -> Tensor | None:
        """[B, T] bool of the selected tokens of the current call, or None for every token."""
        valid = self.valid()
        if mode == "all":
            return None if valid is None or bool(valid.all()) else valid
        image = self.image_mask(path)
        mask = image if mode == "image" else ~image
        return mask if valid is None else mask & valid.to(mask.device)

    def image_counts(self) -> Tensor | None:
        """Image tokens per sample [B] of the current call (None without input_ids)."""
        if self.input_ids is None or self.image_token_id is None:
            return None
        return (self.input_ids == self.image_token_id).sum(1).cpu()


class TokenSite(EditSite):
    """Forward hook at one hookpoint: selected tokens → ``editor(tokens, ctx)`` → written back if edited."""

    def __init__(
        self,
        hookpoint: VLMHookpoint,
        tokens: TokenMode,
        tracker: InputTracker,
        editor: Editor,
        *,
        allow_stack: bool = False,
    ) -> None:
        self.hookpoint = hookpoint
        self.tokens = tokens
        self.tracker = tracker
        self.last_mask: Tensor | None = None
        # prepend: run before hooks already there, e.g. the output-capturing hooks transformers 5.x puts on
        # layers at the first forward (LLaVA reads its image features from those captured hidden states)
        super().__init__(hookpoint.path, hookpoint.module, editor, allow_stack=allow_stack, prepend=True)

    def select(self, output: Any) -> tuple[Tensor, Callable[[Tensor], Any]] | None:
        hidden, restore = to_hidden(output, self.path)
        mask = self.last_mask = self._mask(hidden)
        if mask is None:
            return hidden, lambda edited: restore(edited.to(hidden.dtype))
        if not bool(mask.any()):
            return None

        def write_back(edited: Tensor) -> Any:
            out = hidden.clone()
            out[mask] = edited.to(hidden.dtype)
            return restore(out)

        return hidden[mask], write_back

    def context(self, tokens: Tensor) -> CallContext:
        return CallContext(owner=self.sample_index)

    def _mask(self, hidden: Tensor) -> Tensor | None:
        """Selection over ``hidden.shape[:-1]`` (None: every token)."""
        tracker = self.tracker
        if self.hookpoint.image_only:
            return None
        if not tracker.in_call:
            if self.tokens == "all":
                return None
            raise RuntimeError(
                f"{self.path}: the layer ran outside a call of the model the hooks were installed "
                "on, so image / text positions are unknown (call that model, or use tokens='all')"
            )
        if hidden.dim() != 3 or (
            tracker.seq_len is not None and tuple(hidden.shape[:2]) != (tracker.batch_size, tracker.seq_len)
        ):
            raise RuntimeError(
                f"{self.path}: output of shape {tuple(hidden.shape)} does not match the "
                f"model inputs [{tracker.batch_size}, {tracker.seq_len}]"
            )
        mask = tracker.token_mask(self.tokens, self.path)
        return None if mask is None else mask.to(hidden.device)

    # ------------------------------------------------------------- samples
    def sample_index(self, selected: Tensor) -> Tensor:
        """Sample (batch row) of each selected token, [M] long on the CPU, for per-sample pooling.

        Decoder layers: the row of the token. Projector and vision outputs are assigned to samples
        from the image-token count of each sample: packed [N, d] outputs (Qwen) by a common
        factor N / Σ counts, batched [R, ...] outputs by whole rows (one per image or tile).
        """
        tr = self.tracker
        b = tr.batch_size or 1
        mask = self.last_mask
        if not self.hookpoint.image_only:
            if mask is None:
                t = tr.seq_len or selected.shape[0] // b
                return torch.arange(b).repeat_interleave(t)
            return mask.nonzero()[:, 0].cpu()
        n = selected.shape[0] if selected.dim() == 2 else selected.shape[:-1].numel()
        if b == 1:
            return torch.zeros(n, dtype=torch.long)
        counts = tr.image_counts()
        where = f"{self.path}: cannot tell which sample each image token belongs to"
        if counts is None or int(counts.sum()) == 0:
            raise RuntimeError(f"{where} (no image tokens in input_ids); use batch_size=1")
        total = int(counts.sum())
        if selected.dim() == 2:  # packed: every image's tokens in sample order
            if n % total:
                raise RuntimeError(f"{where} ({n} packed tokens for {total} image tokens); use batch_size=1")
            return torch.arange(b).repeat_interleave(counts * (n // total))
        rows, per_row = selected.shape[0], selected.shape[1:-1].numel()
        if rows == b or self.hookpoint.family == "mllama" or bool((counts == counts[0]).all()):
            if rows % b:
                raise RuntimeError(f"{where} ({rows} rows for {b} samples); use batch_size=1")
            owner = torch.arange(b).repeat_interleave(rows // b)
        else:
            if bool(((counts * rows) % total).any()):
                raise RuntimeError(f"{where} ({rows} rows, image tokens {counts.tolist()}); use batch_size=1")
            owner = torch.arange(b).repeat_interleave(counts * rows // total)
        return owner.repeat_interleave(per_row)


InstalledHooks = InstalledSites
"""What :func:`install_sites` returns (the core's handle; ``.tracker`` is the input tracker)."""


def install_sites(
    model: nn.Module,
    editors: Mapping[str, Editor],
    tokens: Mapping[str, str | None] | str | None = None,
    *,
    index: HookpointIndex | None = None,
    allow_stack: bool = False,
) -> InstalledHooks:
    """Hook ``path -> editor`` into ``model`` with a shared :class:`InputTracker`.

    ``tokens``: one mode for all hookpoints or per path (None / ``auto``: the hookpoint's default).
    Paths are checked before anything is installed; on any error what was installed is removed.
    """
    index = index or hookpoint_index(model)
    resolved = [resolve_hookpoint(model, p, index) for p in editors]
    modes = {
        hp.path: check_tokens(hp, tokens.get(hp.path) if isinstance(tokens, Mapping) else tokens, model)
        for hp in resolved
    }
    installed = InstalledSites(InputTracker(model))
    try:
        for hp in resolved:
            installed.sites[hp.path] = TokenSite(
                hp, modes[hp.path], installed.tracker, editors[hp.path], allow_stack=allow_stack
            )
    except BaseException:
        installed.remove()
        raise
    return installed


__all__ = ["HookConflictError", "InputTracker", "InstalledHooks", "TokenSite", "install_sites"]
