"""The unlearning benchmark on ShapesCanvas: UnlearnCanvas' UA / IRA / CRA protocol in miniature.

For each concept c of a domain (objects, styles, colors) and each method, images are generated
for every caption containing c and for a fixed sample of captions of the same domain without it,
with the test seeds (never used for statistics or the hyperparameter search):

* UA  = share of c-images the domain's judge does not classify as c;
* IRA = domain-judge accuracy on the images without c;
* CRA = accuracy of the other domains' judges on all of them;
* clean (forget / retain) = share of the c-images / the other images that the domain's judge
  assigns to *some* class with confidence >= 0.9 (a clean image, not debris: PER's artifact
  question);
* in-domain = share of the c-images assigned with that confidence to *another* class of the
  domain (an unlearned star became another shape);
* KID (retain) = the paired unbiased MMD² of :mod:`.kid` between the method's images of the captions
  without c and the untouched model's images of the same captions and seeds, on the judges'
  penultimate features; per concept (each side's images distinct: pooling concepts would repeat
  base images the concepts' caption samples share), then mean ± sd over the domain's concepts (× 10³;
  each concept's value is kept in the results' ``kid_per_concept``).

Per method, ``grids/<method>.png`` shows the first concept of each domain: its forget captions and
retained captions, the untouched model's images over the method's (the first test seed set, so they
are images the table counted).

Image seeds depend on (seed set, caption index) only, so the untouched model's images are
generated once and shared by every method as the paired reference (``base``). Methods:
``saeuron`` (the shipped bundle with its tuned defaults) and the baselines of
:mod:`saeuron_plugin.benchmark.baselines` with the presets of :mod:`.baselines.presets`.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..shapescanvas import data as sc
from ..shapescanvas.build import concept_domain, judge_scores
from ..shapescanvas.model import DEFAULT_GUIDANCE, DEFAULT_STEPS, generate
from ..tuning.search import CLEAN_CONFIDENCE, clean_flips
from .kid import polynomial_mmd2

TEST_SEED = 50_000
SEARCH_DIR = "benchmarks/results/baseline-search"
"""Where the baselines' searches keep their trials (:mod:`.baselines.search`)."""
DOMAIN_KEYS = {"object": "objects", "style": "styles", "color": "colors"}
Generate = Callable[[Sequence[str], Sequence[int]], torch.Tensor]


@dataclass
class Protocol:
    """Everything that fixes the numbers (recorded with the results)."""

    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    scheduler: str = "DDIM"
    seeds: tuple[int, ...] = (0, 1)
    others: int = 24
    """Captions of the same domain without the concept, per concept (a fixed sample)."""
    sample_seed: int = 0


def concept_text(name: str) -> str:
    """How a concept appears in a caption: "star", "striped style", "red"."""
    return f"{name} style" if concept_domain(name) == "style" else name


def eval_prompts(name: str, protocol: Protocol) -> list[int]:
    """Indices into ``benchmark_prompts()``: every caption with ``name``, then the fixed sample without it."""
    prompts = sc.benchmark_prompts()
    domain = concept_domain(name)
    with_c = [i for i, p in enumerate(prompts) if getattr(p, domain) == name]
    without = [i for i, p in enumerate(prompts) if getattr(p, domain) != name]
    rng = np.random.default_rng([protocol.sample_seed, sc.VOCABULARIES[domain].index(name)])
    return with_c + sorted(
        int(i) for i in rng.choice(without, min(protocol.others, len(without)), replace=False)
    )


def image_seed(seed_set: int, prompt_index: int) -> int:
    return TEST_SEED + 1000 * seed_set + prompt_index


