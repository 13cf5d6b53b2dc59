"""Adversarial feature selection against UnlearnDiffAtk, held out from the benchmark's attack.

    python examples/experiments/adversarial_selection.py [--concepts striped red] [--rounds 2]

For each concept: attack the shipped bundle's edit with UnlearnDiffAtk on *training* captions (not
the robustness benchmark's caption), with target images from other seeds (1000+) and other attack
seeds; run the statistics pass on the typed prompts the attack found, as a facet of the concept
(``<concept>@attack``, the concept's own hookpoints and selection settings); repeat against the
edit with the facet. Then the robustness benchmark's evaluation for that concept (its caption,
target seeds 0–7, attack seed 0, judged on seeds 100–107): UA clean and under UnlearnDiffAtk, and
IRA / CRA under the same settings, before and after. Also, at each tuned hookpoint, the mean
activation of the concept's selected latents on its own statistics prompts and on the attack
prompts, and the latents the facet selects (``benchmarks/results/experiments/adversarial_selection/``,
about 2 min per concept on 2 cores).
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

import robustness as rb  # noqa: E402

from saeuron_plugin import SAeUron  # noqa: E402
from saeuron_plugin.attacks import AttackConfig, generate_from_embeds, target_latents, unlearndiffatk  # noqa: E402
from saeuron_plugin.eval import shapescanvas as sc  # noqa: E402
from saeuron_plugin.eval.shapescanvas_build import load_default  # noqa: E402
from saeuron_plugin.sae.selection import concept_scores, select_features  # noqa: E402
from saeuron_plugin.tuning import load_judge  # noqa: E402
from saeuron_plugin.tuning.search import forget_percent  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "experiments" / "adversarial_selection"

TRAIN = {
    "object": ["a green {} in striped style", "a blue {} in dotted style", "a yellow {} in checkered style"],
    "style": ["a red square in {} style", "a green triangle in {} style", "a purple heart in {} style"],
    "color": ["a {} circle in dotted style", "a {} star in striped style", "a {} cross in checkered style"],
}


def evaluate(pipe, judge, concept: str, domain: str, names: list[str], eraser) -> dict:
    caption = rb.CAPTION[domain].format(concept)
    targets = target_latents(pipe, caption, range(8), **rb.GEN_KW)
    init, _ = pipe.encode_prompt(caption, "cpu", 1, False)

    def ua(images: torch.Tensor) -> float:
        return forget_percent(judge, images, concept, domain)

    with eraser.unlearn(pipe, names):
        row = {"ua_clean": ua(generate_from_embeds(pipe, init, rb.EVAL_SEEDS, **rb.GEN_KW))}
        prompt = unlearndiffatk(pipe, targets, caption, AttackConfig(iterations=40, lr=1e-2, batch=8))
        typed, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        row["ua_unlearndiffatk"] = ua(generate_from_embeds(pipe, typed, rb.EVAL_SEEDS, **rb.GEN_KW))
        row["prompt"] = prompt
        row |= rb.retention(pipe, judge, concept, domain)
    return row


def latent_report(eraser, concept: str, facet: str, paths: list[str]) -> dict:
    """Per tuned hookpoint: the concept's selected latents, their mean activation (over τ buckets) on
    its statistics prompts and on the attack prompts, and the facet's selected latents."""
    report = {}
    for path in paths:
        lib = eraser.hookpoints[path].library
        d = lib.selection_defaults(concept)
        pick = {"percentile": d.percentile} if d.top_n is None else {"top_n": d.top_n}

        def chosen(name: str, lib=lib, d=d, pick=pick) -> list[int]:
            sel = select_features(concept_scores(lib, name, d.contrast), **pick)
            return sorted({int(i) for i in sel.indices.flatten() if i >= 0})

        mine = chosen(concept)
        mu_c = lib.get(concept).means(fill_empty=True)[:, mine].mean(0)
        mu_a = lib.get(facet).means(fill_empty=True)[:, mine].mean(0)
        report[path] = {
            "concept_latents": mine,
            "on_concept_prompts": [round(float(v), 4) for v in mu_c],
            "on_attack_prompts": [round(float(v), 4) for v in mu_a],
            "facet_latents": chosen(facet),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=["striped", "red"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_default(str(ROOT / "checkpoints" / "shapescanvas-sd"))
    judge = load_judge("shapescanvas")
    eraser = SAeUron.from_pretrained(ROOT / "checkpoints" / "shapescanvas-saeuron")
    results = {}
    for concept in args.concepts:
        start = time.perf_counter()
        domain = next(d for d, v in sc.VOCABULARIES.items() if concept in v)
        paths = eraser.active_hookpoints(concept)
        facet = f"{concept}@attack"
        before = evaluate(pipe, judge, concept, domain, [concept], eraser)
        print(concept, "before", before, flush=True)
        captions = [c.format(concept) for c in TRAIN[domain]]
        targets = {c: target_latents(pipe, c, range(1000, 1008), **rb.GEN_KW) for c in captions}
        found: list[str] = []
        names = [concept]
        for r in range(args.rounds):
            new = []
            with eraser.unlearn(pipe, names):
                for i, c in enumerate(captions):
                    cfg = AttackConfig(iterations=40, lr=1e-2, batch=8, seed=100 + 10 * r + i)
                    new.append(unlearndiffatk(pipe, targets[c], c, cfg))
            print(f"  round {r}: {new}", flush=True)
            found += new
            eraser.add_concept(
                facet,
                new,
                pipe,
                hookpoints=paths,
                num_inference_steps=25,
                guidance_scale=5.0,
                show_progress=False,
            )
            parent = eraser.hookpoints[paths[0]].library.selection_defaults(concept)
            eraser.set_defaults(
                facet,
                hookpoints=paths,
                percentile=parent.percentile,
                top_n=parent.top_n,
                gamma=parent.gamma,
                rule=parent.rule,
                contrast=parent.contrast,
                active=True,
            )
            names = [concept, facet]
        after = evaluate(pipe, judge, concept, domain, names, eraser)
        print(concept, "after", after, flush=True)
        results[concept] = {
            "before": before,
            "after": after,
            "attack_prompts": found,
            "seconds": round(time.perf_counter() - start),
        }
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
