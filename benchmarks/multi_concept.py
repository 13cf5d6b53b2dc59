"""Many concepts at once on ShapesCanvas (#22): UA and retention against the number of concepts removed.

    python benchmarks/multi_concept.py [--threads 2] [--forget 8] [--retain 24] [--seed 0]

SAeUron (the shipped bundle, each concept at its tuned defaults; overlapping latents take the most
negative result), UCE (one closed-form edit, its own multi-concept form, keyed on whole captions),
negative prompting (the concepts' captions listed) and ESD-x (sequential: fine-tuned on one concept
after another, each starting from the weights the previous left; trained weights cached under
``--esd-cache``, so a set reuses its prefix) remove growing sets of concepts at once:

* ``mixed``: star, striped, red, square, dotted, blue, triangle, checkered, first 1, 2, 3, 5 and 8
  (objects, styles and colors interleaved: the cross-domain case and sequential addition, one concept
  more each time);
* ``colors``: red, blue, green, yellow, purple (one domain; 5 = every color but orange).

For each set: UA of every removed concept on ``--forget`` captions with it (the domain judge does not see
it), and, on ``--retain`` captions with none of them, the judges' accuracy in the domains that lost a
concept (IRA) and in the others (CRA), as a share of the untouched model's accuracy on the same captions
and seeds. Writes benchmarks/results/multi_concept.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from _common import describe_run

from saeuron_plugin import SAeUron
from saeuron_plugin.benchmark.baselines import esd, generate_with, negative_prompt, uce
from saeuron_plugin.benchmark.baselines.presets import (
    concept_caption,
    joint_caption_pairs,
    shapescanvas_hparams,
)
from saeuron_plugin.benchmark.unlearning import concept_text
from saeuron_plugin.diagnostics.charts import draw_curves
from saeuron_plugin.shapescanvas import data as sc
from saeuron_plugin.shapescanvas.build import concept_domain, load_default
from saeuron_plugin.shapescanvas.judges import Judges
from saeuron_plugin.shapescanvas.model import generate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ORDERS = {
    "mixed": ("star", "striped", "red", "square", "dotted", "blue", "triangle", "checkered"),
    "colors": ("red", "blue", "green", "yellow", "purple"),
}
SIZES = {"mixed": (1, 2, 3, 5, 8), "colors": (1, 2, 3, 5)}
SEED_BASE = 60_000  # never used for statistics or tuning (those use 10k-40k)
GEN = {"steps": 25, "guidance_scale": 5.0}
METHODS = ("saeuron", "uce", "negative_prompt", "esd")
ESD_CACHE = ROOT / "runs" / "esd-cache"


def accuracy(
    judges: Judges, images: torch.Tensor, prompts: list[sc.BenchmarkPrompt], domains: list[str]
) -> float:
    """Mean judge accuracy over ``domains`` (one judge pass: ``Judges.accuracy``)."""
    labels = {d: torch.tensor([p.label(d) for p in prompts]) for d in domains}
    per_domain = judges.accuracy(images, labels)
    return sum(per_domain[d] for d in domains) / len(domains)


@contextmanager
def removing(method: str, pipe, eraser, removed: Sequence[str]) -> Iterator[Callable[..., torch.Tensor]]:
    """``generate(prompts, seeds)`` with ``method`` removing every concept of ``removed`` at once.

    SAeUron: one ``unlearn`` with all of them (each at its tuned defaults). UCE: one closed-form edit
    (its own multi-concept form) whose keys are whole captions mapped to the same caption without the
    removed concepts, preserving every caption that holds none of them (:func:`uce.caption_keys`;
    per-concept keys would give a caption with two removed concepts two targets, and the edits
    cancel); λ and ε at UCE's defaults. Negative prompt: the concepts' captions listed in one negative
    prompt. ESD-x: trained on each concept in turn (its presets), each run starting from the weights the
    previous one left (sequential addition), restored on exit.
    """
    texts = [concept_text(c) for c in removed]
    if method == "saeuron":
        with eraser.unlearn(pipe, list(removed)):
            yield lambda prompts, seeds: generate(pipe, prompts, seeds, **GEN)
        return
    if method == "uce":
        pairs, kept = joint_caption_pairs(list(removed))
        with uce.edited(pipe, uce.caption_keys(pipe, pairs, kept)) as run:
            yield lambda prompts, seeds: generate_with(run, prompts, seeds, **GEN)
        return
    if method == "negative_prompt":
        listing = ", ".join(concept_caption(t) for t in texts)
        with negative_prompt.erase(pipe, listing) as run:
            yield lambda prompts, seeds: generate_with(run, prompts, seeds, **GEN)
        return
    if method == "esd":
        with ExitStack() as stack:
            for text in texts:
                options = shapescanvas_hparams("esd", text) | {"cache_dir": ESD_CACHE, "progress": False}
                run = stack.enter_context(esd.erase(pipe, text, **options))
            yield lambda prompts, seeds: generate_with(run, prompts, seeds, **GEN)
        return
    raise KeyError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def measure(pipe, eraser, judges, method, removed, sample) -> dict:
    """UA per removed concept, IRA / CRA (absolute and % of base) on captions with none of them."""
    forget, retain, seeds, base_images = sample
    lost = {concept_domain(c) for c in removed}
    with removing(method, pipe, eraser, removed) as gen:
        ua = {}
        for c, ps in forget.items():
            images = gen([p.prompt for p in ps], [SEED_BASE + 500 + i for i in range(len(ps))])
            domain = concept_domain(c)
            target = sc.VOCABULARIES[domain].index(c)
            ua[c] = 100 * float((judges.classify(images)[domain] != target).float().mean())
        images = gen([p.prompt for p in retain], seeds)
    row = {
        "removed": list(removed),
        "ua": ua,
        "ua_mean": sum(ua.values()) / len(ua),
        "retain_prompts": len(retain),
    }
    for name, domains in (("ira", sorted(lost)), ("cra", [d for d in sc.DOMAINS if d not in lost])):
        if not domains:
            row[name] = row[f"{name}_base"] = row[f"{name}_of_base"] = None
            continue
        mine = accuracy(judges, images, retain, domains)
        base = accuracy(judges, base_images, retain, domains)
        row[name], row[f"{name}_base"] = 100 * mine, 100 * base
        row[f"{name}_of_base"] = 100 * mine / base if base else None
    return row


def sample_set(pipe, removed: Sequence[str], args, rng: random.Random) -> tuple:
    """Forget captions per concept, retain captions (none of them), their seeds and base images:
    the same for every method."""
    prompts = sc.benchmark_prompts()
    forget = {
        c: rng.sample([p for p in prompts if getattr(p, concept_domain(c)) == c], args.forget)
        for c in removed
    }
    free = [p for p in prompts if all(getattr(p, concept_domain(c)) != c for c in removed)]
    retain = rng.sample(free, min(args.retain, len(free)))
    seeds = [SEED_BASE + i for i in range(len(retain))]
    return forget, retain, seeds, generate(pipe, [p.prompt for p in retain], seeds, **GEN)


def markdown(result: dict, header: str) -> str:
    lines = ["# Many concepts at once (ShapesCanvas)", "", f"```\n{header}\n```", ""]
    for method, runs in result["methods"].items():
        for order, rows in runs.items():
            lines += [
                f"## {method}, {order}",
                "",
                "| removed | UA mean | UA per concept | IRA (% of base) | CRA (% of base) |",
                "|---|---|---|---|---|",
            ]
            for r in rows:
                per = ", ".join(f"{c} {v:.0f}" for c, v in r["ua"].items())
                ira = "–" if r["ira"] is None else f"{r['ira']:.1f} ({r['ira_of_base']:.1f})"
                cra = "–" if r["cra"] is None else f"{r['cra']:.1f} ({r['cra_of_base']:.1f})"
                lines.append(f"| {len(r['removed'])} | {r['ua_mean']:.1f} | {per} | {ira} | {cra} |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--forget", type=int, default=8, help="captions per removed concept")
    p.add_argument("--retain", type=int, default=24, help="captions with none of the removed concepts")
    p.add_argument("--orders", nargs="+", default=list(ORDERS), choices=list(ORDERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", default=str(RESULTS / "multi_concept.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    header = describe_run(args.seed)
    print(header, flush=True)
    pipe = load_default(str(ROOT / "checkpoints" / "shapescanvas-sd"))
    eraser = SAeUron.from_pretrained(ROOT / "checkpoints" / "shapescanvas-saeuron")
    judges = Judges.from_pretrained(ROOT / "checkpoints" / "shapescanvas-judges")
    start = time.perf_counter()
    methods: dict[str, dict[str, list]] = {m: {} for m in args.methods}
    for order in args.orders:
        for k in SIZES[order]:
            rng = random.Random(f"{args.seed}-{order}-{k}")
            sample = sample_set(pipe, ORDERS[order][:k], args, rng)
            for method in args.methods:
                row = measure(pipe, eraser, judges, method, ORDERS[order][:k], sample)
                methods[method].setdefault(order, []).append(row)
                print(
                    f"{method} {order} {k}: UA {row['ua_mean']:.1f} ({row['ua']}), IRA % of base "
                    f"{row['ira_of_base']}, CRA % of base {row['cra_of_base']}",
                    flush=True,
                )
    result = {
        "protocol": {
            "forget": args.forget,
            "retain": args.retain,
            "seed": args.seed,
            "steps": 25,
            "guidance": 5.0,
            "seconds": round(time.perf_counter() - start),
            "header": header,
        },
        "methods": methods,
    }
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result, header))
    panels = {
        f"{order}: {what}": {
            method: {float(len(r["removed"])): r[key] for r in runs.get(order, []) if r[key] is not None}
            for method, runs in methods.items()
        }
        for order in args.orders
        for what, key in (
            ("UA", "ua_mean"),
            ("IRA % of base", "ira_of_base"),
            ("CRA % of base", "cra_of_base"),
        )
    }
    draw_curves(
        out.with_suffix(".png"),
        panels,
        title="Many concepts at once (ShapesCanvas)",
        x_label="concepts removed at once",
        y_label="%",
        y_range=(0, 110),
    )
    print(f"wrote {out} ({result['protocol']['seconds']} s)")


if __name__ == "__main__":
    main()