# --------------------------------------------------------------------------------------------- methods
@contextmanager
def method_generator(
    method: str,
    pipe: Any,
    concept: str,
    protocol: Protocol,
    *,
    eraser: Any = None,
    presets: dict[str, dict[str, Any]] | None = None,
    setting: dict[str, Any] | None = None,
) -> Iterator[Generate]:
    """A ``generate(prompts, seeds)`` with ``method`` unlearning ``concept`` (restored on exit).

    Baselines get :func:`~.baselines.presets.shapescanvas_hparams` (well-formed captions for the
    concept: the default's text encoder never saw a bare concept word), updated by ``presets[method]``
    and then by ``setting`` (this concept's tuned or searched hyper-parameters, see
    :mod:`.baselines.search`), where ``guidance_scale`` is the generation's CFG and ``retain``
    ("domain", "all", "none") picks the concepts a method preserves.
    """
    steps, guidance = protocol.steps, protocol.guidance_scale
    if method == "none":
        yield lambda prompts, seeds: generate(pipe, prompts, seeds, steps, guidance)
        return
    if method == "saeuron":
        with eraser.unlearn(pipe, concept):
            yield lambda prompts, seeds: generate(pipe, prompts, seeds, steps, guidance)
        return
    from .baselines import BASELINES, generate_with

    hparams = baseline_options(method, concept, presets, setting)
    guidance = hparams.pop("guidance_scale", guidance)
    with BASELINES[method].erase(pipe, concept_text(concept), **hparams) as run:
        yield lambda prompts, seeds: generate_with(run, prompts, seeds, steps, guidance)


