"""What stops the white-box soft prompt? Two candidates against the robust mode (issue #20's open point).

    python examples/experiments/soft_prompt_defences.py [--concepts striped red] [--delta 0.5]

The robustness benchmark's soft prompt (``prompt_embeds``, 40 iterations, lr 0.1, gradients through
the edit, the held-out caption and its targets; UA judged on seeds 100-107) against the shipped
bundle's robust mode, and:

* **token level**: the same attack on the text encoder's *input* token embeddings, so that what the
  UNet sees is a text-encoder output (what a textual-inversion file can carry). If this breaks a
  concept as well, refusing ``prompt_embeds`` that the text encoder did not make cannot protect it;
* **detection-gated replacement** (PER's proposal): at every hookpoint of the robust mode, a token
  where any of the concept's selected latents exceeds ``--delta`` × its mean on the concept's prompts
  (at the τ bucket) is *replaced* by the mean activation of the domain's other concepts (decoded from
  the library's pooled latent means), whatever else it carries. Attacked twice: through the hard gate
  as it is (replaced tokens pass no gradient), and by an attacker who differentiates a sigmoid
  surrogate of the gate (straight-through, temperature ``--temperature`` × δ). Only the second is an
  adaptive evaluation; the first shows what the gate's masked gradient would let one conclude.

IRA / CRA as the benchmark measures them. Writes
``benchmarks/results/experiments/soft_prompt_defences/results.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from _attack_setup import ROOT, SOFT_PROMPT, held_out, rb, setup_experiment, write_results

from saeuron_plugin.attacks import (
    AttackConfig,
    soft_prompt_attack,
    token_prompt_attack,
)
from saeuron_plugin.benchmark.baselines.base import encode_prompts
from saeuron_plugin.sae.kernels import _topk_members
from saeuron_plugin.shapescanvas import data as sc
from saeuron_plugin.shapescanvas.build import concept_domain

OUT = ROOT / "benchmarks" / "results" / "experiments" / "soft_prompt_defences"


@contextlib.contextmanager
def replacement(
    handle: Any, concept: str, delta: float, temperature: float | None, flagged: list[int]
) -> Iterator[None]:
    """Every site of ``handle`` (its ablator runs first) replaces the tokens where the concept is
    detected; ``temperature``: the straight-through surrogate's, None for the hard gate alone.
    ``flagged`` counts [replaced tokens, tokens]."""
    domain = sc.VOCABULARIES[concept_domain(concept)]
    originals = {path: site.editor for path, site in handle.hooks.sites.items()}
    for site in handle.hooks.sites.values():
        ablator = site.editor.ablator
        sae, lib = ablator.sae, ablator.library
        concept_mean = lib.get(concept).means(fill_empty=True).float()
        others = lib.pooled_means([n for n in lib.names if n != concept and n in domain]).float()
        background = others @ sae.W_dec.detach().float() + sae.b_dec.detach().float()  # [K, d]
        site.editor = _gated(site.editor, ablator, concept_mean, background, delta, temperature, flagged)
    try:
        yield
    finally:
        for path, editor in originals.items():
            handle.hooks.sites[path].editor = editor


def _gated(edit, ablator, concept_mean, background, delta, temperature, flagged) -> Callable[..., Any]:
    def call(x: torch.Tensor, ctx: Any) -> torch.Tensor:
        y = edit(x, ctx)
        bucket = ablator._bucket(ctx.tau, x)  # one for every row, or one per row
        flat = [bucket] if isinstance(bucket, int) else bucket.reshape(-1).tolist()
        rows = []
        for r, k in enumerate(flat * len(x) if len(flat) == 1 else flat):
            plan = ablator._plans[k]
            if plan is None:
                rows.append(y[r])
                continue
            z = _topk_members(ablator.sae, x[r], plan.latents)
            score = (z / concept_mean[k, plan.latents].clamp_min(1e-6)).max(-1).values
            hard = (score > delta).float().unsqueeze(-1)
            flagged[0] += int(hard.sum())
            flagged[1] += hard.numel()
            mix = hard
            if temperature is not None and torch.is_grad_enabled():
                soft = torch.sigmoid((score - delta) / (temperature * delta)).unsqueeze(-1)
                mix = hard + (soft - soft.detach())  # forward: the hard gate; backward: the surrogate
            rows.append(y[r] + mix.to(y.dtype) * (background[k].to(y.dtype) - y[r]))
        return torch.stack(rows)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=["striped", "red"])
    parser.add_argument("--delta", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=0.2)
    args, pipe, judge, eraser, out, results = setup_experiment(parser, OUT)
    for concept in args.concepts:
        case = held_out(pipe, judge, concept)
        init = encode_prompts(pipe, [case.caption])
        variants = {
            "robust mode": (None, "embeds"),
            "robust mode, token-level attack": (None, "tokens"),
            f"replacement δ {args.delta:g}, hard gate's gradient": ("hard", "embeds"),
            f"replacement δ {args.delta:g}, surrogate gradient": ("surrogate", "embeds"),
        }
        rows = results.setdefault(concept, {})
        for name, (gate, level) in variants.items():
            start, flagged = time.perf_counter(), [0, 0]
            with eraser.unlearn(pipe, [concept], robust=True) as handle, contextlib.ExitStack() as stack:
                if gate is not None:
                    temp = args.temperature if gate == "surrogate" else None
                    stack.enter_context(replacement(handle, concept, args.delta, temp, flagged))
                row: dict[str, Any] = {"ua_clean": case.ua(init)}
                row["flagged_clean"], flagged[:] = flagged[0] / max(flagged[1], 1), [0, 0]
                attack = AttackConfig(**SOFT_PROMPT)
                if level == "tokens":
                    attacked = token_prompt_attack(pipe, case.targets, case.caption, attack)
                else:
                    attacked = soft_prompt_attack(pipe, case.targets, init, attack)
                flagged[:] = [0, 0]
                row["ua_soft_prompt"] = case.ua(attacked)
                row["flagged_attacked"] = flagged[0] / max(flagged[1], 1)
                row |= rb.retention(pipe, judge, concept, case.domain)
            if gate is None:
                del row["flagged_clean"], row["flagged_attacked"]
            row |= {"attack": {**SOFT_PROMPT, "level": level}, "seconds": round(time.perf_counter() - start)}
            rows[name] = row
            write_results(out, results, f"{concept:8s} {name:45s}: {json.dumps(row)}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
