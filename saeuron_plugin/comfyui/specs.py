"""Node definitions shared by the V3 schema and the V1 adapters: ids, names, inputs, outputs.

One table drives both APIs, so the two can never disagree; contract tests pin it (ids and input
names are what saved workflows refer to: never rename them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CATEGORY = "SAeUron"
SAE_TYPE = "SAEURON_SAE"
"""ComfyUI socket type of a loaded SAE bundle."""


@dataclass(frozen=True)
class Param:
    """One input or output. ``kind``: MODEL, CONDITIONING, LATENT, SAEURON_SAE, STRING, FLOAT, INT, COMBO."""

    name: str
    kind: str
    tooltip: str = ""
    default: Any = None
    options: Callable[[], list[str]] | tuple[str, ...] | None = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    multiline: bool = False
    optional: bool = False
    label: str | None = None
    """Display name (V3 ids must differ between inputs and outputs; labels need not)."""


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: tuple[Param, ...]
    outputs: tuple[Param, ...]
    output_node: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _bundle_options() -> list[str]:
    from .core import NO_BUNDLE, list_bundles

    return list_bundles() or [NO_BUNDLE]


SAE_LOADER = NodeSpec(
    "SAeUronSAELoader",
    "SAE Loader (SAeUron)",
    "Load an SAeUron bundle (SAEs + concept libraries) from ComfyUI/models/sae/ or the Hugging Face Hub.",
    inputs=(
        Param(
            "bundle",
            "COMBO",
            "A bundle folder in models/sae/ (<bundle>/<hookpoint>/cfg.json, sae.safetensors, concepts/)",
            options=_bundle_options,
        ),
        Param(
            "repo_id",
            "STRING",
            "Optional: a Hugging Face Hub repo id (e.g. org/name) or a local folder; "
            "overrides the bundle choice. Needs network unless cached.",
            default="",
            optional=True,
        ),
    ),
    outputs=(Param("sae", "SAEURON_SAE", "The SAE bundle"),),
)

UNLEARN = NodeSpec(
    "SAeUronUnlearnConcepts",
    "Unlearn Concepts (SAeUron)",
    "Patch the MODEL so it stops drawing the given concepts: SAE features of each concept are ablated at the "
    "bundle's hookpoints while sampling (SAeUron). Returns a patched clone; the input MODEL is untouched.",
    inputs=(
        Param("model", "MODEL"),
        Param("sae", "SAEURON_SAE", "From SAE Loader"),
        Param(
            "concepts",
            "STRING",
            "Concepts to unlearn, comma separated (see List Concepts). Empty: no change.",
            default="",
        ),
        Param(
            "strength",
            "FLOAT",
            "Multiplies each concept's default ablation strength γ (1 = the bundle's "
            "tuned default, as in diffusers; 0 = off)",
            default=1.0,
            min=0.0,
            max=50.0,
            step=0.05,
        ),
        Param(
            "start_percent",
            "FLOAT",
            "Start of the sampling window where the ablation runs",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.001,
        ),
        Param(
            "end_percent",
            "FLOAT",
            "End of the sampling window where the ablation runs",
            default=1.0,
            min=0.0,
            max=1.0,
            step=0.001,
        ),
        Param(
            "apply_to",
            "COMBO",
            "CFG rows to edit: all (the paper's setting), cond or uncond only",
            default="all",
            options=("all", "cond", "uncond"),
            optional=True,
        ),
    ),
    outputs=(Param("patched_model", "MODEL", "The patched model", label="model"),),
)

LIST_CONCEPTS = NodeSpec(
    "SAeUronListConcepts",
    "List Concepts (SAeUron)",
    "Show the concepts an SAE bundle can unlearn, where, and with which defaults.",
    inputs=(Param("sae", "SAEURON_SAE"),),
    outputs=(
        Param("concepts", "STRING", "Every concept, comma separated (wire into Unlearn Concepts)"),
        Param("info", "STRING", "Hookpoints, concepts and their defaults"),
    ),
    output_node=True,
)

DETECTOR = NodeSpec(
    "SAeUronConceptDetector",
    "Concept Detector (SAeUron)",
    "Measure how strongly each library concept's SAE features fire on latents (e.g. a KSampler output): "
    "the latents are re-noised to several levels and run through the model with the positive prompt. "
    "Reports per image or per step; the JSON output has both.",
    inputs=(
        Param("model", "MODEL", "The model (unpatched: detection reads activations, it edits nothing)"),
        Param("sae", "SAEURON_SAE"),
        Param("positive", "CONDITIONING"),
        Param("latent", "LATENT", "Latents to audit (e.g. from KSampler)"),
        Param("concepts", "STRING", "Concepts to report, comma separated; empty = all", default=""),
        Param(
            "steps", "INT", "Noise levels probed (the model's 'normal' schedule)", default=10, min=1, max=100
        ),
        Param("seed", "INT", "Noise seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF),
        Param(
            "mode",
            "COMBO",
            "Report table: one row per image or per noise level",
            default="per image",
            options=("per image", "per step"),
        ),
    ),
    outputs=(
        Param("report", "STRING", "Readable table"),
        Param("scores_json", "STRING", "All numbers as JSON"),
    ),
    output_node=True,
)

NODES: tuple[NodeSpec, ...] = (SAE_LOADER, UNLEARN, LIST_CONCEPTS, DETECTOR)


def options_of(param: Param) -> list[str]:
    opts = param.options
    return list(opts() if callable(opts) else (opts or ()))


# ------------------------------------------------------------------------------------ execution
def run_sae_loader(bundle: str, repo_id: str = "") -> tuple[Any]:
    from .core import load_bundle

    return (load_bundle(bundle, repo_id),)


def run_unlearn(
    model: Any,
    sae: Any,
    concepts: str,
    strength: float,
    start_percent: float,
    end_percent: float,
    apply_to: str = "all",
) -> tuple[Any]:
    from .core import unlearn

    return (
        unlearn(
            model,
            sae,
            concepts,
            strength=strength,
            start_percent=start_percent,
            end_percent=end_percent,
            apply_to=apply_to,
        ),
    )


def run_list_concepts(sae: Any) -> tuple[str, str]:
    from .core import describe_bundle

    return describe_bundle(sae)


def run_detector(
    model: Any,
    sae: Any,
    positive: Any,
    latent: Any,
    concepts: str = "",
    steps: int = 10,
    seed: int = 0,
    mode: str = "per image",
) -> tuple[str, str]:
    from .detector import detect

    result = detect(model, sae, positive, latent, concepts=concepts, steps=steps, seed=seed)
    return result.report(mode), result.to_json()


RUNNERS: dict[str, Callable[..., tuple[Any, ...]]] = {
    SAE_LOADER.node_id: run_sae_loader,
    UNLEARN.node_id: run_unlearn,
    LIST_CONCEPTS.node_id: run_list_concepts,
    DETECTOR.node_id: run_detector,
}
"""Node id → the function its ``execute`` calls (keyword arguments = input names)."""

UI_TEXT_OUTPUT: dict[str, int] = {LIST_CONCEPTS.node_id: 1, DETECTOR.node_id: 0}
"""Output nodes: which output is also shown as text on the node."""

__all__ = [
    "CATEGORY",
    "DETECTOR",
    "LIST_CONCEPTS",
    "NODES",
    "RUNNERS",
    "SAE_LOADER",
    "SAE_TYPE",
    "UI_TEXT_OUTPUT",
    "UNLEARN",
    "NodeSpec",
    "Param",
    "options_of",
]
