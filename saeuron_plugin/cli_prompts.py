"""Options shared by the adapters' subcommands: the model (``--model``, ``--device``, ``--dtype``), the
stores (``--store-dtype``), prompts (``--prompt``, ``--prompts FILE``) and ``--contrast``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from .sae.selection import CONTRAST_MODES

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def model_args(p: argparse.ArgumentParser, what: str) -> None:
    """``--model`` (``what``: a folder or Hub id), ``--device`` and ``--dtype``."""
    p.add_argument("--model", required=True, help=f"{what} folder or Hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="model dtype (SAE math stays fp32)")


def store_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store-dtype", choices=list(DTYPES), default="fp16", help="activation store dtype")


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt a line; blank lines and ``#`` comments skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def prompt_args(args: argparse.Namespace) -> list[str]:
    """``--prompt`` values plus the lines of ``--prompts FILE`` (blank lines and ``#`` comments skipped)."""
    prompts = list(getattr(args, "prompt", None) or [])
    path = getattr(args, "prompts", None)
    if path:
        prompts += read_prompt_file(path)
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def contrast_arg(values: list[str] | None) -> str | list[str] | None:
    """``--contrast`` as the core takes it: one named mode as a string, anything else as concept names."""
    if values is not None and len(values) == 1 and values[0] in CONTRAST_MODES:
        return values[0]
    return values


def concept_target_args(p: argparse.ArgumentParser, samples: str) -> None:
    """The options every ``concept add`` shares: ``--name`` / ``--background``, ``--contrast``,
    ``--hookpoint``, ``--out`` (``samples``: what the command adds, "prompts" or "samples")."""
    p.add_argument("--name", help="concept name (omit with --background)")
    p.add_argument("--background", action="store_true", help=f"add the {samples} to the background set")
    p.add_argument(
        "--contrast",
        nargs="+",
        default=None,
        help="default contrast set: auto, others, worst, background, or concept names",
    )
    p.add_argument("--hookpoint", action="append", default=None, help="only these hookpoints")
    p.add_argument("--out", default=None, help="where to write the bundle (default: --sae, in place)")


def concept_target(args: argparse.Namespace) -> str | None:
    """The concept ``concept add`` fills (None: the background set); exactly one of the two is given."""
    if bool(args.name) == bool(args.background):
        raise ValueError("give --name NAME or --background (exactly one)")
    return None if args.background else args.name


def print_added(out: str | Path, args: argparse.Namespace, stats: dict[str, Any]) -> None:
    """The one JSON line ``concept add`` prints: where, which concept, samples per hookpoint."""
    samples = {p: s.total_count for p, s in stats.items()}
    print(json.dumps({"out": str(out), "concept": args.name or "background", "samples": samples}))


def print_collected(out: str | Path, result: Any) -> None:
    """The one JSON line ``collect`` prints: where, prompts / samples collected and skipped, rows."""
    print(
        json.dumps(
            {"out": str(out), "collected": result.collected, "skipped": result.skipped, "rows": result.rows}
        )
    )
