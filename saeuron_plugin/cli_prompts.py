"""Options shared by the adapters' subcommands: the model (``--model``, ``--device``, ``--dtype``), the
stores (``--store-dtype``), prompts (``--prompt``, ``--prompts FILE``) and ``--contrast``."""

from __future__ import annotations

import argparse
from pathlib import Path

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
