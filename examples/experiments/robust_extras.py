"""Lighter settings at the robust mode's extra hookpoints: does a concept still hold against UnlearnDiffAtk
when the hookpoints beyond its tuned ones get a weaker edit, and does retention come back? (issue #20)

    python examples/experiments/robust_extras.py [--concepts striped green] [--extras 99.8:-2 99.9:-1]

For each concept: the tuned setting at its tuned hookpoints, plus every other hookpoint holding the
concept at each ``--extras`` setting (``P:G``, percentile P and γ G; ``same`` is the tuned setting,
which is the robust mode's only wider candidate before this). Attacked as
``hookpoint_robustness.py`` does (three training captions, the held-out one), IRA / CRA as the
benchmark measures them. Writes ``benchmarks/results/experiments/robust_extras/results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import time

from _attack_setup import ROOT, attack_row, concept_case, describe, setup_experiment, write_results

from saeuron_plugin import ConceptAblation

OUT = ROOT / "benchmarks" / "results" / "experiments" / "robust_extras"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=["striped"])
    parser.add_argument("--extras", nargs="+", default=["none", "same", "99.8:-2", "99.9:-1"])
    args, pipe, judge, eraser, out, results = setup_experiment(parser, OUT)
    for concept in args.concepts:
        case = concept_case(pipe, judge, concept)
        tuned = eraser.active_hookpoints(concept)
        extra = [hp for hp in eraser.where(concept) if hp not in tuned]
        lib = eraser.hookpoints[eraser.default_hookpoint(concept)].library.selection_defaults(concept)
        rows = results.setdefault(concept, {})
        for name in args.extras:
            if name in ("none", "same"):
                p, g = lib.percentile, lib.gamma
            else:
                p, g = (float(x) for x in name.split(":"))
            start = time.perf_counter()
            with contextlib.ExitStack() as stack:
                stack.enter_context(eraser.unlearn(pipe, [concept], hookpoints=tuned))
                if name != "none":
                    spec = ConceptAblation(concept, percentile=p, gamma=g)
                    stack.enter_context(eraser.unlearn(pipe, [spec], hookpoints=extra))
                row = {
                    "extra": None if name == "none" else {"percentile": p, "gamma": g},
                    **attack_row(pipe, case),
                }
            row["seconds"] = round(time.perf_counter() - start)
            rows[name] = row
            write_results(out, results, f"{describe(case, name, row)} ({row['seconds']} s)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
