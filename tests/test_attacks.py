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
    project_to_simplex,
    soft_prompt_attack,
    target_latents,
    token_prompt_attack,
    unlearndiffatk,
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
    xt = (a.sqrt() * targets[:2].float() + (1 - a).sqrt() * noise).to(pipe.unet.dtype)
    pred = pipe.unet(xt, t, encoder_hidden_states=e.expand(2, -1, -1)).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
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


def test_gradients_pass_through_the_edit_in_bf16(setup):
    """The same check with the pipeline in bfloat16 (the SAEs stay fp32): the edit is differentiable
    in the dtype users attack in, and its gradient is finite."""
    _, eraser = setup
    pipe = tiny_sd_pipeline().to(torch.bfloat16)
    targets = target_latents(pipe, "a red star", [0, 1], num_inference_steps=2).to(torch.bfloat16)
    embeds, _ = pipe.encode_prompt("a red star", "cpu", 1, False)
    _, plain = loss_and_grad(pipe, embeds, targets)
    with eraser.unlearn(pipe, ["red"], hookpoints=[ATTN]) as handle:
        _, through = loss_and_grad(pipe, embeds, targets)
        with masked_edits(handle):
            _, masked = loss_and_grad(pipe, embeds, targets)
    assert through.dtype == torch.bfloat16 and bool(torch.isfinite(through).all())
    assert through.abs().sum() > 0 and not torch.equal(through, plain) and not torch.equal(through, masked)


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


def test_the_token_level_attack_goes_through_the_text_encoder_and_the_edit(setup):
    """The soft prompt on the token embeddings lowers its loss through the eraser, returns what the
    text encoder makes of them (snapshots too), and leaves the text encoder and UNet as they were."""
    pipe, eraser = setup
    targets = target_latents(pipe, "a red star", [0, 1, 2, 3], num_inference_steps=2)
    table = pipe.text_encoder.get_input_embeddings()
    weights = table.weight.detach().clone()
    cfg = AttackConfig(iterations=30, lr=5e-2, batch=4, seed=1, record_at=(0, 30))
    init, _ = pipe.encode_prompt("a blue circle", "cpu", 1, False)
    with eraser.unlearn(pipe, ["red"]):
        attacked = token_prompt_attack(pipe, targets, "a blue circle", cfg)
        assert attack_loss(pipe, attacked, targets) < attack_loss(pipe, init, targets)
    assert len(cfg.losses) == 30 and attacked.shape == init.shape
    torch.testing.assert_close(cfg.snapshots[0], init)  # the start: the caption's own embeddings
    torch.testing.assert_close(cfg.snapshots[30], attacked)
    # a text-encoder output: it went through the final layer norm, so every token has its scale
    norms = attacked.norm(dim=-1)
    assert torch.allclose(norms, init.norm(dim=-1), rtol=0.2) and not torch.allclose(attacked, init)
    assert torch.equal(table.weight, weights) and not table._forward_hooks  # nothing left behind
    assert all(p.requires_grad for m in (pipe.unet, pipe.text_encoder) for p in m.parameters())


def test_a_failing_attack_leaves_the_models_as_they_were(setup):
    """An error inside the loop (here: targets the UNet cannot take) removes the attack's hook and gives
    back every parameter's gradient flag and every submodule's train / eval mode."""
    pipe, _ = setup
    table = pipe.text_encoder.get_input_embeddings()
    pipe.unet.train()
    pipe.unet.conv_in.eval()  # a submodule in another mode than its parent
    wrong = torch.zeros(2, 3, 8, 8)  # the tiny UNet takes 4 channels
    try:
        for attack in (
            lambda: token_prompt_attack(pipe, wrong, "a red star", AttackConfig(iterations=2, batch=2)),
            lambda: soft_prompt_attack(
                pipe, wrong, torch.zeros(1, 77, 32), AttackConfig(iterations=2, batch=2)
            ),
        ):
            with pytest.raises(RuntimeError):
                attack()
            assert not table._forward_hooks
            assert pipe.unet.training and not pipe.unet.conv_in.training and pipe.unet.conv_out.training
            assert all(p.requires_grad for m in (pipe.unet, pipe.text_encoder) for p in m.parameters())
    finally:
        pipe.unet.eval()


