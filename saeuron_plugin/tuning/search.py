"""Tune how a bundle unlearns a concept on any pipeline, judged by any judge (:mod:`.judges`).

For each concept the search tries ablation settings (hookpoint set × contrast × percentile × γ) on
validation images and keeps the best as the concept's defaults in the bundle:

* **forget** prompts (with the concept) and **retain** prompts (without it) are generated once with
  the untouched model (the *base* images) and once per trial with the setting applied, at the same
  seeds (validation seeds, never test seeds);
* **UA**: forget images the judge no longer assigns to the concept (its domain's top label);
  **IRA**: retain images whose top label in the concept's domain is the base image's;
  **CRA**: images whose top labels in the judge's other domains are the base image's. These paired
  retain measures need no ground-truth labels, so any judge works. A stage whose
  :class:`ValidationSet` carries the images' true labels scores against those instead (no base
  images): ``make bundle`` tunes the ShapesCanvas bundle this way;
* the objective is mean(UA, IRA, CRA), ties broken by the judge's probability margin; stage 2
  judges the best few again on fresh seeds and decides there;
* with ``target_scales``, a replacement stage judges the winner alone and with each other label of
  the concept's judge domain that the bundle holds as its target (:attr:`~..sae.spec.ConceptAblation.target`)
  at each α, on stage 1's images, ranked by the score, then by *clean flips* (forget images the judge
  gives another label with probability ≥ 0.9: a clean image of something else, not debris), then by
  the margin;
* with ``robust_attacks``, a robustness stage attacks the winner at its hookpoints, and the winner
  plus every other hookpoint holding the concept (there with the winner's own setting and with each
  lighter setting of ``robust_extras``), with UnlearnDiffAtk (gradients through the edit) on that
  many of the task's attack prompts, else its forget prompts (targets from the untouched model at
  their own seeds); the most resistant of them whose validation score is within ``robust_tolerance``
  of the winner's becomes the concept's *robust mode*
  (``unlearn(..., robust=True)``); the default mode stays the winner. It needs a Stable Diffusion
  style pipeline (``tokenizer``, ``text_encoder``, ``unet``, ``scheduler``);
* every trial is appended to ``search.json`` (section ``tune``) in the bundle folder as it finishes
  (atomic write), so an interrupted search resumes where it stopped and a re-tune reuses every
  trial it already ran.

The ShapesCanvas bundle builder (``saeuron_plugin.shapescanvas.build``, ``make bundle``) is a
recipe over this search: a :class:`TuneTask` with labelled validation sets and attack captions, and a
:class:`SearchSpace` per judge domain. ``saeuron build recipes/shapescanvas.toml`` asks for the same
(``[tune] validation = "shapescanvas"``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import SAeUronError
from ..sae.io import atomic_write
from ..sae.spec import ConceptAblation
from .judges import Judge

SEARCH_FILE = "search.json"
DOMAIN_CONTRAST = "domain"
"""A search contrast of its own: the concept against the other concepts of its judge domain, pooled
(the named modes of ``sae.selection.CONTRAST_MODES`` pool every other concept or take the worst)."""
BUDGETS: dict[str, dict[str, Any]] = {
    "tiny": {"percentiles": (99.0,), "gammas": (-2.0,), "prompts": 2, "refine_top": 0},
    "small": {"percentiles": (99.0, 99.9), "gammas": (-1.0, -6.0), "prompts": 6, "refine_top": 2},
    "medium": {
        "percentiles": (98.0, 99.0, 99.5, 99.9),
        "gammas": (-1.0, -2.0, -6.0),
        "prompts": 12,
        "refine_top": 3,
    },
    "large": {
        "percentiles": (95.0, 98.0, 99.0, 99.5, 99.9, 99.99),
        "gammas": (-1.0, -2.0, -6.0, -20.0),
        "prompts": 24,
        "refine_top": 4,
    },
}
"""Per ``--budget``: the grid, the validation size (prompts: forget and as many retain prompts) and the
stage-2 finalists."""
ROBUST_EXTRAS: tuple[tuple[float, float], ...] = ((99.8, -2.0), (99.9, -1.0))
"""The robustness stage's lighter settings (percentile, γ) at the extra hookpoints (see
``SearchSpace.robust_extras``; chosen on striped, ``examples/experiments/robust_extras.py``)."""


class TuningError(SAeUronError, ValueError):
    """A tuning task that cannot run (concept unknown to the judge, no prompts...)."""


@dataclass
class SearchSpace:
    """The settings a search tries; hookpoint sets default to each hookpoint holding the concept
    alone, plus all of them together.

    A hookpoint set is a sequence of hookpoints (searched over the space's contrasts × percentiles ×
    γ), or a mapping ``{"hookpoints": [...], "contrasts": [...], "percentiles": [...], "gammas": [...]}``
    whose keys replace the space's own for that set (a recipe's ``[[tune.domains.object.sets]]``).
    """

    hookpoint_sets: list[Any] | None = None
    contrasts: tuple[str, ...] = ("auto",)
    """Named contrasts (``sae.selection.CONTRAST_MODES``) or ``"domain"``: the concept's judge domain."""
    percentiles: tuple[float, ...] = (99.0, 99.9)
    gammas: tuple[float, ...] = (-1.0, -6.0)
    refine_top: int = 0
    """Stage 2: judge this many of stage 1's best again on fresh seeds, and decide there (0 or 1: stage 1
    decides)."""
    target_scales: tuple[float, ...] = ()
    """Replacement stage: α values tried with every other concept of the judge domain as the target
    (empty: removal only). ShapesCanvas colours use (1, 2)."""
    robust_attacks: int = 0
    """Robustness stage: prompts UnlearnDiffAtk attacks per candidate (the task's attack prompts, else its
    forget prompts; 0: no robust mode)."""
    robust_iterations: int = 40
    """UnlearnDiffAtk's steps per attack (its published budget: 40)."""
    robust_tolerance: float = 0.05
    """The robust mode may cost at most this much validation score."""
    robust_extras: tuple[tuple[float, float], ...] = ROBUST_EXTRAS
    """Robustness stage: (percentile, γ) settings tried at the *extra* hookpoints (those holding the
    concept beyond the winner's), besides the winner's own setting there. A lighter edit where the
    concept is not the tuned target often holds as well and costs less retention."""
    attack_images: int = 8
    """Target images per attacked prompt, and images judged per typed prompt."""

    @classmethod
    def from_budget(cls, budget: str, **overrides: Any) -> SearchSpace:
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {list(BUDGETS)}, got {budget!r}")
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TuningError(
                f"unknown search options {sorted(unknown)}; known: {[f.name for f in fields(cls)]}"
            )
        grid = {k: v for k, v in BUDGETS[budget].items() if k != "prompts"}
        return cls(**{**grid, **overrides})

    def settings(self, held_at: Sequence[str]) -> list[dict[str, Any]]:
        sets = self.hookpoint_sets or [(p,) for p in held_at] + ([tuple(held_at)] if len(held_at) > 1 else [])
        out = []
        for entry in sets:
            own = dict(entry) if isinstance(entry, Mapping) else {"hookpoints": entry}
            extra = set(own) - {"hookpoints", "contrasts", "percentiles", "gammas"}
            if extra or isinstance(own.get("hookpoints"), str) or not own.get("hookpoints"):
                raise TuningError(
                    f"a hookpoint set is a list of hookpoints or a table with 'hookpoints' and optional "
                    f"'contrasts', 'percentiles', 'gammas'; got {entry!r}"
                )
            grid = itertools.product(
                own.get("contrasts", self.contrasts),
                own.get("percentiles", self.percentiles),
                own.get("gammas", self.gammas),
            )
            out += [
                {
                    "hookpoints": list(own["hookpoints"]),
                    "contrast": c,
                    "percentile": float(p),
                    "gamma": float(g),
                }
                for c, p, g in grid
            ]
        return out


