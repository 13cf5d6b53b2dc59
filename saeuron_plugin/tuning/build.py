"""``saeuron build RECIPE``: collect → train → statistics → tune → model card → (push), one resumable run.

A recipe is a TOML file (read with the standard library's ``tomllib``)::

    model = "checkpoints/shapescanvas-sd"      # diffusers folder or Hub id
    work = "runs/my-build"                     # stages write here
    out = "my-bundle"                          # the finished bundle (swapped in with a rename)
    hub_repo = "me/my-bundle"                  # optional: push_to_hub at the end

    [collect]                                  # activations for the SAEs
    hookpoints = ["unet.up_blocks.1.attentions.1"]
    prompts = "prompts/collect.txt"            # a file, a list, or "shapescanvas" (its captions)
    steps = 25
    guidance_scale = 5.0
    tokens_per_step = 64
    store_dtype = "fp16"                       # fp16 (default), bf16 or fp32, as ``--store-dtype``

    [train]                          # any TrainConfig field, or from = "org/repo" (released SAEs)
    k = 8
    expansion_factor = 16
    batch_size = 1024
    epochs = 2

    [statistics]
    background = "prompts/background.txt"      # optional background set
    steps = 25

    [concepts.star]                            # one table per concept
    prompts = "prompts/star.txt"               # statistics prompts ("shapescanvas": its captions)
    forget = "prompts/star-val.txt"            # tuning prompts with / without it (defaults: from prompts)
    retain = "prompts/no-star-val.txt"

    [tune]
    judge = "shapescanvas"                     # or "clip:MODEL" with [tune.labels], or "module:function"
    budget = "small"
    steps = 25
    validation = "shapescanvas"                # optional: `make bundle`'s labelled validation sets

Each stage writes ``<work>/<stage>.done.json`` holding the part of the recipe it depends on once its
output is complete; a rerun skips a stage whose stamp matches, and an interrupted stage resumes from
its own checkpoints (collection keys, trainer checkpoints, saved tuning trials). So killing the run at
any point loses nothing and redoes nothing that was complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import tomllib
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..cli_prompts import read_prompt_file
from ..errors import BadFileError
from ..sae.io import atomic_write

STAGES = ("collect", "train", "statistics", "tune", "bundle")


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe at ``path`` (TOML), checked for the fields every run needs; relative paths in it are
    taken relative to the recipe's folder."""
    path = Path(path)
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise BadFileError(path, "no such recipe file") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise BadFileError(path, f"not valid TOML: {err}") from err
    for key in ("model", "work", "out"):
        if not isinstance(recipe.get(key), str):
            raise BadFileError(path, "missing or not a string", field=key)
    if not recipe.get("collect", {}).get("hookpoints"):
        raise BadFileError(path, "missing: the hookpoints to collect and train", field="collect.hookpoints")
    if not recipe.get("concepts"):
        raise BadFileError(path, "no [concepts.NAME] tables", field="concepts")
    from ..cli_prompts import DTYPES
    from .search import BUDGETS

    store_dtype = recipe["collect"].get("store_dtype", "fp16")
    if store_dtype not in DTYPES:
        raise BadFileError(
            path, f"must be one of {list(DTYPES)}, got {store_dtype!r}", field="collect.store_dtype"
        )
    validation = recipe.get("tune", {}).get("validation")
    if validation not in (None, "shapescanvas"):
        raise BadFileError(
            path, f"must be 'shapescanvas' or absent, got {validation!r}", field="tune.validation"
        )
    if validation == "shapescanvas":
        _check_shapescanvas_validation(path, recipe)
    budget = recipe.get("tune", {}).get("budget", "small")
    if budget not in BUDGETS:
        raise BadFileError(path, f"must be one of {list(BUDGETS)}, got {budget!r}", field="tune.budget")
    recipe["_dir"] = str(path.resolve().parent)
    return recipe


