"""From paired runs to answers: effect sizes per metric and site, spread downstream, off-distribution.

Input: :class:`~saeuron_plugin.diffusion.diagnose.PairedRun` objects (any runtime's run with the
same fields works) per condition, e.g. ``concept`` (prompts with the concept), ``retained``
(prompts without it), ``concept@4x`` (a stronger edit), ``attacked``. Output: one JSON-able dict.

* **edit effect** per (condition, metric, site): the edited twins against the base twins (same
  seeds), Cohen's d with a bootstrap interval and AUC, over per-sample means, and d per τ bucket
  (the heatmaps). The two groups are compared as independent (pooled-SD d, each group resampled
  on its own), as the matrix-dynamics paper compares prompt classes; the pairing by seed is not
  used, so the intervals are conservative (a paired d_z would be larger still).
* **drift** per (condition, site, τ bucket) and the **spread**: sites in execution order after the
  first edited one, with their drift relative to the edited site's.
* **off-distribution score** per sample: the mean change of FVU (edited − base twin) at the bundle's
  SAE sites downstream of the edit, and, with a judge, how well it predicts *unclean* images (no
  class of the concept's domain at confidence ≥ ``clean_threshold``): AUC.
* **ranking**: the metrics that separate edited from base twins on concept prompts most (max |d|
  over sites), with the same metric's |d| on retained prompts beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..sae.diagnostics import Effect, SampleMetrics, auc, cohens_d

DRIFTS = ("relative_l2", "cosine", "attention_tv")


def twin_metrics(metrics: SampleMetrics) -> list[str]:
    """Metric names measured on both twins (``base/x`` and ``edited/x`` → ``x``)."""
    names = [m.split("/", 1)[1] for m in metrics.metrics() if m.startswith("base/")]
    return [m for m in dict.fromkeys(names) if f"edited/{m}" in metrics.metrics()]


def _finite(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def _mean(t: Tensor) -> float | None:
    t = t[torch.isfinite(t)]
    return _finite(float(t.mean())) if t.numel() else None


def edit_effects(run: Any, *, rounds: int = 500) -> dict[str, dict[str, dict[str, Any]]]:
    """metric → site → base / edited means, Cohen's d (edited vs base) with interval, AUC, d per bucket."""
    m = run.metrics
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for metric in twin_metrics(m):
        per_site = {}
        for site in run.order:
            if (site, f"base/{metric}") not in m:
                continue
            base, edited = m.per_sample(site, f"base/{metric}"), m.per_sample(site, f"edited/{metric}")
            effect = Effect.between(edited, base, rounds=rounds)
            tb, te = m.table(site, f"base/{metric}"), m.table(site, f"edited/{metric}")
            per_site[site] = {
                "base": _mean(base),
                "edited": _mean(edited),
                "d": _finite(effect.d),
                "d_ci": [_finite(effect.d_low), _finite(effect.d_high)],
                "auc": _finite(effect.auc),
                "d_per_bucket": [_finite(cohens_d(te[:, k], tb[:, k])) for k in range(tb.shape[1])],
            }
        out[metric] = per_site
    return out


def drift_profile(run: Any) -> dict[str, dict[str, Any]]:
    """drift kind → site → mean over samples, and the mean per τ bucket (sites in execution order)."""
    m = run.metrics
    out: dict[str, dict[str, Any]] = {}
    for kind in DRIFTS:
        per_site = {}
        for site in run.order:
            if (site, f"drift/{kind}") not in m:
                continue
            table = m.table(site, f"drift/{kind}")
            per_site[site] = {
                "mean": _mean(table.nanmean(-1)),
                "per_bucket": [_mean(table[:, k]) for k in range(table.shape[1])],
            }
        if per_site:
            out[kind] = per_site
    return out


def spread(run: Any, threshold: float = 0.1) -> dict[str, Any]:
    """How far downstream the edit reaches: relative L2 drift at each site after the first edited
    one (execution order), as a share of the drift at the edited sites; ``reach``: the last site
    whose share is ≥ ``threshold``."""
    drift = drift_profile(run).get("relative_l2", {})
    edited = [s for s in run.order if s in run.edited_sites and s in drift]
    if not edited:
        return {"edited": [], "downstream": [], "reach": None}
    at_edit = max(drift[s]["mean"] or 0.0 for s in edited)
    first = run.order.index(edited[0])
    downstream = []
    for site in run.order[first + 1 :]:
        if site in drift and site not in run.edited_sites:
            value = drift[site]["mean"] or 0.0
            downstream.append(
                {
                    "site": site,
                    "drift": _finite(value),
                    "share_of_edit": _finite(value / at_edit) if at_edit else None,
                }
            )
    reach = [d["site"] for d in downstream if (d["share_of_edit"] or 0.0) >= threshold]
    return {
        "edited": edited,
        "edit_drift": _finite(at_edit),
        "downstream": downstream,
        "reach": reach[-1] if reach else None,
        "threshold": threshold,
    }


def off_distribution_scores(run: Any) -> tuple[Tensor, list[str]]:
    """Per sample: mean over the SAE sites downstream of the edit of FVU(edited) − FVU(base), and
    the sites used (downstream and not edited; else every non-edited SAE site; else the edited)."""
    m = run.metrics
    with_sae = [s for s in run.order if (s, "edited/fvu") in m]
    edited = [s for s in run.order if s in run.edited_sites]
    first = run.order.index(edited[0]) if edited else 0
    sites = [s for s in with_sae if run.order.index(s) > first and s not in run.edited_sites]
    sites = sites or [s for s in with_sae if s not in run.edited_sites] or with_sae
    if not sites:
        return torch.full((m.num_samples,), math.nan, dtype=torch.float64), []
    deltas = torch.stack([m.per_sample(s, "edited/fvu") - m.per_sample(s, "base/fvu") for s in sites])
    return deltas.nanmean(0), sites


