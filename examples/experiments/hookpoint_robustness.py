"""Which hookpoint sets hold against UnlearnDiffAtk, and what they cost (issue #20's defence search).

    python examples/experiments/hookpoint_robustness.py [--concepts star striped red]

For each concept, the shipped bundle's tuned hookpoints T and wider sets (T plus the up_blocks.2
attn2 outputs, plus up_blocks.3, plus both, plus the down blocks, and every hookpoint holding the
concept), each with the concept's tuned selection settings. Every set is attacked with
UnlearnDiffAtk (5 prefix tokens, 40 iterations) on three *training* captions (target images from
seeds 1000+, attack seeds 100+), and on the robustness benchmark's held-out caption (targets from
seeds 0–7, attack seed 0); UA is judged on 8 images (seeds 100–107) of each attacked prompt; IRA /
CRA as the benchmark measures them. ``--target T`` replaces with concept T instead of only removing
(``--target-scale`` α; results under ``<concept>→T``). Writes
``benchmarks/results/experiments/hookpoint_robustness/results.json`` (about 1 min per set on 2 cores).
"""

from __future__ import annotations

import argparse
import time

from _attack_setup import ROOT, attack_row, concept_case, describe, setup_experiment, write_results

from saeuron_plugin import ConceptAblation

OUT = ROOT / "benchmarks" / "results" / "experiments" / "hookpoint_robustness"


def hookpoint_sets(eraser, concept: str) -> dict[str, list[str]]:
    """Named candidate sets: the tuned one and wider ones (only hookpoints that hold the concept)."""
    held = eraser.where(concept)
    tuned = eraser.active_hookpoints(concept)

    def blocks(*prefixes: str) -> list[str]:
        return [p for p in held if p.startswith(prefixes) and p.endswith("attn2")]

    up2, up3 = blocks("unet.up_blocks.2"), blocks("unet.up_blocks.3")
    down = blocks("unet.down_blocks", "unet.mid_block")
    sets = {
        "tuned": tuned,
        "tuned+up2": tuned + up2,
        "tuned+up3": tuned + up3,
        "tuned+up2+up3": tuned + up2 + up3,
        "tuned+down": tuned + down,
        "everywhere": held,
    }
    return {name: list(dict.fromkeys(s)) for name, s in sets.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=["star", "striped", "red"])
    parser.add_argument("--target", default=None, help="replace with this concept (one concept at a time)")
    parser.add_argument("--target-scale", type=float, default=1.0)
    parser.add_argument("--sets", nargs="+", default=None, help="only these named hookpoint sets")
    args, pipe, judge, eraser, out, results = setup_experiment(parser, OUT)
    for concept in args.concepts:
        case = concept_case(pipe, judge, concept)
        # the tuned setting at every set (hookpoints only the robust mode uses may store a lighter one)
        tuned = eraser.hookpoints[eraser.default_hookpoint(concept)].library.selection_defaults(concept)
        spec = ConceptAblation(
            concept,
            percentile=tuned.percentile,
            gamma=tuned.gamma,
            target=args.target,
            target_scale=args.target_scale,
        )
        rows = {}
        for name, paths in hookpoint_sets(eraser, concept).items():
            if args.sets and name not in args.sets:
                continue
            start = time.perf_counter()
            with eraser.unlearn(pipe, [spec], hookpoints=paths):
                row = {"hookpoints": paths, **attack_row(pipe, case)}
            row["seconds"] = round(time.perf_counter() - start)
            rows[name] = row
            print(f"{describe(case, name, row)} ({len(paths)} hookpoints, {row['seconds']} s)", flush=True)
        key = concept if args.target is None else f"{concept}→{args.target} ×{args.target_scale:g}"
        results[key] = rows
        write_results(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
