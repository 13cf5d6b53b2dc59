"""Robustness of SAeUron on ShapesCanvas under adaptive attacks (issue #20, first part).

    python benchmarks/robustness.py [--concepts star striped red] [--iterations 40] [--threads 2]

For each concept: 8 target images of a caption with it, drawn by the untouched model; the attack
optimises that caption's ``prompt_embeds`` so the *unlearned* pipeline (the shipped bundle, its tuned
defaults) predicts their noise (UnlearnDiffAtk's loss on embeddings; Adam(W), lr 0.1, weight decay
0.1, batch 8), with gradients through the edit ("adaptive") and with the edit under ``no_grad``
replacing the module output as the reference harness does ("masked"); and UnlearnDiffAtk's published
protocol (5 relaxed prefix tokens before the caption, Adam(W) lr 1e-2, weight decay 0.1, 40 iterations,
discretised to a typed prompt). UA is judged on 8 images from other seeds with the eraser applied:
clean caption, then the attacked embeddings or prompt.

The weight-editing baselines (UCE, ESD-x; ``--baselines``) get the same attacks on their edited UNet,
with the presets of the unlearning benchmark (ESD-x weights cached under ``runs/esd-cache``); negative
prompting and SLD remove nothing on this model (UA ≤ 1.4 % clean), so there is nothing to attack. The
adaptive soft prompt is judged after 0, 5, 10, 20 and 40 iterations (the curve,
``benchmarks/results/robustness.png``).

Not yet here (the rest of #20): transfer attacks, IRA/CRA under attack, and a defence that holds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import describe_run

from saeuron_plugin import SAeUron
from saeuron_plugin.attacks import (
    AttackConfig,
    generate_from_embeds,
    masked_edits,
    soft_prompt_attack,
    target_latents,
    unlearndiffatk,
)
from saeuron_plugin.diagnostics.charts import draw_curves
from saeuron_plugin.eval import shapescanvas as sc
from saeuron_plugin.eval.baselines import BASELINES
from saeuron_plugin.eval.baselines.presets import shapescanvas_hparams
from saeuron_plugin.eval.shapescanvas_build import load_default
from saeuron_plugin.tuning import load_judge
from saeuron_plugin.tuning.search import forget_percent

ROOT = Path(__file__).resolve().parent.parent
CAPTION = {
    "object": "a red {} in solid style",
    "style": "a blue circle in {} style",
    "color": "a {} square in solid style",
}


CURVE = (0, 5, 10, 20, 40)
EVAL_SEEDS = range(100, 108)
GEN_KW = {"num_inference_steps": 25, "guidance_scale": 5.0}


def attack_row(pipe, targets, init, caption, ua, args, handle=None) -> dict:
    """UA clean, under the adaptive soft prompt (with its curve), gradient-masked (SAeUron only) and
    under UnlearnDiffAtk, against whatever eraser ``pipe`` has (hooks or edited weights)."""
    row = {"ua_clean": ua(generate_from_embeds(pipe, init, EVAL_SEEDS, **GEN_KW))}
    cfg = AttackConfig(
        iterations=args.iterations,
        lr=args.lr,
        batch=8,
        seed=args.seed,
        record_at=tuple(i for i in CURVE if i <= args.iterations),
    )
    attacked = soft_prompt_attack(pipe, targets, init, cfg)
    row["ua_adaptive"] = ua(generate_from_embeds(pipe, attacked, EVAL_SEEDS, **GEN_KW))
    row["curve_adaptive"] = {
        str(i): ua(generate_from_embeds(pipe, e, EVAL_SEEDS, **GEN_KW)) for i, e in cfg.snapshots.items()
    }
    if handle is not None:
        with masked_edits(handle):
            masked = soft_prompt_attack(
                pipe,
                targets,
                init,
                AttackConfig(iterations=args.iterations, lr=args.lr, batch=8, seed=args.seed),
            )
        row["ua_masked"] = ua(generate_from_embeds(pipe, masked, EVAL_SEEDS, **GEN_KW))
    cfg = AttackConfig(iterations=args.iterations, lr=1e-2, batch=8, seed=args.seed)
    row["unlearndiffatk_prompt"] = unlearndiffatk(pipe, targets, caption, cfg, prefix_tokens=5)
    typed, _ = pipe.encode_prompt(row["unlearndiffatk_prompt"], "cpu", 1, False)
    row["ua_unlearndiffatk"] = ua(generate_from_embeds(pipe, typed, EVAL_SEEDS, **GEN_KW))
    return row


def plot_curves(rows: dict, out: Path) -> None:
    """UA under the adaptive soft prompt vs iterations, one panel per concept, one line per method."""
    panels = {
        concept: {
            method: {float(i): ua for i, ua in per[concept]["curve_adaptive"].items()}
            for method, per in rows.items()
            if concept in per
        }
        for concept in rows["saeuron"]
    }
    draw_curves(
        out,
        panels,
        title="UA under the adaptive soft prompt (ShapesCanvas, 8 images)",
        x_label="attack iterations",
        y_label="UA (%)",
        y_range=(0, 100),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=["star", "striped", "red"])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--everywhere",
        action="store_true",
        help="ablate at every hookpoint whose library holds the concept, not only the "
        "tuned ones (a candidate defence)",
    )
    parser.add_argument(
        "--baselines", nargs="*", default=["uce", "esd"], help="weight-editing baselines to attack"
    )
    parser.add_argument("--steps", type=int, default=25, help="denoising steps (the protocol: 25)")
    parser.add_argument("--esd-cache", default=str(ROOT / "runs" / "esd-cache"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "robustness.json"))
    args = parser.parse_args(argv)
    GEN_KW["num_inference_steps"] = args.steps
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_run(args.seed))
    pipe = load_default(str(ROOT / "checkpoints" / "shapescanvas-sd"))
    judge = load_judge("shapescanvas")
    eraser = SAeUron.from_pretrained(ROOT / "checkpoints" / "shapescanvas-saeuron")
    rows: dict[str, dict] = {"saeuron": {}, **{m: {} for m in args.baselines}}
    start = time.perf_counter()
    for concept in args.concepts:
        domain = next(d for d, v in sc.VOCABULARIES.items() if concept in v)
        caption = CAPTION[domain].format(concept)
        targets = target_latents(pipe, caption, range(8), **GEN_KW)
        init, _ = pipe.encode_prompt(caption, "cpu", 1, False)

        def ua(images: torch.Tensor, concept: str = concept, domain: str = domain) -> float:
            return forget_percent(judge, images, concept, domain)

        where = eraser.where(concept) if args.everywhere else None
        with eraser.unlearn(pipe, [concept], hookpoints=where) as handle:
            row = attack_row(pipe, targets, init, caption, ua, args, handle)
        rows["saeuron"][concept] = {"domain": domain, "caption": caption, **row}
        print(
            f"{concept:9s} ({domain}) saeuron: UA clean {row['ua_clean']:5.1f}  soft prompt: adaptive "
            f"{row['ua_adaptive']:5.1f} (curve {row['curve_adaptive']}), "
            f"gradient-masked {row['ua_masked']:5.1f}  "
            f"UnlearnDiffAtk {row['ua_unlearndiffatk']:5.1f} ({row['unlearndiffatk_prompt']!r})",
            flush=True,
        )
        text = f"{concept} style" if domain == "style" else concept
        for method in args.baselines:
            options = shapescanvas_hparams(method, text)
            if method == "esd":
                options |= {"cache_dir": args.esd_cache, "progress": False}
            with BASELINES[method].erase(pipe, text, **options):
                row = attack_row(pipe, targets, init, caption, ua, args)
            rows[method][concept] = {"domain": domain, "caption": caption, **row}
            print(
                f"{concept:9s} ({domain}) {method}: UA clean {row['ua_clean']:5.1f}  soft prompt: adaptive "
                f"{row['ua_adaptive']:5.1f} (curve {row['curve_adaptive']})  UnlearnDiffAtk "
                f"{row['ua_unlearndiffatk']:5.1f}",
                flush=True,
            )
    protocol = {
        "attack": "soft prompt (prompt_embeds), UnlearnDiffAtk loss",
        "iterations": args.iterations,
        "lr": args.lr,
        "weight_decay": 0.1,
        "batch": 8,
        "targets": 8,
        "eval_images": 8,
        "steps": args.steps,
        "guidance": 5.0,
        "seed": args.seed,
        "bundle": "checkpoints/shapescanvas-saeuron",
        "hookpoints": "every one holding the concept" if args.everywhere else "the tuned ones",
        "curve_iterations": [i for i in CURVE if i <= args.iterations],
        "baselines": {m: "presets of the unlearning benchmark" for m in args.baselines},
        "seconds": round(time.perf_counter() - start),
    }
    Path(args.out).write_text(json.dumps({"protocol": protocol, **rows}, indent=1) + "\n")
    plot_curves(rows, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} ({protocol['seconds']} s)")


if __name__ == "__main__":
    main()
