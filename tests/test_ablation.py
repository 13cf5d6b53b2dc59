"""FeatureAblator: identity, the error-preserving edit, rules, multi-concept, layouts, dtypes."""

from __future__ import annotations

import functools
import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saeuron_plugin.sae.ablation import ConceptAblation, FeatureAblator, kth_largest
from saeuron_plugin.sae.concepts import ConceptLibrary, ConceptMismatchError, ConceptStats, TauGrid
from saeuron_plugin.sae.model import SaeConfig, SparseAutoencoder

D, N, K = 16, 64, 4


def make_sae(encoder: str = "topk", unit_norm: bool = False, seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    cfg = SaeConfig(
        d_in=D,
        num_latents=N,
        k=K,
        encoder=encoder,
        input_unit_norm=unit_norm,
        threshold=0.3 if encoder == "threshold" else None,
    )
    sae = SparseAutoencoder(cfg)
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def make_library(sae: SparseAutoencoder, buckets: int = 5) -> ConceptLibrary:
    gen = torch.Generator().manual_seed(1)
    lib = ConceptLibrary.for_sae(sae, tau_grid=TauGrid(buckets))
    for name, dim in [("A", 0), ("B", 1), ("C", 2)]:
        for _ in range(4):
            x = torch.randn(4, 8, D, generator=gen)
            x[..., dim] += 3
            lib.accumulate_activations(name, sae, x, torch.rand(4, generator=gen))
    return lib


@functools.cache
def setup(encoder: str = "topk", unit_norm: bool = False) -> tuple[SparseAutoencoder, ConceptLibrary]:
    sae = make_sae(encoder, unit_norm)
    return sae, make_library(sae)


def concept_input(rows: int = 3, tokens: int = 8, seed: int = 2, every: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, tokens, D, generator=gen)
    x[:, ::every, 0] += 3  # concepts A and B present on every `every`-th token
    x[:, ::every, 1] += 3
    return x


def dense_reference(ab: FeatureAblator, x: torch.Tensor, bucket: int) -> torch.Tensor:
    """out = x + (z′ − z) W_dec (· std) from a dense encode, written out plainly."""
    sae = ab.sae
    z = sae.encode(x).detach().float()
    z_new = z.clone()
    gate = ab.library.all_means(fill_empty=True)[bucket].float()
    for a in ab.ablations:
        mu_c = ab.library.get(a.concept).means(fill_empty=True)[bucket].float()
        for i in ab.selections[a.concept].bucket(bucket).tolist():
            active = z[..., i] > gate[i]
            if a.rule == "reference":
                value = a.gamma * mu_c[i] * z[..., i]
            else:
                value = torch.full_like(z[..., i], 0.0 if a.rule == "zero" else a.clamp_value)
            z_new[..., i] = torch.where(active, torch.minimum(z_new[..., i], value), z_new[..., i])
    delta = (z_new - z) @ sae.W_dec.detach()
    if sae.cfg.input_unit_norm:
        xf = x.float()
        delta = delta * ((xf - xf.mean(-1, keepdim=True)).std(-1, keepdim=True) + 1e-5)
    return x.float() + delta


# ----------------------------------------------------------------- acceptance 1: identity
@pytest.mark.parametrize("encoder", ["topk", "threshold"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_without_selection(encoder, dtype):
    sae, lib = setup(encoder)
    x = concept_input().to(dtype)
    assert FeatureAblator(sae, lib, [])(x, 0.5) is x
    none_selected = FeatureAblator(sae, lib, [ConceptAblation("A", top_n=0)])
    assert not none_selected.active and none_selected(x, 0.5) is x
    disabled = FeatureAblator(sae, lib, ["A"])
    disabled.enabled = False
    assert disabled(x, 0.5) is x


@pytest.mark.parametrize("encoder", ["topk", "threshold"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_when_features_never_fire(encoder, dtype):
    sae = make_sae(encoder)
    dead = 7
    with torch.no_grad():
        sae.encoder.bias[dead] = -1e4  # latent 7 never fires
    lib = ConceptLibrary.for_sae(sae, tau_grid=TauGrid(3))
    base = torch.rand(3, N, dtype=torch.float64)
    for name, planted in [("A", dead), ("B", 9)]:
        sums = base.clone()
        sums[:, planted] += 50.0
        lib.add_stats(
            ConceptStats(
                name,
                N,
                lib.tau_grid,
                lib.sae_fingerprint,
                D,
                sums=sums,
                counts=torch.ones(3, dtype=torch.long),
            )
        )
    ab = FeatureAblator(sae, lib, ["A"])
    assert ab.selected(0.5) == {"A": [dead]}
    x = (torch.randn(4, 8, D) * 3).to(dtype)
    out = ab(x, 0.5)
    assert out is x
    out_rows = ab(x, torch.tensor([0.1, 0.5, 0.9, 0.5]))  # per-row τ path
    assert out_rows.dtype == dtype and torch.equal(out_rows, x)


# ---------------------------------------------------------- the edit equals its definition
@pytest.mark.parametrize("sparse_tokens", [True, False])
@pytest.mark.parametrize(("encoder", "unit_norm"), [("topk", False), ("threshold", False), ("topk", True)])
def test_edit_equals_dense_definition(encoder, unit_norm, sparse_tokens):
    sae, lib = setup(encoder, unit_norm)
    ab = FeatureAblator(
        sae, lib, [ConceptAblation("A", top_n=3, strength=2.0), ConceptAblation("B", top_n=2)]
    )
    ab.sparse_tokens = sparse_tokens  # False: the dense, sync-free path devices run
    # every token / every other / 1 in 8 with the concept: the CPU topk path encodes all tokens
    # when most can change and gathers the candidates when few can
    for x, tau in itertools.product([concept_input(every=e) for e in (1, 2, 8)], (0.05, 0.5, 0.95)):
        out = ab(x, tau)
        bucket = int(lib.tau_grid.index(tau))
        expected = dense_reference(ab, x, bucket)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        untouched = (expected == x).all(-1)  # no selected feature active: x bit for bit
        assert (~untouched).any() and torch.equal(out[untouched], x[untouched])


def test_shared_row_tables_give_the_same_edit(monkeypatch):
    sae, lib = setup("threshold")
    specs = [ConceptAblation("A", top_n=4), ConceptAblation("B", top_n=2)]
    x = concept_input()
    copied = FeatureAblator(sae, lib, specs)(x, 0.3)
    monkeypatch.setattr("saeuron_plugin.sae.ablation._COPY_ROWS_BYTES", 0)  # force the shared tables
    shared = FeatureAblator(sae, lib, specs)
    assert all(p is None or p.pos is not None for p in shared._plans)
    assert torch.equal(shared(x, 0.3), copied)


def test_rules_zero_and_clamp_and_overlap_order():
    sae, lib = setup()
    x = concept_input()
    for rule, extra in (("zero", {}), ("clamp", {"clamp_value": -2.0})):
        ab = FeatureAblator(sae, lib, [ConceptAblation("A", top_n=2, rule=rule, **extra)])
        torch.testing.assert_close(ab(x, 0.3), dense_reference(ab, x, int(lib.tau_grid.index(0.3))))
    # a latent selected by two concepts takes the most negative result, whatever the order
    specs = [
        ConceptAblation("A", top_n=12, strength=1.0, contrast=["C"]),
        ConceptAblation("B", top_n=12, rule="clamp", clamp_value=-0.5, contrast=["C"]),
    ]
    ab1, ab2 = FeatureAblator(sae, lib, specs), FeatureAblator(sae, lib, specs[::-1])
    bucket = int(lib.tau_grid.index(0.3))
    shared = set(ab1.selected(0.3)["A"]) & set(ab1.selected(0.3)["B"])
    assert shared, "the test needs an overlap"
    torch.testing.assert_close(ab1(x, 0.3), ab2(x, 0.3), rtol=0, atol=0)
    torch.testing.assert_close(ab1(x, 0.3), dense_reference(ab1, x, bucket))


def test_invalid_settings():
    sae, lib = setup()
    with pytest.raises(ValueError, match="gamma < 0"):
        FeatureAblator(sae, lib, [ConceptAblation("A", gamma=0.5)])
    with pytest.raises(ValueError, match="contradicts"):
        ConceptAblation("A", gamma=-1, strength=2).resolve(lib)
    with pytest.raises(ValueError, match="twice"):
        FeatureAblator(sae, lib, ["A", "A"])
    with pytest.raises(KeyError, match="Known concepts"):
        FeatureAblator(sae, lib, ["Z"])
    with pytest.raises(ConceptMismatchError):
        FeatureAblator(make_sae(seed=5), lib, ["A"])


def test_library_defaults_and_strength():
    sae = make_sae()
    lib = make_library(sae)
    lib.set_selection_defaults("A", gamma=-7.0, top_n=2)
    (res,) = FeatureAblator(sae, lib, ["A"]).ablations
    assert res.gamma == -7.0 and res.top_n == 2 and res.percentile is None
    (res,) = FeatureAblator(sae, lib, [ConceptAblation("A", strength=3, percentile=99.0)]).ablations
    assert res.gamma == -3.0 and res.percentile == 99.0 and res.top_n is None


# ------------------------------------------------------------------- legacy error sign
def test_legacy_error_sign_reproduces_reference_bug():
    sae, lib = setup()
    x = concept_input()
    legacy = FeatureAblator(sae, lib, [ConceptAblation("A", top_n=2)], legacy_error_sign=True)
    z = sae.encode(x).detach()
    fixed = FeatureAblator(sae, lib, [ConceptAblation("A", top_n=2)])
    # D(z′) + D(z) − x = 2·D(z) − x + (z′ − z) W_dec, and (z′ − z) W_dec is the fixed edit's delta
    expected = 2 * sae.decode(z).detach() - x + (fixed(x, 0.5) - x)
    torch.testing.assert_close(legacy(x, 0.5), expected, atol=1e-5, rtol=1e-5)
    nothing = FeatureAblator(sae, lib, [ConceptAblation("A", top_n=0)], legacy_error_sign=True)
    torch.testing.assert_close(nothing(x, 0.5), 2 * sae.decode(z).detach() - x)  # not x: the bug


# -------------------------------------------------- acceptance 3: planted concept directions
def test_ablation_removes_planted_concept_and_spares_the_other():
    d = n = 32
    torch.manual_seed(11)
    q, _ = torch.linalg.qr(torch.randn(d, d))
    sae = SparseAutoencoder(SaeConfig(d_in=d, num_latents=n, k=8))
    with torch.no_grad():
        sae.W_dec.copy_(q.T)  # orthonormal decoder rows
        sae.encoder.weight.copy_(q.T)  # tied encoder, zero biases
        sae.encoder.bias.zero_()
        sae.b_dec.zero_()
    e = sae.W_dec.detach()
    lat_a, lat_b = 3, 17
    gen = torch.Generator().manual_seed(12)

    def sample(concept: int | None, batch: int = 8, tokens: int = 16) -> torch.Tensor:
        x = 0.1 * torch.randn(batch, tokens, d, generator=gen)
        if concept is not None:
            x += (2 + torch.rand(batch, tokens, 1, generator=gen)) * e[concept]
        return x

    lib = ConceptLibrary.for_sae(sae, tau_grid=TauGrid(10))
    for _ in range(5):
        tau = torch.rand(8, generator=gen)
        lib.accumulate_activations("A", sae, sample(lat_a), tau)
        lib.accumulate_activations("B", sae, sample(lat_b), tau)
        lib.accumulate_activations(None, sae, sample(None), tau)
    mixed = sample(lat_a) + (2.5 * e[lat_b])
    proj = lambda v, i: v @ e[i]  # noqa: E731
    for spec in (ConceptAblation("A"), ConceptAblation("A", rule="zero")):
        ab = FeatureAblator(sae, lib, [spec])
        for tau in (0.05, 0.45, 0.95):
            assert ab.selected(tau)["A"] == [lat_a]
            out = ab(mixed, tau)
            before_a, after_a = proj(mixed, lat_a), proj(out, lat_a)
            assert (after_a <= 0.1 * before_a).all()  # projection on A drops by more than 90 %
            change_b = (proj(out, lat_b) - proj(mixed, lat_b)).abs() / proj(mixed, lat_b).abs()
            assert change_b.max() < 0.01
    # a small γ leaves little of A either way
    gamma = -0.05 / float(lib.get("A").means(fill_empty=True)[:, lat_a].max())
    out = FeatureAblator(sae, lib, [ConceptAblation("A", gamma=gamma)])(mixed, 0.5)
    assert (proj(out, lat_a).abs() <= 0.1 * proj(mixed, lat_a)).all()


# ---------------------------------------------------------------- batch layouts, branches
def test_per_row_tau_equals_row_by_row():
    sae, lib = setup("threshold")
    ab = FeatureAblator(sae, lib, [ConceptAblation("A", top_n=3), ConceptAblation("B", top_n=1)])
    x = concept_input(rows=4)
    tau = torch.tensor([0.05, 0.95, 0.5, 0.05])
    out = ab(x, tau)
    for r in range(4):
        torch.testing.assert_close(out[r], ab(x[r : r + 1], float(tau[r]))[0], atol=1e-6, rtol=1e-6)


def test_apply_to_branches():
    sae, lib = setup()
    x = concept_input(rows=4)
    cond = torch.tensor([False, False, True, True])
    full = FeatureAblator(sae, lib, [ConceptAblation("A", top_n=3)])(x, 0.5)
    only_cond = FeatureAblator(sae, lib, [ConceptAblation("A", top_n=3)], apply_to="cond")
    out = only_cond(x, 0.5, cond)
    assert torch.equal(out[:2], x[:2]) and torch.equal(out[2:], full[2:])
    out_u = FeatureAblator(sae, lib, [ConceptAblation("A", top_n=3)], apply_to="uncond")(x, 0.5, cond)
    assert torch.equal(out_u[2:], x[2:]) and torch.equal(out_u[:2], full[:2])
    assert torch.equal(only_cond(x, 0.5, None), full)  # branch unknown: every row


def test_tau_required_and_clamped():
    sae, lib = setup()
    ab = FeatureAblator(sae, lib, ["A"])
    with pytest.raises(ValueError, match="τ is required"):
        ab(concept_input(), None)
    with pytest.warns(UserWarning, match="outside"):
        ab(concept_input(), 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ab(concept_input(), -0.5)  # warned once
    single = ConceptLibrary.for_sae(sae, tau_grid=TauGrid(1))
    single.accumulate_activations("A", sae, concept_input(), None)
    single.accumulate_activations("B", sae, concept_input(seed=9) - 3, None)
    vlm = FeatureAblator(sae, single, [ConceptAblation("A", top_n=2)])
    assert torch.equal(vlm(concept_input(), None), vlm(concept_input(), 0.7))


def test_threshold_override_from_library_calibration_and_to():
    sae = make_sae()
    lib = make_library(sae)
    with pytest.raises(ValueError, match="needs θ"):
        FeatureAblator(sae, lib, ["A"], encoder="threshold")
    lib.record_threshold(0.3)
    ab = FeatureAblator(sae, lib, [ConceptAblation("A", top_n=3)], encoder="threshold")
    assert ab.sae.cfg.encoder == "threshold" and ab.sae.cfg.threshold == 0.3
    assert sae.cfg.encoder == "topk" and ab.sae.encoder.weight is sae.encoder.weight  # a view
    assert ab.to("cpu") is ab and ab.to(torch.bfloat16) is ab
    same_weights = make_sae("threshold")  # same seed and θ = 0.3, built in threshold mode
    direct = FeatureAblator(same_weights, lib, [ConceptAblation("A", top_n=3)])
    x = concept_input()
    assert torch.equal(ab(x, 0.5), direct(x, 0.5))


def test_gradient_flows_through_the_edit():
    sae, lib = setup()
    ab = FeatureAblator(sae, lib, [ConceptAblation("A", top_n=3)])
    x = concept_input().requires_grad_(True)
    ab(x, 0.5).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------------------ acceptance 5: property tests
leading_shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3)


@settings(max_examples=25, deadline=None)
@given(
    shape=leading_shapes,
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    encoder=st.sampled_from(["topk", "threshold"]),
    tau=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_property_shapes_and_dtypes(shape, dtype, encoder, tau, seed):
    sae, lib = setup(encoder)
    ab = FeatureAblator(sae, lib, [ConceptAblation("A", top_n=3), ConceptAblation("C", top_n=2)])
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, D, generator=gen) + 2 * torch.eye(D)[0]).to(dtype)
    out = ab(x, tau)
    assert out.shape == x.shape and out.dtype == x.dtype
    flat = ab(x.reshape(-1, D), tau)
    torch.testing.assert_close(out.reshape(-1, D), flat, atol=1e-5, rtol=1e-5)
    expected = dense_reference(ab, x, int(lib.tau_grid.index(tau))).to(dtype)
    torch.testing.assert_close(
        out,
        expected,
        atol=2e-2 if dtype != torch.float32 else 1e-5,
        rtol=2e-2 if dtype != torch.float32 else 1e-5,
    )


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(2, 12), encoder=st.sampled_from(["topk", "threshold"]), seed=st.integers(0, 2**16))
def test_property_row_permutation(rows, encoder, seed):
    sae, lib = setup(encoder)
    ab = FeatureAblator(
        sae, lib, [ConceptAblation("A", top_n=3), ConceptAblation("B", top_n=3)], apply_to="cond"
    )
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 5, D, generator=gen) + 3 * torch.eye(D)[0]
    tau = torch.rand(rows, generator=gen)
    cond = torch.rand(rows, generator=gen) > 0.3
    perm = torch.randperm(rows, generator=gen)
    out = ab(x, tau, cond)
    torch.testing.assert_close(ab(x[perm], tau[perm], cond[perm]), out[perm], atol=1e-6, rtol=1e-6)
    tokens = x.reshape(-1, D)  # the edit is per token: permuting tokens permutes outputs
    tperm = torch.randperm(tokens.shape[0], generator=gen)
    torch.testing.assert_close(ab(tokens[tperm], 0.4), ab(tokens, 0.4)[tperm], atol=1e-6, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 5),
    n=st.integers(1, 4096),
    k=st.integers(1, 40),
    ties=st.booleans(),
    blocked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_kth_largest_equals_topk(rows, n, k, ties, blocked, seed):
    k = min(k, n if not blocked else max(1, n // 256))  # half the draws take the blocked path (n ≥ 256·k)
    gen = torch.Generator().manual_seed(seed)
    values = (
        torch.randint(-5, 5, (rows, n), generator=gen).float()
        if ties
        else torch.randn(rows, n, generator=gen)
    )
    assert torch.equal(kth_largest(values, k), values.topk(k, dim=-1).values[:, -1])
    assert torch.equal(kth_largest(values.view(rows, 1, n), k), kth_largest(values, k).view(rows, 1))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 40),
    n=st.integers(2, 600),
    k=st.integers(1, 20),
    picked=st.integers(1, 8),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_members_above_gate_equal_topk_membership(rows, n, k, picked, ties, seed):
    """The counting shortcut decides exactly what ``topk`` membership + the gate decide, ties included."""
    from saeuron_plugin.sae.kernels import _members_above_gate

    k, picked = min(k, n), min(picked, n)
    gen = torch.Generator().manual_seed(seed)
    pre = (
        torch.randint(-4, 6, (rows, n), generator=gen).float()
        if ties
        else torch.randn(rows, n, generator=gen) * 2
    )
    latents = torch.randperm(n, generator=gen)[:picked]
    gate = (torch.rand(picked, generator=gen) * 3).round() if ties else torch.rand(picked, generator=gen) * 2
    sel = pre[:, latents]
    expected = (sel > gate) & (sel >= pre.topk(k, dim=-1).values[:, -1:])
    assert torch.equal(_members_above_gate(pre, sel, gate, k), expected)


def test_topk_membership_matches_full_encode():
    torch.manual_seed(3)
    sae = SparseAutoencoder(SaeConfig(d_in=32, num_latents=2048, k=8))  # blocked k-th value path
    lib = ConceptLibrary.for_sae(sae, tau_grid=TauGrid(1))
    x = torch.randn(64, 32)
    lib.accumulate_activations("A", sae, x[:32] + 2, None)
    lib.accumulate_activations("B", sae, x[32:] - 2, None)
    ab = FeatureAblator(sae, lib, [ConceptAblation("A", top_n=40, gamma=-1.0)])
    ab.sparse_tokens = False
    torch.testing.assert_close(ab(x, None), dense_reference(ab, x, 0), atol=1e-5, rtol=1e-5)
    ab.sparse_tokens = True
    torch.testing.assert_close(ab(x, None), dense_reference(ab, x, 0), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("encoder", ["topk", "threshold"])
def test_cuda_device_path_matches_cpu(encoder, sync_free):
    sae, lib = setup(encoder)
    specs = [ConceptAblation("A", top_n=3), ConceptAblation("B", top_n=2, rule="clamp", clamp_value=-1.0)]
    cpu = FeatureAblator(sae, lib, specs, apply_to="cond")
    gpu_sae = make_sae(encoder).cuda()
    gpu = FeatureAblator(gpu_sae, lib, specs, apply_to="cond", sync_free=sync_free)
    x = concept_input(rows=4)
    cond = torch.tensor([False, True, False, True])
    tau = torch.tensor([0.05, 0.95, 0.5, 0.5])
    for t in (tau, tau[:1]):
        expected = cpu(x, t if t.numel() > 1 else float(t), cond)
        got = gpu(x.cuda(), t.cuda(), cond.cuda())
        torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
    xb = x.cuda().bfloat16()
    got = gpu(xb, tau.cuda(), cond.cuda())
    assert got.dtype == torch.bfloat16
    untouched = (cpu(x.bfloat16(), tau, cond) == x.bfloat16()).all(-1)
    assert torch.equal(got.cpu()[untouched], xb.cpu()[untouched])


# ------------------------------------------------------------------- target replacement
def _target_shift(ab: FeatureAblator, concept: str, target: str, scale: float, bucket: int) -> torch.Tensor:
    lib = ab.library
    diff = lib.get(target).means(fill_empty=True)[bucket] - lib.get(concept).means(fill_empty=True)[bucket]
    return scale * diff.float() @ ab.sae.W_dec.detach().float()


@pytest.mark.parametrize("sparse_tokens", [True, False])
@pytest.mark.parametrize(("encoder", "unit_norm"), [("topk", False), ("threshold", False), ("topk", True)])
def test_target_adds_the_mean_difference_where_the_concept_fires(encoder, unit_norm, sparse_tokens):
    sae, lib = setup(encoder, unit_norm)
    plain = FeatureAblator(sae, lib, [ConceptAblation("A", top_n=3)])
    steered = FeatureAblator(sae, lib, [ConceptAblation("A", top_n=3, target="C", target_scale=1.5)])
    steered.sparse_tokens = sparse_tokens
    for x, tau in itertools.product([concept_input(every=e) for e in (1, 8)], (0.05, 0.5)):
        bucket = int(lib.tau_grid.index(tau))
        base, out = plain(x, tau), steered(x, tau)
        fired = (base != x).any(-1)
        assert fired.any() and torch.equal(out[~fired], x[~fired])  # elsewhere x bit for bit
        shift = _target_shift(steered, "A", "C", 1.5, bucket)
        if unit_norm:
            xf = x.float()
            shift = shift * ((xf - xf.mean(-1, keepdim=True)).std(-1, keepdim=True) + 1e-5)[fired]
        torch.testing.assert_close(
            out[fired] - base[fired], shift.expand_as(out[fired]), atol=1e-5, rtol=1e-4
        )


def test_targets_of_several_concepts_follow_their_own_tokens_and_rows():
    sae, lib = setup("threshold")
    specs = [
        ConceptAblation("A", top_n=3, target="C"),
        ConceptAblation("B", top_n=2, target="C", target_scale=2),
    ]
    ab = FeatureAblator(sae, lib, specs)
    x = concept_input(rows=3)
    x[:, 1::4, 0] += 3  # A alone on some tokens
    a_only = FeatureAblator(sae, lib, specs[:1])(x, 0.5)
    b_only = FeatureAblator(sae, lib, specs[1:])(x, 0.5)
    out = ab(x, 0.5)
    a_fired, b_fired = (a_only != x).any(-1), (b_only != x).any(-1)
    bucket = int(lib.tau_grid.index(0.5))
    expected_shift = a_fired.unsqueeze(-1) * _target_shift(ab, "A", "C", 1.0, bucket) + b_fired.unsqueeze(
        -1
    ) * _target_shift(ab, "B", "C", 2.0, bucket)
    removal = FeatureAblator(sae, lib, [ConceptAblation("A", top_n=3), ConceptAblation("B", top_n=2)])(x, 0.5)
    torch.testing.assert_close(out, removal + expected_shift, atol=1e-5, rtol=1e-4)
    tau = torch.tensor([0.05, 0.95, 0.5])  # per-row buckets: the batched tables
    rows = ab(x, tau)
    for r in range(3):
        torch.testing.assert_close(rows[r], ab(x[r : r + 1], float(tau[r]))[0], atol=1e-5, rtol=1e-5)
    ab.sparse_tokens = False
    torch.testing.assert_close(ab(x, tau), rows, atol=1e-5, rtol=1e-5)


def test_target_errors_defaults_and_gradient():
    sae = make_sae()
    lib = make_library(sae)
    with pytest.raises(KeyError, match="Known concepts"):
        FeatureAblator(sae, lib, [ConceptAblation("A", target="Z")])
    with pytest.raises(ValueError, match="another concept"):
        FeatureAblator(sae, lib, [ConceptAblation("A", target="A")])
    with pytest.raises(ValueError, match="legacy_error_sign"):
        FeatureAblator(sae, lib, [ConceptAblation("A", target="B")], legacy_error_sign=True)
    lib.set_selection_defaults("A", target="C", target_scale=0.5, top_n=2)
    (res,) = FeatureAblator(sae, lib, ["A"]).ablations
    assert (res.target, res.target_scale) == ("C", 0.5)
    (res,) = FeatureAblator(sae, lib, [ConceptAblation("A", target="")]).ablations
    assert res.target is None  # "" switches a default target off
    ab = FeatureAblator(sae, lib, ["A"])
    assert "→ C" in ab.describe()
    both = FeatureAblator(sae, lib, ["A", "C"])  # A's target is removed too: A is only removed
    assert [r.target for r in both.ablations] == [None, None] and both._member is None
    x = concept_input().requires_grad_(True)
    ab(x, 0.5).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
