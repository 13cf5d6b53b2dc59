"""What the nodes do, as plain functions (the V3 and V1 node classes are thin shells around these).

* :func:`list_bundles` / :func:`load_bundle` - bundles in ``models/sae/`` (registered with
  ``folder_paths``) or on the Hugging Face Hub, loaded with the core ``SaeBundle.from_pretrained``.
* :func:`build_ablators` / :func:`unlearn` - the Unlearn Concepts node: a patched clone of the
  MODEL. Concept selection is the core ``SaeBundle.plan`` (a concept is ablated at every hookpoint whose
  library holds it and marks it active); ``strength`` multiplies each concept's default γ, so 1.0
  is exactly what the diffusers adapter does with the bundle's defaults.
* :func:`describe_bundle` - the List Concepts node.

ComfyUI modules (``folder_paths``) are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .patching import (
    IncompatibleBundleError,
    SigmaClock,
    install,
    parse_concepts,
    resolve_targets,
)

log = logging.getLogger("saeuron.comfyui")

SAE_FOLDER = "sae"
"""``folder_paths`` name of ``ComfyUI/models/sae``."""
NO_BUNDLE = "(no bundles in models/sae)"
APPLY_TO = ("all", "cond", "uncond")


# ------------------------------------------------------------------------------------- bundles
def register_sae_folder() -> None:
    """Register ``models/sae`` with ``folder_paths`` (model extensions), keeping paths added from
    ``extra_model_paths.yaml``. Idempotent."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, SAE_FOLDER)
    entry = folder_paths.folder_names_and_paths.get(SAE_FOLDER)
    if entry is None:
        folder_paths.folder_names_and_paths[SAE_FOLDER] = (
            [default],
            set(folder_paths.supported_pt_extensions),
        )
        return
    paths, extensions = entry
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[SAE_FOLDER] = (
        paths,
        set(extensions) | set(folder_paths.supported_pt_extensions),
    )


def bundle_names_from_files(files: Iterable[str]) -> list[str]:
    """Bundle names from files relative to a models/sae root: ``<bundle>/<hookpoint>/sae.safetensors``.

    A hookpoint folder directly under the root (a single SAE whose cfg.json names its hookpoint)
    is a bundle of its own. Sorted, unique, '/' separated.
    """
    names = set()
    for f in files:
        parts = Path(str(f).replace("\\", "/")).parts
        if not parts or parts[-1] != "sae.safetensors" or len(parts) < 2:
            continue
        folder = parts[:-1]
        names.add("/".join(folder[:-1]) if len(folder) > 1 else folder[0])
    return sorted(names)


def list_bundles() -> list[str]:
    """Bundle folders found under every registered ``models/sae`` path."""
    import folder_paths

    register_sae_folder()
    return bundle_names_from_files(folder_paths.get_filename_list(SAE_FOLDER))


def bundle_path(name: str) -> Path:
    """Absolute folder of bundle ``name`` (first registered ``models/sae`` root that has it)."""
    import folder_paths

    register_sae_folder()
    for root in folder_paths.get_folder_paths(SAE_FOLDER):
        candidate = Path(root) / name
        if candidate.is_dir():
            return candidate
    roots = ", ".join(folder_paths.get_folder_paths(SAE_FOLDER))
    raise FileNotFoundError(f"no SAE bundle folder {name!r} under {roots}")


def load_bundle(bundle: str | None = None, repo_id: str | None = None, *, device: str | None = None) -> Any:
    """An ``SAeUron`` bundle: ``repo_id`` (a Hub repo id or a local path) if given, else ``bundle``
    from ``models/sae``. Hub downloads honour ``HF_HUB_OFFLINE`` and the Hugging Face cache."""
    from ..sae.bundle import SaeBundle

    repo = (repo_id or "").strip()
    if repo:
        source: str | Path = repo
    elif bundle and bundle != NO_BUNDLE:
        source = bundle_path(bundle)
    else:
        raise ValueError(
            "choose a bundle from models/sae/ or give a Hugging Face Hub repo id "
            "(put bundles in ComfyUI/models/sae/<name>/<hookpoint>/)"
        )
    eraser = SaeBundle.from_pretrained(source, device=device)
    log.info("SAeUron: loaded %s: %s", source, eraser)
    return eraser


# ------------------------------------------------------------------------------------- unlearn
def check_concepts(bundle: Any, names: Sequence[str]) -> None:
    from ..sae.concepts import UnknownConceptError

    known = bundle.concepts
    for name in names:
        if name not in known:
            raise UnknownConceptError(name, known)


