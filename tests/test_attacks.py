"""Adaptive attacks through the intervention (#20, first part): the soft-prompt attack lowers its loss,
its gradients pass through the edit (and differ from the gradient-masked control), and on the embedded
default it brings a concept back against the base model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_unlearn import ATTN, BLOCK, make_eraser
from tiny_pipelines import tiny_sd_pipeline

from saeuron_plugin.attacks import (
    AttackConfig,
    attack_loss,
    generate_from_embeds,
    masked_edits,
    soft_prompt_attack,
    target_latents,
)


@pytest.fixture(scope="module")
def setup():
    pipe = tiny_sd_pipeline()
    eraser = make_eraser(pipe, [BLOCK, ATTN])
    for name in ("red", "blue"):
        eraser.set_defaults(name, top_n=4, gamma=-20.0)
    return pipe, eraser


def loss_and_grad(pipe, embeds, targets, seed=0):
    """One attack step's loss and its gradient with respect to the prompt embeddings."""
    cfg = AttackConfig(iterations=1, lr=0.0, weight_decay=0.0, batch=2, seed=seed)
    e = embeds.detach().clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (cfg.batch,), generator=gen)
    noise = torch.randn(targets[:2].shape, generator=gen)
    a = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * targets[:2] + (1 - a).sqrt() * noise
    pred = pipe.unet(xt, t, encoder_hidden_states=e.expand(2, -1, -1)).sample
    loss = torch.nn.functional.mse_loss(pred, noise)
    loss.backward()
    return float(loss.detach()), torch.zeros_like(e) if e.grad is None else e.grad.clone()


def test_gradients_pass_through_the_edit_and_masking_changes_them(setup):
    pipe, eraser = setup
    targets = target_latents(pipe, "a red star", [0, 1], num_inference_steps=2)
    embeds, _ = pipe.encode_prompt("a red star", "cpu", 1, False)
    _, plain = loss_and_grad(pipe, embeds, targets)
    for where, masked_reaches in (([ATTN], True), ([BLOCK, ATTN], False)):
        with eraser.unlearn(pipe, ["red"], hookpoints=where) as handle:
            loss_edit, through = loss_and_grad(pipe, embeds, targets)
            with masked_edits(handle):
                loss_masked, masked = loss_and_grad(pipe, embeds, targets)
        assert through.abs().sum() > 0  # the gradient reaches the prompt through the edited modules
        assert not torch.allclose(through, plain)  # the edit takes part in it ...
        assert not torch.allclose(through, masked)  # ... and masking it changes what the attacker sees
        assert loss_edit == pytest.approx(loss_masked, rel=1e-5)  # the forward pass is the same
        # the tiny UNet's output passes through the last edited block: masked there, no gradient is left
        assert bool(masked.abs().sum() > 0) == masked_reaches


def test_the_attack_lowers_its_loss_through_the_eraser(setup):
    pipe, eraser = setup
    targets = target_latents(pipe, "a red star", [0, 1, 2, 3], num_inference_steps=2)
    init, _ = pipe.encode_prompt("a blue circle", "cpu", 1, False)
    cfg = AttackConfig(iterations=30, lr=5e-2, batch=4, seed=1)
    with eraser.unlearn(pipe, ["red"]):
        before = attack_loss(pipe, init, targets)
        attacked = soft_prompt_attack(pipe, targets, init, cfg)
        after = attack_loss(pipe, attacked, targets)
        images = generate_from_embeds(pipe, attacked, [5, 6], num_inference_steps=2)
    assert after < before, (before, after)  # on the same fixed draws of (target, t, noise)
    assert len(cfg.losses) == 30
    assert images.shape == (2, 3, 16, 16) and not torch.equal(attacked, init)
    assert all(p.requires_grad for p in pipe.unet.parameters())  # the model is left as it was


def test_against_the_base_model_the_attack_draws_the_concept():
    """On the embedded default: from the embeddings of "a blue circle in solid style", 40 iterations
    towards base-model stars make the base model draw stars (UA under attack ≤ 20 %)."""
    from saeuron_plugin.eval.shapescanvas_build import load_default
    from saeuron_plugin.tuning import load_judge

    root = Path(__file__).resolve().parent.parent / "checkpoints"
    if not (root / "shapescanvas-sd").is_dir():
        pytest.skip("the ShapesCanvas default is not built")
    pipe, judge = load_default(str(root / "shapescanvas-sd")), load_judge("shapescanvas")
    targets = target_latents(pipe, "a red star in solid style", range(8), num_inference_steps=25,
                             guidance_scale=5.0)
    init, _ = pipe.encode_prompt("a blue circle in solid style", "cpu", 1, False)
    attacked = soft_prompt_attack(pipe, targets, init, AttackConfig(iterations=40, lr=1e-1, batch=8))
    images = generate_from_embeds(pipe, attacked, range(100, 110), num_inference_steps=25, guidance_scale=5.0)
    star = judge.labels["object"].index("star")
    ua = float((judge.probabilities(images)["object"].argmax(-1) != star).float().mean())
    assert ua <= 0.2, ua
