"""Concept statistics, library files, the SAeUron score, feature selection and θ calibration."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from saeuron_plugin.sae.calibration import ThresholdCalibrator, calibrate_threshold
from saeuron_plugin.sae.concepts import (
    ConceptLibrary,
    ConceptMismatchError,
    ConceptStats,
    TauGrid,
    UnknownConceptError,
    concept_scores,
    make_slugs,
    quantile_linear,
    select_features,
)
from saeuron_plugin.sae.model import SaeConfig, SparseAutoencoder


def make_sae(d: int = 16, n: int = 64, k: int = 4, seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SaeConfig(d_in=d, num_latents=n, k=k))
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1)
    return sae


def stats_from(name: str, sums: list[list[float]], counts: list[int], grid: TauGrid) -> ConceptStats:
    return ConceptStats(
        name=name,
        num_latents=len(sums[0]),
        tau_grid=grid,
        sums=torch.tensor(sums, dtype=torch.float64),
        counts=torch.tensor(counts),
    )


# ------------------------------------------------------------------------------------ τ grid
def test_tau_grid_ddim_steps_one_per_bucket():
    grid = TauGrid(50)
    tau = torch.tensor([(1 + 20 * j) / 1000 for j in range(50)])  # SD's 50 DDIM timesteps
    assert torch.equal(grid.index(tau), torch.arange(50))
    assert grid.index(0.5).dim() == 0 and int(grid.index(0.0)) == 0 and int(grid.index(1.0)) == 49
    # nearest centre; half-way goes up
    assert int(TauGrid(4).index(0.25)) == 1 and int(TauGrid(4).index(0.24)) == 0
    explicit = TauGrid(centres=(0.1, 0.5, 0.6))
    assert explicit.num_buckets == 3
    assert explicit.index(torch.tensor([0.0, 0.29, 0.31, 0.56, 1.0])).tolist() == [0, 0, 1, 2, 2]
    assert TauGrid.from_dict(explicit.to_dict()) == explicit
    assert int(TauGrid(1).index(0.7)) == 0 and TauGrid(1).nearest(0.7) == 0
    taus = torch.cat([torch.rand(200), torch.arange(51) / 50, torch.tensor([0.0, 1.0])])
    for g in (grid, explicit, TauGrid(7)):
        assert [g.nearest(float(t)) for t in taus] == g.index(taus).tolist()  # host path agrees


def test_tau_outside_grid_clamps_with_one_warning():
    grid = TauGrid(10)
    with pytest.warns(UserWarning, match="outside"):
        assert grid.index(torch.tensor([-0.5, 1.7])).tolist() == [0, 9]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert int(grid.index(3.0)) == 9  # warned once only


# ---------------------------------------------------------------------------- statistics
def test_stats_update_means_and_fill():
    grid = TauGrid(4)
    st = ConceptStats("dog", num_latents=3, tau_grid=grid)
    st.update(torch.tensor([[1.0, 2, 3], [3.0, 2, 1]]), torch.tensor([0.1, 0.15]))
    st.update(torch.ones(2, 5, 3), 0.9)  # token axis averaged
    assert st.counts.tolist() == [2, 0, 0, 2]
    m = st.means()
    assert m[0].tolist() == [2.0, 2.0, 2.0] and m[1].isnan().all() and m[3].tolist() == [1.0, 1.0, 1.0]
    filled = st.means(fill_empty=True)
    assert torch.equal(filled[1], m[0]) and torch.equal(filled[2], m[3])  # nearest bucket with data


def test_merge_two_halves_equals_all_at_once():
    torch.manual_seed(1)
    grid = TauGrid(5)
    lat = torch.rand(40, 32) * 10
    tau = torch.rand(40)
    whole = ConceptStats("c", 32, grid, sae_fingerprint="fp")
    whole.update(lat, tau)
    a = ConceptStats("c", 32, grid, sae_fingerprint="fp")
    b = ConceptStats("c", 32, grid, sae_fingerprint="fp")
    a.update(lat[:17], tau[:17])
    b.update(lat[17:], tau[17:])
    a.record_prompts(["p1"])
    b.record_prompts(["p2", "p3"])
    a.merge(b)
    assert torch.equal(a.sums, whole.sums) and torch.equal(a.counts, whole.counts)
    assert a.prompts == ["p1", "p2", "p3"] and a.num_prompts == 3


def test_merge_refuses_other_sae_or_grid():
    grid = TauGrid(5)
    base = ConceptStats("c", 8, grid, sae_fingerprint="aaa", d_in=4)
    with pytest.raises(ConceptMismatchError, match="fingerprint"):
        base.merge(ConceptStats("c", 8, grid, sae_fingerprint="bbb", d_in=4))
    with pytest.raises(ConceptMismatchError, match="dims"):
        base.merge(ConceptStats("c", 16, grid, sae_fingerprint="aaa", d_in=4))
    with pytest.raises(ConceptMismatchError, match="grid"):
        base.merge(ConceptStats("c", 8, TauGrid(7), sae_fingerprint="aaa", d_in=4))


def test_stats_save_load_exact(tmp_path):
    torch.manual_seed(2)
    st = ConceptStats(
        "Van Gogh", 32, TauGrid(6), sae_fingerprint="f00", d_in=8, hookpoint="unet.x", extra={"guidance": 9}
    )
    st.update(torch.randn(30, 32).exp(), torch.rand(30))
    st.record_prompts(["a painting in Van Gogh style", "sunflowers, Van Gogh"])
    path = st.save(tmp_path / "vg.safetensors")
    back = ConceptStats.load(path)
    assert torch.equal(back.sums, st.sums) and torch.equal(back.counts, st.counts)
    assert back.sums.dtype == torch.float64 and back.counts.dtype == torch.int64
    assert back.metadata() == st.metadata()
    st.save(tmp_path / "withheld.safetensors", include_prompts=False)
    hidden = ConceptStats.load(tmp_path / "withheld.safetensors")
    assert hidden.prompts is None and hidden.prompts_sha256 == st.prompts_sha256 and hidden.num_prompts == 2


# ------------------------------------------------------------------------------- library
def build_library(sae: SparseAutoencoder, grid: TauGrid | None = None) -> ConceptLibrary:
    torch.manual_seed(3)
    lib = ConceptLibrary.for_sae(sae, tau_grid=grid or TauGrid(5), hookpoint="unet.mid")
    for name, dim in [("Van Gogh", 0), ("van_gogh", 1), ("dog", 2)]:
        for _ in range(3):
            x = torch.randn(2, 6, sae.d_in)
            x[..., dim] += 3
            lib.accumulate_activations(name, sae, x, torch.rand(2), prompts=[f"{name} {_}"])
    lib.accumulate_activations(None, sae, torch.randn(4, 6, sae.d_in), torch.rand(4))
    return lib


def test_library_save_load_roundtrip(tmp_path):
    sae = make_sae()
    lib = build_library(sae)
    lib.set_selection_defaults("dog", gamma=-12.0, percentile=99.99)
    lib.record_threshold(0.25, target_l0=4)
    out = lib.save(tmp_path)
    index = json.loads((out / "index.json").read_text())
    files = {e["file"] for e in index["concepts"].values()}
    assert len(files) == 3 and all(f.endswith(".safetensors") for f in files)
    assert index["concepts"]["dog"]["selection"]["gamma"] == -12.0
    assert index["concepts"]["dog"]["prompts"] == ["dog 0", "dog 1", "dog 2"]
    back = ConceptLibrary.load(tmp_path, sae=sae)
    assert back.names == lib.names and back.calibrated_threshold == 0.25
    for name in lib.names:
        assert torch.equal(back.get(name).sums, lib.get(name).sums)
    assert torch.equal(back.background.sums, lib.background.sums)
    assert back.selection_defaults("dog").gamma == -12.0
    assert back.tau_grid == lib.tau_grid and back.hookpoint == "unet.mid"
    assert ConceptLibrary.load(out).names == lib.names  # the concepts folder itself also works


def test_library_float32_statistics_half_the_size_and_load_as_float64(tmp_path):
    """Shipping option: float32 sums (half the bytes), read back as float64 within float32 rounding."""
    sae = make_sae()
    lib = build_library(sae)
    lib.save(tmp_path / "f64")
    lib.save(tmp_path / "f32", stats_dtype=torch.float32)
    size = {
        d: sum(f.stat().st_size for f in (tmp_path / d / "concepts").glob("*.safetensors"))
        for d in ("f64", "f32")
    }
    tensor_bytes = sum(st.sums.numel() * 4 for st in [*lib.concepts.values(), lib.background])
    assert abs(size["f64"] - size["f32"] - tensor_bytes) < 64  # headers may differ by a few digits
    back = ConceptLibrary.load(tmp_path / "f32", sae=sae)
    for name in lib.names:
        assert back.get(name).sums.dtype == torch.float64
        assert torch.equal(back.get(name).sums, lib.get(name).sums.float().double())
        assert torch.equal(back.get(name).counts, lib.get(name).counts)
    with pytest.raises(ValueError, match="stats_dtype"):
        lib.save(tmp_path / "f16", stats_dtype=torch.float16)


def test_library_refuses_other_sae(tmp_path):
    sae = make_sae()
    build_library(sae).save(tmp_path)
    with pytest.raises(ConceptMismatchError, match="another SAE"):
        ConceptLibrary.load(tmp_path, sae=make_sae(seed=1))
    with pytest.raises(ConceptMismatchError, match="d_in=16, n=64"):
        ConceptLibrary.load(tmp_path, sae=make_sae(n=32))
    other = ConceptLibrary.for_sae(make_sae(seed=1))
    other.accumulate("x", torch.rand(2, 64), 0.5)
    with pytest.raises(ConceptMismatchError):
        build_library(sae).add_stats(other.get("x"))


def test_unknown_concept_lists_known():
    lib = build_library(make_sae())
    with pytest.raises(UnknownConceptError) as err:
        lib.get("dgo")
    msg = str(err.value)
    assert "'dgo'" in msg and "Did you mean 'dog'" in msg and "'Van Gogh'" in msg
    assert isinstance(err.value, KeyError)
    assert "dog" in lib and "cat" not in lib


def test_slugs_safe_unique_deterministic():
    names = ["Van Gogh", "van_gogh", "dog", "../etc/passwd", "", "CON", "猫"]
    slugs = make_slugs(names)
    assert slugs["dog"] == "dog" and slugs["../etc/passwd"] == "etc-passwd"
    assert len(set(slugs.values())) == len(names)
    assert all(s and all(c.isalnum() or c == "-" for c in s) and s.isascii() for s in slugs.values())
    assert slugs["Van Gogh"].startswith("van-gogh-") and slugs["CON"] != "con"
    assert make_slugs(reversed(names)) == slugs


# -------------------------------------------------------------------------------- scores
def hand_library() -> tuple[ConceptLibrary, dict[str, tuple[np.ndarray, np.ndarray]]]:
    grid = TauGrid(2)
    raw = {
        "A": ([[4.0, 1, 0, 0, 2, 1], [0.0, 3, 3, 0, 0, 0]], [2, 1]),
        "B": ([[1.0, 1, 1, 1, 1, 1], [2.0, 0, 1, 0, 5, 0]], [1, 1]),
        "C": ([[0.0, 6, 0, 3, 0, 3], [1.0, 1, 1, 1, 1, 9]], [3, 2]),
    }
    lib = ConceptLibrary(6, tau_grid=grid)
    for name, (sums, counts) in raw.items():
        lib.add_stats(stats_from(name, sums, counts, grid))
    return lib, {k: (np.array(s), np.array(c, dtype=float)) for k, (s, c) in raw.items()}


def reference_score(raw: dict, name: str, contrast: list[str], delta: float = 1e-8) -> np.ndarray:
    """REFERENCE §1, computed here independently with numpy (pooled contrast)."""
    s_c, n_c = raw[name]
    mu_c = s_c / n_c[:, None]
    s_r = sum(raw[k][0] for k in contrast)
    n_r = sum(raw[k][1] for k in contrast)
    mu_r = s_r / n_r[:, None]
    return mu_c / (mu_c.sum(1, keepdims=True) + delta) - mu_r / (mu_r.sum(1, keepdims=True) + delta)


def test_score_matches_reference_formula():
    lib, raw = hand_library()
    for name in "ABC":
        others = [k for k in "ABC" if k != name]
        got = concept_scores(lib, name, "others").numpy()
        np.testing.assert_allclose(got, reference_score(raw, name, others), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(
        concept_scores(lib, "A", ["C"]).numpy(), reference_score(raw, "A", ["C"]), rtol=1e-12
    )
    # pooled contrast (mean over the prompts of B ∪ C), not the mean of B's and C's means
    mean_of_means = (raw["B"][0] / raw["B"][1][:, None] + raw["C"][0] / raw["C"][1][:, None]) / 2
    mu_a = raw["A"][0] / raw["A"][1][:, None]
    alt = mu_a / mu_a.sum(1, keepdims=True) - mean_of_means / mean_of_means.sum(1, keepdims=True)
    assert not np.allclose(concept_scores(lib, "A").numpy(), alt)


def test_selection_matches_numpy_percentile():
    lib, raw = hand_library()
    scores = concept_scores(lib, "A")
    ref = reference_score(raw, "A", ["B", "C"])
    for p in (50.0, 75.0, 90.0):
        sel = select_features(scores, percentile=p)
        for k in range(2):
            expected = set(np.nonzero(ref[k] > np.percentile(ref[k], p))[0].tolist())
            assert set(sel.bucket(k).tolist()) == expected
    top2 = select_features(scores, top_n=2)
    for k in range(2):
        assert top2.bucket(k).tolist() == np.argsort(-ref[k], kind="stable")[:2].tolist()


def test_percentile_counts_at_paper_size():
    torch.manual_seed(4)
    scores = torch.randn(50, 20_480, dtype=torch.float64)
    for p, count in ((99.999, 1), (99.995, 2), (99.99, 3), (99.9, 21)):
        sel = select_features(scores, percentile=p)
        assert sel.counts.tolist() == [count] * 50, p
        best = scores.topk(count, dim=1).indices
        assert all(set(sel.bucket(k).tolist()) == set(best[k].tolist()) for k in range(50))


def test_quantile_linear_matches_numpy_and_torch():
    torch.manual_seed(5)
    rows = torch.randn(3, 1001, dtype=torch.float64)
    for q in (0.0, 0.3, 0.99999, 1.0):
        ours = quantile_linear(rows, q)
        assert torch.allclose(ours, torch.quantile(rows, q, dim=1))
        np.testing.assert_allclose(ours.numpy(), np.percentile(rows.numpy(), q * 100, axis=1))
    nan_row = rows.clone()
    nan_row[1, 5] = float("nan")
    assert quantile_linear(nan_row, 0.5).isnan().tolist() == [False, True, False]


def test_selection_inspection_and_nan_rows():
    nan = float("nan")
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.0], [0.8, 0.2, 0.95, 0.1], [nan] * 4], dtype=torch.float64)
    sel = select_features(scores, top_n=2)
    assert sel.bucket(0).tolist() == [1, 2] and sel.bucket(1).tolist() == [2, 0]
    assert sel.bucket(2).numel() == 0
    assert sel.union().tolist() == [0, 1, 2]
    table = sel.table()
    assert table[0][0] == 2 and table[0][1] == [0, 1] and table[0][2] == pytest.approx(0.95)
    assert [row[0] for row in table] == [2, 1, 0]
    assert select_features(scores, percentile=50).counts.tolist() == [2, 2, 0]
    # top-N never picks a latent scoring ≤ 0 (not more active on the concept than on its contrast)
    mixed = torch.tensor([[0.3, -0.2, 0.0, -0.1], [-0.5, -0.1, -0.3, 0.0]], dtype=torch.float64)
    few = select_features(mixed, top_n=3)
    assert few.bucket(0).tolist() == [0] and few.bucket(1).numel() == 0 and few.counts.tolist() == [1, 0]
    with pytest.raises(ValueError, match="exactly one"):
        select_features(scores)


def test_contrast_options():
    sae = make_sae()
    lib = build_library(sae)
    bg = concept_scores(lib, "dog", "background")
    assert not torch.allclose(bg, concept_scores(lib, "dog", "others"))
    assert torch.equal(concept_scores(lib, "dog", "auto"), concept_scores(lib, "dog", "others"))
    solo = ConceptLibrary.for_sae(sae)
    solo.accumulate("only", torch.rand(3, 64), 0.5)
    with pytest.raises(ValueError, match="background"):
        concept_scores(solo, "only", "others")
    with pytest.raises(UnknownConceptError):
        concept_scores(lib, "dog", ["nope"])


def test_worst_contrast_rejects_a_latent_one_other_concept_shares():
    """Pooling 9 other concepts dilutes a latent that only "heart" shares with "cross"; "worst" does not."""
    sae = make_sae(n=8)
    lib = ConceptLibrary.for_sae(sae, tau_grid=TauGrid(1))
    cross = torch.zeros(4, 8)
    cross[:, 0] = 4.0  # shared with heart
    cross[:, 1] = 1.0  # cross only
    heart = torch.zeros(4, 8)
    heart[:, 0] = 3.0
    heart[:, 2] = 1.0
    lib.accumulate("cross", cross, 0.5)
    lib.accumulate("heart", heart, 0.5)
    for i in range(8):  # eight unrelated concepts on latents 3..7
        filler = torch.zeros(4, 8)
        filler[:, 3 + i % 5] = 1.0
        lib.accumulate(f"other{i}", filler, 0.5)
    pooled = concept_scores(lib, "cross", "others")[0]
    worst = concept_scores(lib, "cross", "worst")[0]
    assert pooled.argmax() == 0  # the shared latent looks most cross-like against the pool
    assert worst.argmax() == 1 and worst[0] < worst[1]  # ... and not against heart alone
    assert select_features(worst[None], top_n=1).bucket(0).tolist() == [1]
    solo = ConceptLibrary.for_sae(sae)
    solo.accumulate("only", torch.rand(3, 8), 0.5)
    with pytest.raises(ValueError, match="only concept"):
        concept_scores(solo, "only", "worst")


# ---------------------------------------------------------------------------- calibration
def test_calibrate_threshold_exact_and_streaming():
    sae = make_sae()
    torch.manual_seed(6)
    x = torch.randn(600, 16)
    theta = calibrate_threshold(sae, x)
    pre = sae.pre_acts(x).detach()
    assert int((pre > theta).sum()) == 4 * 600  # mean L0 = k exactly
    cal = ThresholdCalibrator(sae)
    for chunk in x.split(100):
        cal.update(chunk)
    l0 = float((pre > cal.value).sum()) / 600
    assert abs(l0 - 4) < 0.04 and cal.tokens == 600
    lib = build_library(sae)
    lib.record_threshold(cal)
    assert lib.calibrated_threshold == cal.value and lib.calibration["target_l0"] == 4


def test_calibration_during_statistics_pass():
    sae = make_sae()
    lib = ConceptLibrary.for_sae(sae)
    cal = ThresholdCalibrator(sae, target_l0=8)
    torch.manual_seed(7)
    xs = [torch.randn(2, 10, 16) for _ in range(5)]
    for x in xs:
        lib.accumulate_activations("c", sae, x, torch.rand(2), calibrator=cal)
    pre = sae.pre_acts(torch.cat(xs)).detach()
    assert abs(float((pre > cal.value).sum()) / 100 - 8) < 0.1
