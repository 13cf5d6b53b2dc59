"""``saeuron diagnose`` and its Python API :func:`diagnose`: what an unlearning edit does inside the model.

For one concept of a bundle, on a diffusers pipeline, it runs paired generations (base and
unlearned twins with the same seeds, :func:`~saeuron_plugin.diffusion.diagnose.run_pairs`):

* ``concept``: prompts with the concept;
* ``retained``: prompts without it (the edit should leave them alone);
* ``concept@Mx``: the concept prompts with the edit's γ multiplied by M (``--strength``): does an
  over-strong edit push activations off their distribution?
* ``attacked`` (``--attack-iterations N``): soft prompts optimised against the unlearned model,
  with gradients through the edit (:mod:`saeuron_plugin.attacks`); can they be told from clean ones?

and writes ``diagnostics.json``, heatmaps (sites × τ bucket) of Cohen's d per metric and of the
drift, and ``diagnostics.md`` with the ranking (:mod:`.analysis`). With ``--judge`` the images of
the unlearned twins are judged, and the off-distribution score's power to predict unclean images
(no class of the domain at ≥ 0.9) is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .analysis import pooled_prediction, summarize
from .charts import draw_heatmap

HEATMAP_METRICS = ("effective_rank", "variance_kurtosis", "top_singular_share", "fvu", "attention_entropy")


def scaled_plan(bundle: Any, concept: str, multiplier: float) -> dict[str, list[Any]]:
    """The bundle's plan for ``concept`` with every γ multiplied by ``multiplier``."""
    plan = bundle.plan([concept])
    if multiplier == 1.0:
        return plan
    out = {}
    for path, specs in plan.items():
        library = bundle.hookpoints[path].library
        out[path] = [
            dataclasses.replace(s, gamma=s.resolve(library).gamma * multiplier, strength=None) for s in specs
        ]
    return out


def editors_for(
    bundle: Any, concept: str, multiplier: float = 1.0, encoder: str | None = None
) -> dict[str, Any]:
    """Hookpoint → site editor running the bundle's ablation of ``concept`` (γ × ``multiplier``)."""
    from ..sae.bundle import DeviceFollowingAblator

    ablators = bundle.ablators(scaled_plan(bundle, concept, multiplier), encoder=encoder)
    return {p: DeviceFollowingAblator(a) for p, a in ablators.items()}


def attacked_embeddings(
    pipe: Any, bundle: Any, concept: str, prompts: Sequence[str], iterations: int, cfg: Any, *, seed: int = 0
) -> torch.Tensor:
    """Soft prompts ``[N, L, D]`` optimised against the unlearned pipeline, one per prompt, starting
    from the prompt's own embedding; targets are the base model's images of it (gradients through
    the edit)."""
    from tqdm.auto import tqdm

    from ..attacks.soft_prompt import AttackConfig, soft_prompt_attack, target_latents

    out = []
    for i, prompt in enumerate(tqdm(prompts, desc=f"attack {concept}", unit="prompt")):
        targets = target_latents(
            pipe,
            prompt,
            range(seed + 1000 * i, seed + 1000 * i + 4),
            cfg.num_inference_steps,
            cfg.guidance_scale,
        )
        init, _ = pipe.encode_prompt(prompt, pipe.device, 1, False)
        with bundle.unlearn(pipe, [concept]):
            out.append(
                soft_prompt_attack(pipe, targets, init, AttackConfig(iterations=iterations, seed=seed + i))
            )
    return torch.cat(out).detach()