def baseline_options(
    method: str,
    concept: str,
    presets: dict[str, dict[str, Any]] | None = None,
    setting: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``BASELINES[method].erase(pipe, concept_text(concept), **them)``:
    the ShapesCanvas presets, updated by ``presets[method]`` and then by ``setting`` (tuned), with
    ``retain`` turned into ``retain_texts``; a ``guidance_scale`` key is the generation's CFG."""
    from .baselines import BASELINES

    if method not in BASELINES:
        raise KeyError(f"unknown method {method!r}; known: saeuron, {', '.join(BASELINES)}")
    from .baselines.presets import shapescanvas_hparams
    from .baselines.search import retain_texts

    hparams = {
        **shapescanvas_hparams(method, concept_text(concept)),
        **(presets or {}).get(method, {}),
        **(setting or {}),
    }
    hparams["retain_texts"] = retain_texts(concept, hparams.pop("retain", "domain"))
    return hparams


def saved_setting(method: str, concept: str, search_dir: str | Path = SEARCH_DIR) -> dict[str, Any]:
    """A baseline's tuned setting for ``concept`` from its saved equal-tuning search (written by
    ``benchmarks/unlearning.py``); a clear error when it was never tuned."""
    from .baselines.search import saved_best

    best = saved_best(method, concept, search_dir)
    if best is None:
        raise FileNotFoundError(
            f"{method} has no tuned setting for {concept!r} in {Path(search_dir) / f'{method}.json'}; run "
            f"`python benchmarks/unlearning.py --methods {method} --concepts {concept}` first "
            "(or use the presets)"
        )
    return best


# ------------------------------------------------------------------------------------------- benchmark
METRICS = ("ua", "ira", "cra", "clean_forget", "clean_retain", "in_domain")


def scores(
    judges: Any, images: torch.Tensor, prompts: Sequence[sc.BenchmarkPrompt], concept: str
) -> dict[str, float]:
    """UA / IRA / CRA (:func:`judge_scores`) and the quality fractions of the module docstring."""
    probs = judges.probabilities(images)
    domain = concept_domain(concept)
    confident = probs[domain].max(-1).values >= CLEAN_CONFIDENCE
    has = torch.tensor([getattr(p, domain) == concept for p in prompts])
    flips = clean_flips(probs[domain], sc.VOCABULARIES[domain].index(concept))

    def share(x: torch.Tensor) -> float:
        return float(x.float().mean()) if x.numel() else float("nan")

    return {
        **judge_scores(judges, images, prompts, concept, probs=probs),
        "clean_forget": share(confident[has]),
        "clean_retain": share(confident[~has]),
        "in_domain": share(flips[has]),
    }


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def run_benchmark(
    methods: Sequence[str],
    *,
    concepts: Sequence[str] | None = None,
    protocol: Protocol | None = None,
    model: str = "checkpoints/shapescanvas-sd",
    bundle: str = "checkpoints/shapescanvas-saeuron",
    judges_path: str = "checkpoints/shapescanvas-judges",
    presets: dict[str, dict[str, Any]] | None = None,
    method_concepts: dict[str, Sequence[str]] | None = None,
    search_dir: str | Path | None = SEARCH_DIR,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every method on every concept; returns the results dict (see :func:`write_results`).

    ``method_concepts`` restricts a method to some concepts (ESD trains per concept, so the
    benchmark may run it on a subset); its domain averages are then over that subset.
    ``search_dir``: every baseline is first tuned per concept on the validation sets SAeUron's
    bundle was tuned on (:mod:`.baselines.search`, resumable, trials saved there) and tested with
    its winner; ``None`` runs the baselines at their presets.
    """
    from ..diffusion.unlearn import SAeUron
    from ..shapescanvas.build import load_default
    from ..shapescanvas.judges import Judges

    protocol = protocol or Protocol()
    concepts = list(concepts or sc.CONCEPTS)
    pipe = load_default(model)
    judges = Judges.from_pretrained(judges_path)
    eraser = SAeUron.from_pretrained(bundle) if "saeuron" in methods else None
    prompts = sc.benchmark_prompts()
    texts = [p.prompt for p in prompts]
    t0, commit = time.time(), head_commit()  # the code that runs, not a commit made during the run

    # the untouched model on every caption and seed set: the paired reference of every method
    base_images = {
        s: generate(
            pipe,
            texts,
            [image_seed(s, i) for i in range(len(texts))],
            protocol.steps,
            protocol.guidance_scale,
        )
        for s in protocol.seeds
    }
    tuned, tuning = tune_baselines(
        methods, pipe, judges, protocol, concepts, method_concepts or {}, presets, search_dir, bundle, log
    )
    base_pred = {s: judges.classify(img) for s, img in base_images.items()}
    base_feats = {s: judges.features(img) for s, img in base_images.items()}
    retained: dict[tuple[str, str, str], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    base = {}
    for domain, key in DOMAIN_KEYS.items():
        labels = torch.tensor([p.label(domain) for p in prompts])
        accs = [float((base_pred[s][domain] == labels).float().mean()) for s in protocol.seeds]
        base[key] = 100 * statistics.fmean(accs)
    log(f"base model: {', '.join(f'{k} {v:.1f}%' for k, v in base.items())} ({time.time() - t0:.0f} s)")

    rows: list[dict[str, Any]] = []
    for name in concepts:
        idx = eval_prompts(name, protocol)
        sub = [prompts[i] for i in idx]
        for s in protocol.seeds:
            b = scores(judges, base_images[s][idx], sub, name)
            rows.append({"method": "none", "concept": name, "domain": concept_domain(name), "seed": s, **b})
    for method in methods:
        t_m = time.time()
        for name in (method_concepts or {}).get(method, concepts):
            idx = eval_prompts(name, protocol)
            sub = [prompts[i] for i in idx]
            t_c = time.time()
            setting = tuned.get(method, {}).get(name)
            with method_generator(
                method, pipe, name, protocol, eraser=eraser, presets=presets, setting=setting
            ) as gen:
                for s in protocol.seeds:
                    images = gen([texts[i] for i in idx], [image_seed(s, i) for i in idx])
                    keep = [j for j, p in enumerate(sub) if getattr(p, concept_domain(name)) != name]
                    mine, theirs = retained.setdefault((method, concept_domain(name), name), ([], []))
                    mine.append(judges.features(images[keep]))
                    theirs.append(base_feats[s][[idx[j] for j in keep]])
                    rows.append(
                        {
                            "method": method,
                            "concept": name,
                            "domain": concept_domain(name),
                            "seed": s,
                            **scores(judges, images, sub, name),
                        }
                    )
            last = [r for r in rows[-len(protocol.seeds) :]]
            log(
                f"{method:15s} {name:10s} UA {np.mean([r['ua'] for r in last]):.2f} "
                f"IRA {np.mean([r['ira'] for r in last]):.2f} CRA {np.mean([r['cra'] for r in last]):.2f} "
                f"({time.time() - t_c:.0f} s)"
            )
        log(f"{method}: {time.time() - t_m:.0f} s")
    per_concept: dict[tuple[str, str], list[float]] = {}
    kid_of: dict[str, dict[str, float]] = {}
    for (method, domain, name), (mine, theirs) in retained.items():  # distinct images on both sides
        value = polynomial_mmd2(torch.cat(mine), torch.cat(theirs), paired=True)  # row i: same caption, seed
        per_concept.setdefault((method, DOMAIN_KEYS[domain]), []).append(value)
        kid_of.setdefault(method, {})[name] = round(1e3 * float(value), 3)
    kid = {key: _mean_sd(values) for key, values in per_concept.items()}
    results = summarise(rows, base, protocol, methods, time.time() - t0, kid, commit)
    results["kid_per_concept"] = kid_of
    results["tuning"] = tuning
    results["tuned_settings"] = tuned
    return results


GRID_IMAGES = 6
"""Forget and retained captions shown per concept in a method's grid."""


def grid_concepts(concepts: Sequence[str]) -> list[str]:
    """The first concept of each domain in ``concepts`` (the ones a grid shows)."""
    first: dict[str, str] = {}
    for name in concepts:
        first.setdefault(concept_domain(name), name)
    return list(first.values())


def write_grids(
    methods: Sequence[str],
    folder: str | Path,
    *,
    concepts: Sequence[str],
    protocol: Protocol,
    tuned: dict[str, dict[str, dict[str, Any]]],
    method_concepts: dict[str, Sequence[str]] | None = None,
    presets: dict[str, dict[str, Any]] | None = None,
    model: str = "checkpoints/shapescanvas-sd",
    bundle: str = "checkpoints/shapescanvas-saeuron",
    log: Callable[[str], None] = print,
) -> list[Path]:
    """``<folder>/grids/<method>.png``: labelled before / after images of forget and retained captions.

    Same captions, seeds and settings as the benchmark (``tuned``: the baselines' tuned settings), so
    every image shown is one the table counted.
    """
    from ..diffusion.unlearn import SAeUron
    from ..shapescanvas.build import load_default
    from ..shapescanvas.demo import before_after_grid

    pipe = load_default(model)
    eraser = SAeUron.from_pretrained(bundle) if "saeuron" in methods else None
    prompts, s = sc.benchmark_prompts(), protocol.seeds[0]
    out = Path(folder) / "grids"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    untouched: dict[str, torch.Tensor] = {}  # per concept: shared by every method's grid
    for method in methods:
        rows = []
        for name in grid_concepts((method_concepts or {}).get(method, concepts)):
            domain = concept_domain(name)
            idx = eval_prompts(name, protocol)
            forget = [i for i in idx if getattr(prompts[i], domain) == name][:GRID_IMAGES]
            retain = [i for i in idx if getattr(prompts[i], domain) != name][:GRID_IMAGES]
            chosen = forget + retain
            texts, seeds = [prompts[i].prompt for i in chosen], [image_seed(s, i) for i in chosen]
            if name not in untouched:
                untouched[name] = generate(pipe, texts, seeds, protocol.steps, protocol.guidance_scale)
            base = untouched[name]
            setting = tuned.get(method, {}).get(name)
            with method_generator(
                method, pipe, name, protocol, eraser=eraser, presets=presets, setting=setting
            ) as gen:
                mine = gen(texts, seeds)
            n = len(forget)
            rows.append((f"{method}, {name}: captions with it", base[:n], mine[:n]))
            rows.append((f"{method}, {name}: captions without it", base[n:], mine[n:]))
        if rows:
            path = out / f"{method}.png"
            before_after_grid(rows).save(path)
            written.append(path)
            log(f"grid: {path}")
    return written


def tune_baselines(
    methods: Sequence[str],
    pipe: Any,
    judges: Any,
    protocol: Protocol,
    concepts: Sequence[str],
    method_concepts: dict[str, Sequence[str]],
    presets: dict[str, dict[str, Any]] | None,
    search_dir: str | Path | None,
    bundle: str,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, dict[str, Any]]]:
    """Each baseline's tuned setting per concept and every method's tuning budget (trials, validation
    images, seconds): SAeUron's from its bundle's search, the baselines' from this search."""
    from .baselines.search import BaselineSearch, saeuron_summary

    tuned: dict[str, dict[str, dict[str, Any]]] = {}
    tuning: dict[str, dict[str, Any]] = {}
    for method in methods:
        mine = list(method_concepts.get(method, concepts))
        if method == "saeuron":
            tuning[method] = saeuron_summary(bundle, mine)
        elif search_dir is None:
            tuning[method] = {"concepts": len(mine), "trials": 0, "images": 0, "seconds": 0, "presets": True}
        else:
            t0 = time.time()
            search = BaselineSearch(
                method, pipe, judges, protocol, method_generator, out=search_dir, presets=presets, log=log
            )
            tuned[method] = {c: search.tune(c) for c in mine}
            tuning[method] = search.summary(mine)
            log(f"{method}: tuned in {time.time() - t0:.0f} s ({tuning[method]})")
    return tuned, tuning


def head_commit() -> str:
    """The checkout's short commit hash ("unknown" outside git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def summarise(
    rows: list[dict[str, Any]],
    base: dict[str, float],
    protocol: Protocol,
    methods: Sequence[str],
    seconds: float,
    kid: dict[tuple[str, str], tuple[float, float]] | None = None,
    commit: str | None = None,
) -> dict[str, Any]:
    """Domain averages per method: mean over concepts per seed, then mean ± sd over seeds (percent);
    ``kid``: (method, domain key) → KID of the retained images (mean, sd over concepts), × 10³;
    ``commit``: the code's commit (default: the checkout's now)."""
    out: dict[str, Any] = {
        "protocol": {
            **asdict(protocol),
            "commit": commit or head_commit(),
            "seconds": round(seconds),
            "test_seed_base": TEST_SEED,
        },
        "base": base,
        "methods": {},
        "spread": {},
        "concepts": rows,
    }
    for method in ["none", *methods]:
        per_domain, spread = {}, {}
        for domain, key in DOMAIN_KEYS.items():
            mine = [r for r in rows if r["method"] == method and r["domain"] == domain]
            if not mine:
                continue
            metrics, sds = {}, {}
            for m in METRICS:
                if not all(m in r for r in mine):
                    continue
                per_seed = [
                    statistics.fmean([r[m] for r in mine if r["seed"] == s])
                    for s in protocol.seeds
                    if any(r["seed"] == s for r in mine)
                ]
                mean, sd = _mean_sd(per_seed)
                metrics[m], sds[m] = round(100 * mean, 2), round(100 * sd, 2)
            if kid and (method, key) in kid:
                metrics["kid"], sds["kid"] = (round(1000 * v, 3) for v in kid[method, key])
            metrics["concepts"] = len({r["concept"] for r in mine})
            per_domain[key], spread[key] = metrics, sds
        out["methods"][method if method != "none" else "no_unlearning"] = per_domain
        out["spread"][method if method != "none" else "no_unlearning"] = spread
    return out


def write_results(
    results: dict[str, Any], folder: str | Path = "benchmarks/results", command: str = ""
) -> Path:
    """``unlearning.json`` (as returned), ``unlearning.md`` (tables) and ``unlearning.png`` (a bar plot)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "unlearning.json").write_text(json.dumps(results, indent=1) + "\n")
    (folder / "unlearning.md").write_text(markdown_table(results, command))
    try:
        plot(results, folder / "unlearning.png")
    except ImportError:  # matplotlib is in the bench extra
        warnings.warn(
            "matplotlib is not installed (pip install -e '.[bench]'): no unlearning.png", stacklevel=2
        )
    return folder


