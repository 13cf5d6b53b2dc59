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

Not yet here (the rest of #20): transfer attacks, the baselines, IRA/CRA under attack, the iteration
curve, and a defence.
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
from saeuron_plugin.eval import shapescanvas as sc
from saeuron_plugin.eval.shapescanvas_build import load_default
from saeuron_plugin.tuning import load_judge

ROOT = Path(__file__).resolve().parent.parent
CAPTION = {
    "object": "a red {} in solid style",
    "style": "a blue circle in {} style",
    "color": "a {} square in solid style",
}


def main() -> None:
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
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "robustness.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_run(args.seed))
    pipe = load_default(str(ROOT / "checkpoints" / "shapescanvas-sd"))
    judge = load_judge("shapescanvas")
    eraser = SAeUron.from_pretrained(ROOT / "checkpoints" / "shapescanvas-saeuron")
    gen_kw = {"num_inference_steps": 25, "guidance_scale": 5.0}
    rows = {}
    start = time.perf_counter()
    for concept in args.concepts:
        domain = next(d for d, v in sc.VOCABULARIES.items() if concept in v)
        caption = CAPTION[domain].format(concept)
        targets = target_latents(pipe, caption, range(8), **gen_kw)
        init, _ = pipe.encode_prompt(caption, "cpu", 1, False)
        label = judge.labels[domain].index(concept)

        def ua(images: torch.Tensor, domain: str = domain, label: int = label) -> float:
            return 100 * float((judge.probabilities(images)[domain].argmax(-1) != label).float().mean())

        row = {"domain": domain, "caption": caption}
        where = eraser.where(concept) if args.everywhere else None
        with eraser.unlearn(pipe, [concept], hookpoints=where) as handle:
            row["ua_clean"] = ua(generate_from_embeds(pipe, init, range(100, 108), **gen_kw))
            for name in ("adaptive", "masked"):
                cfg = AttackConfig(iterations=args.iterations, lr=args.lr, batch=8, seed=args.seed)
                with masked_edits(handle) if name == "masked" else torch.enable_grad():
                    attacked = soft_prompt_attack(pipe, targets, init, cfg)
                row[f"ua_{name}"] = ua(generate_from_embeds(pipe, attacked, range(100, 108), **gen_kw))
            cfg = AttackConfig(iterations=args.iterations, lr=1e-2, batch=8, seed=args.seed)
            row["unlearndiffatk_prompt"] = unlearndiffatk(pipe, targets, caption, cfg, prefix_tokens=5)
            typed, _ = pipe.encode_prompt(row["unlearndiffatk_prompt"], "cpu", 1, False)
            row["ua_unlearndiffatk"] = ua(generate_from_embeds(pipe, typed, range(100, 108), **gen_kw))
        rows[concept] = row
        print(
            f"{concept:9s} ({domain}): UA clean {row['ua_clean']:5.1f}  soft prompt: adaptive "
            f"{row['ua_adaptive']:5.1f}, gradient-masked {row['ua_masked']:5.1f}  UnlearnDiffAtk "
            f"{row['ua_unlearndiffatk']:5.1f} ({row['unlearndiffatk_prompt']!r})",
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
        "steps": 25,
        "guidance": 5.0,
        "seed": args.seed,
        "bundle": "checkpoints/shapescanvas-saeuron",
        "hookpoints": "every one holding the concept" if args.everywhere else "the tuned ones",
        "seconds": round(time.perf_counter() - start),
    }
    Path(args.out).write_text(json.dumps({"protocol": protocol, "saeuron": rows}, indent=1) + "\n")
    print(f"wrote {args.out} ({protocol['seconds']} s)")


if __name__ == "__main__":
    main()
