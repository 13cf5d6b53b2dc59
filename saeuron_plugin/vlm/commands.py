"""``saeuron vlm collect | train | concept | ask``: the transformers VLM adapter from the shell.

Each ``*_args`` function adds a subcommand's options, each handler runs it and returns an exit
code; :mod:`saeuron_plugin.cli` wires them up. Models load with
``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor.from_pretrained`` (a local
folder or a Hub id; offline when ``HF_HUB_OFFLINE=1``).

Samples are images plus prompts: ``--image`` (repeatable) and/or ``--images`` (a folder or a text
file listing image paths), with one ``--prompt`` for every image or one per image (``--prompt``
repeatable, or ``--prompts FILE``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ..cli_prompts import (
    DTYPES,
    concept_target,
    concept_target_args,
    contrast_arg,
    model_args,
    print_added,
    print_collected,
    prompt_args,
    store_dtype_arg,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


# ----------------------------------------------------------------------------- shared
def load_model(model: str, device: str | None = None, dtype: str = "fp32") -> Any:
    """A VLM (``*ForConditionalGeneration``) from a folder or Hub id, in eval mode on ``device``."""
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(model, dtype=DTYPES[dtype])
    m.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return m.eval()


def load_processor(name: str) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(name)


def read_images(args: argparse.Namespace) -> list[Any]:
    """``--image`` files plus ``--images`` (folders, sorted, or files listing paths), opened as RGB."""
    from PIL import Image

    paths = [Path(p) for p in getattr(args, "image", None) or []]
    sources = getattr(args, "images", None) or []
    for source in [sources] if isinstance(sources, str) else sources:
        src = Path(source)
        if src.is_dir():
            paths += sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif src.is_file():
            lines = src.read_text(encoding="utf-8").splitlines()
            paths += [
                src.parent / ln.strip() if not Path(ln.strip()).is_absolute() else Path(ln.strip())
                for ln in lines
                if ln.strip() and not ln.lstrip().startswith("#")
            ]
        else:
            raise ValueError(f"--images {source}: no such folder or file")
    if not paths:
        raise ValueError("no images: give --image FILE (repeatable) or --images DIR|LIST")
    out = []
    for p in paths:
        if not p.is_file():
            raise ValueError(f"image {p} does not exist")
        with Image.open(p) as im:
            img = im.convert("RGB")
        img.filename = str(p)  # type: ignore[attr-defined]  # labels the sample in the statistics
        out.append(img)
    return out


def read_prompts(args: argparse.Namespace, n_images: int) -> list[str]:
    """``--prompt`` values plus ``--prompts FILE`` lines: one for all images, or one per image."""
    prompts = prompt_args(args)
    if len(prompts) == 1:
        return prompts * n_images
    if len(prompts) != n_images:
        raise ValueError(f"{n_images} images but {len(prompts)} prompts: give one prompt, or one per image")
    return prompts


def _model_args(p: argparse.ArgumentParser) -> None:
    model_args(p, "VLM (a *ForConditionalGeneration model)")
    p.add_argument("--processor", default=None, help="processor folder or Hub id (default: --model)")


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", action="append", help="an image file (repeatable)")
    p.add_argument(
        "--images",
        action="append",
        help="a folder of images, or a text file with one image path per line (repeatable)",
    )
    p.add_argument("--prompt", action="append", help="a prompt (repeatable: one per image, or one for all)")
    p.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--batch-size", type=int, default=1, help="samples per forward pass")
    p.add_argument(
        "--tokens",
        choices=["auto", "image", "text", "all"],
        default="auto",
        help="tokens read at decoder layers (auto: image tokens; text tokens for Mllama)",
    )


def _hookpoints(args: argparse.Namespace, model: Any) -> list[str] | None:
    from .hookpoints import decoder_hookpoint

    paths = list(getattr(args, "hookpoint", None) or [])
    paths += [decoder_hookpoint(model, i) for i in getattr(args, "layer", None) or []]
    return paths or None


# ----------------------------------------------------------------------------- collect
def collect_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    _sample_args(p)
    p.add_argument(
        "--hookpoint",
        action="append",
        default=None,
        help="module path such as model.language_model.layers.8 (repeatable: one pass for all)",
    )
    p.add_argument(
        "--layer",
        type=int,
        action="append",
        default=None,
        help="decoder layer index (negative: from the end; repeatable)",
    )
    p.add_argument("--out", required=True, help="folder: one activation store per hookpoint")
    p.add_argument("--max-tokens-per-sample", type=int, default=None, help="random tokens kept per sample")
    store_dtype_arg(p)
    p.add_argument("--seed", type=int, default=0)


def collect(args: argparse.Namespace) -> int:
    from .collect import collect_activations

    if not (args.hookpoint or args.layer):  # every cheap check before the model loads
        raise ValueError("give --hookpoint PATH or --layer N (repeatable)")
    images = read_images(args)
    prompts = read_prompts(args, len(images))
    model = load_model(args.model, args.device, args.dtype)
    hookpoints = _hookpoints(args, model)
    result = collect_activations(
        model,
        images,
        prompts,
        load_processor(args.processor or args.model),
        hookpoints,
        args.out,
        tokens=args.tokens,
        batch_size=args.batch_size,
        max_tokens_per_sample=args.max_tokens_per_sample,
        seed=args.seed,
        store_dtype=DTYPES[args.store_dtype],
        show_progress=False,
    )
    print_collected(args.out, result)
    return 0


# ----------------------------------------------------------------------------- concept
def concept_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    _sample_args(p)
    p.add_argument(
        "--sae",
        required=True,
        action="append",
        help="SAE bundle folder or Hub repo, or an SAE folder naming its hookpoint (repeatable)",
    )
    concept_target_args(p, "samples")


def concept(args: argparse.Namespace) -> int:
    from .unlearn import VLMUnlearner

    name = concept_target(args)
    out = args.out or args.sae[0]
    if args.out is None and (len(args.sae) > 1 or not Path(out).is_dir()):
        raise ValueError("give --out DIR to write the bundle (several --sae, or a Hub repo)")
    parts = [VLMUnlearner.from_pretrained(s) for s in args.sae]
    unlearner = VLMUnlearner([h for part in parts for h in part.hookpoints.values()])
    unlearner.paths(args.hookpoint)  # unknown --hookpoint: fail now
    images = read_images(args)  # files and prompts are checked before the model loads
    prompts = read_prompts(args, len(images))
    contrast = contrast_arg(args.contrast)
    model = load_model(args.model, args.device, args.dtype)
    tokens = None if args.tokens == "auto" else args.tokens
    stats = unlearner.add_concept(
        name,
        images,
        prompts,
        model,
        load_processor(args.processor or args.model),
        contrast=contrast,
        hookpoints=args.hookpoint,
        tokens=tokens,
        batch_size=args.batch_size,
    )
    unlearner.save_pretrained(out)
    print_added(out, args, stats)
    return 0


# ----------------------------------------------------------------------------- ask
def ask_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--image", required=True, help="the image to ask about")
    p.add_argument("--question", required=True, help="the question")
    p.add_argument("--sae", default=None, help="SAE bundle folder or Hub repo")
    p.add_argument("--unlearn", nargs="+", default=None, metavar="CONCEPT", help="concepts to remove")
    p.add_argument(
        "--strength", type=float, default=None, help="override the concepts' strength (γ = -strength)"
    )
    p.add_argument(
        "--tokens",
        choices=["auto", "image", "text", "all"],
        default="auto",
        help="tokens to edit (auto: those the SAE was made for)",
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument(
        "--raw-prompt",
        action="store_true",
        help="do not apply the processor's chat template (just prepend the image token)",
    )


def build_prompt(processor: Any, question: str, raw: bool = False) -> str:
    """The question as the model expects it: the chat template with one image, else image token + question."""
    from .inputs import with_image_token

    if not raw and getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return with_image_token(question, processor)


def ask(args: argparse.Namespace) -> int:
    """Answer a question about an image, untouched and (with --unlearn) with the concepts removed."""
    from .hookpoints import image_token_id
    from .inputs import to_device
    from .unlearn import VLMUnlearner

    if args.unlearn and not args.sae:
        raise ValueError("--unlearn needs --sae BUNDLE")
    unlearner = VLMUnlearner.from_pretrained(args.sae) if args.sae else None
    if unlearner is not None and args.unlearn:  # unknown concepts: fail before the model loads
        unlearner.resolve(args.unlearn, strength=args.strength)
    image = read_images(argparse.Namespace(image=[args.image], images=None))[0]
    model = load_model(args.model, args.device, args.dtype)
    processor = load_processor(args.processor or args.model)
    prompt = build_prompt(processor, args.question, args.raw_prompt)
    inputs = dict(
        processor(
            images=[[image]] if type(processor).__name__.startswith("Mllama") else [image],
            text=[prompt],
            return_tensors="pt",
        )
    )
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    inputs = to_device(inputs, next(model.parameters()).device, dtype)
    suppress = [i for i in [image_token_id(model)] if i is not None]
    length = inputs["input_ids"].shape[1]

    def answer() -> str:
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                suppress_tokens=suppress or None,
            )
        return processor.batch_decode(out[:, length:], skip_special_tokens=True)[0]

    result: dict[str, Any] = {"question": args.question, "original": answer()}
    if args.unlearn:
        assert unlearner is not None
        tokens = None if args.tokens == "auto" else args.tokens
        with unlearner.unlearn(model, args.unlearn, strength=args.strength, tokens=tokens) as handle:
            result["unlearned"] = answer()
            result["edited_calls"] = {p: handle.edits(p) for p in handle.hookpoints}
        result["concepts"] = args.unlearn
    print(json.dumps(result, ensure_ascii=False))
    return 0


__all__ = ["ask", "ask_args", "collect", "collect_args", "concept", "concept_args"]