def test_the_attacks_run_in_bf16():
    """A half-precision pipeline takes the attacks' latents and conditioning in its own dtype; the
    returned conditioning is fp32 and the loss finite."""
    pipe = tiny_sd_pipeline().to(torch.bfloat16)
    targets = target_latents(pipe, "a red star", [0, 1], num_inference_steps=2)
    init, _ = pipe.encode_prompt("a blue circle", "cpu", 1, False)
    for attacked in (
        soft_prompt_attack(pipe, targets, init, cfg := AttackConfig(iterations=2, batch=2)),
        token_prompt_attack(pipe, targets, "a blue circle", cfg),
    ):
        assert attacked.dtype == torch.float32 and bool(torch.isfinite(attacked).all())
        assert len(cfg.losses) == 2 and all(torch.isfinite(torch.tensor(cfg.losses)))


def test_against_the_base_model_the_attack_draws_the_concept():
    """On the embedded default: from the embeddings of "a blue circle in solid style", 40 iterations
    towards base-model stars make the base model draw stars (UA under attack ≤ 20 %)."""
    from saeuron_plugin.shapescanvas.build import load_default
    from saeuron_plugin.tuning import load_judge

    root = Path(__file__).resolve().parent.parent / "checkpoints"
    if not (root / "shapescanvas-sd").is_dir():
        pytest.skip("the ShapesCanvas default is not built")
    pipe, judge = load_default(str(root / "shapescanvas-sd")), load_judge("shapescanvas")
    targets = target_latents(
        pipe, "a red star in solid style", range(8), num_inference_steps=25, guidance_scale=5.0
    )
    init, _ = pipe.encode_prompt("a blue circle in solid style", "cpu", 1, False)
    attacked = soft_prompt_attack(pipe, targets, init, AttackConfig(iterations=40, lr=1e-1, batch=8))
    images = generate_from_embeds(pipe, attacked, range(100, 110), num_inference_steps=25, guidance_scale=5.0)
    star = judge.labels["object"].index("star")
    ua = float((judge.probabilities(images)["object"].argmax(-1) != star).float().mean())
    assert ua <= 0.2, ua


