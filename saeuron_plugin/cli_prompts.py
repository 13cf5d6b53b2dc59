"""Prompt options shared by the adapters' subcommands (``--prompt`` and ``--prompts FILE``)."""

from __future__ import annotations

import argparse
from pathlib import Path


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
