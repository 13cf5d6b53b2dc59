"""What the robustness experiments share: the shipped model, judge and bundle, and per concept its
training captions (the tuner's robustness-stage captions, ``ATTACK_CAPTIONS``), the robustness
benchmark's held-out caption, their target latents and a UA function."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saeuron_plugin import SAeUron
from saeuron_plugin.attacks import AttackConfig, generate_from_embeds, target_latents, unlearndiffatk
from saeuron_plugin.benchmark import robustness as rb
from saeuron_plugin.benchmark.baselines.base import encode_prompts
from saeuron_plugin.shapescanvas.build import ATTACK_CAPTIONS, concept_domain, load_default
from saeuron_plugin.tuning import load_judge
from saeuron_plugin.tuning.search import forget_percent

ROOT = Path(__file__).resolve().parents[2]


def saved_results(folder: Path) -> tuple[Path, dict[str, Any]]:
    """``folder/results.json`` and what an earlier run left in it (results of several runs add up)."""
    out = folder / "results.json"
    return out, json.loads(out.read_text()) if out.is_file() else {}


def write_results(out: Path, results: dict[str, Any], line: str | None = None) -> None:
    """Print ``line`` (a row just measured) and save ``results`` to ``out`` (after every row: an
    interrupted experiment keeps what it measured)."""
    if line is not None:
        print(line, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


def load(threads: int) -> tuple[Any, Any, SAeUron]:
    """The default pipeline, its judge and the shipped bundle."""
    torch.set_num_threads(threads)
    pipe = load_default(str(ROOT / "checkpoints" / "shapescanvas-sd"))
    return (
        pipe,
        load_judge("shapescanvas"),
        SAeUron.from_pretrained(ROOT / "checkpoints" / "shapescanvas-saeuron"),
    )


def setup_experiment(parser: Any, folder: Path) -> tuple[Any, Any, Any, SAeUron, Path, dict[str, Any]]:
    """An experiment's preamble: ``parser`` (plus ``--threads``) parsed, the default pipeline, judge and
    bundle loaded, and ``folder``'s earlier results: ``(args, pipe, judge, eraser, out, results)``."""
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    return (args, *load(args.threads), *saved_results(folder))


SOFT_PROMPT = {"iterations": 40, "lr": 0.1, "batch": 8, "seed": 0}
"""The robustness benchmark's soft-prompt budget (``AttackConfig(**SOFT_PROMPT)``)."""


@dataclass
class HeldOut:
    """A concept's held-out caption as the robustness benchmark attacks it: 8 targets the untouched
    model drew (seeds 0-7), and UA judged on the benchmark's eval seeds."""

    concept: str
    domain: str
    caption: str
    targets: torch.Tensor
    pipe: Any
    judge: Any

    def ua(self, embeds: torch.Tensor) -> float:
        images = generate_from_embeds(self.pipe, embeds, rb.EVAL_SEEDS, **rb.GEN_KW)
        return forget_percent(self.judge, images, self.concept, self.domain)


def held_out(pipe: Any, judge: Any, concept: str) -> HeldOut:
    domain = concept_domain(concept)
    caption = rb.CAPTION[domain].format(concept)
    return HeldOut(
        concept, domain, caption, target_latents(pipe, caption, range(8), **rb.GEN_KW), pipe, judge
    )


@dataclass
class ConceptCase:
    """One concept under attack: training captions (targets from seeds 1000+) and the held-out one."""

    concept: str
    domain: str
    train: list[str]
    held_out: str
    targets: dict[str, torch.Tensor]
    init: torch.Tensor
    judge: Any

    def ua(self, images: torch.Tensor) -> float:
        return forget_percent(self.judge, images, self.concept, self.domain)


def concept_case(pipe: Any, judge: Any, concept: str) -> ConceptCase:
    domain = concept_domain(concept)
    train = [c.format(concept) for c in ATTACK_CAPTIONS[domain]]
    held_out = rb.CAPTION[domain].format(concept)
    targets = {c: target_latents(pipe, c, range(1000, 1008), **rb.GEN_KW) for c in train}
    targets[held_out] = target_latents(pipe, held_out, range(8), **rb.GEN_KW)
    init = encode_prompts(pipe, [held_out])
    return ConceptCase(concept, domain, train, held_out, targets, init, judge)


def attacked_ua(pipe: Any, case: ConceptCase, caption: str, seed: int) -> tuple[float, str]:
    """UA (judged on the benchmark's eval seeds) of the prompt UnlearnDiffAtk types for ``caption``."""
    cfg = AttackConfig(iterations=40, lr=1e-2, batch=8, seed=seed)
    prompt = unlearndiffatk(pipe, case.targets[caption], caption, cfg)
    typed = encode_prompts(pipe, [prompt])
    return case.ua(generate_from_embeds(pipe, typed, rb.EVAL_SEEDS, **rb.GEN_KW)), prompt


def attack_row(pipe: Any, case: ConceptCase) -> dict[str, Any]:
    """With whatever eraser ``pipe`` has: clean UA, UA under UnlearnDiffAtk on the training captions
    (mean and each) and on the held-out caption, and IRA / CRA as the benchmark measures them."""
    row: dict[str, Any] = {
        "ua_clean": case.ua(generate_from_embeds(pipe, case.init, rb.EVAL_SEEDS, **rb.GEN_KW))
    }
    train = [attacked_ua(pipe, case, c, 100 + i)[0] for i, c in enumerate(case.train)]
    row["ua_attack_train"] = round(sum(train) / len(train), 2)
    row["ua_attack_train_each"] = train
    row["ua_attack_held_out"], row["prompt_held_out"] = attacked_ua(pipe, case, case.held_out, 0)
    return row | rb.retention(pipe, case.judge, case.concept, case.domain)


def describe(case: ConceptCase, name: str, row: dict[str, Any]) -> str:
    return (
        f"{case.concept:8s} {name:14s}: clean {row['ua_clean']:5.1f} attack train "
        f"{row['ua_attack_train']:5.1f} held-out {row['ua_attack_held_out']:5.1f} "
        f"IRA {row['ira']:5.1f} CRA {row['cra']:5.1f}"
    )
