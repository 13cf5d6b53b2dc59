"""The concept layer's public names in one place (its modules each have one job):

* :mod:`.tau` - the τ grid;
* :mod:`.stats` - streaming per-concept statistics, their file, the concept errors;
* :mod:`.library` - one SAE's concept library and its ``concepts/`` folder;
* :mod:`.selection` - scores and feature selection.

Tensors only (no diffusers / transformers imports).
"""

from __future__ import annotations

from .library import BACKGROUND_FILE, INDEX_FORMAT, ConceptLibrary, SelectionDefaults, make_slugs
from .selection import FeatureSelection, concept_scores, quantile_linear, select_features
from .stats import (
    FORMAT_VERSION,
    STATS_FORMAT,
    ConceptError,
    ConceptMismatchError,
    ConceptStats,
    UnknownConceptError,
    hash_prompts,
    pool_tokens,
    pooled_stats,
)
from .tau import TauGrid

__all__ = [
    "BACKGROUND_FILE",
    "FORMAT_VERSION",
    "INDEX_FORMAT",
    "STATS_FORMAT",
    "ConceptError",
    "ConceptLibrary",
    "ConceptMismatchError",
    "ConceptStats",
    "FeatureSelection",
    "SelectionDefaults",
    "TauGrid",
    "UnknownConceptError",
    "concept_scores",
    "hash_prompts",
    "make_slugs",
    "pool_tokens",
    "pooled_stats",
    "quantile_linear",
    "select_features",
]
