"""The token-level soft prompt on every concept: what a pipeline that takes only text (and textual
inversions) can be given, against SAeUron and the baselines (issue #20's open point).

    python examples/experiments/token_level.py [--concepts star red] [--methods saeuron_robust uce]

The robustness benchmark's held-out caption, its 8 targets (seeds 0-7) and judged seeds (100-107);
the attack is :func:`~saeuron_plugin.attacks.token_prompt_attack` (the caption's token embeddings,
40 iterations, lr 0.1, gradients through the text encoder and the edit). Methods: SAeUron at its tuned
hookpoints and in its robust mode, UCE and ESD-x at their robustness stage's pick where it was run
(``--baselines-at robust`` of the benchmark), else at their equal-tuning setting. Writes
``benchmarks/results/experiments/token_level/results.json`` (per concept and method: UA clean and
under the attack, the setting) and prints domain means.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from _attack_setup import ROOT, SOFT_PROMPT, held_out, setup_experiment, write_results

from saeuron_plugin.attacks import AttackConfig, token_prompt_attack
from saeuron_plugin.benchmark.baselines.base import encode_prompts
from saeuron_plugin.benchmark.baselines.search import saved_best
from saeuron_plugin.benchmark.unlearning import SEARCH_DIR, Protocol, method_generator
from saeuron_plugin.shapescanvas import data as sc

OUT = ROOT / "benchmarks" / "results" / "experiments" / "token_level"
METHODS = ("saeuron", "saeuron_robust", "uce", "esd")


def applied(method: str, pipe: Any, eraser: Any, concept: str, setting: dict | None) -> Any:
    """``method`` unlearning ``concept`` on ``pipe``: SAeUron in either mode, a baseline as the
    unlearning benchmark applies it (UCE and ESD-x edit the UNet's weights; CFG stays the benchmark's)."""
    if method.startswith("saeuron"):
        return eraser.unlearn(pipe, [concept], robust=method == "saeuron_robust")
    presets = {"esd": {"cache_dir": str(ROOT / "runs" / "esd-cache"), "progress": False}}
    return method_generator(method, pipe, concept, Protocol(), presets=presets, setting=setting)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=list(sc.CONCEPTS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args, pipe, judge, eraser, out, results = setup_experiment(parser, OUT)
    for concept in args.concepts:
        case = held_out(pipe, judge, concept)
        for method in args.methods:
            start = time.perf_counter()
            setting, stage = None, None
            if not method.startswith("saeuron"):
                robust = saved_best(method, concept, SEARCH_DIR, robust=True)
                setting, stage = (
                    (robust, "robust") if robust else (saved_best(method, concept, SEARCH_DIR), "tuned")
                )
            with applied(method, pipe, eraser, concept, setting):
                row: dict[str, Any] = {
                    "domain": case.domain,
                    "ua_clean": case.ua(encode_prompts(pipe, [case.caption])),
                }
                attacked = token_prompt_attack(pipe, case.targets, case.caption, AttackConfig(**SOFT_PROMPT))
                row["ua_token_level"] = case.ua(attacked)
            row |= {
                "setting": setting,
                "stage": stage,
                "attack": SOFT_PROMPT,
                "seconds": round(time.perf_counter() - start),
            }
            results.setdefault(concept, {})[method] = row
            line = (
                f"{concept:9s} {method:15s} clean {row['ua_clean']:5.1f} token {row['ua_token_level']:5.1f}"
            )
            write_results(out, results, line)
    for method in args.methods:
        for domain in sc.VOCABULARIES:
            rows = [r[method] for r in results.values() if method in r and r[method]["domain"] == domain]
            if rows:
                mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("ua_clean", "ua_token_level")}
                print(
                    f"{method:15s} {domain:7s} ({len(rows)}): clean {mean['ua_clean']:5.1f} "
                    f"token-level {mean['ua_token_level']:5.1f}"
                )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
