"""Adversarial feature selection against UnlearnDiffAtk, held out from the benchmark's attack.

    python examples/experiments/adversarial_selection.py [--concepts striped] [--rounds 2]

For each concept: attack the shipped bundle's edit with UnlearnDiffAtk on *training* captions (not
the robustness benchmark's caption), with target images from other seeds (1000+) and attack seeds
1000+; run the statistics pass on the typed prompts the attack found, as a facet of the concept
(``<concept>@attack``, the concept's own hookpoints and selection settings); repeat against the
edit with the facet. Before and after, the measurement of ``hookpoint_robustness.py``: UA clean and
under UnlearnDiffAtk on the training captions (attack seeds 100+) and on the robustness benchmark's
held-out caption (targets from seeds 0–7, attack seed 0, judged on seeds 100–107), and IRA / CRA.
Also, at each tuned hookpoint, the mean activation of the concept's selected latents on its own
statistics prompts and on the attack prompts, and the latents the facet selects
(``benchmarks/results/experiments/adversarial_selection/results.json``, about 3 min per concept on
2 cores).
"""

from __future__ import annotations

import argparse
import time

from _attack_setup import ROOT, attack_row, concept_case, describe, load, write_results

from saeuron_plugin.attacks import AttackConfig, unlearndiffatk
from saeuron_plugin.sae.selection import concept_scores, select_features

OUT = ROOT / "benchmarks" / "results" / "experiments" / "adversarial_selection"


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
    parser.add_argument("--concepts", nargs="+", default=["striped"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    pipe, judge, eraser = load(args.threads)
    results = {}
    for concept in args.concepts:
        start = time.perf_counter()
        case = concept_case(pipe, judge, concept)
        paths = eraser.active_hookpoints(concept)
        facet = f"{concept}@attack"
        with eraser.unlearn(pipe, [concept]):
            before = attack_row(pipe, case)
        print(describe(case, "before", before), flush=True)
        found: list[str] = []
        names = [concept]
        for r in range(args.rounds):
            new = []
            with eraser.unlearn(pipe, names):
                for i, c in enumerate(case.train):  # other attack seeds than attack_row's
                    cfg = AttackConfig(iterations=40, lr=1e-2, batch=8, seed=1000 + 10 * r + i)
                    new.append(unlearndiffatk(pipe, case.targets[c], c, cfg))
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
        with eraser.unlearn(pipe, names):
            after = attack_row(pipe, case)
        print(describe(case, "with the facet", after), flush=True)
        results[concept] = {
            "before": before,
            "after": after,
            "attack_prompts": found,
            "latents": latent_report(eraser, concept, facet, paths),
            "seconds": round(time.perf_counter() - start),
        }
        write_results(OUT / "results.json", results)
    print(f"wrote {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