@dataclass
class ValidationSet:
    """The images a search stage judges: prompts (forget prompts first), one seed each, and, where the
    caller knows them, each image's true labels."""

    prompts: list[str]
    seeds: list[int]
    n_forget: int
    """The first ``n_forget`` prompts hold the concept (UA); the rest do not (IRA)."""
    labels: dict[str, list[int]] | None = None
    """Per judge domain, each image's true label (an index into ``judge.labels[domain]``): the stage
    scores against these (ground truth, as a labelled benchmark does). None: against the untouched
    model's image at the same seed (paired: any judge, no labels needed)."""

    def __post_init__(self) -> None:
        if len(self.seeds) != len(self.prompts) or not 0 < self.n_forget < len(self.prompts):
            raise TuningError(
                f"a validation set needs one seed per prompt and both forget and retain prompts; got "
                f"{len(self.prompts)} prompts, {len(self.seeds)} seeds, n_forget {self.n_forget}"
            )
        for domain, labels in (self.labels or {}).items():
            if len(labels) != len(self.prompts):
                raise TuningError(f"{len(labels)} {domain!r} labels for {len(self.prompts)} prompts")

    @classmethod
    def paired(cls, forget: Sequence[str], retain: Sequence[str], seed: int) -> ValidationSet:
        """Forget image i at ``seed + i``, retain image j at ``seed + 10,000 + j``, scored paired."""
        seeds = [*(seed + i for i in range(len(forget))), *(seed + 10_000 + j for j in range(len(retain)))]
        return cls([*forget, *retain], seeds, len(forget))


