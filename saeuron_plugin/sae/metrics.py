"""Standard SAE metrics: FVU / explained variance, L0, dead-latent fraction.

Small pure functions over tensors of shape [..., d] (all leading dimensions are tokens). They
return 0-d float tensors so they can be logged, all-reduced or (for FVU) differentiated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["dead_fraction", "explained_variance", "fvu", "l0"]


def fvu(x: Tensor, x_hat: Tensor, *, eps: float = 1e-12) -> Tensor:
    """Fraction of variance unexplained: Σ‖x̂ − x‖² / Σ‖x − mean(x)‖².

    The mean is taken over all tokens (every leading dimension of ``x``), per feature, as in the
    SAeUron and sparsify training loss. 0 is a perfect reconstruction; predicting the mean gives 1.
    Computed in at least float32. ``eps`` guards a constant ``x``.
    """
    if x.shape != x_hat.shape:
        raise ValueError(f"x and x_hat must have the same shape, got {list(x.shape)} and {list(x_hat.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    flat_hat = x_hat.reshape(-1, x.shape[-1]).to(dtype)
    total = (flat - flat.mean(dim=0)).pow(2).sum().clamp_min(eps)
    return (flat_hat - flat).pow(2).sum() / total


def explained_variance(x: Tensor, x_hat: Tensor, *, eps: float = 1e-12) -> Tensor:
    """1 − FVU: the share of the activations' variance the reconstruction explains."""
    return 1.0 - fvu(x, x_hat, eps=eps)


def l0(latents: Tensor | Sequence[Tensor]) -> Tensor:
    """Mean number of non-zero latents per token.

    ``latents`` is either dense [..., n] or a sparse code such as :class:`~.model.SparseCode`
    (``(values, indices)``, each [..., k]); then zero values (padding) are not counted.
    """
    values = latents if isinstance(latents, Tensor) else latents[0]
    if values.dim() == 0:
        raise ValueError("latents must have at least one dimension (the latent axis)")
    return (values != 0).sum(dim=-1).to(torch.float32).mean()


def dead_fraction(
    fire_counts: Tensor | None = None, *, tokens_since_fired: Tensor | None = None, threshold: float = 0
) -> Tensor:
    """Fraction of latents that are dead, from one of two per-latent [n] statistics.

    - ``fire_counts``: how often each latent fired over an evaluation set; dead when
      ``count <= threshold`` (default 0: never fired).
    - ``tokens_since_fired``: the trainer's counter; dead when ``count > threshold`` (pass the
      dead-token window, e.g. 10M tokens, as the trainer does).
    """
    if (fire_counts is None) == (tokens_since_fired is None):
        raise ValueError("pass exactly one of fire_counts or tokens_since_fired")
    if fire_counts is not None:
        dead = fire_counts <= threshold
    else:
        assert tokens_since_fired is not None
        dead = tokens_since_fired > threshold
    if dead.numel() == 0:
        raise ValueError("dead_fraction needs at least one latent")
    return dead.to(torch.float32).mean()
