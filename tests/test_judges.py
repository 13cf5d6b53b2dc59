"""Judges as plug-ins (#19): the ShapesCanvas judges, a CLIP zero-shot judge (a tiny CLIP built from
config, saved and loaded offline) and a callable, behind one interface; a judge that cannot load
fails at once."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import tiny_clip_tokenizer
from transformers import CLIPConfig, CLIPModel, CLIPProcessor

from saeuron_plugin.tuning import ClipZeroShotJudge, Judge, JudgeLoadError, load_judge

LABELS = {"object": ["star", "circle"], "color": ["red", "blue", "green"]}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor as ImageProcessor
    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder)
    image_processor = ImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def test_clip_judge_loads_offline_and_gives_probabilities(tiny_clip, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    judge = load_judge(f"clip:{tiny_clip}", labels=LABELS)
    assert isinstance(judge, ClipZeroShotJudge) and isinstance(judge, Judge)
    assert judge.labels == LABELS
    images = torch.rand(5, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    probs = judge.probabilities(images)
    assert probs["object"].shape == (5, 2) and probs["color"].shape == (5, 3)
    for p in probs.values():
        assert torch.allclose(p.sum(-1), torch.ones(len(p)), atol=1e-5)
    # it looks at the images: different images, different verdicts; the same image, the same verdict
    assert not torch.allclose(probs["color"][0], probs["color"][1])
    again = judge.probabilities(images[:1])
    assert torch.allclose(again["color"], probs["color"][:1], atol=1e-5)
    # templates are the label prompts
    custom = ClipZeroShotJudge(tiny_clip, LABELS, templates={"color": "painted {}"})
    assert custom.templates["color"] == "painted {}" and custom.templates["object"] == "a photo of a {}"
    assert not torch.allclose(custom.probabilities(images[:2])["color"], probs["color"][:2])


def test_a_judge_that_cannot_load_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(JudgeLoadError, match="nobody/no-such-clip"):
        load_judge("clip:nobody/no-such-clip", labels=LABELS)
    with pytest.raises(JudgeLoadError):
        load_judge(f"clip:{tmp_path}", labels=LABELS)  # a folder without a model
    with pytest.raises(JudgeLoadError, match="module:function"):
        load_judge("no_such_module:judge")
    with pytest.raises(JudgeLoadError, match="unknown judge"):
        load_judge("nonsense")
    with pytest.raises(JudgeLoadError, match="no ShapesCanvas judges"):
        load_judge(f"shapescanvas:{tmp_path}")
    with pytest.raises(ValueError, match="labels"):
        load_judge("clip:whatever")


def always_star(images):
    """A callable judge: every image is a red star."""
    n = len(images)
    return {
        "object": torch.tensor([[1.0, 0.0]]).expand(n, 2),
        "color": torch.tensor([[1.0, 0.0, 0.0]]).expand(n, 3),
    }


def test_a_callable_judge_by_name(monkeypatch):
    judge = load_judge("test_judges:always_star", labels=LABELS)
    probs = judge.probabilities(torch.rand(3, 3, 8, 8))
    assert probs["object"].argmax(-1).tolist() == [0, 0, 0] and judge.labels == LABELS
    with pytest.raises(ValueError, match=r"returned \(1, 3\) for 'color', expected \[N, 2\]"):
        load_judge("test_judges:always_star", labels={"color": ["red", "blue"]}).probabilities(
            torch.rand(1, 3, 8, 8)
        )


def test_the_shapescanvas_judges_are_a_judge():
    judge = load_judge("shapescanvas")
    assert isinstance(judge, Judge)
    assert set(judge.labels) == {"object", "style", "color"}
    probs = judge.probabilities(torch.rand(2, 3, 32, 32))
    assert {d: tuple(p.shape) for d, p in probs.items()} == {d: (2, len(v)) for d, v in judge.labels.items()}