@dataclass
class TuneTask:
    """One concept to tune: its prompts and the judge domain it belongs to (found from the judge's
    labels when None)."""

    concept: str
    forget: list[str]
    retain: list[str]
    domain: str | None = None
    seed: int = 30_000
    """Validation seeds: forget image i uses seed + i, retain image j seed + 10,000 + j (unused where
    ``validation`` is given)."""
    refine_seed: int = 40_000
    """Seeds of stage 2 (the same layout): fresh images for the finalists (unused where ``refine`` is
    given)."""
    validation: ValidationSet | None = None
    """Stage 1's images (the replacement stage judges them too); None: ``forget`` and ``retain`` at
    ``seed``, paired."""
    refine: ValidationSet | None = None
    """Stage 2's images; None: ``forget`` and ``retain`` at ``refine_seed``, paired."""
    attack_prompts: list[str] | None = None
    """The robustness stage's prompts (None: the forget prompts); it attacks the first ``robust_attacks``."""
    attack_seed: int | None = None
    """The robustness stage's seeds: target images at attack_seed + i, each attacked prompt judged at
    attack_seed + 1,000 + j, the attack's own randomness seeded attack_seed (None: seed + 30,000, clear
    of the validation seeds and of ShapesCanvas' test seeds, 50,000 + 1,000·set + caption)."""

    def stage_set(self, stage: str) -> ValidationSet:
        """The images of a stage: ``refine`` has its own, the others judge stage 1's."""
        if stage == "refine":
            return self.refine or ValidationSet.paired(self.forget, self.retain, self.refine_seed)
        return self.validation or ValidationSet.paired(self.forget, self.retain, self.seed)

    @property
    def robust_seed(self) -> int:
        return self.seed + 30_000 if self.attack_seed is None else self.attack_seed


@dataclass
class TuneConfig:
    """How images are generated for the search."""

    num_inference_steps: int = 25
    guidance_scale: float | None = None
    batch_size: int = 4
    show_progress: bool = True
    pipe_kwargs: dict[str, Any] = field(default_factory=dict)


def judge_domain(judge: Judge, concept: str, domain: str | None = None) -> str:
    """The judge domain whose labels hold ``concept``."""
    labels = judge.labels
    if domain is not None:
        if concept not in labels.get(domain, []):
            raise TuningError(f"the judge's {domain!r} labels {labels.get(domain)} do not hold {concept!r}")
        return domain
    found = [d for d, names in labels.items() if concept in names]
    if len(found) != 1:
        raise TuningError(
            f"{concept!r} must be a label of exactly one judge domain, found {found or 'none'} "
            f"in {labels}; pass the domain or the judge's labels"
        )
    return found[0]


def forget_percent(judge: Judge, images: Any, concept: str, domain: str) -> float:
    """UA in %: the share of ``images`` the judge does not assign to ``concept`` in its domain."""
    label = judge.labels[domain].index(concept)
    return 100 * float((judge.probabilities(images)[domain].argmax(-1) != label).float().mean())


def generate(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], cfg: TuneConfig) -> Tensor:
    """Images [N, 3, H, W] in [0, 1], image i from a generator seeded ``seeds[i]`` (batch-independent)."""
    out = []
    for i in range(0, len(prompts), cfg.batch_size):
        kwargs = {"num_inference_steps": cfg.num_inference_steps, "output_type": "pt", **cfg.pipe_kwargs}
        if cfg.guidance_scale is not None:
            kwargs["guidance_scale"] = cfg.guidance_scale
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + cfg.batch_size]]
        out.append(pipe(list(prompts[i : i + cfg.batch_size]), generator=gens, **kwargs).images.float().cpu())
    return torch.cat(out)