def test_simplex_projection():
    v = torch.tensor([[0.2, 0.3, 0.5], [2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    p = project_to_simplex(v)
    assert torch.allclose(p.sum(-1), torch.ones(3)) and bool((p >= 0).all())
    assert torch.allclose(p[0], v[0])  # already on the simplex
    assert torch.allclose(p[1], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(p[2], torch.full((3,), 1 / 3))
    rows = torch.randn(50, 7, generator=torch.Generator().manual_seed(0)) * 3
    proj = project_to_simplex(rows)
    assert torch.allclose(proj.sum(-1), torch.ones(50), atol=1e-5) and bool((proj >= 0).all())
    # the projection is the closest point: no other simplex point (random samples) is closer
    others = torch.distributions.Dirichlet(torch.ones(7)).sample((200,))
    for r, q in zip(rows[:5], proj[:5]):
        assert float((r - q).norm()) <= float((r - others).norm(dim=-1).min()) + 1e-6


def test_unlearndiffatk_returns_a_typed_prompt_and_lowers_the_relaxed_loss(setup):
    pipe, eraser = setup
    targets = target_latents(pipe, "a red star", [0, 1, 2, 3], num_inference_steps=2)
    cfg = AttackConfig(iterations=25, lr=5e-2, batch=4, seed=2)
    with eraser.unlearn(pipe, ["red"]):
        prompt = unlearndiffatk(pipe, targets, "a star", cfg, prefix_tokens=3)
    assert prompt.endswith("a star") and len(prompt) > len("a star")
    assert len(cfg.losses) == 25 and min(cfg.losses[-5:]) < max(cfg.losses[:5])
    assert all(p.requires_grad for m in (pipe.unet, pipe.text_encoder) for p in m.parameters())
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks  # the prefix hook is gone


def test_a_fully_masked_attacker_is_blind_and_says_so(setup):
    """With the last edited block masked, no gradient reaches the prompt: the attack runs, records its
    losses and returns the prompt it started from."""
    pipe, eraser = setup
    targets = target_latents(pipe, "a red star", [0, 1], num_inference_steps=2)
    init, _ = pipe.encode_prompt("a blue circle", "cpu", 1, False)
    cfg = AttackConfig(iterations=3, batch=2)
    with eraser.unlearn(pipe, ["red"], hookpoints=[BLOCK, ATTN]) as handle, masked_edits(handle):
        out = soft_prompt_attack(pipe, targets, init, cfg)
    assert torch.equal(out, init.detach().float()) and len(cfg.losses) == 3


def test_snapshots_are_the_prompt_after_each_recorded_iteration(setup):
    pipe, eraser = setup
    targets = target_latents(pipe, "a red star", [0, 1], num_inference_steps=2)
    init, _ = pipe.encode_prompt("a blue circle", "cpu", 1, False)
    cfg = AttackConfig(iterations=4, lr=5e-2, batch=2, seed=3, record_at=(0, 2, 4))
    with eraser.unlearn(pipe, ["red"]):
        final = soft_prompt_attack(pipe, targets, init, cfg)
        again = AttackConfig(iterations=2, lr=5e-2, batch=2, seed=3)
        after_two = soft_prompt_attack(pipe, targets, init, again)
    assert sorted(cfg.snapshots) == [0, 2, 4]
    assert torch.equal(cfg.snapshots[0], init) and torch.equal(cfg.snapshots[4], final)
    assert torch.equal(cfg.snapshots[2], after_two)  # the same run stopped after 2 steps


def test_guidance_is_the_samplers_guided_prediction_and_sld_as_diffusers_computes_it():
    """The attack loss for defences in the guidance: negative prompting is CFG against the negative
    prompt's branch; with a safety concept, SLD's Eqs. 3-6 as diffusers' ``StableDiffusionPipelineSafe``
    computes them on its first step (zero momentum, after the warm-up)."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionPipelineSafe

    from saeuron_plugin.attacks import Guidance

    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(8, 4, generator=gen)

    def unet(x, t, encoder_hidden_states):  # any prediction that depends on the conditioning
        return SimpleNamespace(sample=x + (encoder_hidden_states.mean(1) @ weights).view(-1, 4, 1, 1))

    xt, t = torch.randn(3, 4, 2, 2, generator=gen), torch.zeros(3, dtype=torch.long)
    neg, safety, prompt = (torch.randn(1, 5, 8, generator=gen) for _ in range(3))
    cond = unet(xt, t, prompt.expand(3, -1, -1)).sample
    uncond = unet(xt, t, neg.expand(3, -1, -1)).sample
    safe = unet(xt, t, safety.expand(3, -1, -1)).sample
    assert torch.allclose(Guidance(7.0, neg).apply(unet, xt, t, cond), uncond + 7.0 * (cond - uncond))
    for s_s, lam in ((1000.0, 0.01), (5.0, 1.0)):
        direction, _ = StableDiffusionPipelineSafe.perform_safety_guidance(
            None, True, None, cond - uncond, [cond, uncond, safe], 5, s_s, 0, lam, 0.3, 0.4
        )
        guided = Guidance(7.0, neg, safety, s_s, lam).apply(unet, xt, t, cond)
        assert torch.allclose(guided, uncond + 7.0 * direction, atol=1e-6)
        assert not torch.allclose(guided, uncond + 7.0 * (cond - uncond))  # the safety term acts


def test_an_attack_on_negative_prompting_optimises_the_guided_loss(setup):
    """With ``AttackConfig.guidance`` the soft prompt lowers the loss of the guided prediction (the
    one the negative-prompted sampler uses), and its gradient differs from the conditional loss's."""
    from saeuron_plugin.attacks import Guidance

    pipe, _ = setup
    targets = target_latents(pipe, "a red star", [0, 1], num_inference_steps=2)
    init, _ = pipe.encode_prompt("a blue circle", "cpu", 1, False)
    negative, _ = pipe.encode_prompt("a red star", "cpu", 1, False)
    guidance = Guidance(5.0, negative)
    cfg = AttackConfig(iterations=15, lr=5e-2, batch=2, seed=0, guidance=guidance)
    attacked = soft_prompt_attack(pipe, targets, init, cfg)
    assert attack_loss(pipe, attacked, targets, guidance=guidance) < attack_loss(
        pipe, init, targets, guidance=guidance
    )
    plain = soft_prompt_attack(pipe, targets, init, AttackConfig(iterations=15, lr=5e-2, batch=2, seed=0))
    assert not torch.allclose(attacked, plain)


def test_robustness_benchmark_smoke(tmp_path, capsys):
    """The benchmark end to end on the shipped model: 1 concept, 2 iterations, 4 steps; the bundle at its
    tuned hookpoints and in its robust mode, and UCE at its equal-tuning setting, attacked too."""
    from saeuron_plugin.benchmark import robustness

    out = tmp_path / "robustness.json"
    robustness.main(
        [
            *("--concepts", "red", "--iterations", "2", "--steps", "4", "--out", str(out)),
            *("--baselines", "uce", "negative_prompt", "sld"),
        ]
    )
    import json

    blob = json.loads(out.read_text())
    methods = ("saeuron", "saeuron_robust", "uce", "negative_prompt")
    from saeuron_plugin.benchmark.unlearning import saved_setting

    for method in ("uce", "negative_prompt", "sld"):  # equal tuning
        assert blob["protocol"]["baselines"][method] == {"red": saved_setting(method, "red")}
    sld = blob["sld"]["red"]  # text prompts only: the typed attack, through SLD's guidance
    assert "ua_adaptive" not in sld and sld["unlearndiffatk_prompt"].endswith("a red square in solid style")
    assert set(blob["methods"]["sld"]["colors"]["ua_attack"]) == {"unlearndiffatk", "typed_worst_case"}
    for method in methods:
        row = blob[method]["red"]
        assert set(row["curve_adaptive"]) == {"0"} and 0 <= row["ua_adaptive"] <= 100
        assert row["unlearndiffatk_prompt"].endswith("a red square in solid style")
    assert "ua_masked" in blob["saeuron_robust"]["red"] and blob["protocol"]["curve_iterations"] == [0]
    for method in methods:  # transfer and retention under the same settings, per domain too
        row, colors = blob[method]["red"], blob["methods"][method]["colors"]
        assert 0 <= row["ua_transfer"] <= 100 and 0 <= row["ira"] <= 100 and 0 <= row["cra"] <= 100
        assert set(colors["ua_attack"]) == {"unlearndiffatk", "typed_worst_case", "soft_prompt", "transfer"}
        assert colors["ua_attack"]["typed_worst_case"] == min(row["ua_clean"], row["ua_unlearndiffatk"])
        assert colors["ua_clean"] == row["ua_clean"] and colors["concepts"] == 1
    assert out.with_suffix(".png").stat().st_size > 0
    text = out.with_suffix(".md").read_text()
    assert "| SAeUron, robust mode | colors | 1 |" in text and "| red | UCE |" in text
    assert "| SLD | colors | 1 |" in text and "n/a" in text and "| red | negative prompt |" in text
    assert "commit" in blob["protocol"]["run"] and "cores" in blob["protocol"]["run"]  # how it ran
    assert blob["protocol"]["concepts_done"] == "1 of 1"  # written after each concept
    from saeuron_plugin import SAeUron

    shipped = SAeUron.from_pretrained("checkpoints/shapescanvas-saeuron")
    robust_at = blob["protocol"]["robust_settings"]["red"]
    assert sorted(robust_at) == sorted(shipped.active_hookpoints("red", robust=True))
    for hp, (percentile, gamma) in robust_at.items():  # the setting each robust hookpoint ablates with
        d = shipped.hookpoints[hp].library.selection_defaults("red")
        assert (percentile, gamma) == (d.percentile, d.gamma)


def test_the_baselines_robustness_stage_is_only_run_at_the_searchs_protocol(tmp_path, capsys):
    """``--baselines-at robust`` runs UCE's robustness stage from the saved search; at another protocol
    than the search's it would search again, so it stops with a clear error before any attack."""
    from saeuron_plugin.benchmark import robustness

    argv = "--concepts red --steps 4 --baselines uce --baselines-at robust --no-saeuron --out"
    with pytest.raises(ValueError, match="another protocol"):
        robustness.main([*argv.split(), str(tmp_path / "r.json")])
    with pytest.raises(ValueError, match="nothing to attack"):
        robustness.main(["--concepts", "red", "--no-saeuron", "--baselines", "--out", str(tmp_path)])
    from saeuron_plugin.cli import main

    assert main(["eval", "--baselines-at", "robust", "--out", str(tmp_path)]) != 0
    assert "--baselines-at robust is for --robustness" in capsys.readouterr().err


def test_saeuron_eval_robustness_runs_the_same_benchmark(tmp_path, monkeypatch):
    """``saeuron eval --robustness`` maps the unlearning benchmark's options onto this one's: the other
    methods are the attacked baselines, the first seed the attack seed, the output in ``--out``."""
    from saeuron_plugin.benchmark import robustness
    from saeuron_plugin.cli import main

    seen = {}
    monkeypatch.setattr(robustness, "run_from_args", lambda args: seen.setdefault("args", args))
    argv = "eval --robustness --methods saeuron uce sld --concepts star red --seeds 3 --iterations 7"
    assert main([*argv.split(), "--out", str(tmp_path), "--steps", "4"]) == 0
    args = seen["args"]
    assert (args.baselines, args.concepts, args.seed, args.iterations, args.steps) == (
        ["uce", "sld"],
        ["star", "red"],
        3,
        7,
        4,
    )
    assert args.out == str(tmp_path / "robustness.json") and args.bundle == robustness.BUNDLE


def test_saeuron_attack_command_on_the_shipped_model(tmp_path, capsys):
    import json

    from saeuron_plugin.cli import main

    out = tmp_path / "attack.json"
    for method in ("soft", "token", "unlearndiffatk"):
        argv = (
            "attack --model checkpoints/shapescanvas-sd --sae checkpoints/shapescanvas-saeuron --concept red"
        )
        code = main(
            [
                *argv.split(),
                "--judge",
                "shapescanvas",
                "--method",
                method,
                "--iterations",
                "2",
                "--images",
                "2",
                "--steps",
                "4",
                "--out",
                str(out),
            ]
        )
        assert code == 0
        result = json.loads(out.read_text())
        assert (
            result["method"] == method
            and 0 <= result["ua_attacked"] <= 100
            and 0 <= result["ua_clean"] <= 100
        )
        assert len(result["loss_first_last"]) == 2
    assert result["attack_prompt"].endswith(result["prompt"])
    assert (
        main(
            [
                "attack",
                "--model",
                "x",
                "--sae",
                "checkpoints/shapescanvas-saeuron",
                "--concept",
                "unicorn",
                "--judge",
                "shapescanvas",
            ]
        )
        == 2
    )  # unknown to the judge: refused before any model loads


def test_an_untuned_baseline_setting_is_a_clear_error(tmp_path):
    from saeuron_plugin.benchmark.unlearning import saved_setting

    with pytest.raises(FileNotFoundError, match=r"benchmarks/unlearning\.py --methods uce --concepts star"):
        saved_setting("uce", "star", tmp_path)
    (tmp_path / "uce.json").write_text('{"concepts": {"star": {"best": {"setting": {"erase_scale": 3.0}}}}}')
    assert saved_setting("uce", "star", tmp_path) == {"erase_scale": 3.0}
    from saeuron_plugin.errors import BadFileError

    (tmp_path / "uce.json").write_text('{"concepts": ')  # truncated: the same reader as the search's
    with pytest.raises(BadFileError, match=r"uce\.json"):
        saved_setting("uce", "star", tmp_path)
