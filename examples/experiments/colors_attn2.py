"""Experiment for issue #5: unlearn ShapesCanvas colors at the cross-attention outputs (attn2).

The shipped bundle ablates at block outputs (``unet.up_blocks.{1,2}.attentions.*``) and cannot
remove blue or yellow there: the text is read again by every later cross-attention, so a colour
edited out of one block's output comes back. Editing the *attn2 outputs*, where the text enters,
at every cross-attention of ``up_blocks.2`` and ``up_blocks.3`` (6 modules) removes each colour.

    python examples/experiments/colors_attn2.py build   # attn2 SAEs, statistics, validation search
    python examples/experiments/colors_attn2.py test    # test-seed UA / IRA / CRA of the chosen setting

``build`` goes through the package's own path (``eval.bundle.collect_and_train`` and
``add_statistics`` with attn2 hookpoints) and prints one JSON line per validation trial
(validation seeds, never the test seeds). ``test`` saves the chosen setting as the colours'
defaults and runs the unlearning benchmark's SAeUron arm on the test seed sets, writing
``benchmarks/results/experiments/colors_attn2/unlearning.{json,md,png}``. Not part of the shipped
bundle yet.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from saeuron_plugin.diffusion.hookpoints import list_hookpoints
from saeuron_plugin.diffusion.unlearn import SAeUron
from saeuron_plugin.eval import shapescanvas as sc
from saeuron_plugin.eval.bundle import (
    VALIDATION_SEED,
    BundleConfig,
    add_statistics,
    collect_and_train,
    judge_scores,
    load_default,
    split_prompts,
)
from saeuron_plugin.eval.default_model import generate
from saeuron_plugin.eval.unlearning import Protocol, run_benchmark, write_results

COLORS = list(sc.VOCABULARIES["color"])


def attn2_paths(pipe, blocks: tuple[str, ...]) -> list[str]:
    return [h.path for h in list_hookpoints(pipe) if h.kind == "attn" and any(b in h.path for b in blocks)]


def build(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    pipe = load_default()
    every = attn2_paths(pipe, ("",))
    cfg = BundleConfig(out=args.bundle, work=args.work, hookpoints=tuple(every))
    t0 = time.time()
    eraser = collect_and_train(pipe, cfg)
    add_statistics(eraser, pipe, cfg)
    eraser.save_pretrained(args.bundle)
    print("built", round(time.time() - t0), flush=True)
    from saeuron_plugin.eval.judges import Judges

    judges = Judges.from_pretrained(cfg.judges)
    options = {"up3-attn2": attn2_paths(pipe, (".up_blocks.3.",)),
               "up2+up3-attn2": attn2_paths(pipe, (".up_blocks.2.", ".up_blocks.3.")), "all-attn2": every}
    for name in COLORS:
        ci = eraser.concepts.index(name)
        prompts = split_prompts(name, cfg.search_prompts, np.random.default_rng([cfg.seed, ci, 7]))
        seeds = [VALIDATION_SEED + 97 * ci + i for i in range(len(prompts))]
        for (where, hps), pct, gamma in itertools.product(options.items(), (99.0, 99.5), (-2.0, -6.0)):
            with eraser.unlearn(pipe, name, hookpoints=hps, percentile=pct, strength=-gamma):
                images = generate(pipe, [p.prompt for p in prompts], seeds, cfg.steps, cfg.guidance_scale)
            s = judge_scores(judges, images, prompts, name)
            print(json.dumps({"c": name, "where": where, "p": pct, "g": gamma,
                              **{k: round(v, 2) for k, v in s.items()},
                              "avg": round(sum(s.values()) / 3, 3)}), flush=True)


def test(args: argparse.Namespace) -> None:
    pipe = load_default()
    where = attn2_paths(pipe, (".up_blocks.2.", ".up_blocks.3."))
    eraser = SAeUron.from_pretrained(args.bundle)
    for name in COLORS:
        for path in eraser.where(name):
            eraser.set_defaults(name, hookpoints=[path], percentile=args.percentile, top_n=None,
                                gamma=-args.strength, active=path in where)
    tuned = Path(args.bundle + "-tuned")
    eraser.save_pretrained(tuned)
    results = run_benchmark(["saeuron"], concepts=COLORS, protocol=Protocol(seeds=(0, 1)), bundle=str(tuned))
    command = f"python examples/experiments/colors_attn2.py test --percentile {args.percentile} " \
              f"--strength {args.strength}"
    write_results(results, args.out, command)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["build", "test"])
    p.add_argument("--bundle", default="runs/colors-attn2/bundle")
    p.add_argument("--work", default="runs/colors-attn2/work")
    p.add_argument("--percentile", type=float, default=99.5)
    p.add_argument("--strength", type=float, default=2.0)
    p.add_argument("--out", default="benchmarks/results/experiments/colors_attn2")
    args = p.parse_args()
    build(args) if args.phase == "build" else test(args)


if __name__ == "__main__":
    main()
