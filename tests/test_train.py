"""Trainer: planted-dictionary recovery, AuxK revival, bit-exact resume, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from saeuron_plugin.sae.model import SaeConfig, SparseAutoencoder
from saeuron_plugin.sae.train import (
    TrainConfig,
    Trainer,
    TrainingDataError,
    _rebatch,
    geometric_median,
    train_config,
    train_sae,
)


def planted_data(d: int, atoms: int, k_true: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse codes (k_true non-zeros) × a random unit-norm dictionary + small noise."""
    g = torch.Generator().manual_seed(seed)
    dictionary = F.normalize(torch.randn(atoms, d, generator=g), dim=1)
    idx = torch.rand(n, atoms, generator=g).argsort(dim=1)[:, :k_true]
    vals = torch.rand(n, k_true, generator=g) * 2 + 0.5
    codes = torch.zeros(n, atoms).scatter_(1, idx, vals)
    return codes @ dictionary + 0.01 * torch.randn(n, d, generator=g), dictionary


def test_planted_dictionary_is_recovered():
    x, dictionary = planted_data(d=48, atoms=192, k_true=4, n=49_152, seed=1)
    sae = train_sae(
        list(x.split(4096)),
        k=8,
        num_latents=384,
        batch_size=256,
        steps=3000,
        lr=2e-3,
        dead_tokens_threshold=20_000,
        progress=False,
    )
    x_test, _ = planted_data(d=48, atoms=192, k_true=4, n=4096, seed=1)  # same dictionary
    out = sae(x_test)
    assert out.fvu.item() < 0.15
    cos = F.normalize(sae.W_dec.detach(), dim=1) @ dictionary.T
    recovered = (cos.max(dim=0).values > 0.9).float().mean().item()
    assert recovered > 0.8
    # the decoder stays unit-norm and θ was calibrated
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(384), atol=1e-5)
    assert sae.cfg.threshold is not None and sae.cfg.threshold > 0
    # θ makes the threshold encoder's mean L0 close to k on the training distribution
    thr = SparseAutoencoder(sae.cfg.replace(encoder="threshold"))
    thr.load_state_dict(sae.state_dict())
    l0 = (thr.encode(x_test) > 0).sum(-1).float().mean().item()
    assert 4 <= l0 <= 16


def _half_dead_sae(d: int, n: int, k: int) -> SparseAutoencoder:
    sae = SparseAutoencoder(SaeConfig(d_in=d, num_latents=n, k=k))
    sae.reset_parameters(torch.Generator().manual_seed(3))
    with torch.no_grad():  # three quarters of the latents can never win the TopK
        sae.encoder.weight[n // 4 :] *= 0.02
    return sae


def test_auxk_revives_dead_latents():
    x, _ = planted_data(d=32, atoms=128, k_true=4, n=32_768, seed=2)
    dead = {}
    for alpha in (1 / 32, 0.0):
        cfg = train_config(
            batch_size=256, steps=1500, auxk_alpha=alpha, dead_tokens_threshold=2048, progress=False
        )
        _, state = Trainer(list(x.split(4096)), cfg, init=_half_dead_sae(32, 256, 4)).fit()
        dead[alpha] = state.dead_fraction
    assert dead[0.0] >= 0.74, f"AuxK off: dead fraction {dead[0.0]:.2f} should stay at 0.75"
    assert dead[1 / 32] <= dead[0.0] - 0.1, f"AuxK on revived too little: {dead}"


def test_resume_is_bit_exact(tmp_path):
    x, _ = planted_data(d=16, atoms=64, k_true=2, n=8192, seed=4)
    chunks = list(x.split(1000))
    common = dict(
        k=4,
        num_latents=64,
        batch_size=128,
        steps=60,
        shuffle_buffer=512,
        progress=False,
        seed=7,
        dead_tokens_threshold=500,
    )
    full = train_sae(chunks, **common)

    def interrupted():  # the process "dies" while reading the 7th chunk (after ~42 steps)
        for i, chunk in enumerate(chunks):
            if i == 6:
                raise KeyboardInterrupt
            yield chunk

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        train_sae(interrupted, **common, checkpoint_dir=str(ckpt), checkpoint_every=25)
    assert (ckpt / "trainer_state.json").exists()
    resumed, state = Trainer(
        chunks, train_config(**common, checkpoint_dir=str(ckpt), checkpoint_every=25, resume=True)
    ).fit()
    assert state.resumed_from == 25
    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert full.cfg.threshold == resumed.cfg.threshold


def test_geometric_median_resists_outliers():
    pts = torch.cat([torch.randn(200, 3) * 0.1, torch.full((20, 3), 100.0)])
    med = geometric_median(pts)
    assert med.norm() < 1.0 < pts.mean(0).norm()


def test_rebatch_keeps_every_row_once():
    rows = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 2)
    out = torch.cat(list(_rebatch(rows.split(37), 50, 200, torch.Generator().manual_seed(0))))
    assert out.shape[0] == 1000
    assert torch.equal(out[:, 0].sort().values, rows[:, 0])
    assert not torch.equal(out[:, 0], rows[:, 0])


def test_default_lr_rule():
    assert math.isclose(TrainConfig().resolved_lr(2**14), 2e-4)
    assert math.isclose(TrainConfig().resolved_lr(4 * 2**14), 1e-4)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ([], "no activations"),
        ([torch.full((64, 8), float("nan"))], "NaN or inf"),
        ([torch.randn(64, 8), torch.randn(64, 9)], "8 then 9"),
    ],
)
def test_bad_data_gives_clear_error(data, match):
    with pytest.raises(TrainingDataError, match=match):
        train_sae(data, k=2, num_latents=16, batch_size=64, progress=False)


def test_one_shot_iterator_needs_steps():
    with pytest.raises(TrainingDataError, match="steps="):
        train_sae(iter([torch.randn(64, 8)]), k=2, num_latents=16, batch_size=64, progress=False)


def test_unknown_option_is_rejected():
    with pytest.raises(TypeError, match="unknown training options"):
        train_sae([torch.randn(64, 8)], kk=3)
