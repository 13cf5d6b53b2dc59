"""The `saeuron` command: train from a store, inspect, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from saeuron_plugin.cli import build_parser, main
from saeuron_plugin.sae.model import SparseAutoencoder
from saeuron_plugin.sae.store import ActivationStore


def test_every_command_has_help(capsys):
    parser = build_parser()
    for name in ("collect", "train", "generate", "info", "demo", "concept"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0
        assert "usage: saeuron" in capsys.readouterr().out


def test_train_then_info(tmp_path, capsys):
    store = ActivationStore.create(tmp_path / "acts", d_in=8, metadata={"hookpoint": "unet.x"})
    store.append(torch.randn(1024, 8), tau=torch.rand(1024))
    store.flush()
    out = tmp_path / "sae"
    assert (
        main(
            [
                "train",
                "--activations",
                str(tmp_path / "acts"),
                "--out",
                str(out),
                "--k",
                "2",
                "--num-latents",
                "32",
                "--batch-size",
                "128",
                "--steps",
                "20",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 20 and summary["threshold"] > 0
    sae = SparseAutoencoder.from_pretrained(out)
    assert sae.cfg.hookpoint == "unet.x" and sae.num_latents == 32
    assert main(["info", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["fingerprint"] == sae.fingerprint()


def test_missing_store_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--activations", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "saeuron train: error:" in capsys.readouterr().err


def test_diffusion_commands_end_to_end(tmp_path, capsys):
    """collect → train → concept add / list / show → generate --compare, on a tiny saved pipeline."""
    from tiny_pipelines import tiny_sd_pipeline

    model = tmp_path / "model"
    tiny_sd_pipeline().save_pretrained(model)
    hp = "unet.up_blocks.1.attentions.1"
    common = ["--model", str(model), "--steps", "2"]
    assert (
        main(
            [
                "collect",
                *common,
                "--hookpoint",
                hp,
                "--prompt",
                "a red star",
                "--prompt",
                "a blue square",
                "--out",
                str(tmp_path / "acts"),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["rows"][hp] == 2 * 2 * 64
    bundle = tmp_path / "bundle"
    assert (
        main(
            [
                "train",
                "--activations",
                str(tmp_path / "acts" / hp),
                "--out",
                str(bundle / hp),
                "--k",
                "4",
                "--num-latents",
                "64",
                "--batch-size",
                "64",
                "--steps",
                "10",
            ]
        )
        == 0
    )
    capsys.readouterr()
    prompts = tmp_path / "red.txt"
    prompts.write_text("# red things\na red star\n\na red square\n")
    assert (
        main(["concept", "add", *common, "--sae", str(bundle), "--name", "red", "--prompts", str(prompts)])
        == 0
    )
    assert (
        main(["concept", "add", *common, "--sae", str(bundle), "--name", "blue", "--prompt", "a blue star"])
        == 0
    )
    capsys.readouterr()
    assert main(["concept", "list", "--sae", str(bundle)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["concept"] for r in listed] == ["red", "blue"] and listed[0]["prompts"] == 2
    assert main(["concept", "show", "--sae", str(bundle), "--name", "red", "--top-n", "2"]) == 0
    shown = capsys.readouterr().out
    assert hp in shown and "latents selected over 50 τ buckets" in shown
    out = tmp_path / "images"
    assert (
        main(
            [
                "generate",
                *common,
                "--sae",
                str(bundle),
                "--unlearn",
                "red",
                "--strength",
                "20",
                "--prompt",
                "a red star",
                "--out",
                str(out),
                "--compare",
            ]
        )
        == 0
    )
    written = json.loads(capsys.readouterr().out)["images"]
    assert {p.rsplit("/", 1)[1] for p in written} == {"0000_unlearned.png", "0000_compare.png"}
    assert main(["concept", "show", "--sae", str(bundle), "--name", "green"]) == 2
    assert "unknown concept 'green'" in capsys.readouterr().err
    replace = ["generate", *common, "--sae", str(bundle), "--unlearn", "red", "--prompt", "a red star"]
    assert main([*replace, "--target", "green", "--out", str(out)]) == 2  # checked before loading
    assert "unknown concept 'green'" in capsys.readouterr().err
    assert main([*replace, "--target", "blue", "--out", str(tmp_path / "replaced")]) == 0
    assert json.loads(capsys.readouterr().out)["images"][0].endswith("0000_unlearned.png")


def test_train_options_come_from_the_config_and_vlm_train_is_an_alias(capsys):
    from saeuron_plugin.sae.train import TrainConfig

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr-warmup-steps" in text and "Linear warm-up steps before the linear decay to zero." in text
    assert "--no-batch-topk, --per-token-topk" in text and "--dead-tokens" in text
    args = parser.parse_args(
        [
            "train",
            "--activations",
            "a",
            "--out",
            "o",
            "--k",
            "8",
            "--per-token-topk",
            "--encoder",
            "threshold",
        ]
    )
    from saeuron_plugin.cli_config import dataclass_from_args

    cfg = dataclass_from_args(TrainConfig, args)
    assert (cfg.k, cfg.batch_topk, cfg.encoder, cfg.lr) == (8, False, "threshold", None)
    vlm = parser.parse_args(["vlm", "train", "--activations", "a", "--out", "o", "--resume"])
    assert vlm.resume and vlm.command_name == "vlm train"