def clean_flags(probabilities: Tensor, threshold: float = 0.9) -> Tensor:
    """[N] bool: some class of the domain has probability ≥ ``threshold`` (a clean image)."""
    return probabilities.max(-1).values >= threshold


def prediction(scores: Tensor, clean: Tensor) -> dict[str, Any]:
    """How well the off-distribution score predicts unclean images: AUC(unclean > clean), rates."""
    scores = scores.double()
    unclean = ~clean
    return {
        "unclean_rate": _finite(float(unclean.double().mean())) if clean.numel() else None,
        "auc_unclean": _finite(auc(scores[unclean], scores[clean])),
        "score_unclean": _mean(scores[unclean]) if bool(unclean.any()) else None,
        "score_clean": _mean(scores[clean]) if bool(clean.any()) else None,
    }


def ranking(
    effects: Mapping[str, Mapping[str, Mapping[str, Any]]],
    control: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """Metrics by how strongly they separate edited from base (max |d| over sites), strongest first;
    ``control`` (the retained prompts' effects) gives the same metric's |d| at that site beside it."""
    rows = []
    for metric, per_site in effects.items():
        best = max(((abs(v["d"]), site) for site, v in per_site.items() if v["d"] is not None), default=None)
        if best is None:
            continue
        site = best[1]
        row = {
            "metric": metric,
            "site": site,
            "d": per_site[site]["d"],
            "d_ci": per_site[site]["d_ci"],
            "auc": per_site[site]["auc"],
        }
        if control is not None and metric in control and site in control[metric]:
            row["control_d"] = control[metric][site]["d"]
        rows.append(row)
    return sorted(rows, key=lambda r: -abs(r["d"] if math.isfinite(r["d"]) else 1e9))


def separation(
    a_run: Any, b_run: Any, *, twin: str = "edited", rounds: int = 500
) -> dict[str, dict[str, Any]]:
    """Per metric: the site where ``a_run``'s and ``b_run``'s ``twin`` values differ most (e.g.
    attacked vs clean prompts under the edit), with Cohen's d and AUC."""
    out: dict[str, dict[str, Any]] = {}
    for metric in twin_metrics(a_run.metrics):
        best = None
        for site in a_run.order:
            key = (site, f"{twin}/{metric}")
            if key not in a_run.metrics or key not in b_run.metrics:
                continue
            eff = Effect.between(
                a_run.metrics.per_sample(*key), b_run.metrics.per_sample(*key), rounds=rounds
            )
            if best is None or abs(eff.d) > abs(best[1].d):
                best = (site, eff)
        if best is not None:
            out[metric] = {
                "site": best[0],
                "d": _finite(best[1].d),
                "auc": _finite(best[1].auc),
                "d_ci": [_finite(best[1].d_low), _finite(best[1].d_high)],
            }
    return out


def summarize(
    runs: Mapping[str, Any],
    *,
    judge_probs: Mapping[str, Tensor] | None = None,
    clean_threshold: float = 0.9,
    rounds: int = 500,
) -> dict[str, Any]:
    """Everything above for every condition (see the module docstring)."""
    out: dict[str, Any] = {"conditions": {}, "ranking": [], "off_distribution": {}}
    effects = {}
    for name, run in runs.items():
        effects[name] = edit_effects(run, rounds=rounds)
        scores, sites = off_distribution_scores(run)
        entry: dict[str, Any] = {
            "samples": run.metrics.num_samples,
            "seconds": round(run.seconds, 1),
            "order": run.order,
            "edited_sites": run.edited_sites,
            "info": run.info,
            "effects": effects[name],
            "drift": drift_profile(run),
            "spread": spread(run),
            "off_distribution": {"sites": sites, "mean": _mean(scores)},
        }
        if judge_probs is not None and name in judge_probs:
            entry["off_distribution"].update(
                prediction(scores, clean_flags(judge_probs[name], clean_threshold))
            )
        out["conditions"][name] = entry
    if "concept" in effects:
        out["ranking"] = ranking(effects["concept"], effects.get("retained"))
    if "attacked" in runs and "concept" in runs:
        out["attack_detection"] = separation(runs["attacked"], runs["concept"], rounds=rounds)
    strengths = [n for n in runs if n == "concept" or n.startswith("concept@")]
    out["off_distribution"] = {n: out["conditions"][n]["off_distribution"] for n in strengths}
    return out


def pooled_prediction(
    runs: Sequence[Any], probs: Sequence[Tensor], clean_threshold: float = 0.9
) -> dict[str, Any]:
    """:func:`prediction` over several runs together (e.g. every strength of a sweep)."""
    scores = torch.cat([off_distribution_scores(r)[0] for r in runs])
    clean = torch.cat([clean_flags(p, clean_threshold) for p in probs])
    return prediction(scores, clean)


__all__ = [
    "clean_flags",
    "drift_profile",
    "edit_effects",
    "off_distribution_scores",
    "pooled_prediction",
    "prediction",
    "ranking",
    "separation",
    "spread",
    "summarize",
    "twin_metrics",
]
