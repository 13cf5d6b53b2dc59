"""Clean retention when concepts are ablated at every hookpoint that holds them (the wider candidate of
the tuners' robustness stage, which the shipped bundle's robust mode uses for eight of 17 concepts).

    python examples/experiments/everywhere_defence.py [--concepts star striped red]

Copies the shipped bundle to ``runs/everywhere-defence/bundle``, makes the concepts active at every
hookpoint whose library holds them (the shipped bundle: 18), and runs the demo's UA / IRA / CRA on it
(36 prompts with the concept and 36 without, as ``saeuron demo``).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from saeuron_plugin import SAeUron
from saeuron_plugin.shapescanvas.demo import run_demo

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=["star", "striped", "red"])
    parser.add_argument("--work", default=str(ROOT / "runs" / "everywhere-defence"))
    args = parser.parse_args()
    bundle = Path(args.work) / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(ROOT / "checkpoints" / "shapescanvas-saeuron", bundle)
    eraser = SAeUron.from_pretrained(bundle)
    for concept in args.concepts:
        for hp in eraser.where(concept):
            eraser.set_defaults(concept, hookpoints=[hp], active=True)
        print(f"{concept}: active at {len(eraser.active_hookpoints(concept))} hookpoints")
    eraser.save_pretrained(bundle, stats_dtype=torch.float32)
    run_demo(
        args.concepts,
        str(Path(args.work) / "demo"),
        bundle=str(bundle),
        model=str(ROOT / "checkpoints" / "shapescanvas-sd"),
        judges_path=str(ROOT / "checkpoints" / "shapescanvas-judges"),
    )


if __name__ == "__main__":
    main()
