"""Train a TopK / BatchTopK SAE over any stream of activation batches.

Model-agnostic (SAELens-style): the trainer sees an iterable of [N, d] tensors or an
:class:`~saeuron_plugin.sae.store.ActivationStore`. It runs single-process, or multi-process
under ``accelerate launch`` (DDP: gradients all-reduced, dead-latent counters and θ synchronised).

Recipe (REFERENCE §1-2): geometric-median ``b_dec`` init, ``W_enc = W_decᵀ`` init, unit-norm
decoder rows with the parallel gradient component removed, FVU + α·AuxK, Adam with
lr = 2e-4/√(n/2¹⁴) and linear decay, gradient clipping, dead latents = no firing for
``dead_tokens_threshold`` tokens, and θ for the threshold encoder calibrated as an EMA of the
batch's (k·B)-th largest activation (so the mean L0 at inference matches k).

Checkpoints are safetensors + JSON only; ``resume=True`` continues bit-for-bit like an
uninterrupted run with the same seed (the data stream is replayed deterministically).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import BadFileError, SAeUronError, TrainingDivergedError
from .config import EncoderMode, SaeConfig
from .files import read_json_object, read_safetensors
from .model import SparseAutoencoder

DataSource = Iterable[Tensor] | Callable[[], Iterable[Tensor]] | Any


@dataclass
class TrainConfig:
    """Hyper-parameters of one SAE training run."""

    k: int = 32
    """Active latents per token."""
    expansion_factor: int = 16
    """n = d_in × expansion_factor unless ``num_latents`` is set."""
    num_latents: int = 0
    """Dictionary size n (0: use ``expansion_factor``)."""
    batch_size: int = 4096
    """Tokens per optimiser step and process."""
    steps: int | None = None
    """Optimiser steps. None: ``epochs`` passes over a finite source."""
    epochs: int = 1
    """Passes over the data when ``steps`` is None (needs a re-iterable source)."""
    lr: float | None = None
    """Adam learning rate; None = 2e-4 / sqrt(n / 2**14)."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps before the linear decay to zero."""
    lr_decay: bool = True
    """Decay the learning rate linearly to 0 over the run."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss (0 disables it)."""
    dead_tokens_threshold: int = 10_000_000
    """A latent is dead after this many tokens without firing."""
    batch_topk: bool = True
    """Train with BatchTopK (k·B activations kept per batch) as SAeUron; False: per-token TopK."""
    encoder: EncoderMode = "topk"
    """Encoder mode recorded in the saved config (θ is calibrated either way)."""
    threshold_momentum: float = 0.99
    """EMA momentum of the θ estimate."""
    grad_clip: float | None = 1.0
    """Max gradient norm (None: no clipping)."""
    shuffle_buffer: int = 0
    """Rows held in a shuffle buffer for generic iterables (0: no shuffling)."""
    seed: int = 0
    """Seeds initialisation, shuffling and the data order."""
    input_unit_norm: bool = False
    """Standardise each token before encoding."""
    checkpoint_dir: str | None = None
    """Where training state is written (safetensors + JSON)."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many steps (0: only at the end)."""
    resume: bool = False
    """Continue from ``checkpoint_dir`` if it holds a checkpoint."""
    device: str | None = None
    """Device for single-process runs (accelerate picks it when launched)."""
    mixed_precision: str = "no"
    """accelerate mixed precision: "no" or "bf16" (about 2× GPU throughput)."""
    progress: bool = True
    """Show a tqdm bar with FVU, L0 and dead %."""
    hookpoint: str | None = None
    model_family: str | None = None
    base_model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved_lr(self, num_latents: int) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(num_latents / 2**14)


class TrainingDataError(SAeUronError, ValueError):
    """The activation stream cannot be trained on (empty, wrong width, NaN/inf)."""


@dataclass
class TrainState:
    """Counters that, with the weights and optimiser, define where a run stands."""

    step: int = 0
    tokens: int = 0
    threshold: float | None = None
    last_fvu: float = float("nan")
    last_l0: float = float("nan")
    dead_fraction: float = 0.0
    resumed_from: int = 0
    """Step the run was resumed from (0: started fresh)."""