def diagnose(
    pipe: Any,
    bundle: Any,
    concept: str,
    concept_prompts: Sequence[str],
    retained_prompts: Sequence[str],
    cfg: Any = None,
    *,
    judge: Any = None,
    strengths: Sequence[float] = (1.0,),
    attacked: torch.Tensor | None = None,
    encoder: str | None = None,
    rounds: int = 500,
) -> dict[str, Any]:
    """Paired runs for every condition and their summary (:func:`.analysis.summarize`).

    ``cfg``: a :class:`~saeuron_plugin.diffusion.diagnose.DiagnoseConfig`. ``judge`` (any judge of
    :mod:`saeuron_plugin.tuning.judges`) rates the unlearned twins' images of the concept
    conditions. ``attacked``: prompt embeddings ``[N, L, D]`` to run as the ``attacked`` condition.
    """
    from ..diffusion.diagnose import DiagnoseConfig, run_pairs
    from ..tuning.search import judge_domain

    cfg = cfg or DiagnoseConfig()
    bundle.check_known([concept])
    saes = {p: e.sae for p, e in bundle.hookpoints.items()}
    runs: dict[str, Any] = {}
    judged = dataclasses.replace(cfg, images=judge is not None)
    for m in dict.fromkeys([1.0, *strengths]):
        name = "concept" if m == 1.0 else f"concept@{m:g}x"
        runs[name] = run_pairs(
            pipe, concept_prompts, editors_for(bundle, concept, m, encoder), judged, saes=saes, desc=name
        )
    runs["retained"] = run_pairs(
        pipe, retained_prompts, editors_for(bundle, concept, 1.0, encoder), cfg, saes=saes, desc="retained"
    )
    if attacked is not None:
        runs["attacked"] = run_pairs(
            pipe, attacked, editors_for(bundle, concept, 1.0, encoder), judged, saes=saes, desc="attacked"
        )
    probs = None
    if judge is not None:
        domain = judge_domain(judge, concept)
        probs = {
            n: judge.probabilities(r.edited_images)[domain]
            for n, r in runs.items()
            if r.edited_images is not None
        }
    summary = summarize(runs, judge_probs=probs, rounds=rounds)
    summary["concept"] = concept
    if probs:
        sweep = [n for n in probs if n.startswith("concept")]
        summary["off_distribution"]["pooled"] = pooled_prediction(
            [runs[n] for n in sweep], [probs[n] for n in sweep]
        )
        summary["clean_rate"] = {
            n: round(float((p.max(-1).values >= 0.9).double().mean()), 4) for n, p in probs.items()
        }
    return summary


def diagnose_vlm(
    model: Any,
    bundle: Any,
    concept: str,
    concept_inputs: Sequence[dict[str, Any]],
    retained_inputs: Sequence[dict[str, Any]],
    *,
    strengths: Sequence[float] = (1.0,),
    show_progress: bool = True,
    rounds: int = 500,
) -> dict[str, Any]:
    """:func:`diagnose` for a transformers VLM and a VLM bundle: per-sample model inputs (batch size 1)
    with and without the concept; observers at every decoder layer (no τ, no attention maps)."""
    from ..vlm.diagnose import run_pairs

    bundle.check_known([concept])
    saes = {p: e.sae for p, e in bundle.hookpoints.items()}
    tokens = {p: e.tokens for p, e in bundle.hookpoints.items()}
    runs: dict[str, Any] = {}
    conditions = [
        ("concept" if m == 1.0 else f"concept@{m:g}x", m, concept_inputs)
        for m in dict.fromkeys([1.0, *strengths])
    ] + [("retained", 1.0, retained_inputs)]
    for name, m, inputs in conditions:
        editors = editors_for(bundle, concept, m)
        runs[name] = run_pairs(
            model,
            inputs,
            editors,
            tokens={p: tokens[p] for p in editors},
            saes=saes,
            show_progress=show_progress,
            desc=name,
        )
    summary = summarize(runs, rounds=rounds)
    summary["concept"] = concept
    return summary


