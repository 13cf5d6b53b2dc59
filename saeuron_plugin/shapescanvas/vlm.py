"""The ShapesCanvas VLM: a tiny LLaVA that answers "What shape / color / style is this?" in one word.

Everything is built in code from transformers classes, so nothing is downloaded: a word-level
``tokenizers`` tokenizer wrapped in ``PreTrainedTokenizerFast``, a ``CLIPImageProcessorPil`` (no
torchvision), a ``LlavaProcessor`` and a ``LlavaForConditionalGeneration`` with a small CLIP vision
tower, the LLaVA projector and a small Llama language model. It is trained on fresh ShapesCanvas
renders (:mod:`.shapescanvas`) with the loss on the answer word and ``</s>`` only.

The prompt is what ``saeuron vlm ask`` builds for a processor without a chat template: the image
token, a newline and the question (``<image>\\nWhat color is this?``). The answer is one word of the
attribute's vocabulary followed by ``</s>``.

    model, processor = load_vlm("checkpoints/shapescanvas-vlm")
    answers = ask(model, processor, pil_images, "color")     # ["red", "blue", ...]
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import data as sc

ATTRIBUTES: tuple[str, ...] = ("object", "color", "style")
"""The three attributes asked about (ShapesCanvas domains; ``object`` is the shape)."""
QUESTIONS: dict[str, str] = {
    "object": "What shape is this?",
    "color": "What color is this?",
    "style": "What style is this?",
}
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
QUESTION_WORDS: tuple[str, ...] = ("what", "shape", "color", "style", "is", "this", "?")
ANSWER_WORDS: tuple[str, ...] = tuple(w for a in ATTRIBUTES for w in sc.VOCABULARIES[a])
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_FOLDER = "checkpoints/shapescanvas-vlm"


def attribute_of(value: str) -> str:
    """The attribute (``object``, ``color``, ``style``) a ShapesCanvas value belongs to."""
    for attribute in ATTRIBUTES:
        if value in sc.VOCABULARIES[attribute]:
            return attribute
    raise KeyError(f"{value!r} is not a ShapesCanvas value; known: {list(ANSWER_WORDS)}")


# ----------------------------------------------------------------------------- model
@dataclass
class VLMConfig:
    """Architecture of the ShapesCanvas VLM (defaults: the shipped model)."""

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 256


def build_tokenizer() -> Any:
    """Word-level fast tokenizer: lower-cases, splits on spaces and punctuation; specials first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIAL_TOKENS, *QUESTION_WORDS, *ANSWER_WORDS]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, "?" sticks to its word
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def build_processor(cfg: VLMConfig, tokenizer: Any | None = None) -> Any:
    """``LlavaProcessor``: CLIP-normalised 32 px images, one ``<image>`` expanded to every patch."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    s = cfg.image_size
    ip = CLIPImageProcessorPil(
        size={"shortest_edge": s},
        crop_size={"height": s, "width": s},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=ip,
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )


def build_model(cfg: VLMConfig, tokenizer: Any, seed: int = 0) -> Any:
    """A randomly initialised ``LlavaForConditionalGeneration`` of the given size."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=4 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=num_image_tokens(cfg),
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def num_image_tokens(cfg: VLMConfig) -> int:
    return (cfg.image_size // cfg.patch_size) ** 2


def save_vlm(model: Any, processor: Any, folder: str | Path) -> Path:
    """fp16 safetensors + JSON (config, processor, tokenizer); the model in memory is not changed."""
    import copy

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to(torch.float16)
    half.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    half.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def load_vlm(folder: str | Path = DEFAULT_FOLDER, device: str = "cpu") -> tuple[Any, Any]:
    """(model in fp32, eval mode; processor) from a saved folder, offline."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(str(folder), dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(str(folder))
    return model.to(device).eval(), processor


# ----------------------------------------------------------------------------- data
@dataclass
class Renders:
    """ShapesCanvas images (float [N, 3, H, W] in [0, 1], 8-bit exact) and their attribute values."""

    images: torch.Tensor
    labels: dict[str, list[str]]

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Sequence[int] | np.ndarray) -> Renders:
        idx = [int(i) for i in index]
        return Renders(self.images[idx], {a: [v[i] for i in idx] for a, v in self.labels.items()})

    def where(self, attribute: str, value: str, present: bool = True) -> Renders:
        """The renders whose ``attribute`` is (``present``) or is not ``value``."""
        return self.subset([i for i, v in enumerate(self.labels[attribute]) if (v == value) == present])

    def pil(self) -> list[Image.Image]:
        return [Image.fromarray(a, "RGB") for a in sc.to_uint8(self.images)]


def render(
    objects: Sequence[int], styles: Sequence[int], colors: Sequence[int], rng: np.random.Generator
) -> Renders:
    """Render index triples with random geometry; pixel values rounded to 8 bits like saved images."""
    params = sc.ShapeParams.sample(len(objects), rng)
    img = sc.render_batch(objects, styles, colors, params)
    img = (img.clamp(0, 1) * 255).round() / 255
    labels = {
        "object": [sc.OBJECTS[i] for i in objects],
        "style": [sc.STYLES[i] for i in styles],
        "color": [sc.COLORS[i] for i in colors],
    }
    return Renders(img, labels)


def random_renders(n: int, seed: int) -> Renders:
    """``n`` renders with uniformly random attributes and geometry."""
    rng = np.random.default_rng(seed)
    o = rng.integers(len(sc.OBJECTS), size=n)
    s = rng.integers(len(sc.STYLES), size=n)
    c = rng.integers(len(sc.COLORS), size=n)
    return render(o.tolist(), s.tolist(), c.tolist(), rng)


def balanced_renders(repeats: int, seed: int) -> Renders:
    """Every object × style × color combination ``repeats`` times, each with fresh random geometry."""
    combos = sc.combinations() * repeats
    rng = np.random.default_rng(seed)
    o = [sc.OBJECTS.index(t[0]) for t in combos]
    s = [sc.STYLES.index(t[1]) for t in combos]
    c = [sc.COLORS.index(t[2]) for t in combos]
    return render(o, s, c, rng)


def prompt(attribute: str) -> str:
    """The full prompt for a question (what ``saeuron vlm ask`` builds without a chat template)."""
    return f"{IMAGE_TOKEN}\n{QUESTIONS[attribute]}"


def pixel_values(images: torch.Tensor, processor: Any) -> torch.Tensor:
    """Float images in [0, 1] → normalised pixel values, as the processor makes them from 8-bit images."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    return (images.float() - mean) / std


def prompt_ids(processor: Any, attribute: str) -> torch.Tensor:
    """Token ids [T] of an attribute's prompt, image token expanded (every prompt has the same length)."""
    blank = Image.new("RGB", (8, 8))
    return processor(images=[blank], text=[prompt(attribute)], return_tensors="pt")["input_ids"][0]


def question_inputs(processor: Any, images: torch.Tensor, attribute: str) -> dict[str, torch.Tensor]:
    """Model inputs for asking about every image (equal to the processor's on the 8-bit PIL images)."""
    ids = prompt_ids(processor, attribute).unsqueeze(0).expand(images.shape[0], -1).clone()
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixel_values(images, processor),
    }


