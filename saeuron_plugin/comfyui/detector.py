"""The Concept Detector: how strongly each library concept's features fire, per image and per step.

The detector re-noises the given latents (e.g. a KSampler output) to ``steps`` noise levels of the
model's own schedule, runs the model once per level on the positive conditioning (ComfyUI's
sampling code, CFG 1, so conditional rows only) and, at every hookpoint of the bundle, encodes the
activations with the SAE. For each concept it reads the latents the Unlearn node would ablate at
that τ (the library's selection defaults, per τ bucket) and reports

* ``score``: the mean over those latents of (token-averaged activation) / μ(i, τ, D_c), the
  concept's own mean activation in its statistics, so ≈ 1 means "fires as on the concept's
  prompts" and ≈ 0 "does not fire";
* ``edit``: the fraction of tokens where one of them exceeds its gate μ(i, τ, D), i.e. where the
  Unlearn node would change something.

A concept held at several hookpoints is averaged over them. Levels whose bucket selects no
latent for a concept count as missing (NaN) and are left out of the means.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..sae.sites import CallContext
from .patching import SigmaClock, install, parse_concepts, resolve_targets

MODES = ("per image", "per step")


class ConceptRecorder:
    """Editor that never edits: records per call the score and edit fraction of each concept."""

    def __init__(self, entry: Any, concepts: Sequence[str]) -> None:
        from ..sae.ablation import ConceptAblation
        from ..sae.selection import concept_scores, select_features

        self.sae, self.library = entry.sae, entry.library
        lib = self.library
        self.concepts = list(concepts)
        self.grid = lib.tau_grid
        gate = lib.all_means(fill_empty=True).float().clamp_min(0)
        self.tables: dict[str, list[tuple[Tensor, Tensor, Tensor] | None]] = {}
        for name in self.concepts:
            spec = ConceptAblation(name).resolve(lib)
            sel = select_features(
                concept_scores(lib, name, spec.contrast), spec.percentile, spec.top_n, self.grid
            )
            mu_c = lib.get(name).means(fill_empty=True).float()
            rows: list[tuple[Tensor, Tensor, Tensor] | None] = []
            for k in range(self.grid.num_buckets):
                latents = sel.bucket(k)
                keep = latents[mu_c[k, latents] > 0]
                rows.append((keep, mu_c[k, keep], gate[k, keep]) if keep.numel() else None)
            self.tables[name] = rows
        self.level = 0
        self.records: list[tuple[int, list[float], dict[str, list[tuple[float, float]]]]] = []

    def to(self, device: torch.device | str) -> ConceptRecorder:
        self.sae.to(device)
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> ConceptRecorder:
        return self

    @torch.no_grad()
    def __call__(self, x: Tensor, ctx: CallContext) -> Tensor:
        rows, taus = ctx.conditional(x)
        if rows.shape[0] == 0:
            return x
        taus = torch.zeros(rows.shape[0]) if taus is None else taus
        sae = self.sae
        z = sae.encode(rows.to(sae.device, torch.float32))  # [b, tokens, n]
        pooled = z.mean(dim=1)  # [b, n]
        out: dict[str, list[tuple[float, float]]] = {}
        for name in self.concepts:
            per_row = []
            for r in range(rows.shape[0]):
                table = self.tables[name][self.grid.nearest(float(taus[r]))]
                if table is None:
                    per_row.append((math.nan, math.nan))
                    continue
                latents, mu_c, gate = (t.to(z.device) for t in table)
                score = float((pooled[r, latents] / mu_c).mean())
                edit = float((z[r][:, latents] > gate).any(-1).float().mean())
                per_row.append((score, edit))
            out[name] = per_row
        self.records.append((self.level, [float(t) for t in taus], out))
        return x


@dataclass
class DetectorResult:
    concepts: list[str]
    sigmas: list[float]
    taus: list[float]
    images: int
    score: dict[str, list[list[float]]] = field(default_factory=dict)
    """concept → [image][level]"""
    edit: dict[str, list[list[float]]] = field(default_factory=dict)

    def per_image(self, what: str = "score") -> dict[str, list[float]]:
        table = self.score if what == "score" else self.edit
        return {c: [_nanmean(row) for row in rows] for c, rows in table.items()}

    def per_step(self, what: str = "score") -> dict[str, list[float]]:
        table = self.score if what == "score" else self.edit
        return {
            c: [_nanmean([rows[i][j] for i in range(len(rows))]) for j in range(len(self.sigmas))]
            for c, rows in table.items()
        }

    def to_json(self) -> str:
        data = {
            "concepts": self.concepts,
            "images": self.images,
            "levels": [{"sigma": s, "tau": t} for s, t in zip(self.sigmas, self.taus)],
            "score": self.score,
            "edit_fraction": self.edit,
            "per_image": {"score": self.per_image("score"), "edit_fraction": self.per_image("edit")},
            "per_step": {"score": self.per_step("score"), "edit_fraction": self.per_step("edit")},
        }
        return json.dumps(_finite(data), indent=1)

    def report(self, mode: str = "per image") -> str:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        head = (
            f"SAeUron Concept Detector: {self.images} image(s), {len(self.sigmas)} noise levels "
            f"(τ {min(self.taus):.3f}–{max(self.taus):.3f})\n"
            "score: firing of the concept's selected features relative to its own mean "
            "(1 ≈ as on the concept's prompts); edit%: tokens the Unlearn node would edit"
        )
        if mode == "per image":
            labels = [f"image {i}" for i in range(self.images)]
            score, edit = self.per_image("score"), self.per_image("edit")
        else:
            labels = [f"τ {t:.3f}" for t in self.taus]
            score, edit = self.per_step("score"), self.per_step("edit")
        width = max(12, *(len(c) + 1 for c in self.concepts)) if self.concepts else 12
        lines = [head, "", f"{'':10}" + "".join(f"{c:>{width}}" for c in self.concepts)]
        for i, label in enumerate(labels):
            cells = "".join(f"{_cell(score[c][i], edit[c][i]):>{width}}" for c in self.concepts)
            lines.append(f"{label:10}" + cells)
        if mode == "per image" and self.concepts:
            top = [max(self.concepts, key=lambda c: _rank(score[c][i])) for i in range(self.images)]
            lines += ["", "strongest: " + ", ".join(f"image {i}: {c}" for i, c in enumerate(top))]
        return "\n".join(lines)


def _rank(v: float) -> float:
    return -math.inf if math.isnan(v) else v


def _cell(score: float, edit: float) -> str:
    if math.isnan(score):
        return "-"
    return f"{score:.2f} ({100 * edit:.0f}%)"


def _nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else round(obj, 5)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def recorders_for(bundle: Any, concepts: str | Iterable[str] | None) -> dict[str, ConceptRecorder]:
    """One recorder per hookpoint that holds (and marks active) some of ``concepts`` (all if empty)."""
    from .core import check_concepts

    names = parse_concepts(concepts) or list(bundle.concepts)
    check_concepts(bundle, names)
    out = {}
    for path, entry in bundle.hookpoints.items():
        held = [
            n
            for n in names
            if n in entry.library
            and entry.library.get(n).total_count > 0
            and entry.library.selection_defaults(n).active
        ]
        if held:
            out[path] = ConceptRecorder(entry, held)
    if not out:
        raise ValueError(f"none of {names} has statistics at an active hookpoint of this bundle")
    return out


def _one_call(
    model: Any,
    x: Tensor,
    sigmas: Tensor,
    extra_args: dict | None = None,
    callback: Any = None,
    disable: Any = None,
) -> Tensor:
    """A one-step 'sampler': the denoised prediction at sigmas[0] (one model call)."""
    return model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))


def detect(
    model: Any,
    bundle: Any,
    positive: Any,
    latent: dict[str, Tensor],
    *,
    concepts: str | Iterable[str] | None = None,
    steps: int = 10,
    seed: int = 0,
    scheduler: str = "normal",
) -> DetectorResult:
    """Run the detector (see the module docstring) on ``latent["samples"]`` [B, C, h, w]."""
    import comfy.sample
    import comfy.samplers

    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    recorders = recorders_for(bundle, concepts)
    targets = resolve_targets(model, {p: bundle.hookpoints[p].sae for p in recorders})
    model_sampling = model.get_model_object("model_sampling")
    clock = SigmaClock(model_sampling)
    patched = model.clone()
    install(patched, recorders, targets, clock)
    samples = comfy.sample.fix_empty_latent_channels(patched, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed)
    levels = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps)[:-1].float().cpu()
    sampler = comfy.samplers.KSAMPLER(_one_call)
    for j, sigma in enumerate(levels):
        for rec in recorders.values():
            rec.level = j
        comfy.sample.sample_custom(
            patched,
            noise,
            1.0,
            sampler,
            torch.stack([sigma, torch.zeros(())]),
            positive,
            positive,
            samples,
            disable_pbar=True,
            seed=seed,
        )
    images = samples.shape[0]
    names = list(dict.fromkeys(n for r in recorders.values() for n in r.concepts))
    taus = clock.tau(levels).tolist()
    score = {c: [[math.nan] * len(levels) for _ in range(images)] for c in names}
    edit = {c: [[math.nan] * len(levels) for _ in range(images)] for c in names}
    sums: dict[tuple[str, int, int], list[tuple[float, float]]] = {}
    for rec in recorders.values():
        for level, _taus, per_concept in rec.records:
            for c, rows in per_concept.items():
                for i, pair in enumerate(rows):
                    sums.setdefault((c, i % images, level), []).append(pair)
    for (c, i, level), pairs in sums.items():
        score[c][i][level] = _nanmean(p[0] for p in pairs)
        edit[c][i][level] = _nanmean(p[1] for p in pairs)
    return DetectorResult(names, levels.tolist(), taus, images, score, edit)


__all__ = ["MODES", "ConceptRecorder", "DetectorResult", "detect", "recorders_for"]