# ------------------------------------------------------------------------------------------- output
def write_outputs(summaries: dict[str, dict[str, Any]], out: Path, meta: dict[str, Any]) -> list[Path]:
    """``diagnostics.json``, ``diagnostics.md`` and the heatmaps per concept; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for concept, summary in summaries.items():
        concept_run = summary["conditions"]["concept"]
        order = concept_run["order"]
        labels = [s.removeprefix("unet.").removeprefix("transformer.") for s in order]
        for metric in HEATMAP_METRICS:
            effects = concept_run["effects"].get(metric)
            if not effects:
                continue
            rows = [effects.get(s, {}).get("d_per_bucket", []) for s in order]
            files.append(
                draw_heatmap(
                    out / f"{concept}-{metric}-d.png",
                    labels,
                    rows,
                    title=f"{concept}: Cohen's d of {metric}, unlearned vs base twins",
                )
            )
        drift = concept_run["drift"].get("relative_l2", {})
        rows = [drift.get(s, {}).get("per_bucket", []) for s in order]
        files.append(
            draw_heatmap(
                out / f"{concept}-drift.png",
                labels,
                rows,
                limit=0.5,
                title=f"{concept}: relative L2 drift, unlearned vs base (concept prompts)",
            )
        )
    blob = {"meta": meta, "concepts": summaries}
    path = out / "diagnostics.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(blob, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    files.append(path)
    md = out / "diagnostics.md"
    md.write_text(markdown(blob), encoding="utf-8")
    files.append(md)
    return files


def _fmt(x: Any, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(blob: dict[str, Any]) -> str:
    """The readable summary: per concept, the metric ranking, spread, retained drift, off-distribution."""
    meta = blob["meta"]
    lines = [
        "# Diagnostics",
        "",
        f"`{meta['command']}` · {meta['machine']} · seed {meta['seed']} · {meta['seconds']:.0f} s",
        "",
    ]
    for concept, s in blob["concepts"].items():
        c = s["conditions"]
        lines += [
            f"## {concept}",
            "",
            "| metric | site | d (unlearned vs base, concept prompts) | 95 % CI | AUC "
            "| d on retained prompts |",
            "|---|---|---|---|---|---|",
        ]
        for r in s["ranking"]:
            lines.append(
                f"| {r['metric']} | {r['site']} | {_fmt(r['d'])} | [{_fmt(r['d_ci'][0])}, "
                f"{_fmt(r['d_ci'][1])}] | {_fmt(r['auc'])} | {_fmt(r.get('control_d'))} |"
            )
        sp = c["concept"]["spread"]
        lines += [
            "",
            f"Spread: edited at {', '.join(sp['edited']) or '–'} (drift {_fmt(sp.get('edit_drift'), 3)}); "
            f"last site downstream with ≥ {sp.get('threshold', 0.1):.0%} of that drift: "
            f"{sp['reach'] or 'none'}.",
        ]
        for name in ("concept", "retained"):
            drift = c[name]["drift"].get("relative_l2", {})
            worst = max(((v["mean"] or 0.0, site) for site, v in drift.items()), default=(0.0, "–"))
            lines.append(f"- {name} prompts: largest mean relative L2 drift {worst[0]:.4f} at {worst[1]}")
        lines += [
            "",
            "| condition | off-distribution score (Δ FVU downstream) | unclean rate | AUC (score → unclean) "
            "|",
            "|---|---|---|---|",
        ]
        for name, od in s["off_distribution"].items():
            lines.append(
                f"| {name} | {_fmt(od.get('mean'), 4)} | {_fmt(od.get('unclean_rate'))} | "
                f"{_fmt(od.get('auc_unclean'))} |"
            )
        if "attack_detection" in s:
            lines += [
                "",
                "Attacked vs clean concept prompts (unlearned twins): best site per metric",
                "",
                "| metric | site | d | AUC |",
                "|---|---|---|---|",
            ]
            for metric, v in sorted(s["attack_detection"].items(), key=lambda kv: -abs(kv[1]["d"] or 0)):
                lines.append(f"| {metric} | {v['site']} | {_fmt(v['d'])} | {_fmt(v['auc'])} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
def diagnose_args(p: argparse.ArgumentParser) -> None:
    from ..cli_prompts import model_args

    model_args(p, "the pipeline")
    p.add_argument("--sae", required=True, help="bundle folder or Hub repo")
    p.add_argument("--concept", action="append", required=True, help="concept to diagnose (repeatable)")
    p.add_argument("--prompts", help="file of prompts with the concept (default: ShapesCanvas captions)")
    p.add_argument("--retain-prompts", help="file of prompts without it (default: ShapesCanvas captions)")
    p.add_argument("-n", "--samples", type=int, default=12, help="prompts per condition (default 12)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=6, help="sample pairs per pipeline call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tau-buckets", type=int, default=5)
    p.add_argument(
        "--strength",
        type=float,
        action="append",
        default=None,
        help="γ multipliers for the over-strength sweep (repeatable; default: 1 and 4)",
    )
    p.add_argument("--judge", default=None, help="judge for clean / unclean images (e.g. 'shapescanvas')")
    p.add_argument(
        "--attack-iterations",
        type=int,
        default=0,
        help="also diagnose soft-prompt attacks of this many steps (0: none)",
    )
    p.add_argument("--attack-prompts", type=int, default=4, help="concept prompts attacked (default 4)")
    p.add_argument("--no-attention", action="store_true", help="skip the attention maps")
    p.add_argument("--out", default="diagnostics", help="output folder (default ./diagnostics)")


def _prompt_sets(args: argparse.Namespace, concept: str) -> tuple[list[str], list[str]]:
    from ..cli_prompts import read_prompt_file
    from ..tuning.commands import shapescanvas_prompts

    if args.prompts or args.retain_prompts:
        if not (args.prompts and args.retain_prompts):
            raise ValueError("give both --prompts and --retain-prompts")
        return read_prompt_file(args.prompts)[: args.samples], read_prompt_file(args.retain_prompts)[
            : args.samples
        ]
    return shapescanvas_prompts(concept, args.samples)


def diagnose_command(args: argparse.Namespace) -> int:
    from ..diffusion.commands import load_pipeline
    from ..diffusion.diagnose import DiagnoseConfig
    from ..diffusion.unlearn import SAeUron
    from ..tuning.judges import load_judge

    start = time.perf_counter()
    judge = load_judge(args.judge) if args.judge else None
    bundle = SAeUron.from_pretrained(args.sae)
    bundle.check_known(args.concept)
    prompt_sets = {c: _prompt_sets(args, c) for c in args.concept}  # bad files fail before the model loads
    pipe = load_pipeline(args.model, args.device, args.dtype)
    cfg = DiagnoseConfig(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        batch_size=args.batch_size,
        seed=args.seed,
        tau_buckets=args.tau_buckets,
        attention=not args.no_attention,
    )
    strengths = args.strength or [1.0, 4.0]
    n_runs = len(args.concept) * (len(set([1.0, *strengths])) + 1 + bool(args.attack_iterations))
    print(
        f"diagnose: {len(args.concept)} concept(s) × {n_runs // len(args.concept)} paired runs of "
        f"{args.samples} prompts ({2 * args.samples * n_runs} images of {args.steps} steps)",
        flush=True,
    )
    summaries = {}
    for concept, (forget, retain) in prompt_sets.items():
        attacked = None
        if args.attack_iterations:
            attacked = attacked_embeddings(
                pipe,
                bundle,
                concept,
                forget[: args.attack_prompts],
                args.attack_iterations,
                cfg,
                seed=args.seed,
            )
        summaries[concept] = diagnose(
            pipe, bundle, concept, forget, retain, cfg, judge=judge, strengths=strengths, attacked=attacked
        )
    meta = {
        "command": "saeuron " + shlex.join(getattr(args, "argv", sys.argv[1:])),
        "machine": f"{platform.machine()} · {os.cpu_count()} cores · torch {torch.__version__}",
        "seed": args.seed,
        "seconds": time.perf_counter() - start,
        "model": args.model,
        "bundle": args.sae,
    }
    files = write_outputs(summaries, Path(args.out), meta)
    print(f"diagnose: {meta['seconds']:.0f} s; wrote {len(files)} files to {args.out}")
    for concept, s in summaries.items():
        for row in s["ranking"][:3]:
            print(f"  {concept}: {row['metric']} at {row['site']}: d {row['d']}, AUC {row['auc']}")
    return 0


__all__ = [
    "diagnose",
    "diagnose_args",
    "diagnose_command",
    "editors_for",
    "markdown",
    "scaled_plan",
    "write_outputs",
]
