"""A reconstruction-error gate against UnlearnDiffAtk (issue #20's defence candidates).

    python examples/experiments/error_gate.py [--concepts striped] [--quantile 0.99]

Hypothesis: a prompt that draws the concept while its SAE features stay silent must carry it off the
SAE's manifold, in the reconstruction error that the error-preserving edit passes through untouched.
The gate: at every attn2 hookpoint holding the concept, a token whose relative SAE error
‖x − x̂‖ / ‖x‖ exceeds that hookpoint's ``--quantile`` over benign generations (8 benchmark captions,
with and without the concept) loses its error term (x → x̂ + the edit). The concept's own edit stays
at its tuned hookpoints. Measured like ``hookpoint_robustness.py`` (training captions and the
benchmark's held-out caption under UnlearnDiffAtk, clean UA, IRA / CRA); gradients pass through the
gate (it is part of what the attacker differentiates). Writes
``benchmarks/results/experiments/error_gate/results.json``.
"""

from __future__ import annotations

import argparse
import time

import torch
from _attack_setup import ROOT, attack_row, concept_case, describe, load, rb, saved_results, write_results

from saeuron_plugin.shapescanvas import data as sc
from saeuron_plugin.shapescanvas.model import generate

OUT = ROOT / "benchmarks" / "results" / "experiments" / "error_gate"


def relative_error(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x − x̂, ‖x − x̂‖ / ‖x‖ per token) of the SAE's TopK reconstruction."""
    err = x - sae(x, measure_threshold=False).reconstruction
    return err, err.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-6)


def calibrate(pipe, eraser, concept: str, paths: list[str], quantile: float) -> dict[str, float]:
    """Per hookpoint: the ``quantile`` of the relative error over every token of benign generations."""
    prompts = [p.prompt for p in sc.benchmark_prompts()[:: len(sc.benchmark_prompts()) // 8][:8]]
    seen: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    with eraser.unlearn(pipe, [concept], hookpoints=paths) as handle:  # editors replaced below
        for path in paths:
            sae = eraser.hookpoints[path].sae

            def record(x, ctx, _sae=sae, _path=path):
                with torch.no_grad():
                    seen[_path].append(relative_error(_sae, x)[1].flatten())
                return x

            handle.hooks.sites[path].editor = record
        generate(
            pipe,
            prompts,
            list(range(300, 308)),
            rb.GEN_KW["num_inference_steps"],
            rb.GEN_KW["guidance_scale"],
        )
    return {p: float(torch.quantile(torch.cat(v)[:1_000_000], quantile)) for p, v in seen.items()}


def install_gate(handle, eraser, thresholds: dict[str, float], edited: list[str]) -> None:
    """Every site of ``handle`` drops the error of flagged tokens; sites outside ``edited`` only gate."""
    for path, limit in thresholds.items():
        site = handle.hooks.sites[path]
        sae = eraser.hookpoints[path].sae
        edit = site.editor if path in edited else None

        def gated(x, ctx, _edit=edit, _sae=sae, _limit=limit):
            y = _edit(x, ctx) if _edit is not None else x
            err, ratio = relative_error(_sae, x)
            flag = (ratio > _limit).unsqueeze(-1)
            return torch.where(flag, y - err.to(y.dtype), y)

        site.editor = gated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=["striped"])
    parser.add_argument("--quantile", type=float, default=0.99)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    pipe, judge, eraser = load(args.threads)
    out, results = saved_results(OUT)
    for concept in args.concepts:
        start = time.perf_counter()
        paths = [p for p in eraser.where(concept) if p.endswith("attn2")]
        thresholds = calibrate(pipe, eraser, concept, paths, args.quantile)
        case = concept_case(pipe, judge, concept)
        tuned = eraser.active_hookpoints(concept)
        with eraser.unlearn(pipe, [concept], hookpoints=list(dict.fromkeys(tuned + paths))) as handle:
            install_gate(handle, eraser, thresholds, tuned)
            row = attack_row(pipe, case)
        row |= {
            "quantile": args.quantile,
            "thresholds": thresholds,
            "seconds": round(time.perf_counter() - start),
        }
        print(f"{describe(case, f'gate q{args.quantile}', row)} ({row['seconds']} s)", flush=True)
        results.setdefault(concept, {})[f"q{args.quantile}"] = row
        write_results(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
