"""``saeuron demo``: unlearn a style and an object on the embedded default, show and measure it.

For each concept the demo generates, with the same seeds, the untouched model's images and the
unlearned ones for prompts with the concept and for as many prompts of the same domain without it,
judges them (UA, IRA, CRA; base accuracy beside them), and writes a labelled before/after grid
(PNG) and ``metrics.json``. Everything is offline and takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .build import concept_domain, judge_scores, load_default, split_prompts
from .model import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate

DEMO_SEED = 40_000


def _label_strip(texts: Sequence[str], width: int, height: int = 12) -> Any:
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, height * len(texts)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, t in enumerate(texts):
        draw.text((2, i * height), t, fill=(0, 0, 0))
    return strip


def before_after_grid(rows: Sequence[tuple[str, torch.Tensor, torch.Tensor]], scale: int = 2) -> Any:
    """One labelled block per row: title, then 'before' images over 'after' images (float [N,3,H,W])."""
    from PIL import Image

    from .model import image_grid

    blocks = []
    for title, before, after in rows:
        pair = image_grid(torch.cat([before, after]), ncol=before.shape[0])
        pair = pair.resize((pair.width * scale, pair.height * scale), Image.NEAREST)
        label = _label_strip([title, "top: untouched model   bottom: unlearned"], pair.width)
        block = Image.new("RGB", (pair.width, pair.height + label.height), (255, 255, 255))
        block.paste(label, (0, 0))
        block.paste(pair, (0, label.height))
        blocks.append(block)
    width = max(b.width for b in blocks)
    grid = Image.new("RGB", (width, sum(b.height + 6 for b in blocks)), (255, 255, 255))
    y = 0
    for b in blocks:
        grid.paste(b, (0, y))
        y += b.height + 6
    return grid


def run_demo(
    concepts: Sequence[str] = ("checkered", "star"),
    out: str | Path = "out/demo",
    bundle: str = "checkpoints/shapescanvas-saeuron",
    model: str = "checkpoints/shapescanvas-sd",
    judges_path: str = "checkpoints/shapescanvas-judges",
    prompts_per_set: int = 36,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    show: int = 8,
    log: Any = print,
) -> dict[str, Any]:
    """Unlearn each concept in turn; returns (and writes) the metrics."""
    from ..diffusion.unlearn import SAeUron
    from .judges import Judges

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_default(model)
    eraser = SAeUron.from_pretrained(bundle)
    judges = Judges.from_pretrained(judges_path)
    metrics: dict[str, Any] = {
        "protocol": {
            "steps": steps,
            "guidance_scale": guidance_scale,
            "scheduler": "DDIM",
            "seed": DEMO_SEED,
            "prompts_per_set": prompts_per_set,
            "bundle": bundle,
            "model": model,
        },
        "concepts": {},
    }
    rows = []
    for ci, name in enumerate(concepts):
        domain = concept_domain(name)
        prompts = split_prompts(name, prompts_per_set, np.random.default_rng([DEMO_SEED, ci]))
        texts = [p.prompt for p in prompts]
        seeds = [DEMO_SEED + 1000 * ci + i for i in range(len(prompts))]
        with torch.no_grad():
            before = generate(pipe, texts, seeds, steps, guidance_scale)
            with eraser.unlearn(pipe, name) as handle:
                after = generate(pipe, texts, seeds, steps, guidance_scale)
        base = judge_scores(judges, before, prompts, name)
        unlearned = judge_scores(judges, after, prompts, name)
        n_with = sum(getattr(p, domain) == name for p in prompts)
        metrics["concepts"][name] = {
            "domain": domain,
            "hookpoints": handle.hookpoints,
            "images": len(prompts),
            # base: the untouched model; its "ua" is the share NOT drawn as the concept (should be ~0)
            "base": {"accuracy_on_concept": 1 - base["ua"], "ira": base["ira"], "cra": base["cra"]},
            "unlearned": unlearned,
        }
        log(
            f"{name!r} ({domain}, at {', '.join(handle.hookpoints)}): "
            f"UA {unlearned['ua']:.1%} (base model draws it {1 - base['ua']:.1%}), "
            f"IRA {unlearned['ira']:.1%} (base {base['ira']:.1%}), "
            f"CRA {unlearned['cra']:.1%} (base {base['cra']:.1%})"
        )
        k = min(show, n_with)
        rows.append((f"unlearn '{name}': prompts with it", before[:k], after[:k]))
        rows.append(
            (
                f"unlearn '{name}': other {domain}s (kept)",
                before[n_with : n_with + k],
                after[n_with : n_with + k],
            )
        )
    grid = before_after_grid(rows)
    grid.save(out / "grid.png")
    metrics["seconds"] = round(time.time() - t0, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(f"wrote {out / 'grid.png'} and {out / 'metrics.json'} in {metrics['seconds']:.0f} s")
    return metrics


__all__ = ["before_after_grid", "run_demo"]