# ----------------------------------------------------------------------------- asking
def parse_answer(text: str) -> str | None:
    """The answer word when ``text`` is exactly one word of the answer vocabulary, else None."""
    words = text.strip().lower().split()
    return words[0] if len(words) == 1 and words[0] in ANSWER_WORDS else None


def ask(
    model: Any,
    processor: Any,
    images: torch.Tensor | Sequence[Image.Image],
    attribute: str,
    *,
    batch_size: int = 256,
    max_new_tokens: int = 3,
) -> list[str]:
    """Greedy ``generate()`` answers (decoded, special tokens dropped) to the attribute's question.

    ``images``: float renders [N, 3, H, W] in [0, 1] (fast path) or PIL images (through the processor).
    """
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        part = images[start : start + batch_size]
        if isinstance(part, torch.Tensor):
            inputs = question_inputs(processor, part, attribute)
        else:
            inputs = dict(
                processor(
                    images=list(part), text=[prompt(attribute)] * len(part), return_tensors="pt", padding=True
                )
            )
        device = next(model.parameters()).device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        with torch.no_grad():
            ids = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                suppress_tokens=[image_id],
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        new = ids[:, inputs["input_ids"].shape[1] :]
        out.extend(processor.batch_decode(new, skip_special_tokens=True))
    return [t.strip() for t in out]