def build_ablators(
    bundle: Any,
    concepts: str | Iterable[str],
    *,
    strength: float = 1.0,
    apply_to: str = "all",
    encoder: str | None = None,
    hookpoints: Sequence[str] | None = None,
) -> dict[str, Any]:
    """hookpoint → ``FeatureAblator`` for ``concepts``, as ``SAeUron.apply`` chooses them.

    ``strength`` s: the reference rule uses γ = s × the concept's default γ at that hookpoint
    (zero/clamp rules ignore it). Unknown concepts raise ``UnknownConceptError``.
    """
    from ..sae.ablation import AblationRule

    names = parse_concepts(concepts)
    if not names:
        return {}
    if strength < 0:
        raise ValueError(f"strength must be ≥ 0, got {strength}")
    if apply_to not in APPLY_TO:
        raise ValueError(f"apply_to must be one of {APPLY_TO}, got {apply_to!r}")
    check_concepts(bundle, names)
    targets = bundle.plan(names, hookpoints=hookpoints)
    for path, specs in targets.items():
        for spec in specs:  # γ = strength × the concept's default γ at this hookpoint
            defaults = bundle.hookpoints[path].library.selection_defaults(spec.concept)
            if AblationRule(defaults.rule) is AblationRule.REFERENCE:
                spec.gamma = defaults.gamma * strength
    return bundle.ablators(targets, encoder=encoder, apply_to=apply_to)


def unlearn(
    model: Any,
    bundle: Any,
    concepts: str | Iterable[str],
    *,
    strength: float = 1.0,
    start_percent: float = 0.0,
    end_percent: float = 1.0,
    apply_to: str = "all",
    encoder: str | None = None,
    key_map: Mapping[str, str] | None = None,
) -> Any:
    """The Unlearn Concepts node: a clone of ``model`` (a ComfyUI ModelPatcher) with the ablation.

    No concepts (or strength 0) gives a plain clone. Bad inputs (unknown concept, a bundle for
    another model family or width, a hookpoint this model lacks) raise before anything is patched.
    ``key_map`` (diffusers → ComfyUI weight keys) defaults to ``comfy.utils.unet_to_diffusers``.
    """
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"need 0 <= start_percent <= end_percent <= 1, got {start_percent}, {end_percent}")
    patched = model.clone()
    names = parse_concepts(concepts)
    if not names:
        return patched
    check_concepts(bundle, names)
    if strength == 0:
        return patched
    ablators = build_ablators(bundle, names, strength=strength, apply_to=apply_to, encoder=encoder)
    targets = resolve_targets(model, {p: bundle.hookpoints[p].sae for p in ablators}, key_map)
    clock = SigmaClock(model.get_model_object("model_sampling"), start_percent, end_percent)
    install(patched, ablators, targets, clock)
    log.info("SAeUron: unlearning %s at %s", names, ", ".join(f"{p} ({t.kind})" for p, t in targets.items()))
    return patched


def check_bundle(model: Any, bundle: Any, key_map: Mapping[str, str] | None = None) -> None:
    """Raise :class:`IncompatibleBundleError` unless every hookpoint of ``bundle`` fits ``model``."""
    resolve_targets(model, {p: h.sae for p, h in bundle.hookpoints.items()}, key_map)


# ----------------------------------------------------------------------------------- list
def describe_bundle(bundle: Any) -> tuple[str, str]:
    """(comma list of the concepts, a readable table: hookpoints, concepts and their defaults)."""
    lines = [f"{len(bundle.concepts)} concepts at {len(bundle.hookpoints)} hookpoints"]
    for path, h in bundle.hookpoints.items():
        cfg = h.sae.cfg
        lines.append(
            f"- {path}: d_in {cfg.d_in}, {cfg.num_latents} latents, k {cfg.k}, "
            f"{cfg.model_family or 'model ?'}, {len(h.library)} concepts"
        )
    lines.append("")
    lines.append("concept | hookpoints (active) | prompts | defaults")
    for name in bundle.concepts:
        where = bundle.where(name)
        lib = bundle.hookpoints[bundle.default_hookpoint(name)].library
        active = [w for w in where if bundle.hookpoints[w].library.selection_defaults(name).active]
        d = lib.selection_defaults(name)
        sel = f"top {d.top_n}" if d.top_n is not None else f"p={d.percentile}"
        shown = ", ".join(w.removeprefix("unet.") for w in (active or where))
        lines.append(
            f"{name} | {shown}{'' if active else ' (inactive)'} | {lib.get(name).num_prompts} | "
            f"{d.rule} γ={d.gamma:g}, {sel}"
        )
    return ", ".join(bundle.concepts), "\n".join(lines)


__all__ = [
    "APPLY_TO",
    "NO_BUNDLE",
    "SAE_FOLDER",
    "IncompatibleBundleError",
    "build_ablators",
    "bundle_names_from_files",
    "bundle_path",
    "check_bundle",
    "check_concepts",
    "describe_bundle",
    "list_bundles",
    "load_bundle",
    "register_sae_folder",
    "unlearn",
]