def paired_scores(
    judge: Judge,
    domain: str,
    concept: str,
    probs: dict[str, Tensor],
    reference: dict[str, Tensor],
    n_forget: int,
) -> dict[str, float]:
    """UA / IRA / CRA (fractions) and the probability margin of edited images against the
    ``reference`` labels ``{domain: [N] label indices}``: the base images' decisions at the same seeds
    (paired) or the true labels. The first ``n_forget`` rows are forget images, the rest retain images."""
    target = judge.labels[domain].index(concept)
    top = {d: p.argmax(-1) for d, p in probs.items()}
    own = top[domain]
    ua = (own[:n_forget] != target).float().mean()
    ira = (own[n_forget:] == reference[domain][n_forget:]).float().mean()
    others = [d for d in judge.labels if d != domain]
    cra = (
        torch.cat([(top[d] == reference[d]).float() for d in others]).mean() if others else torch.tensor(1.0)
    )
    # margin: the same three with probabilities instead of decisions (the tie-break)
    p_own = probs[domain]
    keep = p_own[n_forget:].gather(1, reference[domain][n_forget:, None]).mean()
    m_cra = (
        torch.cat([probs[d].gather(1, reference[d][:, None]).flatten() for d in others]).mean()
        if others
        else torch.tensor(1.0)
    )
    margin = ((1 - p_own[:n_forget, target]).mean() + keep + m_cra) / 3
    return {
        "ua": float(ua),
        "ira": float(ira),
        "cra": float(cra),
        "margin": float(margin),
        "clean_flip": float(clean_flips(p_own[:n_forget], target).float().mean()),
    }


CLEAN_CONFIDENCE = 0.9
"""A judge probability at least this high makes an image a clean image of its label."""
REMOVAL_KEYS = ("hookpoints", "contrast", "percentile", "gamma")
SETTING_KEYS = (*REMOVAL_KEYS, "target", "target_scale")


def clean_flips(domain_probs: Tensor, concept_index: int) -> Tensor:
    """[N] bool: images the judge assigns to another label than ``concept_index`` with probability
    ≥ :data:`CLEAN_CONFIDENCE` (unlearned into a clean image of something else, not debris)."""
    top = domain_probs.max(-1)
    return (top.values >= CLEAN_CONFIDENCE) & (top.indices != concept_index)


def replacement_rank(trial: dict[str, Any]) -> tuple[float, float, float]:
    """The replacement stage's ranking: the objective, then clean flips, then the margin.

    Removal and replacement often tie on the objective (both flip every image); what separates them
    is whether the flipped image is a clean image of something else or debris between concepts.
    """
    return trial["score"], trial["clean_flip"], trial["margin"]


