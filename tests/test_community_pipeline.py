"""The single-file community pipeline loads through ``custom_pipeline=`` and unlearns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from test_unlearn import BLOCK, images, make_eraser
from tiny_pipelines import tiny_sd_pipeline

PIPELINE_FILE = Path(__file__).resolve().parents[1] / "pipelines" / "saeuron_stable_diffusion.py"


def test_custom_pipeline_loads_and_unlearns(tmp_path):
    base = tiny_sd_pipeline()
    base.save_pretrained(tmp_path / "model")
    eraser = make_eraser(base, [BLOCK])
    eraser.set_defaults("red", top_n=4, gamma=-20.0)
    eraser.save_pretrained(tmp_path / "bundle")

    pipe = DiffusionPipeline.from_pretrained(
        tmp_path / "model", custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "SAeUronStableDiffusionPipeline"
    plain = images(base)
    assert torch.equal(images(pipe), plain)  # without unlearn: plain SD
    with pytest.raises(ValueError, match="needs an SAE bundle"):
        images(pipe, unlearn=["red"])
    edited = images(pipe, sae=str(tmp_path / "bundle"), unlearn=["red"])
    assert not torch.equal(edited, plain)
    with eraser.unlearn(base, "red"):
        assert torch.equal(images(base), edited)  # the same edit as the package API
    assert torch.equal(images(pipe), plain)  # removed after the call
    assert pipe.sae is not None and pipe.sae.concepts == ["red", "blue"]
