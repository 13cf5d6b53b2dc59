"""``saeuron attack``: does an unlearned concept come back under an adaptive attack?

For one concept of a bundle on a diffusers pipeline: images of a prompt with the concept drawn by the
untouched model are the targets; the attack optimises against the *unlearned* pipeline, with gradients
through the edit, either the prompt embeddings (``--method soft``, the white-box upper bound), the
prompt's token embeddings through the text encoder (``--method token``, what a textual inversion can
carry) or a typed prefix (``--method unlearndiffatk``, UnlearnDiffAtk's published protocol). A judge
rates images at other seeds: UA (share not showing the concept) with the clean prompt and the attack.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def attack_args(p: argparse.ArgumentParser) -> None:
    from ..cli_prompts import model_args

    model_args(p, "the pipeline")
    p.add_argument("--sae", required=True, help="bundle folder or Hub repo")
    p.add_argument("--concept", required=True, help="the unlearned concept to attack")
    p.add_argument(
        "--judge", required=True, help="judge spec: shapescanvas[:DIR], clip:MODEL or module:function"
    )
    p.add_argument(
        "--prompt", default=None, help="a prompt with the concept (default: a ShapesCanvas caption)"
    )
    p.add_argument(
        "--method",
        choices=("soft", "token", "unlearndiffatk"),
        default="soft",
        help="soft: prompt embeddings (white-box bound); token: the token embeddings (a textual inversion's "
        "reach); unlearndiffatk: a typed 5-token prefix",
    )
    p.add_argument("--iterations", type=int, default=40, help="attack steps (UnlearnDiffAtk's budget: 40)")
    p.add_argument("--lr", type=float, default=None, help="default: 0.1 (soft, token), 0.01 (unlearndiffatk)")
    p.add_argument("--images", type=int, default=8, help="target images and judged images (default 8)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--robust",
        action="store_true",
        help="attack the bundle's robust mode (the hookpoints its tuner chose against attacks)",
    )
    p.add_argument("--out", default=None, help="write the result as JSON here")


def attack(args: argparse.Namespace) -> int:
    from ..diffusion.commands import load_pipeline
    from ..diffusion.unlearn import SAeUron
    from ..tuning.commands import shapescanvas_prompts
    from ..tuning.judges import load_judge
    from ..tuning.search import forget_percent, judge_domain
    from .soft_prompt import (
        AttackConfig,
        generate_from_embeds,
        soft_prompt_attack,
        target_latents,
        token_prompt_attack,
    )
    from .unlearndiffatk import unlearndiffatk

    if args.iterations < 1 or args.images < 1:
        raise ValueError("--iterations and --images must be >= 1")
    judge = load_judge(args.judge)  # everything cheap is checked before the model loads
    domain = judge_domain(judge, args.concept)
    eraser = SAeUron.from_pretrained(args.sae)
    eraser.check_known([args.concept])
    prompt = args.prompt or shapescanvas_prompts(args.concept, 1)[0][0]
    pipe = load_pipeline(args.model, args.device, args.dtype)
    gen: dict[str, Any] = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    eval_seeds = range(args.seed + 100, args.seed + 100 + args.images)

    def ua(images: Any) -> float:
        return forget_percent(judge, images, args.concept, domain)

    start = time.perf_counter()
    targets = target_latents(pipe, prompt, range(args.seed, args.seed + args.images), **gen)
    init, _ = pipe.encode_prompt(prompt, pipe.device, 1, False)
    result: dict[str, Any] = {
        "concept": args.concept,
        "prompt": prompt,
        "method": args.method,
        "iterations": args.iterations,
        "images": args.images,
        "seed": args.seed,
    }
    with eraser.unlearn(pipe, [args.concept], robust=args.robust):
        result["ua_clean"] = ua(generate_from_embeds(pipe, init, eval_seeds, **gen))
        lr = args.lr or (1e-2 if args.method == "unlearndiffatk" else 0.1)
        cfg = AttackConfig(iterations=args.iterations, lr=lr, batch=args.images, seed=args.seed)
        if args.method == "soft":
            attacked = soft_prompt_attack(pipe, targets, init, cfg)
        elif args.method == "token":
            attacked = token_prompt_attack(pipe, targets, prompt, cfg)
        else:
            result["attack_prompt"] = unlearndiffatk(pipe, targets, prompt, cfg, prefix_tokens=5)
            attacked, _ = pipe.encode_prompt(result["attack_prompt"], pipe.device, 1, False)
        result["ua_attacked"] = ua(generate_from_embeds(pipe, attacked, eval_seeds, **gen))
    result["loss_first_last"] = [cfg.losses[0], cfg.losses[-1]] if cfg.losses else None
    result["seconds"] = round(time.perf_counter() - start, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result))
    return 0


__all__ = ["attack", "attack_args"]