@dataclass
class Evaluation:
    """Answers of one model (or one unlearned model) to every question about a set of renders."""

    answers: dict[str, list[str]]
    labels: dict[str, list[str]]

    def correct(self, attribute: str) -> np.ndarray:
        pairs = zip(self.answers[attribute], self.labels[attribute])
        return np.array([parse_answer(a) == y for a, y in pairs])

    def accuracy(self, attribute: str, mask: np.ndarray | None = None) -> float:
        c = self.correct(attribute)
        return float(c[mask].mean()) if mask is not None else float(c.mean())

    def fluency(self) -> float:
        """Share of answers that are one word of the answer vocabulary."""
        flat = [a for v in self.answers.values() for a in v]
        return float(np.mean([parse_answer(a) is not None for a in flat]))


def evaluate(
    model: Any,
    processor: Any,
    renders: Renders,
    attributes: Sequence[str] = ATTRIBUTES,
    batch_size: int = 256,
) -> Evaluation:
    """Ask every attribute's question about every render."""
    answers = {a: ask(model, processor, renders.images, a, batch_size=batch_size) for a in attributes}
    return Evaluation(answers, {a: renders.labels[a] for a in attributes})


# ----------------------------------------------------------------------------- training
@dataclass
class TrainConfig:
    """Recipe of the shipped VLM; the defaults reproduce it."""

    out: str = DEFAULT_FOLDER
    model: VLMConfig = field(default_factory=VLMConfig)
    steps: int = 3000
    batch_size: int = 96
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 150
    seed: int = 0
    data_seed: int = 1
    val_seed: int = 2
    test_seed: int = 3
    val_repeats: int = 1
    test_repeats: int = 5
    eval_every: int = 500


def answer_ids(tokenizer: Any, words: Sequence[str]) -> torch.Tensor:
    return torch.tensor([tokenizer.convert_tokens_to_ids(w) for w in words])


def training_batch(processor: Any, n: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """``n`` fresh renders, each with a random question; labels only on the answer word and ``</s>``."""
    r = random_renders(n, int(rng.integers(2**31)))
    tok = processor.tokenizer
    which = rng.integers(len(ATTRIBUTES), size=n)
    prompts = torch.stack([prompt_ids(processor, a) for a in ATTRIBUTES])  # [3, T] (same length)
    ids = prompts[torch.as_tensor(which)]
    words = [r.labels[ATTRIBUTES[k]][i] for i, k in enumerate(which)]
    tail = torch.stack([answer_ids(tok, words), torch.full((n,), tok.eos_token_id)], 1)
    input_ids = torch.cat([ids, tail], 1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -2:] = tail
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixel_values(r.images, processor),
        "labels": labels,
    }


def _lr_factor(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train_vlm(tc: TrainConfig, log: Callable[[str], None] = print) -> tuple[Any, Any, dict[str, Any]]:
    """Train the VLM from scratch on fresh renders; returns (model, processor, training record)."""
    processor = build_processor(tc.model)
    model = build_model(tc.model, processor.tokenizer, tc.seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, tc))
    rng = np.random.default_rng(tc.data_seed)
    val = balanced_renders(tc.val_repeats, tc.val_seed)
    start, history = time.perf_counter(), []
    for step in range(tc.steps):
        batch = training_batch(processor, tc.batch_size, rng)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % tc.eval_every == 0 or step + 1 == tc.steps:
            model.eval()
            acc = {a: evaluate(model, processor, val, [a]).accuracy(a) for a in ATTRIBUTES}
            model.train()
            history.append({"step": step + 1, "loss": loss.item(), **acc})
            log(
                f"step {step + 1}: loss {loss.item():.4f}, val "
                + ", ".join(f"{a} {v:.3f}" for a, v in acc.items())
                + f" ({time.perf_counter() - start:.0f} s)"
            )
    record = {"train_seconds": time.perf_counter() - start, "history": history, "config": asdict(tc)}
    return model.eval(), processor, record