def markdown_table(results: dict[str, Any], command: str = "") -> str:
    p = results["protocol"]
    lines = [
        "# Unlearning on ShapesCanvas (UA / IRA / CRA, %)",
        "",
        f"Command: `{command or 'python benchmarks/unlearning.py'}` "
        f"(commit {p['commit']}, {p['seconds']} s). "
        f"Protocol: {p['scheduler']} {p['steps']} steps, guidance {p['guidance_scale']}, test seed sets "
        f"{list(p['seeds'])} (image seed {p['test_seed_base']} + 1000·set + caption index), every caption "
        f"with the concept plus {p['others']} without it per concept; mean ± sd over seed sets.",
        "",
        "Base model (judge accuracy on every caption): "
        + ", ".join(f"{k} {v:.1f} %" for k, v in results["base"].items()),
        "",
        "| method | domain | concepts | UA | IRA | CRA | avg | clean, forget | clean, retain | in-domain "
        "| KID×10³, retain |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, domains in results["methods"].items():
        for key, m in domains.items():
            sd = results["spread"][method][key]
            avg = (m["ua"] + m["ira"] + m["cra"]) / 3
            quality = " | ".join(f"{m[q]:.1f}" if q in m else "–" for q in METRICS[3:])
            quality += f" | {m['kid']:.2f} ± {sd['kid']:.2f}" if "kid" in m else " | –"
            lines.append(
                f"| {method} | {key} | {m['concepts']} | {m['ua']:.1f} ± {sd['ua']:.1f} | "
                f"{m['ira']:.1f} ± {sd['ira']:.1f} | {m['cra']:.1f} ± {sd['cra']:.1f} | {avg:.1f} | "
                f"{quality} |"
            )
    lines += tuning_table(results)
    lines += [
        "",
        "## Per concept (mean over seed sets)",
        "",
        "| method | concept | UA | IRA | CRA | clean, forget | KID×10³, retain |",
        "|---|---|---|---|---|---|---|",
    ]
    seen: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results["concepts"]:
        seen.setdefault((r["method"], r["concept"]), []).append(r)
    kid_of = results.get("kid_per_concept", {})
    for (method, concept), rs in seen.items():
        vals = [100 * statistics.fmean(r[m] for r in rs) for m in ("ua", "ira", "cra", "clean_forget")]
        kid = kid_of.get(method, {}).get(concept)
        lines.append(
            f"| {method} | {concept} | {vals[0]:.1f} | {vals[1]:.1f} | {vals[2]:.1f} | {vals[3]:.1f} | "
            f"{'–' if kid is None else f'{kid:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def tuning_table(results: dict[str, Any]) -> list[str]:
    """The tuning budget each method had, and the baselines' tuned settings per concept."""
    tuning = results.get("tuning") or {}
    if not tuning:
        return []
    lines = [
        "",
        "## Tuning budget (per-concept validation search; the same prompts and seeds for every method)",
        "",
        "| method | concepts | trials | validation images | seconds |",
        "|---|---|---|---|---|",
    ]
    for method, t in tuning.items():
        secs = "–" if t.get("seconds") is None else f"{t['seconds']}"
        label = f"{method} (presets)" if t.get("presets") else method
        lines.append(f"| {label} | {t['concepts']} | {t['trials']} | {t['images']} | {secs} |")
    for method, per_concept in (results.get("tuned_settings") or {}).items():
        lines += ["", f"{method}, tuned settings:", ""]
        lines += [
            f"- {concept}: `{json.dumps(setting, sort_keys=True)}`"
            for concept, setting in per_concept.items()
        ]
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in results["methods"] if m != "no_unlearning"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), sharey=True)
    for ax, key in zip(axes, DOMAIN_KEYS.values()):
        xs = np.arange(len(methods))
        for j, m in enumerate(("ua", "ira", "cra")):
            vals = [results["methods"][meth].get(key, {}).get(m, float("nan")) for meth in methods]
            errs = [results["spread"][meth].get(key, {}).get(m, 0.0) for meth in methods]
            ax.bar(xs + (j - 1) * 0.27, vals, 0.27, yerr=errs, label=m.upper())
        ax.set_xticks(xs, methods, rotation=30, ha="right")
        ax.set_title(key)
        ax.set_ylim(0, 105)
    axes[0].set_ylabel("%")
    axes[0].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- command