def _check_shapescanvas_validation(path: Path, recipe: dict[str, Any]) -> None:
    """``make bundle``'s validation sets carry ShapesCanvas labels: they need its judge and concepts,
    and they replace a concept's own forget / retain prompts (so those may not be given)."""
    from ..shapescanvas.data import CONCEPTS

    judge = recipe["tune"].get("judge", "shapescanvas")
    if judge.split(":")[0] != "shapescanvas":
        problem = f"validation = 'shapescanvas' needs the ShapesCanvas judge, got {judge!r}"
        raise BadFileError(path, problem, field="tune.judge")
    for name, spec in recipe["concepts"].items():
        if name not in CONCEPTS:
            problem = f"{name!r} is not a ShapesCanvas concept; known: {list(CONCEPTS)}"
            raise BadFileError(path, problem, field="concepts")
        extra = sorted({"forget", "retain"} & set(spec))
        if extra:
            problem = f"{extra} are unused with [tune] validation = 'shapescanvas'"
            raise BadFileError(path, problem, field=f"concepts.{name}")


def _prompts(value: Any, recipe: dict[str, Any], concept: str | None = None) -> list[str]:
    """A list, a file (one prompt a line, ``#`` comments), or ``"shapescanvas"`` (its captions: with
    ``concept`` when given)."""
    if isinstance(value, list):
        return [str(v) for v in value]
    if value == "shapescanvas":
        from ..shapescanvas import data as sc
        from .commands import shapescanvas_captions

        return shapescanvas_captions(concept) if concept else [p.prompt for p in sc.benchmark_prompts()]
    return read_prompt_file(Path(recipe["_dir"]) / str(value))


def _stamp(recipe: dict[str, Any], *sections: str) -> dict[str, Any]:
    """The part of the recipe a stage depends on, with a digest (model and the named sections)."""
    part = {"model": recipe["model"], **{s: recipe.get(s) for s in sections}}
    blob = json.dumps(part, sort_keys=True, default=str)
    return {"recipe": part, "sha256": hashlib.sha256(blob.encode()).hexdigest()}


def _space_options(domain: dict[str, Any]) -> dict[str, Any]:
    """A recipe's ``[tune.domains.<domain>]`` table as :class:`~.search.SearchSpace` options
    (``sets`` names the hookpoint sets; lists become tuples)."""
    options = {("hookpoint_sets" if k == "sets" else k): v for k, v in domain.items()}
    return {k: (tuple(v) if isinstance(v, list) and k != "hookpoint_sets" else v) for k, v in options.items()}


