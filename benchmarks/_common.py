"""Shared helpers for the benchmarks: say how a number was measured, time things robustly."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from saeuron_plugin.benchmark.provenance import describe_run

__all__ = ["describe_run", "paired_ratios", "time_call", "time_interleaved", "time_rounds", "wall_time"]


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