ALL_METHODS = ("saeuron", "negative_prompt", "sld", "uce", "esd")


def add_args(p: Any) -> None:
    """Options of ``saeuron eval`` and ``benchmarks/unlearning.py``."""
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), help=f"of {', '.join(ALL_METHODS)}")
    p.add_argument("--concepts", nargs="+", default=None, help="ShapesCanvas concepts (default: all 17)")
    p.add_argument(
        "--esd-concepts",
        nargs="+",
        default=None,
        help="ESD-x fine-tunes one UNet per concept (weights cached under --esd-cache): run it on these "
        "(default: every concept of --concepts)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="test seed sets")
    p.add_argument("--others", type=int, default=Protocol.others, help="captions without the concept")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--out", default="benchmarks/results", help="folder for unlearning.{json,md,png}")
    p.add_argument("--esd-cache", default="runs/esd-cache", help="trained ESD weights are kept here")
    p.add_argument(
        "--baselines-at",
        choices=("tuned", "robust", "presets"),
        default="tuned",
        help="tuned: each baseline searches its own hyper-parameters per concept on SAeUron's validation "
        "sets first (equal tuning; resumable); robust (--robustness only): UCE and ESD-x at their "
        "robustness stage's pick, as SAeUron's robust mode; presets: the hand-set presets",
    )
    p.add_argument("--search-dir", default=SEARCH_DIR, help="the baselines' search trials are kept here")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--bundle",
        default="checkpoints/shapescanvas-saeuron",
        help="the SAeUron bundle measured (e.g. one `saeuron build recipes/shapescanvas.toml` made)",
    )
    p.add_argument(
        "--robustness",
        action="store_true",
        help="run the robustness benchmark instead (adaptive attacks on SAeUron, its robust mode and the "
        "baselines of --methods; writes <out>/robustness.{json,md,png})",
    )
    p.add_argument("--iterations", type=int, default=40, help="attack iterations (with --robustness only)")
    p.add_argument(
        "--grids-only",
        action="store_true",
        help="only (re)write <out>/grids/<method>.png, with the saved tuned settings (nothing is tuned "
        "again unless a concept was never tuned)",
    )