class Build:
    """One recipe's run; :meth:`run` does the stages that are not done yet."""

    def __init__(self, recipe: dict[str, Any], log: Callable[[str], None] = print) -> None:
        from ..sae.processes import Processes

        self.procs = Processes.current()
        self.recipe = recipe
        self.log = log if self.procs.main else (lambda _: None)
        base = Path(recipe["_dir"])
        self.work = base / recipe["work"]
        self.out = base / recipe["out"]
        self.hookpoints = list(recipe["collect"]["hookpoints"])
        self._pipe: Any = None

    # --------------------------------------------------------------- stamps
    def _stamp_path(self, stage: str) -> Path:
        return self.work / f"{stage}.done.json"

    def done(self, stage: str, stamp: dict[str, Any]) -> bool:
        path = self._stamp_path(stage)
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        return saved.get("sha256") == stamp["sha256"]

    def _mark(self, stage: str, stamp: dict[str, Any], seconds: float) -> None:
        text = json.dumps({**stamp, "seconds": round(seconds, 1)}, indent=1)
        atomic_write(self._stamp_path(stage), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    @property
    def pipe(self) -> Any:
        if self._pipe is None:
            from ..diffusion.commands import load_pipeline

            local = Path(self.recipe["_dir"]) / self.recipe["model"]  # a folder by the recipe, or a Hub id
            model = str(local) if local.is_dir() else self.recipe["model"]
            self._pipe = load_pipeline(model, self.recipe.get("device"), self.recipe.get("dtype", "fp32"))
        return self._pipe

    # --------------------------------------------------------------- stages
    def run(self) -> Path:
        self.work.mkdir(parents=True, exist_ok=True)
        steps = [
            ("collect", ("collect",), self.collect),
            ("train", ("collect", "train"), self.train),
            ("statistics", ("collect", "train", "statistics", "concepts"), self.statistics),
            ("tune", ("collect", "train", "statistics", "concepts", "tune"), self.tune),
            ("bundle", ("collect", "train", "statistics", "concepts", "tune", "hub_repo"), self.bundle),
        ]
        for stage, sections, fn in steps:
            if stage == "tune" and not self.procs.main:
                return self.out  # tuning's trials run one after another on the main process
            stamp = _stamp(self.recipe, *sections)
            if self.done(stage, stamp):
                self.log(f"{stage}: done (recipe unchanged), skipped")
                continue
            start = time.perf_counter()
            fn()
            if self.procs.main:
                self._mark(stage, stamp, time.perf_counter() - start)
            if stage in ("collect", "train", "statistics"):  # the stages every process runs
                self.procs.barrier()  # every process sees the same stamps at the next stage
            self.log(f"{stage}: {time.perf_counter() - start:.0f} s")
        return self.out

    def collect(self) -> None:
        from ..cli_prompts import DTYPES
        from ..diffusion.collect import collect_activations

        if self.recipe.get("train", {}).get("from"):
            self.log(f"collect: not needed, the SAEs come from {self.recipe['train']['from']}")
            return
        c = self.recipe["collect"]
        result = collect_activations(
            self.pipe,
            _prompts(c.get("prompts", "shapescanvas"), self.recipe) * int(c.get("repeats", 1)),
            self.hookpoints,
            self.work / "activations",
            num_inference_steps=int(c.get("steps", 25)),
            guidance_scale=c.get("guidance_scale"),
            tokens_per_step=c.get("tokens_per_step"),
            seed=int(c.get("seed", 10_000)),
            batch_size=int(c.get("batch_size", 8)),
            store_dtype=DTYPES[c.get("store_dtype", "fp16")],
        )
        self.log(f"collect: {result.collected} prompts ({result.skipped} already stored), rows {result.rows}")

    def train(self) -> None:
        from ..sae.store import ActivationStore
        from ..sae.train import TrainConfig, Trainer

        allowed = {f.name for f in fields(TrainConfig)}
        options = {k: v for k, v in self.recipe.get("train", {}).items() if k in allowed}
        released = self.recipe.get("train", {}).get("from")
        for hp in self.hookpoints:
            if released:  # a released bundle (e.g. bcywinski/SAeUron): one SAE folder per hookpoint
                from ..sae.model import SparseAutoencoder

                sae = SparseAutoencoder.from_pretrained(released, subfolder=hp)
                if self.procs.main:
                    sae.save_pretrained(self.work / "sae" / hp)
                continue
            store = ActivationStore(self.work / "activations" / hp)
            meta = store.metadata
            cfg = TrainConfig(
                **{
                    "progress": False,
                    **options,
                    "hookpoint": hp,
                    "model_family": meta.get("model_family"),
                    "base_model": meta.get("base_model"),
                    "checkpoint_dir": str(self.work / "sae" / hp / "checkpoint"),
                    "checkpoint_every": int(options.get("checkpoint_every", 200)),
                    "resume": True,
                }
            )
            sae, state = Trainer(store, cfg).fit()
            if self.procs.main:
                sae.save_pretrained(self.work / "sae" / hp)
            self.log(f"train {hp}: {state.step} steps, FVU {state.last_fvu:.3f}")

    def statistics(self) -> None:
        from ..diffusion.unlearn import SAeUron
        from ..sae.model import SparseAutoencoder
        from ..sae.tau import TauGrid

        s = self.recipe.get("statistics", {})
        eraser = SAeUron.from_saes(
            {hp: SparseAutoencoder.from_pretrained(self.work / "sae" / hp) for hp in self.hookpoints},
            tau_grid=TauGrid(int(s["tau_buckets"])) if "tau_buckets" in s else None,
        )
        prompts = {
            name: _prompts(spec.get("prompts", "shapescanvas"), self.recipe, name)
            for name, spec in self.recipe["concepts"].items()
        }
        if s.get("background"):
            prompts[None] = _prompts(s["background"], self.recipe)
        eraser.add_concepts(
            prompts,
            self.pipe,
            num_inference_steps=int(s.get("steps", 25)),
            guidance_scale=s.get("guidance_scale"),
            seed=int(s.get("seed", 20_000)),
            batch_size=int(s.get("batch_size", 8)),
        )
        if self.procs.main:  # every process holds the pooled statistics; one writes them
            shutil.rmtree(self.work / "statistics", ignore_errors=True)
            eraser.save_pretrained(self.work / "statistics")

    def tune(self) -> None:
        from ..diffusion.unlearn import SAeUron
        from .judges import load_judge
        from .search import BUDGETS, SearchSpace, TuneConfig, judge_domain, tune_concept

        t = self.recipe.get("tune", {})
        judge = load_judge(t.get("judge", "shapescanvas"), labels=t.get("labels"))
        folder = self.work / "tuned"  # every trial is saved to folder/search.json: a rerun reuses them
        eraser = SAeUron.from_pretrained(self.work / "statistics")
        n = BUDGETS[t.get("budget", "small")]["prompts"]
        domains = t.get("domains", {})  # [tune.domains.<judge domain>]: that domain's search space
        cfg = TuneConfig(
            num_inference_steps=int(t.get("steps", 25)),
            guidance_scale=t.get("guidance_scale"),
            batch_size=int(t.get("batch_size", 4)),
            show_progress=bool(t.get("progress", True)),
        )
        # trials of other SAEs or statistics are not reused (the stamp of the stages they come from)
        source = _stamp(self.recipe, "collect", "train", "statistics", "concepts")["sha256"]
        for name in self.recipe["concepts"]:
            space = SearchSpace.from_budget(
                t.get("budget", "small"), **_space_options(domains.get(judge_domain(judge, name), {}))
            )
            tune_concept(eraser, self.pipe, judge, self._task(name, n), space, folder, cfg, self.log, source)
        eraser.save_pretrained(folder)

    def _task(self, name: str, n: int) -> Any:
        """``name``'s tuning task: ``make bundle``'s labelled validation sets where ``[tune] validation =
        "shapescanvas"``; otherwise ``n`` forget prompts (``forget``, else its own prompts, evenly
        spaced) and ``n`` retain prompts (``retain``, else the other concepts' prompts), paired."""
        from .search import TuneTask

        if self.recipe.get("tune", {}).get("validation") == "shapescanvas":
            from ..shapescanvas.build import BundleConfig, tune_task

            return tune_task(name, BundleConfig())
        spec = self.recipe["concepts"][name]
        own = _prompts(spec.get("prompts", "shapescanvas"), self.recipe, name)
        forget = _prompts(spec["forget"], self.recipe) if "forget" in spec else own[:: max(1, len(own) // n)]
        if "retain" in spec:
            retain = _prompts(spec["retain"], self.recipe)
        else:
            others = [
                p
                for other, o in self.recipe["concepts"].items()
                if other != name
                for p in _prompts(o.get("prompts", "shapescanvas"), self.recipe, other)
                if p not in own
            ]
            retain = others[:: max(1, len(others) // n)]
        return TuneTask(name, forget[:n], retain[:n])

    def bundle(self) -> None:
        from ..diffusion.unlearn import SAeUron

        eraser = SAeUron.from_pretrained(self.work / "tuned")
        staging = self.out.with_name(self.out.name + ".building")
        shutil.rmtree(staging, ignore_errors=True)
        recipe = {k: v for k, v in self.recipe.items() if not k.startswith("_")}
        search = json.loads((self.work / "tuned" / "search.json").read_text(encoding="utf-8"))
        keys = ("hookpoints", "contrast", "percentile", "gamma", "ua", "ira", "cra")
        tuned = {
            name: {k: entry["best"][k] for k in keys}
            for name, entry in search.get("tune", {}).items()
            if "best" in entry
        }
        # the card records the recipe, the tuned settings and their validation scores
        eraser.save_pretrained(staging, metrics={"validation (tuned settings)": tuned, "recipe": recipe})
        shutil.copy2(self.work / "tuned" / "search.json", staging / "search.json")
        old = self.out.with_name(self.out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if self.out.exists():
            self.out.rename(old)
        staging.rename(self.out)  # the finished bundle appears whole, or not at all
        shutil.rmtree(old, ignore_errors=True)
        if self.recipe.get("hub_repo"):
            self.log(f"pushing to {self.recipe['hub_repo']}: {eraser.push_to_hub(self.recipe['hub_repo'])}")


def build(recipe_path: str | Path, log: Callable[[str], None] = print) -> Path:
    """Run (or resume) the recipe at ``recipe_path``; returns the finished bundle's folder."""
    return Build(read_recipe(recipe_path), log).run()


__all__ = ["STAGES", "Build", "build", "read_recipe"]
