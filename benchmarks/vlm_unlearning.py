"""Unlearning on the ShapesCanvas VLM: one color, one shape, one style, one command.

    python benchmarks/vlm_unlearning.py [--targets red star striped --repeats 5 --seed 41000 --threads 2]

Loads ``checkpoints/shapescanvas-vlm`` and the bundle ``checkpoints/shapescanvas-vlm-saeuron`` (its
saved selection defaults, searched on validation renders), asks every question about fresh test
renders with and without each value unlearned, and writes benchmarks/results/vlm_unlearning.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from _common import describe_run

from saeuron_plugin.shapescanvas.vlm import ATTRIBUTES, DEFAULT_FOLDER
from saeuron_plugin.shapescanvas.vlm_build import (
    DEFAULT_BUNDLE,
    TARGETS,
    TEST_SEED,
    BenchmarkResult,
    UnlearnedScores,
    run_benchmark,
)

RESULTS = Path(__file__).parent / "results"


def table(rows: dict[str, UnlearnedScores], where: dict[str, str]) -> str:
    head = (
        "| unlearned | where | forget | same attr. (% of base) | other attr. (% of base) "
        "| other, on target | in-domain answers | fluency |\n|---|---|---|---|---|---|---|---|"
    )
    body = "\n".join(
        f"| {v} | {where[v]} | {100 * s.forget:.1f} | {100 * s.retain_same_attribute:.1f} "
        f"({100 * s.retain_same_rel:.1f}) | {100 * s.retain_other_attributes:.1f} "
        f"({100 * s.retain_other_rel:.1f}) | {100 * s.retain_other_on_target:.1f} | {100 * s.in_domain:.1f} "
        f"| {100 * s.fluency:.1f} |"
        for v, s in rows.items()
    )
    return f"{head}\n{body}"


def markdown(result: BenchmarkResult, command: str, run: str, seconds: float) -> str:
    """The results page: base accuracy, per-value forget / retain tables, how it was measured."""
    p = result.protocol
    base = " | ".join(f"{a} {100 * result.base[a]:.1f} %" for a in ATTRIBUTES)
    defaults = {v: ", ".join(p["defaults_at"][v]) for v in result.unlearned}
    image_where = {
        v: f"{c['hookpoint']} (top {c['top_n']}, strength {c['strength']:g})"
        for v, c in result.image_settings.items()
    }
    image = (
        f"""
With the best setting of the same search restricted to the image-token hookpoints (projector output,
decoder layers 0-2):

{table(result.image_tokens, image_where)}
"""
        if result.image_tokens
        else ""
    )
    return f"""# Unlearning on the ShapesCanvas VLM (%)

Command: `{command}` ({seconds:.0f} s). Test: {p["test_renders"]} fresh renders (every object × style ×
color combination, random geometry, seed {p["test_seed"]}), each asked "What shape / color / style is
this?" (greedy `generate()`). Selection: {p["selection"]}.

Base model accuracy: {base}; well-formed answers {100 * p["base_fluency"]:.1f} %.

{table(result.unlearned, defaults)}
{image}
forget: share of renders showing the value whose question about its attribute is no longer answered
with it. Same attribute: accuracy on renders without the value. Other attributes: accuracy of the other
two questions on every render (and on the renders showing the value). In-domain: share of the answers
about the value's attribute, on renders showing it, that are still a word of that attribute (red →
"blue"). Fluency: answers that are one word of the answer vocabulary. Targets (issue #7): forget ≥ 90,
same ≥ 90 % of base, other ≥ 95 % of base.

```
{run}
```
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_FOLDER)
    p.add_argument("--bundle", default=DEFAULT_BUNDLE)
    p.add_argument("--targets", nargs="+", default=list(TARGETS))
    p.add_argument("--repeats", type=int, default=5, help="renders per combination")
    p.add_argument("--seed", type=int, default=TEST_SEED)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "vlm_unlearning"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = describe_run(args.seed)
    print(run, flush=True)
    start = time.perf_counter()
    result = run_benchmark(args.model, args.bundle, args.targets, args.repeats, args.seed)
    seconds = time.perf_counter() - start
    command = shlex.join(["python", "benchmarks/vlm_unlearning.py", *sys.argv[1:]])
    data = result.to_json()
    data["protocol"].update({"command": command, "seconds": seconds, "run": run})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    md = markdown(result, command, run, seconds)
    out.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)


if __name__ == "__main__":
    main()