def run_from_args(args: Any, command: str = "") -> dict[str, Any]:
    if args.baselines_at == "robust":
        raise ValueError("--baselines-at robust is for --robustness (the baselines' robustness stage)")
    if args.threads:
        torch.set_num_threads(args.threads)
    protocol = Protocol(steps=args.steps, seeds=tuple(args.seeds), others=args.others)
    concepts = args.concepts or list(sc.CONCEPTS)
    esd_concepts = concepts if args.esd_concepts is None else args.esd_concepts
    method_concepts = {"esd": [c for c in concepts if c in esd_concepts]}
    presets = {"esd": {"cache_dir": args.esd_cache, "progress": False}}
    grids = {
        "concepts": concepts,
        "protocol": protocol,
        "method_concepts": method_concepts,
        "presets": presets,
        "bundle": args.bundle,
    }
    if args.grids_only:
        tuned = _saved_tuning(args, grids)
        write_grids(args.methods, args.out, tuned=tuned, **grids)
        return {"tuned_settings": tuned}
    results = run_benchmark(
        args.methods,
        concepts=concepts,
        protocol=protocol,
        presets=presets,
        method_concepts=method_concepts,
        search_dir=args.search_dir if args.baselines_at == "tuned" else None,
        bundle=args.bundle,
    )
    write_results(results, args.out, command)
    write_grids(args.methods, args.out, tuned=results["tuned_settings"], **grids)
    print(markdown_table(results, command).split("\n## Per concept")[0])
    return results


def _saved_tuning(args: Any, grids: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """The baselines' tuned settings from their saved searches (reused trial by trial)."""
    if args.baselines_at != "tuned":
        return {}
    from ..shapescanvas.build import load_default
    from ..shapescanvas.judges import Judges

    tuned, _ = tune_baselines(
        args.methods,
        load_default(),
        Judges.from_pretrained("checkpoints/shapescanvas-judges"),
        grids["protocol"],
        grids["concepts"],
        grids["method_concepts"],
        grids["presets"],
        args.search_dir,
        args.bundle,
    )
    return tuned
