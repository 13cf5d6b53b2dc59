"""Known-answer checks for the SAE metrics."""

from __future__ import annotations

import pytest
import torch

from saeuron_plugin.sae.metrics import dead_fraction, explained_variance, fvu, l0
from saeuron_plugin.sae.model import SaeConfig, SparseAutoencoder, SparseCode


def test_fvu_known_values():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])  # mean 0, Σ‖x‖² = 10
    assert fvu(x, x).item() == 0.0
    assert fvu(x, torch.zeros_like(x)).item() == pytest.approx(1.0)  # predicting the mean
    x_hat = x.clone()
    x_hat[0, 0] = 2.0  # squared error 1
    assert fvu(x, x_hat).item() == pytest.approx(0.1)
    assert explained_variance(x, x_hat).item() == pytest.approx(0.9)


def test_fvu_uses_the_token_mean_and_any_leading_shape():
    x = torch.tensor([[3.0, 5.0], [5.0, 7.0]])  # mean (4, 6); variance sum = 4
    mean = x.mean(0).expand_as(x)
    assert fvu(x, mean).item() == pytest.approx(1.0)
    x3 = torch.randn(2, 3, 4)
    y3 = x3 + 0.1 * torch.randn(2, 3, 4)
    assert fvu(x3, y3).item() == pytest.approx(fvu(x3.reshape(6, 4), y3.reshape(6, 4)).item())


def test_fvu_matches_the_model_forward():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=8, num_latents=32, k=4))
    x = torch.randn(20, 8)
    out = sae(x)
    assert fvu(x, out.reconstruction).item() == pytest.approx(out.fvu.item(), rel=1e-5)
    assert l0(SparseCode(out.latent_values, out.latent_indices)).item() == pytest.approx(out.l0.item())


def test_fvu_half_precision_and_shape_check():
    x = torch.randn(10, 4).half()
    assert fvu(x, x).dtype == torch.float32
    with pytest.raises(ValueError, match="same shape"):
        fvu(torch.zeros(2, 3), torch.zeros(3, 2))


def test_fvu_is_differentiable():
    x = torch.randn(5, 3)
    x_hat = torch.zeros(5, 3, requires_grad=True)
    fvu(x, x_hat).backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0


def test_l0_dense_and_sparse():
    z = torch.tensor([[0.0, 1.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    assert l0(z).item() == pytest.approx(1.5)
    assert l0(z.reshape(1, 2, 4)).item() == pytest.approx(1.5)
    values = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])  # zero values are padding
    indices = torch.tensor([[1, 2, 0], [0, 1, 2]])
    assert l0(SparseCode(values, indices)).item() == pytest.approx(1.5)
    assert l0((values, indices)).item() == pytest.approx(1.5)


def test_dead_fraction():
    counts = torch.tensor([0, 3, 0, 10])
    assert dead_fraction(counts).item() == pytest.approx(0.5)
    assert dead_fraction(counts, threshold=3).item() == pytest.approx(0.75)
    since = torch.tensor([0, 5, 11, 100, 10])
    assert dead_fraction(tokens_since_fired=since, threshold=10).item() == pytest.approx(0.4)
    with pytest.raises(ValueError, match="exactly one"):
        dead_fraction()
    with pytest.raises(ValueError, match="exactly one"):
        dead_fraction(counts, tokens_since_fired=since)
