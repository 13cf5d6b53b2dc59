"""Which hookpoint sets hold against UnlearnDiffAtk, and what they cost (issue #20's defence search).

    python examples/experiments/hookpoint_robustness.py [--concepts star striped red]

For each concept, the shipped bundle's tuned hookpoints T and wider sets (T plus the up_blocks.2
attn2 outputs, plus up_blocks.3, plus both, plus the down blocks, and every hookpoint holding the
concept), each with the concept's tuned selection settings. Every set is attacked with
UnlearnDiffAtk (5 prefix tokens, 40 iterations) on three *training* captions (target images from
seeds 1000+, attack seeds 100+), and on the robustness benchmark's held-out caption (targets from
seeds 0–7, attack seed 0); UA is judged on 8 images (seeds 100–107) of each attacked prompt; IRA /
CRA as the benchmark measures them. ``--target T`` replaces with concept T instead of only removing
(``--target-scale`` α; results under ``<concept>→T``). Writes
``benchmarks/results/experiments/hookpoint_robustness/results.json`` (about 1 min per set on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import robustness as rb  # noqa: E402
from adversarial_selection import TRAIN  # noqa: E402

from saeuron_plugin import ConceptAblation, SAeUron  # noqa: E402
from saeuron_plugin.attacks import AttackConfig, generate_from_embeds, target_latents, unlearndiffatk  # noqa: E402
from saeuron_plugin.eval import shapescanvas as sc  # noqa: E402
from saeuron_plugin.eval.shapescanvas_build import load_default  # noqa: E402
from saeuron_plugin.tuning import load_judge  # noqa: E402
from saeuron_plugin.tuning.search import forget_percent  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "experiments" / "hookpoint_robustness"


def hookpoint_sets(eraser, concept: str) -> dict[str, list[str]]:
    """Named candidate sets: the tuned one and wider ones (only hookpoints that hold the concept)."""
    held = eraser.where(concept)
    tuned = eraser.active_hookpoints(concept)

    def blocks(*prefixes: str) -> list[str]:
        return [p for p in held if p.startswith(prefixes) and p.endswith("attn2")]

    up2, up3 = blocks("unet.up_blocks.2"), blocks("unet.up_blocks.3")
    down = blocks("unet.down_blocks", "unet.mid_block")
    sets = {
        "tuned": tuned,
        "tuned+up2": tuned + up2,
        "tuned+up3": tuned + up3,
        "tuned+up2+up3": tuned + up2 + up3,
        "tuned+down": tuned + down,
        "everywhere": held,
    }
    return {name: list(dict.fromkeys(s)) for name, s in sets.items()}


def attacked_ua(pipe, ua, targets, caption: str, seed: int) -> tuple[float, str]:
    prompt = unlearndiffatk(pipe, targets, caption, AttackConfig(iterations=40, lr=1e-2, batch=8, seed=seed))
    typed, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    return ua(generate_from_embeds(pipe, typed, rb.EVAL_SEEDS, **rb.GEN_KW)), prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=["star", "striped", "red"])
    parser.add_argument("--target", default=None, help="replace with this concept (one concept at a time)")
    parser.add_argument("--target-scale", type=float, default=1.0)
    parser.add_argument("--sets", nargs="+", default=None, help="only these named hookpoint sets")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_default(str(ROOT / "checkpoints" / "shapescanvas-sd"))
    judge = load_judge("shapescanvas")
    eraser = SAeUron.from_pretrained(ROOT / "checkpoints" / "shapescanvas-saeuron")
    out = OUT / "results.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    for concept in args.concepts:
        domain = next(d for d, v in sc.VOCABULARIES.items() if concept in v)

        def ua(images: torch.Tensor, concept: str = concept, domain: str = domain) -> float:
            return forget_percent(judge, images, concept, domain)

        train = [c.format(concept) for c in TRAIN[domain]]
        held_out = rb.CAPTION[domain].format(concept)
        targets = {c: target_latents(pipe, c, range(1000, 1008), **rb.GEN_KW) for c in train}
        targets[held_out] = target_latents(pipe, held_out, range(8), **rb.GEN_KW)
        init, _ = pipe.encode_prompt(held_out, "cpu", 1, False)
        rows = {}
        spec = ConceptAblation(concept, target=args.target, target_scale=args.target_scale)
        for name, paths in hookpoint_sets(eraser, concept).items():
            if args.sets and name not in args.sets:
                continue
            start = time.perf_counter()
            with eraser.unlearn(pipe, [spec], hookpoints=paths):
                row = {
                    "hookpoints": paths,
                    "ua_clean": ua(generate_from_embeds(pipe, init, rb.EVAL_SEEDS, **rb.GEN_KW)),
                }
                train_ua = [attacked_ua(pipe, ua, targets[c], c, 100 + i)[0] for i, c in enumerate(train)]
                row["ua_attack_train"] = round(sum(train_ua) / len(train_ua), 2)
                row["ua_attack_train_each"] = train_ua
                row["ua_attack_held_out"], row["prompt_held_out"] = attacked_ua(
                    pipe, ua, targets[held_out], held_out, 0
                )
                row |= rb.retention(pipe, judge, concept, domain)
            row["seconds"] = round(time.perf_counter() - start)
            rows[name] = row
            print(
                f"{concept:8s} {name:14s} {len(paths):2d} hp: clean {row['ua_clean']:5.1f} attack train "
                f"{row['ua_attack_train']:5.1f} held-out {row['ua_attack_held_out']:5.1f} "
                f"IRA {row['ira']:5.1f} CRA {row['cra']:5.1f} ({row['seconds']} s)",
                flush=True,
            )
        key = concept if args.target is None else f"{concept}→{args.target} ×{args.target_scale:g}"
        results[key] = rows
        OUT.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
