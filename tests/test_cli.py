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
    for name in ("train", "info", "demo"):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0
        assert "usage: saeuron" in capsys.readouterr().out


def test_train_then_info(tmp_path, capsys):
    store = ActivationStore.create(tmp_path / "acts", d_in=8, metadata={"hookpoint": "unet.x"})
    store.append(torch.randn(1024, 8), tau=torch.rand(1024))
    store.flush()
    out = tmp_path / "sae"
    assert main(["train", "--activations", str(tmp_path / "acts"), "--out", str(out), "--k", "2",
                 "--num-latents", "32", "--batch-size", "128", "--steps", "20"]) == 0
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
