"""Removal vs replacement for one colour: what the unlearned images become, judged.

    python examples/experiments/colour_replacement.py [--concept red] [--threads 2]

The shipped bundle's tuned setting for the colour (its hookpoints, percentile and γ), on the first 24
stage-2 validation captions with the colour (never test seeds): plain removal (``target=""``), removal
at stronger γ, and replacement toward other colours at several α. For each variant: UA, the clean
rate (judge probability ≥ 0.9 for some colour) and which colour the images became. Writes
``benchmarks/results/experiments/colour_replacement/<concept>.md`` (about 2 min on 2 cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from saeuron_plugin import ConceptAblation, SAeUron
from saeuron_plugin.shapescanvas import data as sc
from saeuron_plugin.shapescanvas.build import BundleConfig, load_default, validation_set
from saeuron_plugin.shapescanvas.judges import Judges
from saeuron_plugin.shapescanvas.model import generate
from saeuron_plugin.tuning.search import CLEAN_CONFIDENCE

ROOT = Path(__file__).resolve().parents[2]
VARIANTS: list[tuple[str, dict]] = [
    ("removal (tuned γ)", {}),
    ("removal, γ -4", {"gamma": -4.0}),
    ("removal, γ -8", {"gamma": -8.0}),
    ("→ green, α 1", {"target": "green", "target_scale": 1.0}),
    ("→ green, α 4", {"target": "green", "target_scale": 4.0}),
    ("→ green, α 10", {"target": "green", "target_scale": 10.0}),
    ("→ blue, α 4", {"target": "blue", "target_scale": 4.0}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concept", default="red", choices=sc.COLORS)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_default(str(ROOT / "checkpoints" / "shapescanvas-sd"))
    judges = Judges.from_pretrained(ROOT / "checkpoints" / "shapescanvas-judges")
    eraser = SAeUron.from_pretrained(ROOT / "checkpoints" / "shapescanvas-saeuron")
    prompts, seeds = validation_set(args.concept, 30, BundleConfig(), "refine")
    chosen = [(p.prompt, s) for p, s in zip(prompts, seeds) if p.color == args.concept][:24]
    texts, seeds = [t for t, _ in chosen], [s for _, s in chosen]
    lines = [
        f"# {args.concept}: removal vs replacement ({len(texts)} stage-2 validation captions)",
        "",
        f"`python examples/experiments/colour_replacement.py --concept {args.concept}`",
        "",
        "| variant | UA | clean | became |",
        "|---|---|---|---|",
    ]
    start = time.perf_counter()
    for label, options in VARIANTS:
        if options.get("target") == args.concept:
            continue
        spec = ConceptAblation(args.concept, **{"target": "", **options})
        with eraser.unlearn(pipe, [spec]):
            images = generate(pipe, texts, seeds, 25, 5.0)
        top = judges.probabilities(images)["color"].max(-1)
        ua = 100 * float((top.indices != sc.COLORS.index(args.concept)).float().mean())
        clean = 100 * float((top.values >= CLEAN_CONFIDENCE).float().mean())
        counts = torch.bincount(top.indices, minlength=len(sc.COLORS)).tolist()
        became = ", ".join(f"{c} {n}" for c, n in zip(sc.COLORS, counts) if n)
        lines.append(f"| {label} | {ua:.1f} | {clean:.1f} | {became} |")
        print(lines[-1], flush=True)
    lines += ["", f"{time.perf_counter() - start:.0f} s on this machine."]
    out = ROOT / "benchmarks" / "results" / "experiments" / "colour_replacement" / f"{args.concept}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
