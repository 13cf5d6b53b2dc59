"""Diagnostics (#21): metrics with known answers, the paired capture, and `saeuron diagnose` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from saeuron_plugin.sae.diagnostics import (
    Effect,
    SampleMetrics,
    attention_entropy,
    auc,
    bootstrap_interval,
    cohens_d,
    cosine_drift,
    effective_rank,
    fraction_of_variance_unexplained,
    participation_ratio,
    relative_drift,
    top_singular_share,
    variance_kurtosis,
)
from saeuron_plugin.sae.probes import PairedEditor, PairLayout
from saeuron_plugin.sae.sites import CallContext


# ------------------------------------------------------------------------------ known answers
@pytest.mark.parametrize("n", [1, 4, 16])
def test_identity_has_full_rank_and_flat_spectrum(n):
    eye = torch.eye(n)
    assert effective_rank(eye).item() == pytest.approx(n, rel=1e-5)
    assert participation_ratio(eye).item() == pytest.approx(n, rel=1e-5)
    assert top_singular_share(eye).item() == pytest.approx(1 / n, rel=1e-5)


def test_rank_one_matrix_has_rank_one():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(32, 1, generator=gen) @ torch.randn(1, 16, generator=gen)
    assert effective_rank(m).item() == pytest.approx(1.0, abs=1e-3)
    assert participation_ratio(m).item() == pytest.approx(1.0, abs=1e-4)
    assert top_singular_share(m).item() == pytest.approx(1.0, abs=1e-4)


def test_metrics_are_batched_over_leading_dims():
    batch = torch.stack([torch.eye(8), torch.diag(torch.tensor([1.0] + [0.0] * 7))])
    assert effective_rank(batch).tolist() == pytest.approx([8.0, 1.0], abs=1e-3)


def test_kurtosis_of_known_distributions():
    gen = torch.Generator().manual_seed(0)
    gauss = torch.randn(1000, 1000, generator=gen)
    assert variance_kurtosis(gauss).item() == pytest.approx(3.0, abs=0.03)
    uniform = torch.rand(1000, 1000, generator=gen)
    assert variance_kurtosis(uniform).item() == pytest.approx(1.8, abs=0.02)  # 9/5


def test_attention_entropy_of_uniform_and_one_hot_maps():
    k = 7
    uniform = torch.full((5, k), 1.0 / k)
    assert attention_entropy(uniform).item() == pytest.approx(math.log(k), rel=1e-5)
    one_hot = torch.eye(k)[:5]
    assert attention_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)


def test_drifts_are_exactly_zero_for_equal_matrices_and_scale_free_for_cosine():
    x = torch.randn(3, 10, 4)
    assert torch.equal(relative_drift(x, x.clone()), torch.zeros(3))
    assert torch.equal(cosine_drift(x, x.clone()), torch.zeros(3))
    assert relative_drift(2 * x, x).tolist() == pytest.approx([1.0] * 3, rel=1e-5)
    assert cosine_drift(2 * x, x).abs().max().item() < 1e-6
    assert cosine_drift(-x, x).tolist() == pytest.approx([2.0] * 3, rel=1e-5)


def test_fvu_of_perfect_and_mean_reconstructions():
    x = torch.randn(2, 12, 5)
    assert torch.equal(fraction_of_variance_unexplained(x, x), torch.zeros(2))
    mean = x.mean(-2, keepdim=True).expand_as(x)
    assert fraction_of_variance_unexplained(x, mean).tolist() == pytest.approx([1.0, 1.0], rel=1e-5)


def test_effect_sizes_with_known_answers():
    assert cohens_d([4.0, 5.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(3.0)
    assert cohens_d([1.0, 1.0], [1.0, 1.0]) == 0.0
    assert cohens_d([2.0, 2.0], [1.0, 1.0]) == math.inf
    assert math.isnan(cohens_d([1.0], [2.0, 3.0]))
    assert auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert auc([1.0, 2.0], [1.0, 2.0]) == 0.5
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(200, generator=gen) + 1.0, torch.randn(200, generator=gen)
    low, high = bootstrap_interval(a, b, rounds=300)
    d = cohens_d(a, b)
    assert low < d < high and 0.6 < d < 1.4
    effect = Effect.between(a, b, rounds=100)
    assert effect.n_a == effect.n_b == 200 and 0.7 < effect.auc < 0.9


def test_sample_metrics_keep_per_sample_means_per_bucket():
    store = SampleMetrics(num_samples=3, num_buckets=2)
    store.add("s", "m", torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 2]), torch.tensor([0, 0, 1]))
    store.add("s", "m", torch.tensor([7.0]), torch.tensor([0]), torch.tensor([1]))
    table = store.table("s", "m")
    assert table[0].tolist() == [2.0, 7.0]
    assert torch.isnan(table[1]).all() and math.isnan(table[2, 0]) and table[2, 1] == 5.0
    assert store.per_sample("s", "m")[0].item() == 4.5


def test_paired_editor_edits_only_the_edited_twins():
    layout = PairLayout(pairs=2)
    seen = []

    def add_one(tokens, ctx):
        seen.append((tokens.shape[0], ctx.tau.tolist(), ctx.cond_mask.tolist()))
        return tokens + 1

    x = torch.zeros(8, 3, 2)  # CFG: [uncond: base 2, edited 2, cond: base 2, edited 2]
    tau = torch.arange(8.0) / 10
    mask = torch.tensor([False] * 4 + [True] * 4)
    out = PairedEditor(add_one, layout)(x, CallContext(tau, mask))
    assert out[:, 0, 0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert seen == [(4, pytest.approx([0.2, 0.3, 0.6, 0.7]), [False, False, True, True])]
    unchanged = PairedEditor(lambda t, ctx: t, layout)(x, CallContext(tau, mask))
    assert unchanged is x


# ------------------------------------------------------------------------------ paired capture
@pytest.fixture(scope="module")
def sd():
    from tiny_pipelines import tiny_sd_pipeline

    return tiny_sd_pipeline()


BLOCK = "unet.up_blocks.1.attentions.0"


def _cfg(**kw):
    from saeuron_plugin.diffusion.diagnose import DiagnoseConfig

    return DiagnoseConfig(num_inference_steps=3, batch_size=2, show_progress=False, **kw)


def test_nothing_selected_gives_bit_identical_twins(sd):
    from saeuron_plugin.diffusion.diagnose import run_pairs

    run = run_pairs(sd, ["a red star", "a blue cat", "x"], {}, _cfg())
    m = run.metrics
    assert len(run.order) == len(m.sites()) > 4
    for site in m.sites():
        for kind in ("relative_l2", "cosine", "attention_tv"):
            if (site, f"drift/{kind}") in m:
                assert torch.equal(m.table(site, f"drift/{kind}").nan_to_num(), torch.zeros(3, 5)), (
                    site,
                    kind,
                )
        for metric in ("effective_rank", "variance_kurtosis", "attention_entropy"):
            if (site, f"base/{metric}") in m:
                assert torch.equal(
                    m.per_sample(site, f"base/{metric}"), m.per_sample(site, f"edited/{metric}")
                )


def test_twins_without_cfg_are_not_taken_for_cfg_halves(sd):
    """guidance 1: the batch is [base, edited] with equal halves at the first step; not CFG rows."""
    from saeuron_plugin.diffusion.diagnose import run_pairs

    plain = run_pairs(sd, ["a red star", "a blue cat"], {}, _cfg(guidance_scale=1.0))
    assert torch.equal(
        plain.metrics.table(BLOCK, "drift/relative_l2").nan_to_num(), torch.zeros(2, 5).double()
    )
    run = run_pairs(sd, ["a red star"], {BLOCK: lambda t, ctx: t + 0.5}, _cfg(guidance_scale=1.0))
    assert (run.metrics.per_sample(BLOCK, "drift/relative_l2") > 0).all()


def test_an_edit_drifts_at_its_site_and_downstream_only_after_it_ran(sd):
    from saeuron_plugin.diagnostics.analysis import spread
    from saeuron_plugin.diffusion.diagnose import run_pairs

    run = run_pairs(sd, ["a red star", "a blue cat"], {BLOCK: lambda t, ctx: t + 0.5}, _cfg(tau_buckets=3))
    m = run.metrics
    at_edit = m.per_sample(BLOCK, "drift/relative_l2")
    assert (at_edit > 0.05).all()
    # sites before the edit in execution order see no change in the first step (τ ≈ 1: last bucket
    # holds steps 1 and 2 of 3; the very first call is exact, so the drift there is smaller than at the edit)
    first = run.order[0]
    assert (m.table(first, "drift/relative_l2")[:, -1] < at_edit).all()
    s = spread(run)
    assert s["edited"] == [BLOCK] and s["downstream"] and s["downstream"][0]["drift"] > 0


def test_attention_probe_matches_diffusers_attention_scores(sd):
    from saeuron_plugin.diffusion.diagnose import AttentionProbe
    from saeuron_plugin.sae.diagnostics import SampleMetrics
    from saeuron_plugin.sae.probes import PairObserver
    from saeuron_plugin.sae.tau import TauGrid

    attn = sd.unet.up_blocks[1].attentions[0].transformer_blocks[0].attn2
    observer = PairObserver("a", SampleMetrics(1, 1), PairLayout(1), TauGrid(1))
    probe = AttentionProbe(attn, observer, tracker=None)
    probe.remove()
    hidden, context = torch.randn(2, 16, attn.to_q.in_features), torch.randn(2, 5, attn.to_k.in_features)
    ours = probe.probabilities(hidden, context)
    q = attn.head_to_batch_dim(attn.to_q(hidden))
    k = attn.head_to_batch_dim(attn.to_k(context))
    theirs = attn.get_attention_scores(q, k).reshape(2, attn.heads, 16, 5)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_observer_refuses_a_batch_that_is_not_twin_shaped():
    from saeuron_plugin.sae.probes import PairObserver
    from saeuron_plugin.sae.tau import TauGrid

    observer = PairObserver("site", SampleMetrics(2, 1), PairLayout(2), TauGrid(1))
    with pytest.raises(RuntimeError, match="3 conditional rows for 2 sample pairs"):
        observer(torch.zeros(3, 4, 2), CallContext())


# ------------------------------------------------------------------------------ the command
def test_saeuron_diagnose_on_the_shipped_model(tmp_path, capsys):
    """Smoke test of the acceptance command, at a reduced size (2 prompts, 4 steps)."""
    from saeuron_plugin.cli import main

    out = tmp_path / "diag"
    shipped = ["--model", "checkpoints/shapescanvas-sd", "--sae", "checkpoints/shapescanvas-saeuron"]
    options = "--concept red -n 2 --steps 4 --batch-size 2 --strength 1 --strength 3 --judge shapescanvas"
    code = main(["diagnose", *shipped, *options.split(), "--tau-buckets", "2", "--out", str(out)])
    assert code == 0
    blob = json.loads((out / "diagnostics.json").read_text())
    red = blob["concepts"]["red"]
    assert set(red["conditions"]) == {"concept", "concept@3x", "retained"}
    assert red["ranking"] and all(r["metric"] for r in red["ranking"])
    concept = red["conditions"]["concept"]
    assert concept["edited_sites"] and concept["spread"]["edited"]
    assert concept["drift"]["relative_l2"][concept["edited_sites"][0]]["mean"] > 0
    assert set(red["off_distribution"]) >= {"concept", "concept@3x", "pooled"}
    assert 0.0 <= red["clean_rate"]["concept"] <= 1.0
    assert (out / "red-drift.png").stat().st_size > 0 and (out / "diagnostics.md").read_text().startswith(
        "# Diag"
    )
    assert "diagnose:" in capsys.readouterr().out


def test_saeuron_diagnose_refuses_an_unknown_concept_before_loading(tmp_path, capsys):
    from saeuron_plugin.cli import main

    code = main(
        [
            "diagnose",
            "--model",
            str(tmp_path / "no-model"),
            "--sae",
            "checkpoints/shapescanvas-saeuron",
            "--concept",
            "unicorn",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert "unicorn" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the VLM adapter
@pytest.fixture(scope="module")
def vlm():
    from saeuron_plugin.shapescanvas.vlm import load_vlm, question_inputs, random_renders
    from saeuron_plugin.vlm.unlearn import VLMUnlearner

    model, processor = load_vlm("checkpoints/shapescanvas-vlm")
    renders = random_renders(6, seed=5)
    batch = question_inputs(processor, renders.images, "color")
    inputs = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(len(renders))]
    return model, VLMUnlearner.from_pretrained("checkpoints/shapescanvas-vlm-saeuron"), inputs


def test_vlm_pairs_drift_only_at_and_after_the_edited_layer(vlm):
    from saeuron_plugin.vlm.diagnose import run_pairs

    model, _, inputs = vlm
    plain = run_pairs(model, inputs[:2], {}, show_progress=False)
    for site in plain.order:
        assert torch.equal(plain.metrics.table(site, "drift/relative_l2"), torch.zeros(2, 1))
    layer = "model.language_model.layers.1"
    run = run_pairs(
        model, inputs[:2], {layer: lambda t, ctx: t + 0.25}, tokens={layer: "all"}, show_progress=False
    )
    drift = [float(run.metrics.per_sample(s, "drift/relative_l2").mean()) for s in run.order]
    at = run.order.index(layer)
    assert drift[:at] == [0.0] * at  # one forward, no time axis: upstream layers are untouched, exactly
    assert all(d > 0 for d in drift[at:])


def test_diagnose_vlm_with_the_shipped_bundle(vlm):
    from saeuron_plugin.diagnostics.commands import diagnose_vlm

    model, bundle, inputs = vlm
    summary = diagnose_vlm(model, bundle, "red", inputs[:3], inputs[3:], show_progress=False, rounds=50)
    concept = summary["conditions"]["concept"]
    assert set(concept["edited_sites"]) == set(bundle.plan(["red"]))
    assert summary["ranking"] and concept["drift"]["relative_l2"]
    edited = concept["edited_sites"][0]
    assert concept["drift"]["relative_l2"][edited]["mean"] > 0