def robust_choice(trials: Sequence[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """The robustness stage's pick: the trial with the highest UA under attack (``ua_attack``) among
    those whose validation score is within ``tolerance`` of the first (the winner at its own
    hookpoints); a tie goes to the higher score, then to the first."""
    floor = trials[0]["score"] - tolerance
    return max((t for t in trials if t["score"] >= floor), key=lambda t: (t["ua_attack"], t["score"]))


def ua_under_attack(
    pipe: Any,
    judge: Judge,
    concept: str,
    domain: str,
    targets: Mapping[str, Tensor],
    generate_images: Callable[[list[str], list[int]], Any],
    *,
    iterations: int,
    seed: int,
    judge_seeds: Sequence[int],
) -> dict[str, Any]:
    """A robustness stage's measurement of whatever ``pipe`` has applied: UnlearnDiffAtk on each
    prompt of ``targets`` (:func:`~..attacks.typed_attacks`), each typed prompt generated at
    ``judge_seeds`` with ``generate_images(prompts, seeds)`` and judged; ``ua_attack`` (a fraction,
    the mean over prompts) and the typed ``attack_prompts``."""
    from ..attacks import typed_attacks

    typed = typed_attacks(pipe, targets, iterations=iterations, seed=seed)
    seeds = list(judge_seeds)
    uas = [
        forget_percent(judge, generate_images([t] * len(seeds), seeds), concept, domain) / 100 for t in typed
    ]
    return {"ua_attack": sum(uas) / len(uas), "attack_prompts": typed}


@dataclass(frozen=True)
class AttackBudget:
    """What a robustness stage's attack trial depends on beyond its setting; saved with each trial
    (:meth:`record`), which is reused only under the same budget."""

    prompts: tuple[str, ...]
    """The attacked prompts (targets drawn by the untouched model for each)."""
    attacks: int
    iterations: int
    images: int
    """Target images per prompt, and judged images per typed prompt."""
    seed: int
    """Targets from ``seed`` on, judged images from ``seed + 1000`` on, attack ``i`` seeded ``seed + i``."""

    def record(self) -> dict[str, Any]:
        return {
            "attacks": self.attacks,
            "iterations": self.iterations,
            "images": self.images,
            "prompts": list(self.prompts),
            "seed": self.seed,
        }

    def seeds(self, judged: bool = False) -> list[int]:
        start = self.seed + 1_000 if judged else self.seed
        return list(range(start, start + self.images))


def attack_trials(
    pipe: Any,
    judge: Judge,
    concept: str,
    domain: str,
    candidates: Sequence[dict[str, Any]],
    budget: AttackBudget,
    *,
    apply: Callable[[dict[str, Any]], contextlib.AbstractContextManager[Callable[..., Any]]],
    key: Callable[[dict[str, Any]], Any],
    saved: list[dict[str, Any]],
    save: Callable[[], None],
    steps: int,
    guidance: float | None,
    progress: Callable[[list[dict[str, Any]]], Any] = lambda todo: todo,
) -> list[dict[str, Any]]:
    """A robustness stage's attack trials of ``candidates``, in their order (SAeUron's tuner and the
    baselines' search both run theirs here). A trial in ``saved`` with the same ``key`` and budget is
    reused; each other candidate is applied (``apply(candidate)``: a context manager yielding
    ``generate_images(prompts, seeds)``) and measured by :func:`ua_under_attack` against the budget's
    targets (drawn once, only when something is measured, ``steps`` / ``guidance``), appended to
    ``saved`` and ``save()`` d, so an interrupted stage loses nothing."""
    from ..attacks import target_latents

    record = budget.record()
    done = {key(t): t for t in saved if t.get("budget") == record}
    todo = [c for c in candidates if key(c) not in done]
    if todo:
        seeds = budget.seeds()
        targets = {p: target_latents(pipe, p, seeds, steps, guidance) for p in budget.prompts}
        for candidate in progress(todo):
            with apply(candidate) as generate_images:
                attacked = ua_under_attack(
                    pipe,
                    judge,
                    concept,
                    domain,
                    targets,
                    generate_images,
                    iterations=budget.iterations,
                    seed=budget.seed,
                    judge_seeds=budget.seeds(judged=True),
                )
            trial = {**candidate, **attacked, "budget": record}
            saved.append(trial)
            done[key(trial)] = trial
            save()
    return [done[key(c)] for c in candidates]


def _key(trial: dict[str, Any]) -> tuple[Any, ...]:
    return (
        tuple(trial["hookpoints"]),
        trial.get("contrast", "auto"),
        float(trial["percentile"]),
        float(trial["gamma"]),
        trial.get("target"),
        float(trial.get("target_scale", 1.0)),
        json.dumps(trial.get("extra"), sort_keys=True),
    )


def read_search(folder: str | Path) -> dict[str, Any]:
    """The saved search of a bundle folder (empty when there is none)."""
    from ..sae.files import read_json_object

    path = Path(folder) / SEARCH_FILE
    return read_json_object(path, "search file") if path.is_file() else {}


def _write_search(folder: Path, data: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=1)
    atomic_write(folder / SEARCH_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _rank(trial: dict[str, Any]) -> tuple[float, float]:
    return trial["score"], trial["margin"]


class _Stage:
    """One stage of a concept's search: its validation images, and its trials saved under ``name``."""

    def __init__(self, run: _ConceptRun, name: str) -> None:
        self.run, self.name = run, name
        self.images = run.task.stage_set(name)
        stamp = json.loads(json.dumps(asdict(self.images)))  # as it reads back (tuples → lists)
        images = run.entry.setdefault("images", {})
        if images.get(name) != stamp:  # other prompts, seeds or labels: this stage's trials do not apply
            images[name] = stamp
            run.entry[name] = []
        self.trials = run.entry[name]
        self.done = {_key(t): t for t in self.trials}

    def reference(self) -> dict[str, Tensor]:
        """The labels trials are scored against: the true ones, or the untouched model's decisions."""
        images, run = self.images, self.run
        if images.labels is not None:
            return {d: torch.tensor(v) for d, v in images.labels.items()}
        base = run.judge.probabilities(generate(run.pipe, images.prompts, images.seeds, run.cfg))
        return {d: p.argmax(-1) for d, p in base.items()}

    def judge(self, settings: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The trials of ``settings`` (saved ones reused), each saved as soon as it is judged."""
        run, task, images = self.run, self.run.task, self.images
        todo = [s for s in settings if _key(s) not in self.done]
        reused = len(settings) - len(todo)
        run.log(
            f"{task.concept} {self.name}: {len(settings)} settings ({reused} reused) × "
            f"{len(images.prompts)} images"
        )
        if todo:
            start = time.perf_counter()
            reference = self.reference()
            bar = tqdm(
                todo,
                desc=f"tune {task.concept} ({self.name})",
                unit="trial",
                disable=not run.cfg.show_progress,
            )
            for setting in bar:
                with run.unlearn(setting):
                    probs = run.judge.probabilities(generate(run.pipe, images.prompts, images.seeds, run.cfg))
                scores = paired_scores(run.judge, run.domain, task.concept, probs, reference, images.n_forget)
                trial = {**setting, **scores, "score": (scores["ua"] + scores["ira"] + scores["cra"]) / 3}
                self.trials.append(trial)
                self.done[_key(trial)] = trial
                run.save()  # nothing is lost if the run stops here
                bar.set_postfix(best=f"{max(t['score'] for t in self.done.values()):.3f}", refresh=False)
            bar.close()
            run.log(f"{task.concept} {self.name}: {len(todo)} trials in {time.perf_counter() - start:.0f} s")
        return [self.done[_key(s)] for s in settings]


def _check_labels(judge: Judge, task: TuneTask) -> None:
    """Labelled validation sets must name every judge domain, with indices into its labels."""
    for stage in ("trials", "refine"):
        labels = task.stage_set(stage).labels
        if labels is None:
            continue
        if set(labels) != set(judge.labels):
            raise TuningError(
                f"{task.concept!r}: the {stage} validation labels cover {sorted(labels)}, the judge's "
                f"domains are {sorted(judge.labels)}"
            )
        for domain, values in labels.items():
            if any(not 0 <= v < len(judge.labels[domain]) for v in values):
                raise TuningError(
                    f"{task.concept!r}: a {stage} {domain!r} label is not an index into "
                    f"{judge.labels[domain]}"
                )


class _ConceptRun:
    """State of one concept's search: the saved entry in search.json and what judging needs."""

    def __init__(
        self,
        eraser: Any,
        pipe: Any,
        judge: Judge,
        task: TuneTask,
        folder: Path,
        cfg: TuneConfig,
        log: Callable[[str], None],
        source: Any = None,
    ) -> None:
        self.eraser, self.pipe, self.judge, self.task = eraser, pipe, judge, task
        self.cfg, self.log = cfg, log
        self.folder = folder
        self.domain = judge_domain(judge, task.concept, task.domain)
        self.search = read_search(folder)
        # the "tune" section; a bundle's search.json may hold other records beside it (make bundle's config)
        self.entry = self.search.setdefault("tune", {}).setdefault(task.concept, {})
        _check_labels(judge, task)
        recipe = {
            "domain": self.domain,
            "generation": {k: v for k, v in asdict(cfg).items() if k != "show_progress"},
            **({} if source is None else {"source": source}),
        }
        recipe = json.loads(json.dumps(recipe))  # as it reads back from search.json (tuples → lists)
        # other SAEs, statistics or sampling: no saved trial applies (each stage also stamps its images)
        if self.entry.get("recipe") != recipe:
            self.entry.clear()
            self.entry["recipe"] = recipe

    def save(self) -> None:
        _write_search(self.folder, self.search)

    @contextlib.contextmanager
    def unlearn(self, setting: dict[str, Any]) -> Iterator[None]:
        """``setting`` applied to the pipeline at its hookpoints, and its ``extra`` hookpoints (a robust
        candidate's) with their own percentile and γ."""

        def ablation(percentile: float, gamma: float) -> ConceptAblation:
            return ConceptAblation(
                self.task.concept,
                percentile=percentile,
                gamma=gamma,
                contrast=self.contrast(setting["contrast"]),
                target=setting.get("target") or "",
                target_scale=float(setting.get("target_scale", 1.0)),
            )

        extra = setting.get("extra")
        with contextlib.ExitStack() as stack:
            main = ablation(setting["percentile"], setting["gamma"])
            stack.enter_context(self.eraser.unlearn(self.pipe, [main], hookpoints=setting["hookpoints"]))
            if extra:
                light = ablation(extra["percentile"], extra["gamma"])
                stack.enter_context(self.eraser.unlearn(self.pipe, [light], hookpoints=extra["hookpoints"]))
            yield

    def contrast(self, name: str) -> str | list[str]:
        """A searched contrast as the ablation takes it: ``"domain"`` is the bundle's other concepts
        that share the concept's judge domain, pooled (``"auto"`` when it holds none of them)."""
        if name != DOMAIN_CONTRAST:
            return name
        same = [
            c for c in self.judge.labels[self.domain] if c != self.task.concept and c in self.eraser.concepts
        ]
        return same or "auto"


def tune_concept(
    eraser: Any,
    pipe: Any,
    judge: Judge,
    task: TuneTask,
    space: SearchSpace,
    folder: str | Path,
    cfg: TuneConfig | None = None,
    log: Callable[[str], None] = print,
    source: Any = None,
) -> dict[str, Any]:
    """Search ``task.concept``'s settings, write the winner as its defaults in ``eraser`` and every trial
    to ``folder/search.json`` (resumable); returns the winning trial.

    Stage 1 judges every setting of ``space``; with ``space.refine_top`` > 1, stage 2 judges the best
    of them again on fresh images (``task.stage_set("refine")``) and decides there: stage 1's images are the
    same for every trial, so its winner is the one that happened to suit those seeds best.

    ``source``: what the bundle's SAEs and statistics were made from (a recipe, a digest; any JSON):
    saved trials of another source are judged again, not reused.
    """
    held_at = eraser.where(task.concept)
    if not held_at:
        eraser.check_known([task.concept])
    if not task.forget or not task.retain:
        raise TuningError(f"{task.concept!r} needs forget prompts (with it) and retain prompts (without it)")
    run = _ConceptRun(eraser, pipe, judge, task, Path(folder), cfg or TuneConfig(), log, source)
    trials = _Stage(run, "trials").judge(space.settings(held_at))
    ranked = sorted(trials, key=_rank, reverse=True)
    decided = "trials"  # the stage whose images chose the winner
    if space.refine_top > 1 and len(ranked) > 1:
        finalists = [{k: t[k] for k in SETTING_KEYS if k in t} for t in ranked[: space.refine_top]]
        ranked = sorted(_Stage(run, "refine").judge(finalists), key=_rank, reverse=True)
        decided = "refine"
    best = ranked[0]
    targets = [c for c in judge.labels[run.domain] if c != task.concept and c in eraser.concepts]
    if space.target_scales and targets:
        plain = {k: best[k] for k in REMOVAL_KEYS}
        candidates = [plain] + [
            {**plain, "target": t, "target_scale": float(a)} for t in targets for a in space.target_scales
        ]
        best = max(_Stage(run, "replace").judge(candidates), key=replacement_rank)
        decided = "replace"
    robust = _robust_stage(run, space, best, decided) if space.robust_attacks > 0 else None
    contrast = run.contrast(best["contrast"])
    write_defaults(eraser, task.concept, best, contrast, robust)
    run.entry["best"] = best
    run.entry.pop("robust_best", None)  # a robust mode of an earlier run would outlive its defaults
    if robust is not None:
        run.entry["robust_best"] = robust
    run.save()
    return best


def write_defaults(
    eraser: Any,
    concept: str,
    trial: Mapping[str, Any],
    contrast: str | list[str],
    robust: Mapping[str, Any] | None = None,
) -> None:
    """Write ``concept``'s defaults at every hookpoint holding it: ``trial``'s setting, active at the
    trial's hookpoints; ``robust`` (the robustness stage's pick; None: no robust mode of its own)
    marks where the robust mode ablates, and its ``extra`` hookpoints get their own percentile and γ
    (they are inactive in the default mode, so it does not change).

    The contrast is always written: a re-tuned bundle may hold another winner's contrast.
    """
    extra = (robust or {}).get("extra") or {}
    robust_at = None if robust is None else set(robust_hookpoints(robust))
    for hp in eraser.hookpoints:
        if concept in eraser.hookpoints[hp].library:
            setting = extra if hp in extra.get("hookpoints", ()) else trial
            eraser.set_defaults(
                concept,
                hookpoints=[hp],
                percentile=setting["percentile"],
                top_n=None,
                gamma=setting["gamma"],
                contrast=contrast,
                target=trial.get("target"),
                target_scale=float(trial.get("target_scale", 1.0)),
                active=hp in trial["hookpoints"],
                robust=None if robust_at is None else hp in robust_at,
            )


def robust_hookpoints(trial: Mapping[str, Any]) -> list[str]:
    """Every hookpoint a robustness-stage trial ablates at: its own and its ``extra`` ones."""
    return [*trial["hookpoints"], *(trial.get("extra") or {}).get("hookpoints", ())]


def _robust_stage(run: _ConceptRun, space: SearchSpace, best: dict[str, Any], stage: str) -> dict[str, Any]:
    """The winner at its hookpoints, its setting at every hookpoint holding the concept, and the winner
    plus each lighter setting of ``space.robust_extras`` at the other hookpoints (the wider ones judged
    on the validation images of ``stage``, the one that chose the winner), each attacked with UnlearnDiffAtk
    on the first ``space.robust_attacks`` attack prompts (``task.attack_prompts``, else forget prompts);
    returns :func:`robust_choice`'s pick. Attack trials are saved under ``robust`` and reused while the
    attack budget (prompts, seeds, iterations, images) is the same."""

    task = run.task
    held_at = run.eraser.where(task.concept)
    candidates = [best]
    extra_at = [hp for hp in held_at if hp not in best["hookpoints"]]
    if extra_at:
        setting = {k: best[k] for k in SETTING_KEYS if k in best}
        wide = [{**setting, "hookpoints": list(held_at)}]  # the winner's setting everywhere
        wide += [  # the winner at its hookpoints, a lighter edit at the others
            {**setting, "extra": {"hookpoints": extra_at, "percentile": float(p), "gamma": float(g)}}
            for p, g in dict.fromkeys((float(p), float(g)) for p, g in space.robust_extras)
            if (p, g) != (float(best["percentile"]), float(best["gamma"]))
        ]
        candidates += _Stage(run, stage).judge(wide)
    budget = AttackBudget(
        tuple((task.attack_prompts or task.forget)[: space.robust_attacks]),
        space.robust_attacks,
        space.robust_iterations,
        space.attack_images,
        task.robust_seed,
    )

    @contextlib.contextmanager
    def applied(candidate: dict[str, Any]) -> Iterator[Callable[..., Any]]:
        with run.unlearn(candidate):
            yield lambda prompts, seeds: generate(run.pipe, prompts, seeds, run.cfg)

    trials = attack_trials(
        run.pipe,
        run.judge,
        task.concept,
        run.domain,
        candidates,
        budget,
        apply=applied,
        key=_key,
        saved=run.entry.setdefault("robust", []),
        save=run.save,
        steps=run.cfg.num_inference_steps,
        guidance=run.cfg.guidance_scale,
        progress=lambda todo: tqdm(
            todo, desc=f"attack {task.concept}", unit="setting", disable=not run.cfg.show_progress
        ),
    )
    chosen = robust_choice(trials, space.robust_tolerance)
    own = trials[0]["ua_attack"]
    extra = chosen.get("extra")
    lighter = (
        f" (p {extra['percentile']:g}, γ {extra['gamma']:g} at {len(extra['hookpoints'])})" if extra else ""
    )
    run.log(
        f"{task.concept} robust mode: {len(robust_hookpoints(chosen))} hookpoint(s){lighter}, UA under "
        f"attack {100 * chosen['ua_attack']:.1f} % (at the winner's own: {100 * own:.1f} %)"
    )
    return chosen


__all__ = [
    "BUDGETS",
    "ROBUST_EXTRAS",
    "SEARCH_FILE",
    "AttackBudget",
    "SearchSpace",
    "TuneConfig",
    "TuneTask",
    "TuningError",
    "ValidationSet",
    "attack_trials",
    "clean_flips",
    "generate",
    "judge_domain",
    "paired_scores",
    "read_search",
    "replacement_rank",
    "robust_choice",
    "robust_hookpoints",
    "tune_concept",
    "ua_under_attack",
    "write_defaults",
]
