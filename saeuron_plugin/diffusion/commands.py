"""``saeuron collect | concept | generate``: the diffusers adapter from the shell.

Each ``*_args`` function adds a subcommand's options, each handler runs it and returns an exit
code; :mod:`saeuron_plugin.cli` wires them up. Models load with ``DiffusionPipeline.from_pretrained``
(a local folder or a Hub id; offline when ``HF_HUB_OFFLINE=1``).
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
from ..sae.processes import Processes


# ----------------------------------------------------------------------------- shared
def read_prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt`` values plus the lines of ``--prompts FILE``."""
    return prompt_args(args)


def dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` where diffusers takes it (it deprecates ``torch_dtype`` since it resolves both),
    ``torch_dtype=`` on the older releases our range allows."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present: dtype= works)
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def load_pipeline(model: str, device: str | None = None, dtype: str = "fp32") -> Any:
    """A diffusers pipeline from a folder or Hub id, on ``device`` (default: this process's GPU under
    ``accelerate launch`` / ``torchrun``, else CUDA when available)."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, **dtype_kwarg(DTYPES[dtype]))
    launched = Processes.current().device
    if launched is not None and device in (None, "cuda"):  # each process on its own GPU, not all on cuda:0
        device = str(launched)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _model_args(p: argparse.ArgumentParser) -> None:
    model_args(p, "diffusers pipeline")


def _generation_args(p: argparse.ArgumentParser, steps: int = 50) -> None:
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default {steps})")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call")


# ----------------------------------------------------------------------------- collect
def collect_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    _generation_args(p)
    p.add_argument(
        "--hookpoint",
        action="append",
        required=True,
        help="module path such as unet.up_blocks.1.attentions.1 (repeatable: one pass for all)",
    )
    p.add_argument("--out", required=True, help="folder: one activation store per hookpoint")
    p.add_argument("--tokens-per-step", type=int, default=None, help="random tokens kept per image and step")
    p.add_argument("--all-rows", action="store_true", help="keep unconditional CFG rows too")
    store_dtype_arg(p)


def collect(args: argparse.Namespace) -> int:
    from .collect import collect_activations

    prompts = read_prompts(args)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    result = collect_activations(
        pipe,
        prompts,
        args.hookpoint,
        args.out,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        cond_only=not args.all_rows,
        tokens_per_step=args.tokens_per_step,
        batch_size=args.batch_size,
        seed=args.seed,
        store_dtype=DTYPES[args.store_dtype],
    )
    if Processes.current().main:
        print_collected(args.out, result)
    return 0


# ----------------------------------------------------------------------------- concept
def concept_add_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    _generation_args(p)
    p.add_argument("--sae", required=True, help="SAE bundle folder (or Hub repo, then give --out)")
    concept_target_args(p, "prompts")


def concept_add(args: argparse.Namespace) -> int:
    from .unlearn import SAeUron

    name = concept_target(args)
    out = args.out or args.sae
    if not Path(out).is_dir():
        raise ValueError(f"{out} is not a local bundle folder; give --out DIR to write the result")
    prompts = read_prompts(args)  # every cheap check before the model loads
    contrast = contrast_arg(args.contrast)
    eraser = SAeUron.from_pretrained(args.sae)
    eraser.paths(args.hookpoint)  # unknown --hookpoint: fail now
    pipe = load_pipeline(args.model, args.device, args.dtype)
    stats = eraser.add_concept(
        name,
        prompts,
        pipe,
        hookpoints=args.hookpoint,
        contrast=contrast,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    if Processes.current().main:  # every process holds the pooled statistics; one writes them
        eraser.save_pretrained(out)
        print_added(out, args, stats)
    return 0


def concept_list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE bundle folder or Hub repo")


def concept_list(args: argparse.Namespace) -> int:
    from .unlearn import SAeUron

    eraser = SAeUron.from_pretrained(args.sae)
    rows = []
    for name in eraser.concepts:
        where = eraser.where(name)
        lib = eraser.hookpoints[where[0]].library
        rows.append(
            {
                "concept": name,
                "hookpoints": where,
                "prompts": lib.get(name).num_prompts,
                "defaults": lib.selection_defaults(name).to_dict(),
            }
        )
    print(json.dumps(rows, indent=2))
    return 0


def concept_show_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sae", required=True, help="SAE bundle folder or Hub repo")
    p.add_argument("--name", required=True, help="concept to show")
    p.add_argument("--percentile", type=float, default=None, help="override the default percentile")
    p.add_argument("--top-n", type=int, default=None, help="override: N best latents per τ bucket")
    p.add_argument("--limit", type=int, default=20, help="latents listed per hookpoint")


def concept_show(args: argparse.Namespace) -> int:
    """Which latents the concept ablates, at which τ, with their scores."""
    from ..sae.ablation import ConceptAblation
    from ..sae.concepts import UnknownConceptError
    from ..sae.selection import concept_scores, select_features
    from .unlearn import SAeUron

    eraser = SAeUron.from_pretrained(args.sae)
    where = eraser.where(args.name)
    if not where:
        raise UnknownConceptError(args.name, eraser.concepts)
    for path in where:
        lib = eraser.hookpoints[path].library
        spec = ConceptAblation(args.name, percentile=args.percentile, top_n=args.top_n).resolve(lib)
        sel = select_features(
            concept_scores(lib, args.name, spec.contrast), spec.percentile, spec.top_n, lib.tau_grid
        )
        how = f"top {spec.top_n}" if spec.top_n is not None else f"p={spec.percentile}"
        active = "" if lib.selection_defaults(args.name).active else " [inactive here by default]"
        print(
            f"{path}: {args.name!r} ({spec.rule.value}, γ={spec.gamma:g}, {how}, "
            f"contrast={spec.contrast}){active}"
        )
        print(sel.describe(limit=args.limit))
    return 0


# ----------------------------------------------------------------------------- generate
def generate_args(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    _generation_args(p, steps=50)
    p.add_argument("--sae", default=None, help="SAE bundle folder or Hub repo")
    p.add_argument("--unlearn", nargs="+", default=None, metavar="CONCEPT", help="concepts to remove")
    p.add_argument(
        "--strength", type=float, default=None, help="override the concepts' strength (γ = -strength)"
    )
    p.add_argument(
        "--target",
        default=None,
        metavar="CONCEPT",
        help='replace the removed concepts with this one of the bundle ("": none, whatever the default)',
    )
    p.add_argument(
        "--robust",
        action="store_true",
        help="the bundle's robust mode: the hookpoints its tuner chose against adaptive prompt attacks",
    )
    p.add_argument("--encoder", choices=["topk", "threshold"], default=None, help="override the SAE encoder")
    p.add_argument("--out", default="out/generate", help="output folder for the PNGs")
    p.add_argument("--compare", action="store_true", help="also write untouched | unlearned side by side")


def generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from .unlearn import SAeUron

    if args.unlearn and not args.sae:
        raise ValueError("--unlearn needs --sae BUNDLE")
    prompts = read_prompts(args)
    eraser = SAeUron.from_pretrained(args.sae) if args.sae else None
    if eraser is not None and args.unlearn:  # unknown concepts, a bad --strength: fail before loading
        eraser.resolve(args.unlearn, strength=args.strength, target=args.target, robust=args.robust)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def run(batch: list[tuple[int, str]]) -> list[Any]:
        kwargs: dict[str, Any] = {"num_inference_steps": args.steps}
        if args.guidance is not None:
            kwargs["guidance_scale"] = args.guidance
        gens = [torch.Generator().manual_seed(args.seed + i) for i, _ in batch]
        return pipe([p for _, p in batch], generator=gens, **kwargs).images

    indexed = list(enumerate(prompts))
    for start in range(0, len(indexed), args.batch_size):
        batch = indexed[start : start + args.batch_size]
        plain = run(batch) if (args.compare or not args.unlearn) else None
        edited = None
        if args.unlearn:
            assert eraser is not None
            with eraser.unlearn(
                pipe,
                args.unlearn,
                strength=args.strength,
                encoder=args.encoder,
                target=args.target,
                robust=args.robust,
            ):
                edited = run(batch)
        for j, (i, _) in enumerate(batch):
            tag = "unlearned" if args.unlearn else "image"
            image = edited[j] if edited is not None else plain[j]
            path = out / f"{i:04d}_{tag}.png"
            image.save(path)
            written.append(str(path))
            if args.compare and edited is not None and plain is not None:
                pair = Image.new("RGB", (plain[j].width * 2, plain[j].height))
                pair.paste(plain[j], (0, 0))
                pair.paste(edited[j], (plain[j].width, 0))
                pair.save(out / f"{i:04d}_compare.png")
                written.append(str(out / f"{i:04d}_compare.png"))
    print(json.dumps({"out": str(out), "images": written}))
    return 0
