"""ComfyUI adapter: the SAeUron node pack (the only package of saeuron-plugin that imports ComfyUI).

Nodes (ids are stable; see :mod:`.specs`): ``SAeUronSAELoader`` (bundles in ``models/sae/`` or a
Hub repo id), ``SAeUronUnlearnConcepts`` (MODEL + bundle + concepts → patched MODEL clone),
``SAeUronListConcepts`` and ``SAeUronConceptDetector``. The patch logic is in :mod:`.patching`
(testable without ComfyUI), the node functions in :mod:`.core` and :mod:`.detector`, the two node
APIs in :mod:`.nodes_v3` (``comfy_api.latest``) and :mod:`.nodes_v1` (``NODE_CLASS_MAPPINGS``).

The repository root's ``__init__.py`` calls :func:`node_pack_exports` when ComfyUI loads it.
Importing this package does not import ComfyUI.
"""

from __future__ import annotations

import importlib
from typing import Any


def has_v3_api() -> bool:
    """Whether this ComfyUI has the V3 node API (``comfy_api.latest``, ComfyUI ≥ 0.3.47)."""
    try:
        importlib.import_module("comfy_api.latest")
    except ImportError:
        return False
    return True


def node_pack_exports() -> dict[str, Any]:
    """What the node pack's ``__init__`` exports: ``comfy_entrypoint`` (V3) or the V1 mappings, never both."""
    from .core import register_sae_folder

    register_sae_folder()
    if has_v3_api():
        from .nodes_v3 import comfy_entrypoint

        return {"comfy_entrypoint": comfy_entrypoint}
    from .nodes_v1 import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    return {
        "NODE_CLASS_MAPPINGS": NODE_CLASS_MAPPINGS,
        "NODE_DISPLAY_NAME_MAPPINGS": NODE_DISPLAY_NAME_MAPPINGS,
    }


__all__ = ["has_v3_api", "node_pack_exports"]
