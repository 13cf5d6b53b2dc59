"""Collect hookpoint activations from a diffusers pipeline across all denoising steps.

Every spatial position (or image token) of every step becomes one row ``[d]`` with its normalised
time τ; by default only conditional CFG rows are kept (SAeUron computes its statistics there).
Several hookpoints are captured in the same generation pass. Rows go to an
:class:`~saeuron_plugin.sae.store.ActivationStore` (one per hookpoint; prompts already stored are
skipped on a re-run) or stream to a callable ``sink(hookpoint, rows [N, d], tau [N])``, e.g. a
trainer's queue, without touching disk.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..sae.processes import Processes
from ..sae.sites import BatchLoop, CallContext, CollectResult
from ..sae.store import flushing, merge_process_stores, open_process_stores, open_stores
from .hookpoints import Hookpoint, detect_family, resolve_hookpoint
from .hooks import install_hooks

Sink = Callable[[str, Tensor, Tensor], None]
Prompt = str | Mapping[str, Any]


def prompt_key(index: int, prompt: Prompt) -> str:
    """Resume key of a prompt: its position plus a hash of its content."""
    h = hashlib.sha256()
    if isinstance(prompt, str):
        h.update(prompt.encode())
    else:
        for name in sorted(prompt):
            value = prompt[name]
            h.update(name.encode())
            if isinstance(value, Tensor):
                t = value.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(repr(value).encode())
    return f"{index}:{h.hexdigest()[:16]}"


class _Capture:
    """Editor that records rows (never edits): selected batch rows, optional token subsample."""

    def __init__(self, path: str, cond_only: bool, tokens_per_step: int | None, seed: int) -> None:
        self.path = path
        self.cond_only = cond_only
        self.tokens_per_step = tokens_per_step
        self.seed = seed
        self.generators: list[torch.Generator] = []
        self.prompts_in_batch = 1
        self.images_per_prompt = 1
        self.chunks: list[tuple[Tensor, Tensor, Tensor]] = []  # rows [n, k, d], tau [n], local prompt [n]

    def start_batch(self, indices: Sequence[int], images_per_prompt: int) -> None:
        """Prepare for a pipeline call over the prompts ``indices``. Each prompt's token subsample
        has its own generator (seeded by its index), so the rows kept do not depend on batching or
        on how prompts are dealt to processes."""
        self.prompts_in_batch, self.images_per_prompt = len(indices), images_per_prompt
        self.generators = [torch.Generator().manual_seed(self.seed + i) for i in indices]
        self.chunks = []

    def __call__(self, x: Tensor, ctx: CallContext) -> Tensor:
        tau, cond_mask = ctx.tau, ctx.cond_mask
        if tau is None:
            raise RuntimeError(f"{self.path}: no timestep seen for this call (run outside the denoiser?)")
        batch, tokens, _ = x.shape
        rows = torch.arange(batch)
        if self.cond_only:
            if cond_mask is None:
                raise RuntimeError(
                    f"{self.path}: the CFG branch of this call is unknown; pass "
                    "cond_only=False to collect every row"
                )
            rows = rows[cond_mask.cpu()]
        if rows.numel() == 0:
            return x
        per_call = self.prompts_in_batch * self.images_per_prompt
        local = (rows % per_call) // self.images_per_prompt
        dev_rows = rows.to(x.device)
        picked = x.detach().index_select(0, dev_rows)
        if self.tokens_per_step is not None and self.tokens_per_step < tokens:
            draws = [torch.rand(tokens, generator=self.generators[int(p)]) for p in local]
            order = torch.stack(draws).argsort(dim=1)
            idx = order[:, : self.tokens_per_step].to(x.device)
            picked = picked.gather(1, idx.unsqueeze(-1).expand(-1, -1, picked.shape[-1]))
        tau_t = torch.as_tensor(tau, dtype=torch.float32, device=x.device).expand(batch)
        self.chunks.append((picked, tau_t.index_select(0, dev_rows), local))
        return x

    def take(self) -> list[tuple[Tensor, Tensor]]:
        """Rows and per-row τ of each local prompt, in step order; clears the buffer."""
        out = []
        chunks, self.chunks = self.chunks, []
        for p in range(self.prompts_in_batch):
            xs, ts = [], []
            for picked, tau, local in chunks:
                sel = (local == p).nonzero().flatten()
                if sel.numel():
                    sel_dev = sel.to(picked.device)
                    block = picked.index_select(0, sel_dev)
                    xs.append(block.reshape(-1, block.shape[-1]))
                    ts.append(tau.index_select(0, sel_dev).repeat_interleave(block.shape[1]))
            width = chunks[0][0].shape[-1] if chunks else 0
            out.append(
                (
                    torch.cat(xs).cpu() if xs else torch.empty(0, width),
                    torch.cat(ts).cpu() if ts else torch.empty(0),
                )
            )
        return out


def _batch_kwargs(prompts: list[Prompt]) -> dict[str, Any]:
    """Pipeline kwargs for a batch: ``prompt=[...]`` or merged per-prompt kwargs (tensors concatenated)."""
    if all(isinstance(p, str) for p in prompts):
        return {"prompt": list(prompts)}
    if not all(isinstance(p, Mapping) for p in prompts):
        raise TypeError("prompts must be all strings or all mappings of pipeline kwargs")
    keys = set(prompts[0])
    if any(set(p) != keys for p in prompts):
        raise ValueError("every prompt mapping must have the same keys")
    merged: dict[str, Any] = {}
    for key in keys:
        values = [p[key] for p in prompts]
        if isinstance(values[0], Tensor):
            merged[key] = torch.cat(values)
        elif all(v == values[0] for v in values):
            merged[key] = values[0]
        else:
            raise ValueError(f"non-tensor prompt field {key!r} differs within a batch; use batch_size=1")
    return merged


def _store_specs(hookpoints: list[Hookpoint], pipe: Any) -> dict[str, tuple[int, dict[str, Any]]]:
    family = detect_family(pipe)
    name = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    return {
        hp.path: (hp.width, {"hookpoint": hp.path, "model_family": family, "base_model": name})
        for hp in hookpoints
    }


def collect_activations(
    pipe: Any,
    prompts: Sequence[Prompt],
    hookpoints: Sequence[str],
    store: Any,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    cond_only: bool = True,
    tokens_per_step: int | None = None,
    batch_size: int = 1,
    seed: int = 0,
    output_type: str = "latent",
    show_progress: bool = True,
    store_dtype: torch.dtype = torch.float16,
    **pipe_kwargs: Any,
) -> CollectResult:
    """Generate every prompt once and record the hookpoints' tokens at every denoising step.

    ``prompts`` are strings, or mappings of per-prompt pipeline kwargs (e.g. ``prompt_embeds``
    ``[1, L, D]`` for pipelines run without text encoders). ``store``: an ``ActivationStore``
    (one hookpoint), a dict hookpoint → store, a folder (one store per hookpoint in
    ``<folder>/<hookpoint>``, created as needed) or a callable ``sink(hookpoint, rows, tau)``
    called once per prompt batch. ``tokens_per_step`` keeps that many random tokens per image
    per step (seeded). Image i uses a generator seeded ``seed + i``, so results do not depend on
    batching or resumption. ``output_type="latent"`` skips the VAE decode.

    Under ``accelerate launch`` / ``torchrun`` the prompts still to do are dealt round-robin to
    the processes (each with ``pipe`` on its own device); each appends to its own part of each
    store (``<store>/parts/rank-N``) and the main process merges the parts into one manifest at
    the end, or at the start of the next run if this one was interrupted. A multi-process run
    needs a folder ``store`` (or a sink, then called by every process with its own rows); the
    result counts every process's work.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokens_per_step is not None and tokens_per_step < 1:
        raise ValueError(f"tokens_per_step must be >= 1 or None, got {tokens_per_step}")
    resolved = [resolve_hookpoint(pipe, path) for path in hookpoints]
    procs = Processes.current()
    specs = _store_specs(resolved, pipe)
    merged: dict[str, Any] = {}
    if procs.world > 1 and not callable(store):
        merged, stores = open_process_stores(store, specs, store_dtype, procs)
        sink = None
    else:
        targets = open_stores(store, specs, store_dtype)
        sink = targets if callable(targets) else None
        stores = {} if sink is not None else targets  # type: ignore[assignment]
    done_in = merged or stores
    images_per_prompt = int(pipe_kwargs.get("num_images_per_prompt", 1) or 1)

    todo: list[tuple[int, Prompt, str]] = []
    result = CollectResult(rows={hp.path: 0 for hp in resolved})
    for i, prompt in enumerate(prompts):
        key = prompt_key(i, prompt)
        if done_in and all(s.has_key(key) for s in done_in.values()):
            result.skipped += 1
        else:
            todo.append((i, prompt, key))
    todo = procs.share(todo)

    captures = {
        hp.path: _Capture(hp.path, cond_only, tokens_per_step, seed + 7919 * n)
        for n, hp in enumerate(resolved)
    }

    def start(batch: list[tuple[int, Prompt]]) -> None:
        for cap in captures.values():
            cap.start_batch([i for i, _ in batch], images_per_prompt)

    def done(batch: list[tuple[int, Prompt]]) -> None:
        keyed = [(i, p, keys[i]) for i, p in batch]
        _write(keyed, captures, stores, sink, result, done_in)
        result.collected += len(batch)

    keys = {i: key for i, _, key in todo}
    with flushing(stores):
        loop = BatchLoop("collect", show_progress and procs.main, start, done)
        run_prompts(
            pipe,
            [(i, p) for i, p, _ in todo],
            captures,
            loop,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            batch_size=batch_size,
            seed=seed,
            output_type=output_type,
            **pipe_kwargs,
        )
    if procs.world > 1:
        if merged:
            merge_process_stores(merged, stores, procs)
        result = _sum_results(result, procs)
    return result


