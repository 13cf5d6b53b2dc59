"""Experiment for issue #5: score object latents against the *worst* other concept, not the pool.

Cross stayed near 70 % UA at the ``up_blocks.1`` block outputs (the bundle before commit
ca6d8d4). At the attn2 output of ``down_blocks.2.attentions.0`` (8×8), the default score
(``contrast="others"``: the other 16 concepts pooled) picks latents that cross shares with one
other object: its top three at p 99.8 are latent 569 (also star's), 808 (also heart's) and 337
(cross only). Ablating them removes crosses and also hearts and stars, which then come out as
circles. ``contrast="worst"`` scores each latent against the other concept that uses it most, so
shared latents drop out of the selection.

    python examples/experiments/object_contrast.py [--concepts cross heart] [--threads 2]
    python examples/experiments/object_contrast.py --test [--threads 2]
    python examples/experiments/object_contrast.py --latents   # the shared latents, in seconds

Every setting is judged on the bundle search's stage-2 validation set (30 captions with the object
plus 30 without, seeds 40,000+; never the test seeds 50,000+) with both contrasts, and the table is
written to ``benchmarks/results/experiments/object_contrast/results.{json,md}``. About 20 s per
setting and contrast on 2 cores.

``--test`` then takes, per object, the ``worst``-contrast setting with the best mean(UA, IRA, CRA)
in that validation table, writes a copy of the shipped bundle with those defaults to
``runs/object-contrast-bundle`` and runs the unlearning benchmark's SAeUron arm on the six objects
(test seeds) into ``benchmarks/results/experiments/object_contrast/test/``. The shipped bundle is
not changed. This experiment led to the object search set ``bundle.OBJECT_ATTN2`` (this hookpoint,
``worst``, its own percentile/γ grid): the shipped bundle has been searched with it since.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from saeuron_plugin.benchmark.unlearning import run_benchmark, write_results
from saeuron_plugin.diffusion.unlearn import SAeUron
from saeuron_plugin.sae.selection import concept_scores, select_features
from saeuron_plugin.sae.spec import ConceptAblation
from saeuron_plugin.shapescanvas import build as B
from saeuron_plugin.shapescanvas.judges import Judges
from saeuron_plugin.shapescanvas.model import generate
from saeuron_plugin.tuning.search import write_defaults

D2_0 = "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn2"
SETTINGS = [((D2_0,), 99.8, -2.0), ((D2_0,), 99.8, -6.0), ((B.BLOCKS_UP1[0],), 99.0, -2.0)]
OUT = Path("benchmarks/results/experiments/object_contrast")
TEST_BUNDLE = Path("runs/object-contrast-bundle")


def validation_winners(rows: list[dict]) -> dict[str, dict]:
    """Per concept, the ``worst``-contrast row with the best mean(UA, IRA, CRA) (first of equals)."""
    best: dict[str, dict] = {}
    for r in rows:
        score = (r["ua"] + r["ira"] + r["cra"]) / 3
        if r["contrast"] == "worst" and score > best.get(r["concept"], {}).get("score", -1):
            best[r["concept"]] = {**r, "score": score}
    return best


def shared_latents(eraser: SAeUron, name: str, percentile: float = 99.8) -> list[dict]:
    """The latents the pooled score selects for ``name`` at D2_0 (middle τ bucket), and who else uses them."""
    lib = eraser.hookpoints[D2_0].library
    scores = concept_scores(lib, name, "others")
    bucket = scores.shape[0] // 2
    share = {n: lib.get(n).means(fill_empty=True)[bucket] for n in lib.names}
    share = {n: m / m.sum() for n, m in share.items()}
    out = []
    for latent in select_features(scores, percentile=percentile).bucket(bucket).tolist():
        rival = max((n for n in lib.names if n != name), key=lambda n: float(share[n][latent]))
        out.append(
            {
                "latent": latent,
                "share": float(share[name][latent]),
                "rival": rival,
                "rival_share": float(share[rival][latent]),
            }
        )
    return out


def evaluate(eraser, pipe, judges, cfg, name, validation, ablation, hookpoints) -> dict:
    """One trial: ``ablation`` at ``hookpoints`` on the validation captions and seeds, judged."""
    prompts, seeds = validation
    with eraser.unlearn(pipe, [ablation], hookpoints=list(hookpoints)):
        images = generate(pipe, [p.prompt for p in prompts], seeds, cfg.steps, cfg.guidance_scale)
    return B.trial_scores(judges, images, prompts, name)


def benchmark_winners(bundle: str) -> None:
    """Benchmark (test seeds) the validation winners in a copy of ``bundle``; the original is untouched."""
    winners = validation_winners(json.loads((OUT / "results.json").read_text())["rows"])
    eraser = SAeUron.from_pretrained(bundle)
    for name, w in winners.items():
        write_defaults(eraser, name, w, "worst")
        print(f"{name}: {B.short_set(w['hookpoints'])} p{w['percentile']:g} γ{w['gamma']:g} contrast worst")
    eraser.save_pretrained(TEST_BUNDLE, stats_dtype=torch.float32)
    results = run_benchmark(["saeuron"], concepts=list(winners), bundle=str(TEST_BUNDLE))
    write_results(results, OUT / "test", "python examples/experiments/object_contrast.py --test")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concepts", nargs="+", default=list(B.sc.OBJECTS))
    p.add_argument("--bundle", default="checkpoints/shapescanvas-saeuron")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--test", action="store_true", help="benchmark the validation winners on the test seeds")
    p.add_argument(
        "--latents",
        action="store_true",
        help="only list the latents the pooled score selects at down_blocks.2.attentions.0 attn2",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.test:
        benchmark_winners(args.bundle)
        return
    eraser = SAeUron.from_pretrained(args.bundle)
    if args.latents:
        for name in args.concepts:
            found = shared_latents(eraser, name)
            print(
                name,
                ", ".join(
                    f"{x['latent']} ({x['share']:.2f}; {x['rival']} {x['rival_share']:.2f})" for x in found
                ),
            )
        return
    cfg = B.BundleConfig()
    pipe, judges = B.load_default(cfg.model), Judges.from_pretrained(cfg.judges)
    rows = []
    for name in args.concepts:
        validation = B.validation_set(name, cfg.refine_prompts, cfg, "refine")
        for setting in SETTINGS:
            for contrast in ("others", "worst"):
                t0 = time.time()
                hps, pct, gamma = setting
                s = evaluate(
                    eraser,
                    pipe,
                    judges,
                    cfg,
                    name,
                    validation,
                    ConceptAblation(name, percentile=pct, gamma=gamma, contrast=contrast),
                    hps,
                )
                r = {
                    "concept": name,
                    "hookpoints": list(hps),
                    "percentile": pct,
                    "gamma": gamma,
                    "contrast": contrast,
                    **{k: 100 * s[k] for k in ("ua", "ira", "cra")},
                }
                rows.append(r)
                print(
                    f"{name:8s} {B.short_set(hps):28s} p{pct:g} γ{gamma:g} {contrast:6s}: "
                    f"UA {r['ua']:5.1f} IRA {r['ira']:5.1f} CRA {r['cra']:5.1f} ({time.time() - t0:.0f} s)",
                    flush=True,
                )
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python examples/experiments/object_contrast.py",
        "validation": "stage 2 (seeds 40,000+)",
    }
    (OUT / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines = ["| concept | hookpoints | p | γ | contrast | UA | IRA | CRA |", "|---" * 8 + "|"]
    lines += [
        f"| {r['concept']} | {B.short_set(r['hookpoints'])} | {r['percentile']:g} | {r['gamma']:g} | "
        f"{r['contrast']} | {r['ua']:.1f} | {r['ira']:.1f} | {r['cra']:.1f} |"
        for r in rows
    ]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}/results.{{json,md}}")


if __name__ == "__main__":
    main()
