"""Options shared by the adapters' subcommands (``--prompt``, ``--prompts FILE``, ``--contrast``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .sae.selection import CONTRAST_MODES


def prompt_args(args: argparse.Namespace) -> list[str]:
    """``--prompt`` values plus the lines of ``--prompts FILE`` (blank lines and ``#`` comments skipped)."""
    prompts = list(getattr(args, "prompt", None) or [])
    path = getattr(args, "prompts", None)
    if path:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        prompts += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def contrast_arg(values: list[str] | None) -> str | list[str] | None:
    """``--contrast`` as the core takes it: one named mode as a string, anything else as concept names."""
    if values is not None and len(values) == 1 and values[0] in CONTRAST_MODES:
        return values[0]
    return values