# --------------------------------------------------------------------------- data
def _rebatch(
    chunks: Iterable[Tensor], batch_size: int, buffer_rows: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """Cut a stream of [N, d] chunks into [batch_size, d] batches, shuffled within a buffer.

    With ``buffer_rows`` > 0 the buffer is filled to that many rows, permuted, and emptied down
    to below ``max(batch_size, buffer_rows)``; the seeded generator makes the order repeatable.
    """
    want = max(batch_size, buffer_rows)
    buf: Tensor | None = None
    for chunk in chunks:
        if isinstance(chunk, tuple | list):
            chunk = chunk[0]
        chunk = chunk.reshape(-1, chunk.shape[-1])
        if buf is not None and chunk.shape[-1] != buf.shape[-1]:
            raise TrainingDataError(
                f"activation chunks disagree in width: {buf.shape[-1]} then {chunk.shape[-1]}"
            )
        buf = chunk if buf is None else torch.cat([buf, chunk])
        if buf.shape[0] < want:
            continue
        if buffer_rows > 0:
            buf = buf[torch.randperm(buf.shape[0], generator=generator)]
        while buf.shape[0] >= want:
            yield buf[:batch_size]
            buf = buf[batch_size:]
    if buf is not None and buffer_rows > 0:
        buf = buf[torch.randperm(buf.shape[0], generator=generator)]
    while buf is not None and buf.shape[0] >= batch_size:
        yield buf[:batch_size]
        buf = buf[batch_size:]


def _is_store(data: Any) -> bool:
    return hasattr(data, "iter_batches") and hasattr(data, "d_in")


def _epoch_batches(data: DataSource, cfg: TrainConfig, epoch: int) -> Iterator[Tensor]:
    """Batches of one pass over the source, identical on every call with the same epoch."""
    if _is_store(data):
        yield from data.iter_batches(cfg.batch_size, shuffle=True, seed=cfg.seed + epoch, drop_last=True)
        return
    source = data() if callable(data) else data
    if epoch > 0 and iter(source) is source:
        raise TrainingDataError(
            "epochs > 1 needs a re-iterable source (a list, an ActivationStore or a callable "
            "returning a fresh iterator); got a one-shot iterator"
        )
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    yield from _rebatch(source, cfg.batch_size, cfg.shuffle_buffer, gen)


def _batches(data: DataSource, cfg: TrainConfig) -> Iterator[Tensor]:
    """All training batches in order: epochs back to back, or endless when ``steps`` is set."""
    epoch = 0
    while True:
        produced = False
        for batch in _epoch_batches(data, cfg, epoch):
            produced = True
            yield batch
        epoch += 1
        if not produced:
            if epoch == 1:
                raise TrainingDataError(
                    f"no activations to train on: the data source yielded no full batch of "
                    f"{cfg.batch_size} rows (is the store empty or batch_size too large?)"
                )
            return
        if cfg.steps is None and epoch >= cfg.epochs:
            return


def _check_batch(x: Tensor, d_in: int, index: int) -> None:
    if x.shape[-1] != d_in:
        raise TrainingDataError(f"batch {index} has width {x.shape[-1]} but the SAE's d_in is {d_in}")
    if not torch.isfinite(x).all():
        raise TrainingDataError(f"batch {index} contains NaN or inf activations")


def _count_steps(data: DataSource, cfg: TrainConfig) -> int:
    if cfg.steps is not None:
        return cfg.steps
    if _is_store(data):
        return (len(data) // cfg.batch_size) * cfg.epochs
    if not callable(data) and iter(data) is data:
        raise TrainingDataError(
            "pass `steps=` when training from a one-shot iterator (the learning-rate schedule "
            "needs the run length), or pass a list / callable / ActivationStore"
        )
    return sum(1 for _ in _batches(data, cfg))


# --------------------------------------------------------------------------- init
@torch.no_grad()
def geometric_median(points: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances."""
    points = points.float()
    guess = points.mean(0)
    for _ in range(iters):
        dist = (points - guess).norm(dim=1).clamp_min(1e-8)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - guess).norm() < tol * (1 + guess.norm()):
            return new
        guess = new
    return guess


def _lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    if not cfg.lr_decay:
        return 1.0
    span = max(1, total - cfg.lr_warmup_steps)
    return max(0.0, 1.0 - (step - cfg.lr_warmup_steps) / span)


# --------------------------------------------------------------------- checkpoints
_THETA_EVERY = 8
"""Per-token TopK runs measure θ every this many steps (BatchTopK gets it for free)."""
_CKPT_TENSORS = "trainer.safetensors"
_CKPT_STATE = "trainer_state.json"


def _save_checkpoint(
    folder: Path,
    sae: SparseAutoencoder,
    opt: torch.optim.Optimizer,
    since_fired: Tensor,
    state: TrainState,
    cfg: TrainConfig,
) -> None:
    """Atomically replace ``folder`` with the current training state (no pickles)."""
    tensors = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    params = list(sae.parameters())
    for i, p in enumerate(params):
        for key, value in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["since_fired"] = since_fired.cpu().contiguous()
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / _CKPT_TENSORS))
    meta = {
        "state": asdict(state),
        "sae_config": sae.cfg.to_dict(),
        "train_config": {k: v for k, v in asdict(cfg).items() if k != "extra"},
    }
    (tmp / _CKPT_STATE).write_text(json.dumps(meta, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(
    folder: Path, sae: SparseAutoencoder, opt: torch.optim.Optimizer, since_fired: Tensor
) -> TrainState:
    hint = "; delete the checkpoint folder or start without resume"
    state_path, tensors_path = folder / _CKPT_STATE, folder / _CKPT_TENSORS
    try:
        meta = read_json_object(state_path, "training checkpoint state")
        tensors = read_safetensors(tensors_path, "training checkpoint").tensors
    except BadFileError as err:
        raise BadFileError(err.path, err.problem + hint, err.field) from err
    saved_cfg, saved_state = meta.get("sae_config"), meta.get("state")
    if not isinstance(saved_cfg, dict) or not isinstance(saved_state, dict):
        raise BadFileError(state_path, "must hold 'sae_config' and 'state' objects" + hint)
    dims = (saved_cfg.get("d_in"), saved_cfg.get("num_latents"))
    if dims != (sae.d_in, sae.num_latents):
        raise ValueError(
            f"checkpoint at {folder} is for an SAE of d_in={dims[0]}, n={dims[1]}; "
            f"this run builds d_in={sae.d_in}, n={sae.num_latents}"
        )
    try:
        state = TrainState(**saved_state)
        sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        params = list(sae.parameters())
        opt_state = opt.state_dict()
        opt_state["state"] = {}
        for name, value in tensors.items():
            if name.startswith("opt."):
                _, idx, key = name.split(".", 2)
                opt_state["state"].setdefault(int(idx), {})[key] = value.to(params[int(idx)].device)
        opt.load_state_dict(opt_state)
        since_fired.copy_(tensors["since_fired"].to(since_fired.device))
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as err:
        problem = f"does not fit this run ({type(err).__name__}: {err})"
        raise BadFileError(tensors_path, problem + hint) from err
    return state


# --------------------------------------------------------------------------- train
def _diverged(step: int, what: str, ckpt: Path | None) -> TrainingDivergedError:
    saved = ckpt is not None and (ckpt / _CKPT_STATE).exists()
    kept = f"the last finite checkpoint in {ckpt} is kept" if saved else "nothing was saved"
    return TrainingDivergedError(
        f"SAE training diverged at step {step}: {what}; {kept}. Lower the learning rate (--lr), "
        "check the activations' scale (input_unit_norm=True standardises each token), or keep grad_clip on"
    )


def _check_weights(sae: SparseAutoencoder, step: int, ckpt: Path | None) -> None:
    """Raise before anything non-finite can be checkpointed or returned."""
    for name, p in sae.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise _diverged(step, f"parameter {name} holds NaN/inf", ckpt)


def _adam(params: list[Tensor], lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel where torch has one for the device (one pass over the
    parameters instead of a dozen: 8× faster on CPU at 8M parameters), else the foreach one."""
    try:
        return torch.optim.Adam(params, lr=lr, eps=6.25e-10, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(params, lr=lr, eps=6.25e-10, foreach=True)


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class TrainResult(NamedTuple):
    """What :meth:`Trainer.fit` returns."""

    sae: SparseAutoencoder
    """The trained SAE (on CPU when multi-process, else on its device); θ and a training summary
    are in its config (``cfg.threshold``, ``cfg.extra["training"]``)."""
    state: TrainState
    """Where the run ended: steps, tokens, last FVU / L0, dead fraction, the step it resumed from."""


class Trainer:
    """One SAE training run as a loop of small methods over a stream of [N, d] batches.

    ``Trainer(data, cfg).fit()`` returns a :class:`TrainResult`; :func:`train_sae` is the one-call
    form returning the SAE. ``data``: an :class:`ActivationStore`, a list/iterable of [N, d]
    tensors, or a callable returning a fresh iterable (needed for several epochs or for ``resume``
    replays). ``init``: start from these weights (fine-tune a released SAE on your data) instead
    of a fresh initialisation; its d_in/n/k win over the config's.
    """

    def __init__(
        self,
        data: DataSource,
        cfg: TrainConfig | None = None,
        *,
        d_in: int | None = None,
        init: SparseAutoencoder | None = None,
    ) -> None:
        from accelerate import Accelerator

        self.data, self.cfg, self.init = data, cfg or TrainConfig(), init
        on_cpu = self.cfg.device == "cpu" or not torch.cuda.is_available()
        self.accelerator = Accelerator(mixed_precision=self.cfg.mixed_precision, cpu=on_cpu)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.device = (
            self.accelerator.device
            if (_distributed() or self.cfg.device is None)
            else torch.device(self.cfg.device)
        )
        self.total_steps = _count_steps(data, self.cfg)
        if self.total_steps <= 0:
            raise TrainingDataError("no activations to train on: zero training steps")
        self.stream = enumerate(_batches(data, self.cfg))
        try:
            self.first_index, self.first = next(self.stream)
        except StopIteration as exc:  # pragma: no cover - _batches raises first
            raise TrainingDataError("no activations to train on") from exc
        self.d_in = d_in or self.first.shape[-1]
        _check_batch(self.first, self.d_in, 0)
        self.ckpt = Path(self.cfg.checkpoint_dir) if self.cfg.checkpoint_dir else None
        self.state = TrainState()

    # ----------------------------------------------------------------- setup
    def _build_sae(self) -> SparseAutoencoder:
        cfg = self.cfg
        if self.init is not None:
            sae = SparseAutoencoder(self.init.cfg.replace(encoder="topk"))
            sae.load_state_dict({k: v.float() for k, v in self.init.state_dict().items()})
            if sae.d_in != self.d_in:
                raise TrainingDataError(f"init SAE has d_in={sae.d_in} but the data has width {self.d_in}")
            return sae
        sae = SparseAutoencoder(
            SaeConfig(
                d_in=self.d_in,
                num_latents=cfg.num_latents,
                expansion_factor=cfg.expansion_factor,
                k=cfg.k,
                input_unit_norm=cfg.input_unit_norm,
                hookpoint=cfg.hookpoint,
                model_family=cfg.model_family,
                base_model=cfg.base_model,
                extra=dict(cfg.extra),
            )
        )
        sae.reset_parameters(torch.Generator().manual_seed(cfg.seed))
        with torch.no_grad():
            xs, _, _ = sae._standardise(self.first.float())
            sae.b_dec.copy_(geometric_median(xs))
        return sae

    def _setup(self) -> None:
        sae = self._build_sae().to(self.device)
        self.lr = self.cfg.resolved_lr(sae.num_latents)
        opt = _adam(list(sae.parameters()), self.lr)
        self.since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=self.device)
        if self.cfg.resume and self.ckpt is not None and (self.ckpt / _CKPT_STATE).exists():
            self.state = _load_checkpoint(self.ckpt, sae, opt, self.since_fired)
            self.state.resumed_from = self.state.step
        self.model, self.opt = self.accelerator.prepare(sae, opt)
        self.sae: SparseAutoencoder = self.accelerator.unwrap_model(self.model)

    def _my_batches(self) -> Iterator[Tensor]:
        """This process's batches from where the run stands: global batch i belongs to process
        i % world, and a resumed run skips what it already consumed."""
        skip = self.state.step * self.world
        for index, batch in itertools.chain([(self.first_index, self.first)], self.stream):
            if self.state.step >= self.total_steps:
                return
            if index < skip or index % self.world != self.rank:
                continue
            _check_batch(batch, self.d_in, index)
            yield batch

    # ------------------------------------------------------------------ loop
    def fit(self) -> TrainResult:
        """Train to ``total_steps``; checkpoints as configured; raises on divergence or short data."""
        from tqdm.auto import tqdm

        self._setup()
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            unit="step",
            disable=not self.cfg.progress or self.rank != 0,
            desc=f"train SAE {self.cfg.hookpoint or ''}".strip(),
        )
        for batch in self._my_batches():
            out, loss, x = self._step(batch)
            self._track(out, loss, x)
            bar.update(1)
            bar.set_postfix(
                fvu=f"{self.state.last_fvu:.3f}",
                l0=f"{self.state.last_l0:.1f}",
                dead=f"{100 * self.state.dead_fraction:.1f}%",
                refresh=False,
            )
            if self.cfg.checkpoint_every and self.state.step % self.cfg.checkpoint_every == 0:
                self._checkpoint()
        bar.close()
        if self.state.step < self.total_steps:
            raise TrainingDataError(
                f"the data ran out after {self.state.step} of {self.total_steps} steps; lower `steps` or "
                "pass a re-iterable source"
            )
        self._checkpoint()
        return TrainResult(self._finish(), self.state)

    def _step(self, batch: Tensor) -> tuple[Any, Tensor, Tensor]:
        """One optimiser step: forward (FVU + AuxK), backward, parallel-gradient removal, clipping,
        Adam, decoder renormalisation."""
        cfg, core = self.cfg, self.sae
        x = batch.to(device=self.device, dtype=torch.float32, non_blocking=True)
        for group in self.opt.param_groups:
            group["lr"] = self.lr * _lr_factor(self.state.step, self.total_steps, cfg)
        dead = self.since_fired > cfg.dead_tokens_threshold
        with self.accelerator.autocast():
            measure = (
                cfg.batch_topk
                or self.state.step % _THETA_EVERY == 0
                or self.state.step + 1 == self.total_steps
            )
            out = self.model(
                x,
                dead_mask=dead if cfg.auxk_alpha > 0 else None,
                batch_topk=cfg.batch_topk,
                measure_threshold=measure,
            )
            loss = out.fvu + cfg.auxk_alpha * out.auxk_loss
        self.accelerator.backward(loss)
        core.remove_parallel_grad()
        if cfg.grad_clip:
            self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        core.normalize_decoder()
        return out, loss, x

    @torch.no_grad()
    def _track(self, out: Any, loss: Tensor, x: Tensor) -> None:
        """Dead-latent counters, the θ estimate and the run's counters (synchronised across processes)."""
        cfg, state, world = self.cfg, self.state, self.world
        fired = torch.zeros(self.sae.num_latents, device=self.device)
        fired.index_fill_(0, out.latent_indices[out.latent_values > 0].flatten(), 1.0)
        theta = out.pre_threshold.detach().float().reshape(1)
        if world > 1:
            fired = self.accelerator.reduce(fired, reduction="sum")
            theta = self.accelerator.reduce(theta, reduction="mean")
        self.since_fired += x.shape[0] * world
        self.since_fired[fired > 0] = 0
        theta_value = float(theta)
        if not math.isnan(theta_value):
            m = cfg.threshold_momentum if cfg.batch_topk else cfg.threshold_momentum**_THETA_EVERY
            previous = state.threshold
            state.threshold = theta_value if previous is None else m * previous + (1 - m) * theta_value
        state.step += 1
        state.tokens += x.shape[0] * world
        state.last_fvu, state.last_l0 = float(out.fvu.detach()), float(out.l0)
        if not math.isfinite(float(loss.detach())):  # the fvu read above already synchronised
            raise _diverged(state.step - 1, f"the loss is {float(loss.detach())}", self.ckpt)
        state.dead_fraction = float((self.since_fired > cfg.dead_tokens_threshold).float().mean())

    def _checkpoint(self) -> None:
        """Write the training state (rank 0), never a non-finite one."""
        _check_weights(self.sae, self.state.step - 1, self.ckpt)
        if self.ckpt is not None and self.rank == 0:
            _save_checkpoint(self.ckpt, self.sae, self.opt, self.since_fired, self.state, self.cfg)
        self.accelerator.wait_for_everyone()

    def _finish(self) -> SparseAutoencoder:
        """θ, the encoder mode and a training summary go into the SAE's config."""
        cfg, state = self.cfg, self.state
        core = self.sae
        core.cfg = core.cfg.replace(
            threshold=state.threshold,
            encoder=cfg.encoder,
            extra={
                **core.cfg.extra,
                "training": {
                    "steps": state.step,
                    "tokens": state.tokens,
                    "batch_size": cfg.batch_size,
                    "processes": self.world,
                    "lr": self.lr,
                    "batch_topk": cfg.batch_topk,
                    "seed": cfg.seed,
                    "auxk_alpha": cfg.auxk_alpha,
                    "final_fvu": state.last_fvu,
                    "dead_fraction": state.dead_fraction,
                },
            },
        )
        return core


def train_config(cfg: TrainConfig | None = None, **overrides: Any) -> TrainConfig:
    """``cfg`` (default: :class:`TrainConfig`) with keyword overrides; unknown names are refused."""
    cfg = cfg or TrainConfig()
    if overrides:
        unknown = set(overrides) - set(TrainConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown training options: {sorted(unknown)}")
        cfg = TrainConfig(**{**asdict(cfg), **overrides})
    return cfg


def train_sae(
    data: DataSource,
    cfg: TrainConfig | None = None,
    *,
    d_in: int | None = None,
    init: SparseAutoencoder | None = None,
    **overrides: Any,
) -> SparseAutoencoder:
    """Train an SAE on ``data`` and return it: ``Trainer(data, cfg, ...).fit().sae``.

    Keyword overrides set fields of :class:`TrainConfig`, e.g. ``train_sae(store, k=32, steps=1000)``.
    Use :class:`Trainer` directly for the run's :class:`TrainState` as well.
    """
    return Trainer(data, train_config(cfg, **overrides), d_in=d_in, init=init).fit().sae
