"""``saeuron vlm collect | concept | ask`` and ``saeuron train`` on a tiny LLaVA saved to disk (offline)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

torch.set_num_threads(1)

from tiny_vlms import image, tiny_llava  # noqa: E402

from saeuron_plugin import cli  # noqa: E402
from saeuron_plugin.vlm import commands  # noqa: E402

LAYER = "model.language_model.layers.1"


def _parse(build, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    build(p)
    return p.parse_args(argv)


def _run(build, handler, argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert handler(_parse(build, argv)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("vlm-cli")
    vlm = tiny_llava()
    vlm.model.save_pretrained(root / "model")
    vlm.processor.save_pretrained(root / "model")
    for sub, colors in {"red": ["red"] * 4, "other": ["blue", "green", "yellow", "gray"]}.items():
        (root / sub).mkdir()
        for i, c in enumerate(colors):
            image(c, seed=i).save(root / sub / f"{i}.png")
    return root


def test_collect_train_concept_ask(files, capsys):
    model = str(files / "model")
    common = ["--model", model, "--device", "cpu"]
    out = _run(
        commands.collect_args,
        commands.collect,
        [
            *common,
            "--images",
            str(files / "red"),
            "--images",
            str(files / "other"),
            "--prompt",
            "what is in the image ?",
            "--layer",
            "1",
            "--out",
            str(files / "acts"),
            "--batch-size",
            "2",
        ],
        capsys,
    )
    assert out["collected"] == 8 and out["rows"] == {LAYER: 8 * 16}  # 16 image tokens per image
    out = _run(
        commands.collect_args,
        commands.collect,
        [
            *common,
            "--images",
            str(files / "red"),
            "--prompt",
            "what is in the image ?",
            "--hookpoint",
            LAYER,
            "--out",
            str(files / "acts"),
        ],
        capsys,
    )
    assert out["skipped"] == 4 and out["rows"] == {LAYER: 0}  # already stored: resumed
    out = _run(  # one `saeuron train` for every adapter: the store's token set goes into cfg.json
        cli._train_args,
        cli._train,
        [
            "--activations",
            str(files / "acts" / LAYER),
            "--out",
            str(files / "bundle" / LAYER),
            "--k",
            "4",
            "--expansion-factor",
            "4",
            "--batch-size",
            "32",
            "--steps",
            "20",
            "--device",
            "cpu",
            "--dead-tokens",
            "1000000000",
        ],
        capsys,
    )
    assert out["hookpoint"] == LAYER and out["steps"] == 20
    cfg = json.loads((files / "bundle" / LAYER / "cfg.json").read_text())
    assert cfg["tokens"] == "image" and cfg["model_family"] == "llava"
    bundle = str(files / "bundle")
    out = _run(
        commands.concept_args,
        commands.concept,
        [
            *common,
            "--sae",
            bundle,
            "--name",
            "red",
            "--images",
            str(files / "red"),
            "--prompt",
            "what is in the image ?",
        ],
        capsys,
    )
    assert out["samples"] == {LAYER: 4}
    out = _run(
        commands.concept_args,
        commands.concept,
        [
            *common,
            "--sae",
            bundle,
            "--background",
            "--images",
            str(files / "other"),
            "--prompt",
            "what is in the image ?",
            "--batch-size",
            "2",
        ],
        capsys,
    )
    assert (files / "bundle" / LAYER / "concepts" / "red.safetensors").is_file()
    ask = [
        "--model",
        model,
        "--device",
        "cpu",
        "--image",
        str(files / "red" / "0.png"),
        "--question",
        "what color is it ?",
        "--max-new-tokens",
        "4",
    ]
    plain = _run(commands.ask_args, commands.ask, ask, capsys)
    assert set(plain) == {"question", "original"} and isinstance(plain["original"], str)
    edited = _run(
        commands.ask_args,
        commands.ask,
        [*ask, "--sae", bundle, "--unlearn", "red", "--strength", "30"],
        capsys,
    )
    assert edited["original"] == plain["original"] and edited["edited_calls"] == {LAYER: 1}
    assert isinstance(edited["unlearned"], str)


def test_cli_errors(files):
    with pytest.raises(ValueError, match="--hookpoint PATH or --layer N"):
        commands.collect(
            _parse(
                commands.collect_args,
                [
                    "--model",
                    str(files / "model"),
                    "--device",
                    "cpu",
                    "--image",
                    "x.png",
                    "--prompt",
                    "p",
                    "--out",
                    "o",
                ],
            )
        )
    with pytest.raises(ValueError, match="--unlearn needs --sae"):
        commands.ask(
            _parse(commands.ask_args, ["--model", "m", "--image", "x", "--question", "q", "--unlearn", "c"])
        )
    with pytest.raises(ValueError, match="exactly one"):
        commands.concept(
            _parse(commands.concept_args, ["--model", "m", "--sae", "s", "--image", "x", "--prompt", "p"])
        )
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        commands.read_prompts(argparse.Namespace(prompt=["a", "b", "c"], prompts=None), 2)
