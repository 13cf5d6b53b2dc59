"""saeuron-plugin: remove concepts from diffusion models and VLMs with sparse autoencoders.

Heavy adapters (diffusers, transformers) load lazily, so ``import saeuron_plugin`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "SparseAutoencoder": "saeuron_plugin.sae.model",
    "SaeConfig": "saeuron_plugin.sae.model",
    "SaeOutput": "saeuron_plugin.sae.model",
    "ActivationStore": "saeuron_plugin.sae.store",
    "TrainConfig": "saeuron_plugin.sae.train",
    "Trainer": "saeuron_plugin.sae.train",
    "train_sae": "saeuron_plugin.sae.train",
    "ConceptAblation": "saeuron_plugin.sae.spec",
    "SAeUron": "saeuron_plugin.diffusion.unlearn",
    "VLMUnlearner": "saeuron_plugin.vlm.unlearn",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'saeuron_plugin' has no attribute {name!r}")
