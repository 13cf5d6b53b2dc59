"""``saeuron tune``: tune concepts of a bundle on a diffusers pipeline with a judge."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..cli_prompts import model_args, read_prompt_file
from .search import (
    BUDGETS,
    SearchSpace,
    TuneConfig,
    TuneTask,
    TuningError,
    judge_domain,
    read_search,
    robust_hookpoints,
    tune_concept,
)


def tune_args(p: argparse.ArgumentParser) -> None:
    model_args(p, "diffusers pipeline")
    p.add_argument("--sae", required=True, help="bundle folder to tune (written in place unless --out)")
    p.add_argument("--concept", action="append", required=True, help="concept to tune (repeatable)")
    p.add_argument(
        "--judge",
        required=True,
        help="shapescanvas[:FOLDER], clip:MODEL (Hub id or folder) or module:function",
    )
    p.add_argument(
        "--labels",
        action="append",
        default=None,
        metavar="DOMAIN=A,B,...",
        help="the judge's labels for clip / callable judges (repeatable, one per domain)",
    )
    p.add_argument("--forget-prompts", default=None, help="file: prompts with the concept (one --concept)")
    p.add_argument("--retain-prompts", default=None, help="file: prompts without it (one --concept)")
    p.add_argument(
        "--budget",
        choices=list(BUDGETS),
        default="small",
        help="grid size and validation prompts (tiny, small, medium, large)",
    )
    p.add_argument(
        "--robust-attacks",
        type=int,
        default=0,
        metavar="N",
        help="robustness stage: attack each candidate with UnlearnDiffAtk on N forget prompts and store the "
        "most resistant hookpoint set as the robust mode (unlearn(..., robust=True)); 0: none",
    )
    p.add_argument("--steps", type=int, default=25, help="denoising steps of the validation images")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default=None, help="write the tuned bundle (and search.json) here")


def _labels(values: list[str] | None) -> dict[str, list[str]] | None:
    if not values:
        return None
    out = {}
    for value in values:
        domain, _, names = value.partition("=")
        if not domain or not names:
            raise ValueError(f"--labels takes DOMAIN=A,B,...; got {value!r}")
        out[domain.strip()] = [n.strip() for n in names.split(",") if n.strip()]
    return out


def shapescanvas_captions(concept: str, with_concept: bool = True) -> list[str]:
    """ShapesCanvas captions with (or without) ``concept``, in the benchmark's order."""
    from ..shapescanvas import data as sc

    domain = next((d for d, v in sc.VOCABULARIES.items() if concept in v), None)
    if domain is None:
        raise TuningError(f"{concept!r} is not a ShapesCanvas concept; give forget and retain prompts")
    return [p.prompt for p in sc.benchmark_prompts() if (getattr(p, domain) == concept) == with_concept]


def shapescanvas_prompts(concept: str, n: int) -> tuple[list[str], list[str]]:
    """``n`` ShapesCanvas captions with ``concept`` and ``n`` without it, spread over the list."""
    with_c, without = shapescanvas_captions(concept), shapescanvas_captions(concept, with_concept=False)
    return with_c[:: max(1, len(with_c) // n)][:n], without[:: max(1, len(without) // n)][:n]


def tasks(args: argparse.Namespace, judge: Any) -> list[TuneTask]:
    """Prompts per concept, checked against the judge before any model loads."""
    n = BUDGETS[args.budget]["prompts"]
    if (args.forget_prompts or args.retain_prompts) and len(args.concept) != 1:
        raise ValueError("--forget-prompts / --retain-prompts go with exactly one --concept")
    out = []
    for concept in args.concept:
        if args.forget_prompts or args.retain_prompts:
            if not (args.forget_prompts and args.retain_prompts):
                raise ValueError("give both --forget-prompts and --retain-prompts")
            forget = read_prompt_file(args.forget_prompts)[:n]
            retain = read_prompt_file(args.retain_prompts)[:n]
        else:
            forget, retain = shapescanvas_prompts(concept, n)
        task = TuneTask(concept, forget, retain)
        task.domain = judge_domain(judge, concept)
        out.append(task)
    return out


def tune(args: argparse.Namespace) -> int:
    from ..diffusion.commands import load_pipeline
    from ..diffusion.unlearn import SAeUron
    from .judges import load_judge

    judge = load_judge(args.judge, labels=_labels(args.labels))  # fails before anything is generated
    todo = tasks(args, judge)
    eraser = SAeUron.from_pretrained(args.sae)
    eraser.check_known(args.concept)
    out = Path(args.out or args.sae)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    space = SearchSpace.from_budget(args.budget, robust_attacks=args.robust_attacks)
    cfg = TuneConfig(num_inference_steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch_size)
    best = {t.concept: tune_concept(eraser, pipe, judge, t, space, out, cfg) for t in todo}
    eraser.save_pretrained(out)
    search = read_search(out)
    print(
        f"{'concept':12s} {'p':>7s} {'γ':>6s} {'contrast':>9s}  {'UA':>5s} {'IRA':>5s} {'CRA':>5s}  "
        "hookpoints"
    )
    for name, b in best.items():
        scores = f"{100 * b['ua']:5.1f} {100 * b['ira']:5.1f} {100 * b['cra']:5.1f}"
        print(
            f"{name:12s} {b['percentile']:7.3f} {b['gamma']:6.1f} {b['contrast']!s:>9s}  {scores}  "
            f"{', '.join(b['hookpoints'])}"
        )
    robust = {
        name: search["tune"][name]["robust_best"] for name in best if "robust_best" in search["tune"][name]
    }
    for name, r in robust.items():
        print(
            f"{name:12s} robust mode: {len(robust_hookpoints(r))} hookpoint(s), UA under attack "
            f"{100 * r['ua_attack']:.1f} %"
        )
    print(json.dumps({"out": str(out), "best": best, "robust": robust}))
    return 0


__all__ = ["shapescanvas_prompts", "tasks", "tune", "tune_args"]
