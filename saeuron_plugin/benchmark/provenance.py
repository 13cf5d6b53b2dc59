"""How a measurement was made: command, machine, software, commit and seed, for every benchmark's header."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys

import torch


def describe_run(seed: int) -> str:
    """Command, machine, software and seed: everything needed to repeat a measurement."""
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
            ).stdout.strip()
            or "unknown"
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        commit += " + uncommitted changes" if dirty and commit != "unknown" else ""
    except OSError:
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return "\n".join(
        [
            f"command : {shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}",
            f"machine : {platform.node()} | {cpu} | {os.cpu_count()} cores | {device}",
            f"software: python {platform.python_version()} | torch {torch.__version__} | "
            f"threads {torch.get_num_threads()} | commit {commit}",
            f"seed    : {seed}",
        ]
    )


__all__ = ["describe_run"]
