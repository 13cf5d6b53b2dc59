"""Shared helpers for the benchmarks: say how a number was measured, time things robustly."""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

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


def wall_time(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (synchronising CUDA before and after, when present)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds."""
    for _ in range(warmup):
        fn()
    return statistics.median(wall_time(fn) for _ in range(repeats))


def time_rounds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each function over ``repeats`` rounds, run in turns so load drift hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(wall_time(fn))
    return samples


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function, run in turns so that load drift hits all alike."""
    return {name: statistics.median(v) for name, v in time_rounds(fns, repeats).items()}


def paired_ratios(samples: dict[str, list[float]], baseline: str) -> dict[str, tuple[float, float, float]]:
    """Per function: (median, min, max) over rounds of its time / the baseline's time in the same round.

    Pairing by round cancels slow drifts of the machine's speed that a ratio of two medians keeps.
    """
    base = samples[baseline]
    out = {}
    for name, times in samples.items():
        ratios = [t / b for t, b in zip(times, base, strict=True)]
        out[name] = (statistics.median(ratios), min(ratios), max(ratios))
    return out
