"""Robustness of SAeUron on ShapesCanvas under adaptive attacks (issue #20), one command.

    python benchmarks/robustness.py [--concepts star striped red] [--iterations 40] [--threads 2]

All 17 concepts by default (about 70 min on 2 cores). Writes
``benchmarks/results/robustness.{json,md,png}``; the protocol is in
``saeuron_plugin.benchmark.robustness`` (same as ``saeuron eval --robustness``).
"""

from __future__ import annotations

import sys

from saeuron_plugin.benchmark.robustness import main

if __name__ == "__main__":
    main(sys.argv[1:])