def _sum_results(result: CollectResult, procs: Processes) -> CollectResult:
    """Every process's counts added up (``skipped`` is the same everywhere: it was counted before
    the prompts were dealt)."""
    parts = procs.gather({"collected": result.collected, "rows": result.rows})
    rows = {path: sum(p["rows"][path] for p in parts) for path in result.rows}
    return CollectResult(sum(p["collected"] for p in parts), result.skipped, rows)


@contextlib.contextmanager
def quiet_pipeline(pipe: Any) -> Iterator[None]:
    """Silence the pipeline's own progress bar for a loop that shows one of its own; restored after."""
    saved = getattr(pipe, "_progress_bar_config", None)
    pipe.set_progress_bar_config(**{**(saved or {}), "disable": True})
    try:
        yield
    finally:
        if saved is None:
            pipe.__dict__.pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = saved


def run_prompts(
    pipe: Any,
    prompts: Sequence[tuple[int, Prompt]],
    editors: Mapping[str, Any],
    loop: BatchLoop,
    *,
    num_inference_steps: int = 50,
    guidance_scale: float | None = None,
    batch_size: int = 1,
    seed: int = 0,
    output_type: str = "latent",
    **pipe_kwargs: Any,
) -> None:
    """Generate ``(index, prompt)`` pairs in batches with ``editors`` hooked in: the loop shared by
    collection and the concept statistics pass (``loop``: its progress bar and per-batch callbacks,
    which receive the batch's ``(index, prompt)`` pairs).

    Image ``r`` of prompt ``i`` uses a generator seeded ``seed + i * images_per_prompt + r``, so
    results do not depend on batching or resumption. The pipeline's own progress bar is silenced
    for the run (one bar over prompts instead).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images_per_prompt = int(pipe_kwargs.get("num_images_per_prompt", 1) or 1)
    prompts = list(prompts)
    batches = (prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size))
    each = contextlib.closing(loop.each(batches, len(prompts), "prompt"))  # an error closes the bar
    with quiet_pipeline(pipe), install_hooks(pipe, editors), each as batches:
        for batch in batches:
            generators = [
                torch.Generator().manual_seed(seed + i * images_per_prompt + r)
                for i, _ in batch
                for r in range(images_per_prompt)
            ]
            kwargs = {
                "num_inference_steps": num_inference_steps,
                "output_type": output_type,
                "generator": generators,
                **_batch_kwargs([p for _, p in batch]),
                **pipe_kwargs,
            }
            if guidance_scale is not None:
                kwargs["guidance_scale"] = guidance_scale
            pipe(**kwargs)


def _write(
    batch: list[tuple[int, Prompt, str]],
    captures: dict[str, _Capture],
    stores: dict[str, Any],
    sink: Sink | None,
    result: CollectResult,
    done_in: dict[str, Any],
) -> None:
    """Append each prompt's rows to its store, or hand them to the sink. A prompt a store (or, in a
    multi-process run, the merged store) already holds is skipped there: after a crash one
    hookpoint's store may have kept a prompt that another lost, and the rerun collects it again."""
    for path, cap in captures.items():
        per_prompt = cap.take()
        if sink is not None:
            rows = torch.cat([x for x, _ in per_prompt])
            if rows.shape[0]:
                sink(path, rows, torch.cat([t for _, t in per_prompt]))
            result.rows[path] += rows.shape[0]
            continue
        target = stores[path]
        for (_, _, key), (rows, tau) in zip(batch, per_prompt):
            if target.has_key(key) or (path in done_in and done_in[path].has_key(key)):
                continue
            target.append(rows, tau=tau, key=key)
            result.rows[path] += rows.shape[0]
