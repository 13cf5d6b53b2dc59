"""The TopK sparse autoencoder: one compact module, one config dataclass, NamedTuple outputs.

Parameter names and shapes follow EleutherAI sparsify and ``bcywinski/SAeUron``
(``encoder.weight`` [n, d], ``encoder.bias`` [n], ``W_dec`` [n, d], ``b_dec`` [d]) so their
folders load unchanged.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EncoderMode, SaeConfig, SaeConfigError  # noqa: F401  (re-exported: the model's public names)
from .io import load_sae, push_sae_to_hub, save_sae

# The sparse backward uses CSR matmuls, stable for this use but flagged "beta" by torch.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class SparseCode(NamedTuple):
    """Sparse latents: ``values`` and ``indices`` of shape [..., k] (zero values are padding)."""

    values: Tensor
    indices: Tensor


class SaeOutput(NamedTuple):
    """Everything one forward pass measures."""

    reconstruction: Tensor
    """x̂, same shape and dtype as the input."""
    latent_values: Tensor
    """Active latent values [tokens, k'] (k' = k for TopK; BatchTopK pads with zeros)."""
    latent_indices: Tensor
    """Indices of the active latents [tokens, k']."""
    fvu: Tensor
    """Fraction of variance unexplained: Σ‖x̂ − x‖² / Σ‖x − mean(x)‖²."""
    auxk_loss: Tensor
    """AuxK loss (0 when no dead mask is given or nothing is dead)."""
    l0: Tensor
    """Mean number of non-zero latents per token."""
    pre_threshold: Tensor
    """The batch's (k·B)-th largest activation: the per-batch estimate of θ (NaN if not measured)."""


class SparseAutoencoder(nn.Module):
    """TopK SAE: z = TopK(ReLU(W_enc (x − b_dec) + b_enc)), x̂ = z W_dec + b_dec."""

    def __init__(
        self, cfg: SaeConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        n, d = cfg.num_latents, cfg.d_in
        self.encoder = nn.Linear(d, n, device=device, dtype=dtype)
        self.W_dec = nn.Parameter(torch.empty(n, d, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Unit-norm random decoder rows, encoder tied to the decoder transpose, zero biases."""
        w = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32)
        w /= w.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.W_dec.copy_(w)
        self.encoder.weight.copy_(w)
        self.encoder.bias.zero_()
        self.b_dec.zero_()

    # ------------------------------------------------------------ properties
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def num_latents(self) -> int:
        return self.cfg.num_latents

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    def fingerprint(self) -> str:
        """Short content hash of the weights: concept statistics are tied to one SAE."""
        h = hashlib.sha256()
        h.update(f"{self.d_in}:{self.num_latents}".encode())
        for t in (self.encoder.weight, self.encoder.bias, self.W_dec, self.b_dec):
            flat = t.detach().float().cpu().contiguous().view(-1)
            # A strided sample keeps hashing cheap for 50M-parameter SAEs yet catches any retrain.
            step = max(1, flat.numel() // 65536)
            h.update(flat[::step].numpy().tobytes())
        return h.hexdigest()[:16]

    # ---------------------------------------------------------- input checks
    def check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"activation width {x.shape[-1]} does not match the SAE's d_in={self.d_in}"
                + (f" (hookpoint {self.cfg.hookpoint})" if self.cfg.hookpoint else "")
            )

    def _standardise(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        x = x.to(self.dtype)
        if not self.cfg.input_unit_norm:
            return x, None, None
        mean = x.mean(dim=-1, keepdim=True)
        std = (x - mean).std(dim=-1, keepdim=True) + 1e-5
        return (x - mean) / std, mean, std

    # ---------------------------------------------------------------- encode
    def pre_acts(self, x: Tensor) -> Tensor:
        """ReLU(W_enc (x − b_dec) + b_enc) for every latent: [..., n]."""
        self.check_input(x)
        xs, _, _ = self._standardise(x)
        return F.relu(self.encoder(xs - self.b_dec))

    def encode_sparse(self, x: Tensor, k: int | None = None) -> SparseCode:
        """Per-token TopK code (values, indices) [..., k]. In threshold mode values ≤ θ are zeroed."""
        pre = self.pre_acts(x)
        values, indices = pre.topk(k or self.cfg.k, dim=-1, sorted=False)
        if self.cfg.encoder == "threshold":
            values = values * (values > self.cfg.threshold)
        return SparseCode(values, indices)

    def encode(self, x: Tensor) -> Tensor:
        """Dense latents [..., n] with zeros off the active set (per the configured encoder)."""
        return self.activate(self.pre_acts(x))

    def activate(self, pre: Tensor) -> Tensor:
        """The configured encoder applied to pre-activations [..., n]: θ-gated, or TopK per token.

        The one place that turns pre-activations into latents: ``encode``, the statistics pass
        (which shares ``pre`` with θ calibration) and ComfyUI's concept detector all call it.
        """
        if self.cfg.encoder == "threshold":
            return pre * (pre > self.cfg.threshold)
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, values)

    def encode_subset(self, x: Tensor, latents: Tensor) -> Tensor:
        """Activations of the chosen ``latents`` only: [..., len(latents)].

        Threshold mode computes just those rows of W_enc (cost |latents|·d per token, the fast
        path the ablation uses). TopK mode must run the full encode to know which latents won.
        """
        latents = latents.to(device=self.device, dtype=torch.long)
        if self.cfg.encoder == "threshold":
            self.check_input(x)
            xs, _, _ = self._standardise(x)
            pre = F.relu(F.linear(xs - self.b_dec, self.encoder.weight[latents], self.encoder.bias[latents]))
            return pre * (pre > self.cfg.threshold)
        return self.encode(x)[..., latents]

    # ---------------------------------------------------------------- decode
    def decode(self, z: Tensor) -> Tensor:
        """x̂ from dense latents [..., n] (in the standardised space if ``input_unit_norm``)."""
        return z.to(self.dtype) @ self.W_dec + self.b_dec

    def decode_sparse(self, values: Tensor, indices: Tensor, *, bias: bool = True) -> Tensor:
        """x̂ from a sparse code via ``embedding_bag``: k·d work per token instead of n·d."""
        lead = values.shape[:-1]
        out = F.embedding_bag(
            indices.reshape(-1, indices.shape[-1]),
            self.W_dec,
            per_sample_weights=values.reshape(-1, values.shape[-1]).to(self.dtype),
            mode="sum",
        )
        out = out.reshape(*lead, self.d_in)
        return out + self.b_dec if bias else out

    # --------------------------------------------------------------- forward
    def forward(
        self,
        x: Tensor,
        *,
        dead_mask: Tensor | None = None,
        batch_topk: bool = False,
        measure_threshold: bool = True,
    ) -> SaeOutput:
        """Encode, decode and measure a batch of tokens [..., d].

        ``batch_topk`` keeps the k·B largest activations over the whole batch (training mode of
        the reference); otherwise per-token TopK. ``dead_mask`` [n] switches on the AuxK loss:
        the detached residual e = x − x̂ is predicted from the top-k_aux dead latents through
        W_dec alone (no b_dec), scaled by min(n_dead / k_aux, 1). ``measure_threshold=False``
        skips the θ estimate in per-token mode (``pre_threshold`` is then NaN).
        """
        self.check_input(x)
        shape = x.shape
        flat = x.reshape(-1, self.d_in)
        xs, mean, std = self._standardise(flat)
        k_aux, scale = 0, 0.0
        if dead_mask is not None and (n_dead := int(dead_mask.sum())) > 0:
            k_aux_full = self.d_in // 2
            scale, k_aux = min(n_dead / k_aux_full, 1.0), min(k_aux_full, n_dead)
            dead_mask = dead_mask.to(xs.device)
        values, indices, aux_values, aux_indices, kept_min = _SparseEncode.apply(
            xs - self.b_dec,
            self.encoder.weight,
            self.encoder.bias,
            self.cfg.k,
            batch_topk,
            dead_mask,
            k_aux,
            measure_threshold,
            self._scratch(flat.shape[0], xs),
        )
        recon = _Bags.of(values, indices).embed(self.W_dec) + self.b_dec

        total_variance = (xs - xs.mean(0)).pow(2).sum().clamp_min(1e-12)
        fvu = (recon - xs).pow(2).sum() / total_variance
        auxk = recon.new_zeros(())
        if k_aux > 0:
            e = (xs - recon).detach()
            e_hat = _Bags.of(aux_values, aux_indices).embed(self.W_dec)
            auxk = scale * (e_hat - e).pow(2).sum() / total_variance

        if std is not None:
            recon = recon * std + mean
        l0 = (values.detach() > 0).sum(-1).float().mean()
        return SaeOutput(recon.reshape(shape).to(x.dtype), values, indices, fvu, auxk, l0, kept_min)

    def _scratch(self, rows: int, x: Tensor) -> Tensor | None:
        """A reused flat buffer for a training step's [rows, n] pre-activations on CPU, or None.

        A fresh 30 MB tensor per step is fresh pages from the OS each time: about 15 ms of a
        100 ms step at n = 8192, B = 1024. The buffer is only written and read inside one forward
        (nothing saved for backward holds it). Only training steps use it (grad enabled, not
        inference mode); devices with a caching allocator (CUDA) and autocast runs allocate as usual.
        """
        training = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        if not training or x.device.type != "cpu" or x.dtype != self.dtype or _cpu_autocast():
            return None  # evaluation passes (any size, inference tensors) allocate as usual
        need = rows * self.num_latents
        buf = getattr(self, "_pre_buffer", None)
        if buf is None or buf.numel() < need or buf.dtype != x.dtype:
            buf = torch.empty(need, dtype=x.dtype)
            self._pre_buffer = buf
        return buf

    # ------------------------------------------------------------- training
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale W_dec rows to unit norm (kept after every optimiser step)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Drop the gradient component along each (unit) decoder row before the optimiser step."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * self.W_dec)

    # ----------------------------------------------------------------- io
    def save_pretrained(self, path: Any, **kwargs: Any) -> None:
        """Write ``cfg.json`` + ``sae.safetensors`` (see :mod:`saeuron_plugin.sae.io`)."""
        save_sae(self, path, **kwargs)

    @classmethod
    def from_pretrained(
        cls, path_or_repo_id: Any, subfolder: str | None = None, **kwargs: Any
    ) -> SparseAutoencoder:
        """Load from a local folder or a Hugging Face Hub repo (see :mod:`saeuron_plugin.sae.io`)."""
        return load_sae(path_or_repo_id, subfolder=subfolder, sae_class=cls, **kwargs)

    def push_to_hub(self, repo_id: str, subfolder: str | None = None, **kwargs: Any) -> str:
        return push_sae_to_hub(self, repo_id, subfolder=subfolder, **kwargs)


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 has no device argument
        return torch.is_autocast_cpu_enabled()


def _select(pre: Tensor, k: int, batch_topk: bool, need_theta: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token TopK, or BatchTopK as a zero-padded code; plus θ_batch when asked.

    ``pre`` are raw pre-activations: ReLU commutes with selecting the largest entries, so it is
    applied to the selected values only (an [B, n] pass saved); the values come out ≥ 0.
    θ_batch is the (k·B)-th largest ReLU'd activation of the batch (the global threshold at which
    the mean L0 is k), taken over each token's top candidates (:func:`_batch_candidates`).
    """
    if not batch_topk and not need_theta:
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return values.clamp_min(0), indices, pre.new_full((), float("nan"))
    cand_values, cand_indices, theta = _batch_candidates(pre, k)
    if not batch_topk:
        return cand_values[:, :k].clamp_min(0), cand_indices[:, :k], theta
    k_max = max(1, int((cand_values >= theta).sum(-1).max()))
    values, indices = cand_values[:, :k_max].clamp_min(0), cand_indices[:, :k_max]
    return values * (values >= theta), indices, theta


def _batch_candidates(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each token's largest pre-activations (sorted, -inf padded) holding every entry ≥ θ_batch,
    and θ_batch itself (clamped at 0, the ReLU).

    A flat top-(k·B) over all B·n values is slow, so θ is first taken over each token's top-2k
    candidates: a lower bound of θ_batch (a subset's (k·B)-th largest). It is exact unless a token
    has all its candidates at or above it; only those tokens get more candidates (twice as many,
    repeated), after which no entry outside the candidates can reach θ.
    """
    rows, n = pre.shape
    values, indices = pre.topk(min(n, 2 * k), dim=-1, sorted=True)
    while True:
        theta = values.reshape(-1).topk(rows * k, sorted=False).values.min()
        full = values[:, -1] >= theta
        if values.shape[1] >= n or not bool(full.any()):
            return values, indices, theta.clamp_min(0)
        width = min(n, 2 * values.shape[1])
        grow = full.nonzero().squeeze(-1)
        more_values, more_indices = pre.index_select(0, grow).topk(width, dim=-1, sorted=True)
        pad = width - values.shape[1]
        values = F.pad(values, (0, pad), value=-torch.inf).index_copy_(0, grow, more_values)
        indices = F.pad(indices, (0, pad)).index_copy_(0, grow, more_indices)


def _dead_topk(pre: Tensor, dead_mask: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
    """The k_aux largest ReLU'd pre-activations among dead latents, per token ([B, k_aux] each).

    Reads only the dead columns when they are a minority (the usual case late in training).
    """
    dead = dead_mask.nonzero().squeeze(-1)
    if 2 * dead.numel() < pre.shape[-1]:
        values, local = pre.index_select(-1, dead).topk(k_aux, dim=-1, sorted=False)
        return values.clamp_min(0), dead[local]
    values, indices = pre.masked_fill(~dead_mask, -torch.inf).topk(k_aux, dim=-1, sorted=False)
    return values.clamp_min(0), indices


class _Bags(NamedTuple):
    """The non-zero entries of a padded [B, k'] code, token by token (CSR rows).

    BatchTopK pads every token to the widest token's k', often 5× the mean k: dropping the zeros
    keeps the decode and both backward products at k·B entries.
    """

    values: Tensor
    indices: Tensor
    crow: Tensor
    """[B + 1] where each token's entries start (and the last one ends)."""

    @classmethod
    def of(cls, values: Tensor, indices: Tensor) -> _Bags:
        keep = values.detach() != 0
        crow = F.pad(keep.sum(-1).cumsum(0), (1, 0))
        return cls(values[keep], indices[keep], crow)

    def embed(self, weight: Tensor) -> Tensor:
        """Σ_j values_j · weight[indices_j] per token: [B, d]."""
        return F.embedding_bag(
            self.indices,
            weight,
            self.crow,
            per_sample_weights=self.values.to(weight.dtype),
            mode="sum",
            include_last_offset=True,
        )

    def scatter(self, x: Tensor, n: int) -> Tensor:
        """Σ_tokens values_j · x[t] into row indices_j of an [n, d] matrix, via a CSR matmul."""
        rows = self.crow.numel() - 1
        csr = torch.sparse_csr_tensor(
            self.crow, self.indices, self.values.to(x.dtype), (rows, n), check_invariants=False
        )
        return csr.t() @ x


class _SparseEncode(torch.autograd.Function):
    """ReLU encoder + TopK/BatchTopK (+ AuxK dead-latent TopK) with a sparse backward.

    Only the selected k (+ k_aux) activations per token receive gradient, so the encoder's
    backward costs O(B·k·d) instead of the dense O(B·n·d): training does one dense matmul
    per step instead of three.
    """

    @staticmethod
    def forward(
        ctx: Any,
        xc: Tensor,
        weight: Tensor,
        bias: Tensor,
        k: int,
        batch_topk: bool,
        dead_mask: Tensor | None,
        k_aux: int,
        need_theta: bool,
        scratch: Tensor | None,
    ) -> tuple[Tensor, ...]:
        if scratch is None:
            pre = F.linear(xc, weight, bias)  # ReLU is applied after selection (see _select)
        else:
            pre = torch.addmm(
                bias, xc, weight.t(), out=scratch[: xc.shape[0] * weight.shape[0]].view(xc.shape[0], -1)
            )
        values, indices, theta = _select(pre, k, batch_topk, need_theta)
        if k_aux > 0 and dead_mask is not None:
            aux_values, aux_indices = _dead_topk(pre, dead_mask, k_aux)
        else:
            aux_values = pre.new_zeros(pre.shape[0], 0)
            aux_indices = indices.new_zeros(pre.shape[0], 0)
        ctx.save_for_backward(xc, weight, values, indices, aux_values, aux_indices)
        ctx.mark_non_differentiable(indices, aux_indices, theta)
        return values, indices, aux_values, aux_indices, theta

    @staticmethod
    def backward(
        ctx: Any, g_values: Tensor, _gi: Any, g_aux: Tensor, _gai: Any, _gt: Any
    ) -> tuple[Tensor | None, ...]:
        xc, weight, values, indices, aux_values, aux_indices = ctx.saved_tensors
        n = weight.shape[0]
        parts = [_Bags.of(g_values * (values > 0), indices)]  # ReLU, BatchTopK mask: no grad at 0
        if g_aux is not None and aux_indices.shape[1] > 0:
            parts.append(_Bags.of(g_aux * (aux_values > 0), aux_indices))
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = sum(bags.embed(weight) for bags in parts)
        if ctx.needs_input_grad[1]:
            grad_w = sum(bags.scatter(xc, n) for bags in parts)
        if ctx.needs_input_grad[2]:
            grad_b = weight.new_zeros(n)
            for bags in parts:
                grad_b.index_add_(0, bags.indices, bags.values.to(weight.dtype))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None
