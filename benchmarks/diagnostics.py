"""What the shipped unlearning edits do inside the ShapesCanvas models (#21), in one command.

    python benchmarks/diagnostics.py [--threads 2] [--samples 12] [--attack-iterations 40]

Diffusion: ``saeuron diagnose`` on ``checkpoints/shapescanvas-sd`` with the shipped bundle, for one
object, one style and one color (star, striped, red): paired base / unlearned generations (same
seeds) of concept prompts, of retained prompts, of the concept prompts at 4× the tuned γ, and of
soft prompts optimised against the unlearned model (gradients through the edit); the ShapesCanvas
judges rate the unlearned images. VLM: the ShapesCanvas VLM and its bundle, unlearning "red", on
renders with and without red. Writes benchmarks/results/diagnostics.{json,md} and the heatmaps in
benchmarks/results/diagnostics/.
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

from saeuron_plugin.cli import main as saeuron

RESULTS = Path(__file__).parent / "results"
CONCEPTS = ("star", "striped", "red")


def vlm_part(value: str, samples: int, seed: int) -> dict:
    from saeuron_plugin.diagnostics.commands import diagnose_vlm
    from saeuron_plugin.shapescanvas.vlm import attribute_of, load_vlm, question_inputs, random_renders
    from saeuron_plugin.vlm.unlearn import VLMUnlearner

    model, processor = load_vlm("checkpoints/shapescanvas-vlm")
    bundle = VLMUnlearner.from_pretrained("checkpoints/shapescanvas-vlm-saeuron")
    attribute = attribute_of(value)
    renders = random_renders(samples * 16, seed)  # 1 in 6 renders is red: enough of both
    with_value = renders.where(attribute, value).subset(range(samples))
    without = renders.where(attribute, value, present=False).subset(range(samples))

    def inputs(r):
        batch = question_inputs(processor, r.images, attribute)
        return [{k: v[i : i + 1] for k, v in batch.items()} for i in range(len(r))]

    summary = diagnose_vlm(model, bundle, value, inputs(with_value), inputs(without), strengths=(1.0, 4.0))
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--samples", type=int, default=12)
    p.add_argument("--attack-iterations", type=int, default=40)
    p.add_argument("--attack-prompts", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "diagnostics"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    header = describe_run(args.seed)
    print(header, flush=True)
    start = time.perf_counter()
    out = Path(args.out)
    argv = [
        "diagnose",
        "--model",
        "checkpoints/shapescanvas-sd",
        "--sae",
        "checkpoints/shapescanvas-saeuron",
        *[a for c in CONCEPTS for a in ("--concept", c)],
        "-n",
        str(args.samples),
        "--judge",
        "shapescanvas",
        "--strength",
        "1",
        "--strength",
        "4",
        "--attack-iterations",
        str(args.attack_iterations),
        "--attack-prompts",
        str(args.attack_prompts),
        "--seed",
        str(args.seed),
        "--out",
        str(out),
    ]
    print("saeuron " + shlex.join(argv), flush=True)
    if saeuron(argv) != 0:
        return 1
    diffusion_seconds = time.perf_counter() - start
    # the CLI's own diagnostics.{json,md} are merged into results/diagnostics.{json,md}, not kept twice
    blob = json.loads((out / "diagnostics.json").read_text())
    md = (out / "diagnostics.md").read_text()
    (out / "diagnostics.json").unlink()
    (out / "diagnostics.md").unlink()
    t0 = time.perf_counter()
    blob["vlm"] = {"red": vlm_part("red", args.samples, 41_000 + args.seed)}
    blob["vlm_seconds"] = round(time.perf_counter() - t0, 1)
    blob["meta"]["benchmark"] = {
        "header": header,
        "diffusion_seconds": round(diffusion_seconds, 1),
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
    }
    results = out.parent  # diagnostics.{json,md} beside the heatmap folder
    (results / "diagnostics.json").write_text(json.dumps(blob, indent=1) + "\n")
    vlm = blob["vlm"]["red"]
    lines = [
        "",
        "## VLM: red (ShapesCanvas VLM, decoder layers)",
        "",
        "| metric | site | d (unlearned vs base, red renders) | AUC | d on renders without red |",
        "|---|---|---|---|---|",
    ]

    def fmt(x, digits=2):
        return "–" if x is None else f"{x:.{digits}f}"

    for r in vlm["ranking"]:
        lines.append(
            f"| {r['metric']} | {r['site']} | {fmt(r['d'])} | {fmt(r['auc'])} | {r.get('control_d')} |"
        )
    for name in ("concept", "retained"):
        drift = vlm["conditions"][name]["drift"]["relative_l2"]
        lines.append(
            f"- {name}: relative L2 drift per layer "
            + ", ".join(f"{s.rsplit('.', 1)[-1]}: {fmt(v['mean'], 4)}" for s, v in drift.items())
        )
    (results / "diagnostics.md").write_text(f"```\n{header}\n```\n\n" + md + "\n".join(lines) + "\n")
    print(f"total {time.perf_counter() - start:.0f} s; wrote {results / 'diagnostics.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