def held_out_accuracy(model: Any, processor: Any, tc: TrainConfig) -> dict[str, float]:
    """Accuracy per attribute on fresh renders of the test seed (every combination ``test_repeats`` times)."""
    ev = evaluate(model, processor, balanced_renders(tc.test_repeats, tc.test_seed))
    out = {a: ev.accuracy(a) for a in ATTRIBUTES}
    out["all"] = float(np.mean([out[a] for a in ATTRIBUTES]))
    out["fluency"] = ev.fluency()
    return out


def model_card(
    tc: TrainConfig, record: Mapping[str, Any], acc: Mapping[str, float], n_params: int, size_mb: float
) -> str:
    """README.md of the saved model folder."""
    m = tc.model
    rows = "\n".join(f"| {a} | {acc[a]:.4f} |" for a in ATTRIBUTES)
    n_test = len(sc.combinations()) * tc.test_repeats
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [llava, shapescanvas, tiny, saeuron-plugin]
---
# ShapesCanvas VLM

A tiny LLaVA (`LlavaForConditionalGeneration`) trained from scratch on CPU on ShapesCanvas renders
(32 px; one shape × style × color per image, random size / position / rotation). It answers
"What shape is this?", "What color is this?" and "What style is this?" with one word.

- vision tower: CLIP, {m.image_size} px, patch {m.patch_size}, hidden {m.vision_hidden},
  {m.vision_layers} layers
  → {num_image_tokens(m)} image tokens; projector: LLaVA 2-layer MLP
- language model: Llama, hidden {m.text_hidden}, {m.text_layers} layers, {m.text_heads} heads
  ({m.text_kv_heads} KV), MLP {m.text_intermediate}; word-level tokenizer built in code ({len(ANSWER_WORDS)}
  answer words)
- {n_params:,} parameters, fp16 safetensors ({size_mb:.1f} MB), no pickles

## Held-out accuracy

{n_test} fresh renders (every combination {tc.test_repeats} times, seed {tc.test_seed}; training used
seed {tc.data_seed}), one question per attribute, greedy `generate()`, answer = the decoded words:

| attribute | accuracy |
|---|---|
{rows}
| all | {acc["all"]:.4f} |

Well-formed answers (one word of the answer vocabulary): {acc["fluency"]:.4f}.

## Use

```python
from saeuron_plugin.shapescanvas.vlm import load_vlm, ask
model, processor = load_vlm("{tc.out}")       # AutoModelForImageTextToText + AutoProcessor, offline
ask(model, processor, [pil_image], "color")  # ['red']
```

or `saeuron vlm ask --model {tc.out} --image img.png --question "What color is this?"`.
The prompt is `<image>\\nWhat color is this?` (no chat template).

## Training

`python examples/train_shapescanvas_vlm.py` ({tc.steps} steps of {tc.batch_size} fresh renders with one
random question each, AdamW lr {tc.lr}, cosine, loss on the answer word and `</s>`):
{record["train_seconds"] / 60:.1f} min wall time on 2 CPU cores (torch {torch.__version__}).
"""


def train_and_save(tc: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, save (fp16), reload from disk, measure held-out accuracy, write the model card."""
    import json

    model, processor, record = train_vlm(tc, log)
    folder = save_vlm(model, processor, tc.out)
    loaded, proc = load_vlm(folder)
    acc = held_out_accuracy(loaded, proc, tc)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 2**20
    n_params = sum(p.numel() for p in loaded.parameters())
    (folder / "README.md").write_text(model_card(tc, record, acc, n_params, size), encoding="utf-8")
    record = {**record, "held_out": acc}
    (folder / "training.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    log(f"held-out accuracy: {acc}")
    return record


__all__ = [
    "ANSWER_WORDS",
    "ATTRIBUTES",
    "QUESTIONS",
    "Evaluation",
    "Renders",
    "TrainConfig",
    "VLMConfig",
    "ask",
    "attribute_of",
    "balanced_renders",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "evaluate",
    "held_out_accuracy",
    "load_vlm",
    "parse_answer",
    "prompt",
    "random_renders",
    "save_vlm",
    "train_and_save",
    "train_vlm",
]
