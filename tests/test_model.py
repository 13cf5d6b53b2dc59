"""SparseAutoencoder: encoders, decoders, the sparse backward, config validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from saeuron_plugin.sae.model import SaeConfig, SaeConfigError, SparseAutoencoder


def make_sae(d: int = 16, n: int = 64, k: int = 4, **cfg) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=d, num_latents=n, k=k, **cfg))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.encoder.bias.normal_(0, 0.1)
    return sae


def manual_pre(sae: SparseAutoencoder, x: torch.Tensor) -> torch.Tensor:
    return torch.relu((x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)


def test_topk_encode_matches_manual():
    sae = make_sae()
    x = torch.randn(3, 5, 16)
    pre = manual_pre(sae, x)
    vals, idx = pre.topk(4, dim=-1)
    expected = torch.zeros_like(pre).scatter_(-1, idx, vals)
    assert torch.allclose(sae.encode(x), expected, atol=1e-6)
    code = sae.encode_sparse(x)
    assert code.values.shape == (3, 5, 4)
    assert torch.allclose(sae.decode_sparse(*code), sae.decode(expected), atol=1e-5)


def test_threshold_encode_and_subset_fast_path():
    sae = make_sae(encoder="threshold", threshold=0.3)
    x = torch.randn(20, 16)
    pre = manual_pre(sae, x)
    dense = sae.encode(x)
    assert torch.allclose(dense, pre * (pre > 0.3), atol=1e-6)
    chosen = torch.tensor([5, 2, 40])
    assert torch.allclose(sae.encode_subset(x, chosen), dense[:, chosen], atol=1e-6)


def test_topk_subset_needs_full_encode():
    sae = make_sae()
    x = torch.randn(20, 16)
    chosen = torch.tensor([1, 7])
    assert torch.equal(sae.encode_subset(x, chosen), sae.encode(x)[:, chosen])


@pytest.mark.parametrize("batch_topk", [False, True])
def test_sparse_backward_equals_dense_autograd(batch_topk):
    sae = make_sae()
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, dead_mask=dead, batch_topk=batch_topk)
    (out.fvu + out.auxk_loss).backward()
    fused = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    # Reference: the same selections, gradients through plain dense ops.
    pre = manual_pre(sae, x)
    keep = out.latent_values > 0
    z = torch.zeros_like(pre).scatter(1, out.latent_indices, pre.gather(1, out.latent_indices) * keep)
    rec = z @ sae.W_dec + sae.b_dec
    total = (x - x.mean(0)).pow(2).sum()
    fvu = (rec - x).pow(2).sum() / total
    _, aux_idx = pre.masked_fill(~dead, -1.0).topk(8, sorted=False)  # k_aux = d/2 = 8
    z_aux = torch.zeros_like(pre).scatter(1, aux_idx, pre.gather(1, aux_idx))
    aux = ((z_aux @ sae.W_dec) - (x - rec).detach()).pow(2).sum() / total  # no b_dec, scale 1
    assert torch.allclose(out.fvu, fvu, atol=1e-6) and torch.allclose(out.auxk_loss, aux, atol=1e-5)
    (fvu + aux).backward()
    for name, p in sae.named_parameters():
        assert torch.allclose(p.grad, fused[name], atol=1e-5), name


def test_batch_topk_keeps_k_per_token_on_average():
    sae = make_sae(n=128, k=8)
    out = sae(torch.randn(64, 16), batch_topk=True)
    active = (out.latent_values > 0).sum().item()
    assert 8 * 64 <= active <= 8 * 64 + 4  # ties aside, exactly k·B
    assert out.l0.item() == pytest.approx(active / 64)


@pytest.mark.parametrize("heavy", [1.0, 5.0, 100.0])
def test_batch_topk_is_exact_when_some_tokens_take_many_latents(heavy):
    """BatchTopK keeps exactly the batch's k·B largest ReLU'd activations, however they spread:
    a few tokens scaled ×100 take far more than the 2k candidates first looked at."""
    sae = make_sae(n=256, k=4)
    x = torch.randn(32, 16)
    x[:3] *= heavy
    out = sae(x, batch_topk=True)
    pre = manual_pre(sae, x)
    theta = pre.flatten().topk(4 * 32).values.min()
    assert out.pre_threshold.item() == pytest.approx(theta.item())
    code = torch.zeros_like(pre).scatter(1, out.latent_indices, out.latent_values)
    expected = pre * (pre >= theta)
    assert torch.allclose(code, expected, atol=1e-6)
    assert (code > 0).sum(-1).max() > (8 if heavy == 100.0 else 0)


def test_training_forward_reuses_one_cpu_buffer():
    sae = make_sae(n=128, k=8)
    x = torch.randn(40, 16)
    first = sae(x)
    buffer = sae._pre_buffer
    again = sae(x)
    assert sae._pre_buffer is buffer and torch.equal(first.reconstruction, again.reconstruction)
    assert torch.allclose(first.reconstruction, sae.decode(sae.encode(x)), atol=1e-5)
    assert sae._scratch(40, x.double()) is None


def test_decoder_normalisation_and_parallel_grad():
    sae = make_sae()
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.remove_parallel_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5


def test_input_unit_norm_reconstructs_in_input_space():
    sae = make_sae(input_unit_norm=True)
    x = torch.randn(10, 16) * 5 + 3
    out = sae(x)
    xs = (x - x.mean(-1, keepdim=True)) / ((x - x.mean(-1, keepdim=True)).std(-1, keepdim=True) + 1e-5)
    rec_std = sae.decode_sparse(out.latent_values, out.latent_indices)
    mean, std = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True) + 1e-5
    assert torch.allclose(out.reconstruction, rec_std * std + mean, atol=1e-4)
    assert torch.allclose(out.fvu, F.mse_loss(rec_std, xs, reduction="sum") / (xs - xs.mean(0)).pow(2).sum())


def test_width_mismatch_is_clear():
    sae = make_sae()
    with pytest.raises(ValueError, match="width 17 does not match the SAE's d_in=16"):
        sae.encode(torch.randn(2, 17))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(d_in=0, k=1), "d_in must be positive"),
        (dict(d_in=8, num_latents=16, k=17), "k must be in"),
        (dict(d_in=8, k=2, encoder="nope"), "encoder must be"),
        (dict(d_in=8, k=2, encoder="threshold"), "needs a calibrated"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(SaeConfigError, match=match):
        SaeConfig(**kwargs)


def test_config_from_foreign_dict_keeps_extras():
    cfg = SaeConfig.from_dict(
        {"d_in": 8, "k": 2, "expansion_factor": 4, "num_latents": 0, "multi_topk": False, "batch_topk": True}
    )
    assert cfg.num_latents == 32 and cfg.extra == {"multi_topk": False, "batch_topk": True}
    with pytest.raises(SaeConfigError, match="'k'"):
        SaeConfig.from_dict({"d_in": 8, "num_latents": 4})


def test_fingerprint_tracks_weights():
    a, b = make_sae(), make_sae()
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.W_dec[0, 0] += 1.0
    assert a.fingerprint() != b.fingerprint()
