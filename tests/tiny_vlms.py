"""Tiny offline vision-language models (random seeded weights, no downloads) for VLM adapter tests.

Each builder returns ``TinyVLM(model, processor, image_token_id)``: a ``*ForConditionalGeneration``
model built from a config in well under a second, and a processor made in code (a word-level
tokenizer with the family's special tokens plus the ``*ImageProcessorPil`` class, so no
torchvision). Images are 16×16 RGB; solid colours make easy concepts (``red`` vs the rest).
Generate with ``suppress_tokens=[image_token_id]`` (random weights would emit image tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

WORDS = [
    "what",
    "is",
    "in",
    "the",
    "image",
    "a",
    "red",
    "blue",
    "green",
    "yellow",
    "square",
    "circle",
    "color",
    "shape",
    "describe",
    "it",
    "picture",
    "this",
    "?",
    ".",
    ",",
    ":",
    "user",
    "assistant",
    "there",
    "one",
    "two",
    "small",
    "big",
]
HIDDEN = 32
COLORS = {
    "red": (230, 20, 20),
    "blue": (20, 30, 220),
    "green": (20, 200, 40),
    "yellow": (230, 220, 20),
    "gray": (128, 128, 128),
    "white": (250, 250, 250),
}


@dataclass
class TinyVLM:
    model: Any
    processor: Any
    image_token_id: int
    family: str

    def inputs(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        """Processor outputs for a batch (left padding), ready for ``model(**inputs)`` / ``generate``."""
        tok = self.processor.tokenizer
        tok.padding_side = "left"
        text = [
            p if self.processor.image_token in p else f"{self.processor.image_token} {p}" for p in prompts
        ]
        if self.family == "mllama":
            images = [[im] for im in images]  # Mllama's processor wants the images of each sample in a list
        out = self.processor(images=images, text=text, return_tensors="pt", padding=True)
        return dict(out)


def image(color: str | tuple[int, int, int], size: int = 16, seed: int | None = None) -> Image.Image:
    """A solid-colour image, optionally with seeded noise so samples differ."""
    rgb = COLORS[color] if isinstance(color, str) else color
    t = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, size, size).clone()
    if seed is not None:
        t += torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed)) * 12
    arr = t.clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


def tokenizer(specials: list[str], extra: dict[str, str], *, pad: str = "<pad>") -> Any:
    """Word-level fast tokenizer: ``specials`` first (ids 0..), then :data:`WORDS`; ``extra``: named ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token=pad,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=extra,
        padding_side="left",
    )
    tok.add_special_tokens(
        {"additional_special_tokens": [s for s in specials if s not in (pad, "<s>", "</s>", "<unk>")]}
    )
    return tok


def _llama_text(vocab: int, layers: int = 3, **kw: Any) -> dict[str, Any]:
    return dict(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **kw,
    )


def tiny_llava(seed: int = 0) -> TinyVLM:
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = tokenizer(["<pad>", "<s>", "</s>", "<unk>", "<image>"], {"image_token": "<image>"})
    vocab = len(tok)
    vc = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=4,
    )
    cfg = LlavaConfig(
        vision_config=vc,
        text_config=LlamaConfig(**_llama_text(vocab)),
        image_token_id=tok.image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=16,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    ip = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )
    return TinyVLM(model, proc, tok.image_token_id, "llava")


def tiny_qwen2_vl(seed: int = 0) -> TinyVLM:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    specials = [
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tok = tokenizer(
        specials,
        {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
    )
    vocab = len(tok)
    cfg = Qwen2VLConfig(
        vision_config=dict(
            depth=2,
            embed_dim=16,
            hidden_size=HIDDEN,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        text_config=dict(
            _llama_text(vocab),
            rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
        ),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    ip = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 16 * 16, "longest_edge": 16 * 16},
        patch_size=4,
        temporal_patch_size=2,
        merge_size=2,
    )
    proc = TinyQwenProcessor(ip, tok)
    return TinyVLM(model, proc, cfg.image_token_id, "qwen2_vl")


class TinyQwenProcessor:
    """What ``Qwen2VLProcessor`` does, for images only (in 5.24 it cannot be built without torchvision,
    which its video processor needs): image features, ``<|image_pad|>`` expanded to the number of
    merged patches, ``mm_token_type_ids``."""

    image_token = "<|image_pad|>"

    def __init__(self, image_processor: Any, tokenizer: Any) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)

    def __call__(
        self,
        images: Any = None,
        text: Any = None,
        return_tensors: str = "pt",
        padding: bool = True,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        text = [text] if isinstance(text, str) else list(text)
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            feats = self.image_processor(images=images, return_tensors="pt")
            out["pixel_values"], out["image_grid_thw"] = feats["pixel_values"], feats["image_grid_thw"]
            merge = self.image_processor.merge_size**2
            counts = iter((out["image_grid_thw"].prod(-1) // merge).tolist())
            expanded = []
            for t in text:  # each placeholder becomes as many image tokens as the image has merged patches
                head, *tails = t.split(self.image_token)
                expanded.append(
                    head
                    + "".join(
                        " " + " ".join([self.image_token] * next(counts)) + " " + tail for tail in tails
                    )
                )
            text = expanded
        enc = self.tokenizer(text, return_tensors="pt", padding=padding)
        out["input_ids"], out["attention_mask"] = enc["input_ids"], enc["attention_mask"]
        out["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).int()
        return out


def tiny_mllama(seed: int = 0) -> TinyVLM:
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessorPil,
        MllamaProcessor,
    )

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|image|>", "<|python_tag|>"]
    tok = tokenizer(specials, {"image_token": "<|image|>"})
    vocab = len(tok)
    cfg = MllamaConfig(
        vision_config=dict(
            hidden_size=16,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=2,
            intermediate_size=32,
            vision_output_dim=32,
            image_size=8,
            patch_size=4,
            max_num_tiles=1,
            intermediate_layers_indices=[0],
            supported_aspect_ratios=[[1, 1]],
        ),
        text_config=dict(_llama_text(vocab, layers=4), cross_attention_layers=[1, 3]),
        image_token_index=tok.convert_tokens_to_ids("<|image|>"),
    )
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # the cross-attention gates start at 0 (tanh 0 = no image at all): open them
        for i in cfg.text_config.cross_attention_layers:
            layer = model.model.language_model.layers[i]
            layer.cross_attn_attn_gate.fill_(1.0)
            layer.cross_attn_mlp_gate.fill_(1.0)
    ip = MllamaImageProcessorPil(size={"height": 8, "width": 8}, max_image_tiles=1)
    proc = MllamaProcessor(image_processor=ip, tokenizer=tok)
    return TinyVLM(model, proc, cfg.image_token_id, "mllama")


def tiny_idefics3(seed: int = 0) -> TinyVLM:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    specials = [
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
        "<image>",
        "<fake_token_around_image>",
        "<global-img>",
        "<end_of_utterance>",
    ]
    tok = tokenizer(specials, {"image_token": "<image>"})
    vocab = len(tok)
    cfg = Idefics3Config(
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
        ),
        text_config=dict(_llama_text(vocab), model_type="llama"),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    ip = Idefics3ImageProcessorPil(
        size={"longest_edge": 16}, max_image_size={"longest_edge": 16}, do_image_splitting=False
    )
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4)
    return TinyVLM(model, proc, cfg.image_token_id, "idefics3")


BUILDERS = {"llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl, "mllama": tiny_mllama, "idefics3": tiny_idefics3}
