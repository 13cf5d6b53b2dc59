"""Experiment for issue #5: unlearn ShapesCanvas colors at the cross-attention outputs (attn2).

The shipped bundle ablates at block outputs (``unet.up_blocks.{1,2}.attentions.*``) and cannot
remove blue or yellow there: the text is read again by every later cross-attention, so a colour
edited out of one block's output comes back. Editing the *attn2 outputs*, where the text enters,
at every cross-attention of ``up_blocks.2`` and ``up_blocks.3`` (6 modules) removes each colour.

    python examples/experiments/colors_attn2.py build   # an SAE per attn2 module, concept statistics
    python examples/experiments/colors_attn2.py search  # validation search over hookpoint sets
    python examples/experiments/colors_attn2.py test    # test-seed UA / IRA / CRA of the winners

``build`` and ``search`` go through the bundle builder's own steps: ``collect_and_train``,
``add_statistics``, and ``search_defaults`` over the hookpoint sets up_blocks.3 / up_blocks.2+3 /
all attn2 × p × γ on validation seeds (never the test seeds). ``search`` saves each colour's winner
as its defaults, with the trials in ``search.json``. ``test`` runs the unlearning benchmark's
SAeUron arm with those defaults on the test seed sets and writes
``benchmarks/results/experiments/colors_attn2/unlearning.{json,md}``. The shipped bundle now edits
colours this way (``saeuron_plugin.shapescanvas.build.SEARCH_SETS``); this script keeps the colours-only
experiment that led there reproducible.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from saeuron_plugin.benchmark.unlearning import Protocol, run_benchmark, write_results
from saeuron_plugin.diffusion.hookpoints import list_hookpoints
from saeuron_plugin.diffusion.unlearn import SAeUron
from saeuron_plugin.shapescanvas import data as sc
from saeuron_plugin.shapescanvas.build import (
    BundleConfig,
    add_statistics,
    collect_and_train,
    load_default,
    search_defaults,
)
from saeuron_plugin.shapescanvas.judges import Judges

COLORS = list(sc.VOCABULARIES["color"])


def attn2_paths(pipe, blocks: tuple[str, ...]) -> list[str]:
    return [h.path for h in list_hookpoints(pipe) if h.kind == "attn" and any(b in h.path for b in blocks)]


def config(pipe, args: argparse.Namespace) -> BundleConfig:
    """Every attn2 module has an SAE; the search tries three sets of them ablated together."""
    every = attn2_paths(pipe, ("",))
    up3, up23 = attn2_paths(pipe, (".up_blocks.3.",)), attn2_paths(pipe, (".up_blocks.2.", ".up_blocks.3."))
    sets = (up3, up23, every)
    return BundleConfig(
        out=args.bundle,
        work=args.work,
        hookpoints=tuple(every),
        search_sets=tuple(tuple(s) for s in sets),
        search_percentiles=(99.0, 99.5),
        search_gammas=(-2.0, -6.0),
    )


def build(args: argparse.Namespace) -> None:
    """SAEs and statistics through the bundle builder's own steps (about 20 min)."""
    torch.manual_seed(0)
    pipe = load_default()
    cfg = config(pipe, args)
    eraser = collect_and_train(pipe, cfg)
    add_statistics(eraser, pipe, cfg)
    eraser.save_pretrained(args.bundle)


def search(args: argparse.Namespace) -> None:
    """The builder's search for the colours (about 13 min); winners saved as their defaults."""
    pipe = load_default()
    cfg = config(pipe, args)
    eraser = SAeUron.from_pretrained(args.bundle)
    trials = search_defaults(eraser, pipe, Judges.from_pretrained(cfg.judges), cfg, concepts=COLORS)
    eraser.save_pretrained(args.bundle)
    (Path(args.bundle) / "search.json").write_text(json.dumps({"tune": trials}, indent=1) + "\n")


def test(args: argparse.Namespace) -> None:
    """The benchmark's SAeUron arm with the searched defaults, on the test seed sets."""
    results = run_benchmark(["saeuron"], concepts=COLORS, protocol=Protocol(seeds=(0, 1)), bundle=args.bundle)
    write_results(results, args.out, "python examples/experiments/colors_attn2.py test")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["build", "search", "test"])
    p.add_argument("--bundle", default="runs/colors-attn2/bundle")
    p.add_argument("--work", default="runs/colors-attn2/work")
    p.add_argument("--out", default="benchmarks/results/experiments/colors_attn2")
    args = p.parse_args()
    {"build": build, "search": search, "test": test}[args.phase](args)


if __name__ == "__main__":
    main()
