"""ComfyUI node pack entry point (clone this repository into ``ComfyUI/custom_nodes/``).

Inside ComfyUI this exports ``comfy_entrypoint`` (the V3 node API, ComfyUI ≥ 0.3.47) or, on older
ComfyUI, ``NODE_CLASS_MAPPINGS`` / ``NODE_DISPLAY_NAME_MAPPINGS`` (V1), never both. The nodes live
in ``saeuron_plugin/comfyui/``. Anywhere else (``pip install``, pytest, a plain ``import``) this
file does nothing: it imports nothing heavy and touches neither ``sys.path`` nor ComfyUI.
"""

import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _inside_comfyui() -> bool:
    try:
        return (
            _importlib_util.find_spec("comfy") is not None
            and _importlib_util.find_spec("folder_paths") is not None
        )
    except (ImportError, ValueError):
        return False


def _use_this_checkout() -> None:
    """Make ``import saeuron_plugin`` resolve to this clone (unless it was already imported)."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    loaded = _sys.modules.get("saeuron_plugin")
    if loaded is not None:
        return
    try:
        spec = _importlib_util.find_spec("saeuron_plugin")
    except (ImportError, ValueError):
        spec = None
    origin = getattr(spec, "origin", None) if spec is not None else None
    if origin is None or _os.path.dirname(_os.path.dirname(_os.path.abspath(origin))) != here:
        _sys.path.insert(0, here)


if _inside_comfyui():
    _use_this_checkout()
    from saeuron_plugin.comfyui import node_pack_exports as _exports

    globals().update(_exports())
    __all__ = sorted(
        k for k in ("comfy_entrypoint", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS") if k in globals()
    )
