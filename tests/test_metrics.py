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


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    from saeuron_plugin.benchmark.kid import kernel_inception_distance, polynomial_mmd2

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 16, generator=g), torch.randn(300, 16, generator=g)
    same, same_sd = kernel_inception_distance(x, y)
    shifted, shifted_sd = kernel_inception_distance(x, y + 0.5)
    assert abs(same) < 2 * same_sd + 1e-3  # unbiased: 0 in expectation, either sign
    assert shifted > 5 * shifted_sd > 0 and shifted > 20 * abs(same)
    # the estimator itself: for one sample each, by hand
    a, b = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    k = lambda u, v: (float(u @ v) / 2 + 1) ** 3  # noqa: E731
    by_hand = k(a[0], a[1]) + k(b[0], b[1]) - sum(k(u, v) for u in a for v in b) / 2
    assert polynomial_mmd2(a, b) == pytest.approx(by_hand)
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(x[:1], y)
    # paired sets (an edit that changes almost nothing): ~0 paired, strongly negative if the pairs count
    near = x + 1e-3 * torch.randn(x.shape, generator=g)
    assert abs(polynomial_mmd2(x, near, paired=True)) < 1e-6 < 0.01 < -polynomial_mmd2(x, near)
    assert polynomial_mmd2(x, y + 0.5, paired=True) > 0.5
    with pytest.raises(ValueError, match="as many rows"):
        polynomial_mmd2(x, y[:10], paired=True)


def test_unlearning_tables_carry_kid_with_its_spread():
    from saeuron_plugin.benchmark.unlearning import Protocol, markdown_table, summarise

    row = {"method": "saeuron", "concept": "star", "domain": "object", "seed": 0}
    rows = [{**row, "ua": 1.0, "ira": 1.0, "cra": 1.0, "clean_forget": 0.5}]
    out = summarise(
        rows,
        {"objects": 100.0},
        Protocol(seeds=(0,)),
        ["saeuron"],
        1.0,
        {("saeuron", "objects"): (2e-3, 5e-4)},
    )
    assert (
        out["methods"]["saeuron"]["objects"]["kid"] == 2.0
        and out["spread"]["saeuron"]["objects"]["kid"] == 0.5
    )
    assert "| 2.00 ± 0.50 |" in markdown_table(out)
    # every method's tuning budget and the baselines' tuned settings are part of the report (#22)
    out["tuning"] = {
        "saeuron": {"concepts": 1, "trials": 73, "images": 1896, "seconds": None},
        "uce": {"concepts": 1, "trials": 13, "images": 456, "seconds": 60},
    }
    out["tuned_settings"] = {"uce": {"star": {"erase_scale": 3.0, "retain": "all"}}}
    table = markdown_table(out)
    assert "| saeuron | 1 | 73 | 1896 | – |" in table and "| uce | 1 | 13 | 456 | 60 |" in table
    assert '- star: `{"erase_scale": 3.0, "retain": "all"}`' in table
    out["kid_per_concept"] = {"saeuron": {"star": 2.0}}  # per concept, x 10^3, in the per-concept rows
    assert "| saeuron | star | 100.0 | 100.0 | 100.0 | 50.0 | 2.00 |" in markdown_table(out)
