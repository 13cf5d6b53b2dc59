"""The unlearning benchmark: SAeUron vs baselines on ShapesCanvas (UA / IRA / CRA), one command.

    python benchmarks/unlearning.py [--methods saeuron uce ... --seeds 0 1 --threads 2]

Writes benchmarks/results/unlearning.{json,md,png}; the protocol (steps, scheduler, guidance, seeds,
commit) is recorded in the JSON and the Markdown. Same as ``saeuron eval``.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from _common import describe_run

from saeuron_plugin.benchmark.unlearning import add_args, run_from_args


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(p)
    args = p.parse_args()
    print(describe_run(0))
    run_from_args(args, shlex.join(["python", "benchmarks/unlearning.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
