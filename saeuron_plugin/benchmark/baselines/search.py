"""Equal tuning for the baselines: each gets a per-concept validation search, as SAeUron's bundle did.

SAeUron's shipped defaults come from a search (``shapescanvas.build.search_defaults``, the generic
tuner) over hookpoint sets × percentile × γ on validation prompts and seeds, ranked by
mean(UA, IRA, CRA) with the judges' probability margin as tie-break, and for objects a second stage
on fresh prompts. A baseline run at
one hand-set preset against that is not a fair comparison, so every baseline gets the same search:

* the **same validation sets** (:func:`~...shapescanvas.build.validation_set`: the same prompts and
  seeds as SAeUron's stage 1 and stage 2, never test seeds);
* the **same objective and ranking** (:func:`~...shapescanvas.build.trial_scores`; the generic tuner
  scores SAeUron against the same true labels);
* the **same second stage** where SAeUron had one (objects: the best 4 judged again on 30 + 30
  fresh prompts);
* a grid over the method's own hyper-parameters (:func:`search_grid`): negative prompt, its text and
  guidance; SLD, its four levels × warm-up; UCE, erase scale × preserve set and λ × templates; ESD-x,
  steps, lr, negative guidance η and which cross-attention parameters train;
* the **same replacement stage** where SAeUron had one (colours), for the methods that can steer
  toward a target: UCE maps the concept to another colour's text (its anchor) at erase scale 1 and
  3, 11 candidates as SAeUron's 5 targets × 2 α plus the winner, ranked the same way
  (:func:`~...tuning.search.replacement_rank`). ESD-x, SLD and negative prompting have no target;
* the **same robustness stage** (:meth:`BaselineSearch.robust_stage`, run by the robustness benchmark
  with ``--baselines-at robust``) for the methods whose edit is in the UNet (UCE, ESD-x): up to four
  settings (the winner and the strongest others within the tolerance) attacked with UnlearnDiffAtk on
  SAeUron's attack captions and seeds at its budget, the most resistant within 0.05 of the winner's
  score kept (:func:`~...tuning.search.robust_choice`, the rule that picks SAeUron's robust mode).

Each trial is saved to ``<out>/<method>.json`` as soon as it is judged (atomic write), so an
interrupted search resumes and a rerun reuses every trial; ESD's trained weights go to its own cache,
so the test run loads the winner's instead of training again. Trial counts, validation images and
seconds are recorded per concept: the benchmark reports them next to the scores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ...shapescanvas import data as sc
from ...shapescanvas.build import (
    ATTACK_CAPTIONS,
    ATTACK_IMAGES,
    ATTACK_SEED,
    REFINE_TOP,
    TARGET_SCALES,
    BundleConfig,
    concept_domain,
    replacement_targets,
    stage_validation,
    trial_scores,
)
from ...tuning.search import AttackBudget, attack_trials, replacement_rank, robust_choice
from .presets import concept_caption
from .sld import MEDIUM

SLD_LEVELS: dict[str, dict[str, float]] = {
    # the paper's four configurations (diffusers' SafetyConfig), warm-up as a fraction of 50 steps
    "weak": {
        "sld_guidance_scale": 20.0,
        "sld_warmup_fraction": 15 / 50,
        "sld_threshold": 0.0,
        "sld_momentum_scale": 0.0,
        "sld_mom_beta": 0.0,
    },
    "medium": dict(MEDIUM),
    "strong": {
        "sld_guidance_scale": 2000.0,
        "sld_warmup_fraction": 7 / 50,
        "sld_threshold": 0.025,
        "sld_momentum_scale": 0.5,
        "sld_mom_beta": 0.7,
    },
    "max": {
        "sld_guidance_scale": 5000.0,
        "sld_warmup_fraction": 0.0,
        "sld_threshold": 1.0,
        "sld_momentum_scale": 0.5,
        "sld_mom_beta": 0.7,
    },
}


def _text(concept: str) -> str:
    return f"{concept} style" if concept_domain(concept) == "style" else concept


STAGES = ("search", "refine", "replace")
REPLACING = ("uce",)
"""Baselines with a replacement target of their own (UCE's anchor text)."""
ROBUST_STAGE = ("uce", "esd")
"""Baselines that get SAeUron's robustness stage: their edit is in the UNet's weights, so UnlearnDiffAtk's
gradients pass through it as through ours. Negative prompting and SLD act in the sampler's guidance,
which the stage's attack does not differentiate through: they get none."""
ROBUST_CANDIDATES = 4
"""Settings the stage attacks per concept, as many as SAeUron's (its winner, its setting everywhere and
two lighter extras)."""


def robust_candidates(
    entry: dict[str, Any], tolerance: float, count: int = ROBUST_CANDIDATES
) -> list[dict[str, Any]]:
    """The robustness stage's candidates for a tuned concept's ``entry``: the winner's trial, then the
    strongest other trials (validation UA, then score) of the stage that chose it whose score is
    within ``tolerance`` of the winner's. A baseline has no wider edit to try, as SAeUron has; the
    stronger settings its own search judged nearly as good are its closest equivalent."""
    best = entry["best"]
    stage = next(s for s in reversed(STAGES) if entry.get(s))
    others = [
        t
        for t in entry[stage]
        if _key(t["setting"]) != _key(best["setting"]) and t["score"] >= best["score"] - tolerance
    ]
    others.sort(key=lambda t: (t["ua"], t["score"]), reverse=True)
    return [best, *others[: count - 1]]


def replacement_grid(method: str, concept: str, best: dict[str, Any]) -> list[dict[str, Any]]:
    """The replacement stage's candidates: the winner as it is, and with each other concept of the
    domain as its target (UCE: its anchor text, at erase scale 1 and 3); none for other methods."""
    if method not in REPLACING:
        return []
    return [best] + [
        {**best, "target_text": _text(t), "erase_scale": e}
        for t in replacement_targets(concept)
        for e in (1.0, 3.0)
    ]


def search_grid(method: str, concept: str) -> list[dict[str, Any]]:
    """The settings a baseline's search tries for ``concept`` (keyword arguments on top of the presets;
    ``guidance_scale`` is the generation's CFG and ``retain`` picks the preserved concepts)."""
    text = _text(concept)
    if method == "negative_prompt":
        return [
            {"negative_text": t, "guidance_scale": g}
            for t in (concept_caption(text), text)
            for g in (5.0, 7.5, 10.0, 15.0)
        ]
    if method == "sld":
        out = []
        for params in SLD_LEVELS.values():
            for warmup in dict.fromkeys((params["sld_warmup_fraction"], 0.0, 0.1)):
                out.append({**params, "sld_warmup_fraction": warmup})
        return out
    if method == "uce":
        preserve = [("none", 0.0), ("domain", 0.3), ("domain", 1.0), ("all", 1.0)]
        out = [
            {"erase_scale": e, "retain": r, "preserve_scale": lam} for e in (1.0, 3.0) for r, lam in preserve
        ]
        return [*out, {"erase_scale": 1.0, "retain": "domain", "preserve_scale": 1.0, "templates": ["{}"]}]
    if method == "esd":
        return [
            {"steps": 200, "lr": 1e-3, "negative_guidance": 1.0},
            {"steps": 200, "lr": 3e-3, "negative_guidance": 1.0},
            {"steps": 400, "lr": 1e-3, "negative_guidance": 1.0},
            {"steps": 200, "lr": 1e-3, "negative_guidance": 3.0},
            {"steps": 200, "lr": 3e-3, "negative_guidance": 1.0, "layers": "attn2_kv"},
        ]
    raise KeyError(f"no search grid for {method!r}; known: negative_prompt, sld, uce, esd")


def retain_texts(concept: str, which: str = "domain") -> list[str]:
    """Preserved concept texts: the rest of the concept's domain, every other concept, or none."""
    if which not in ("domain", "all", "none"):
        raise ValueError(f"retain must be 'domain', 'all' or 'none', got {which!r}")
    domain = concept_domain(concept)
    words = [] if which == "none" else sc.VOCABULARIES[domain] if which == "domain" else sc.CONCEPTS
    return [_text(w) for w in words if w != concept]


def _key(setting: dict[str, Any]) -> str:
    return json.dumps(setting, sort_keys=True)


def _rank(trial: dict[str, Any]) -> tuple[float, float]:
    return trial["score"], trial["margin"]


def _read(path: Path) -> dict[str, Any]:
    """A saved baseline search (``{}`` when there is none); a corrupt file is a clear error."""
    from ...sae.files import read_json_object

    return read_json_object(path, "baseline search file") if path.is_file() else {}


def saved_best(method: str, concept: str, out: str | Path, robust: bool = False) -> dict[str, Any] | None:
    """The setting ``method``'s saved search in ``out`` chose for ``concept``, or with ``robust`` its
    robustness stage chose (None: never tuned, or no stage run)."""
    entry = _read(Path(out) / f"{method}.json").get("concepts", {}).get(concept, {})
    best = entry.get("robust_best" if robust else "best")
    return None if best is None else dict(best["setting"])


class BaselineSearch:
    """One baseline's search over the ShapesCanvas concepts, saved in ``<out>/<method>.json``.

    ``generator`` is the benchmark's ``method_generator`` (``benchmark.unlearning``): a context manager
    ``(method, pipe, concept, protocol, presets=..., setting=...)`` yielding ``generate(prompts, seeds)``.
    """

    def __init__(
        self,
        method: str,
        pipe: Any,
        judges: Any,
        protocol: Any,
        generator: Callable[..., Any],
        *,
        out: str | Path,
        presets: dict[str, dict[str, Any]] | None = None,
        grid: Callable[[str, str], list[dict[str, Any]]] = search_grid,
        bundle: BundleConfig | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.method, self.pipe, self.judges, self.protocol = method, pipe, judges, protocol
        self.presets, self.grid, self.log = presets or {}, grid, log
        self.generator = generator
        self.bundle = bundle or BundleConfig()
        self.path = Path(out) / f"{method}.json"
        recipe = {
            "steps": protocol.steps,
            "guidance_scale": protocol.guidance_scale,
            "search_prompts": self.bundle.search_prompts,
            "refine_prompts": self.bundle.refine_prompts,
            "seed": self.bundle.seed,
        }
        saved = _read(self.path)
        self.data = saved if saved.get("recipe") == recipe else {"recipe": recipe, "concepts": {}}

    def save(self) -> None:
        from ...sae.io import atomic_write

        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.data, indent=1) + "\n"
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def _judge(self, concept: str, stage: str, settings: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every setting's trial on the stage's validation set (saved trials reused, new ones saved)."""
        entry = self.data["concepts"].setdefault(concept, {"seconds": 0.0})
        trials = entry.setdefault(stage, [])
        done = {_key(t["setting"]): t for t in trials}
        prompts, seeds = stage_validation(concept, self.bundle, stage)
        todo = [s for s in settings if _key(s) not in done]
        bar = tqdm(
            todo, desc=f"tune {self.method} {concept} ({stage})", unit="trial", leave=False, disable=not todo
        )
        for setting in bar:
            start = time.perf_counter()
            with self.generator(
                self.method, self.pipe, concept, self.protocol, presets=self.presets, setting=setting
            ) as gen:
                images = gen([p.prompt for p in prompts], seeds)
            trial = {
                "setting": setting,
                "images": len(prompts),
                **trial_scores(self.judges, images, prompts, concept),
            }
            trials.append(trial)
            done[_key(setting)] = trial
            entry["seconds"] += time.perf_counter() - start
            self.save()  # nothing is lost if the run stops here
        return [done[_key(s)] for s in settings]

    def tune(self, concept: str) -> dict[str, Any]:
        """The best setting for ``concept`` (stage 2 decides where SAeUron's search had one)."""
        ranked = sorted(
            self._judge(concept, "search", self.grid(self.method, concept)), key=_rank, reverse=True
        )
        top = REFINE_TOP.get(concept_domain(concept), 0)
        if top > 1 and len(ranked) > 1:
            finalists = [t["setting"] for t in ranked[:top]]
            ranked = sorted(self._judge(concept, "refine", finalists), key=_rank, reverse=True)
        candidates = replacement_grid(self.method, concept, ranked[0]["setting"])
        if concept_domain(concept) in TARGET_SCALES and candidates:
            ranked = sorted(self._judge(concept, "replace", candidates), key=replacement_rank, reverse=True)
        entry = self.data["concepts"][concept]
        if entry.get("best", {}).get("setting") != ranked[0]["setting"]:
            entry.pop("robust_best", None)  # chosen around another winner: the stage runs again
        entry["best"] = ranked[0]
        self.save()
        b = ranked[0]
        self.log(
            f"{self.method:15s} {concept:10s} tuned: {b['setting']} UA {b['ua']:.2f} IRA {b['ira']:.2f} "
            f"CRA {b['cra']:.2f} ({sum(len(entry.get(s, [])) for s in STAGES)} trials, "
            f"{entry['seconds']:.0f} s)"
        )
        return b["setting"]

    def robust_stage(self, concept: str) -> dict[str, Any]:
        """SAeUron's robustness stage for this baseline (tuned first if it was not): each of
        :func:`robust_candidates` attacked with UnlearnDiffAtk on the bundle config's attack captions
        (``ATTACK_CAPTIONS``, targets and judged images from ``ATTACK_SEED``) at its attack budget,
        then :func:`~...tuning.search.robust_choice`. Attack trials are saved under ``robust`` (reused
        while the budget is the same), their time under ``robust_seconds`` (apart from the search's
        ``seconds``: :meth:`summary` counts the search, as SAeUron's counts no attacks); the pick under
        ``robust_best``. Returns its setting."""
        if self.method not in ROBUST_STAGE:
            raise ValueError(f"{self.method!r} gets no robustness stage; only {', '.join(ROBUST_STAGE)} do")
        if "best" not in self.data["concepts"].get(concept, {}):
            self.tune(concept)
        entry, cfg, domain = self.data["concepts"][concept], self.bundle, concept_domain(concept)
        budget = AttackBudget(
            tuple(c.format(concept) for c in ATTACK_CAPTIONS[domain][: cfg.robust_attacks]),
            cfg.robust_attacks,
            cfg.robust_iterations,
            ATTACK_IMAGES,
            ATTACK_SEED,
        )
        candidates = robust_candidates(entry, cfg.robust_tolerance)
        start = time.perf_counter()
        trials = attack_trials(
            self.pipe,
            self.judges,
            concept,
            domain,
            candidates,
            budget,
            apply=lambda c: self.generator(
                self.method, self.pipe, concept, self.protocol, presets=self.presets, setting=c["setting"]
            ),
            key=lambda t: _key(t["setting"]),
            saved=entry.setdefault("robust", []),
            save=self.save,
            steps=self.protocol.steps,
            guidance=self.protocol.guidance_scale,
            progress=lambda todo: tqdm(
                todo, desc=f"attack {self.method} {concept}", unit="setting", leave=False
            ),
        )
        entry["robust_seconds"] = entry.get("robust_seconds", 0.0) + time.perf_counter() - start
        chosen = robust_choice(trials, cfg.robust_tolerance)
        entry["robust_best"] = chosen
        self.save()
        own = trials[0]["ua_attack"]
        self.log(
            f"{self.method:15s} {concept:10s} robust: {chosen['setting']} UA under attack "
            f"{100 * chosen['ua_attack']:.1f} % (the winner: {100 * own:.1f} %, {len(candidates)} attacked)"
        )
        return dict(chosen["setting"])

    def summary(self, concepts: Sequence[str]) -> dict[str, Any]:
        """Trials, validation images and seconds spent on ``concepts`` (per concept means and totals)."""
        entries = [self.data["concepts"][c] for c in concepts if c in self.data["concepts"]]
        trials = [t for e in entries for s in STAGES for t in e.get(s, [])]
        return {
            "concepts": len(entries),
            "trials": len(trials),
            "images": sum(t["images"] for t in trials),
            "seconds": round(sum(e["seconds"] for e in entries)),
        }


def saeuron_summary(bundle: str | Path, concepts: Sequence[str]) -> dict[str, Any]:
    """The same counts for a bundle's search (its ``search.json``, section ``tune``: every judged trial,
    the robustness stage's wider sets included); its seconds are the recorded build's, which reused
    earlier trials, so they are left out."""
    from ...errors import BadFileError
    from ...sae.io import resolve_repo
    from ...tuning.search import SEARCH_FILE, read_search

    folder = resolve_repo(bundle)
    data = read_search(folder).get("tune", {})
    missing = [c for c in concepts if c not in data]
    if missing:
        raise BadFileError(folder / SEARCH_FILE, f"no search record of {missing}", field="tune")
    trials = images = 0
    for concept in concepts:
        record = data[concept]
        for stage, stamp in record.get("images", {}).items():
            count = len(record.get(stage, []))
            trials += count
            images += count * len(stamp["prompts"])
    return {"concepts": len(concepts), "trials": trials, "images": images, "seconds": None}


__all__ = [
    "ROBUST_STAGE",
    "SLD_LEVELS",
    "BaselineSearch",
    "retain_texts",
    "robust_candidates",
    "saeuron_summary",
    "saved_best",
    "search_grid",
]
