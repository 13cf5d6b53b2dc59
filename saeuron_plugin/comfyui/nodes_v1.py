"""The nodes as V1 classes (``INPUT_TYPES`` / ``RETURN_TYPES`` / ``FUNCTION``) for ComfyUI without V3.

Built from the same table as the V3 schema (:mod:`.specs`) and running the same functions. The
root ``__init__.py`` exports these only when ``comfy_api.latest`` is missing (ComfyUI < 0.3.47):
a node pack exporting ``NODE_CLASS_MAPPINGS`` is always loaded as V1, so the two are never both
exported. Importing this module needs no ComfyUI at all.
"""

from __future__ import annotations

from typing import Any

from . import core, specs
from .specs import NodeSpec, Param


def _v1_input(p: Param) -> tuple[Any, ...]:
    opts: dict[str, Any] = {}
    if p.tooltip:
        opts["tooltip"] = p.tooltip
    if p.kind == "COMBO":
        if p.default is not None:
            opts["default"] = p.default
        return (specs.options_of(p), opts)
    if p.kind in ("FLOAT", "INT", "STRING"):
        for key in ("default", "min", "max", "step"):
            value = getattr(p, key)
            if value is not None:
                opts[key] = value
        if p.kind == "STRING":
            opts["multiline"] = p.multiline
        return (p.kind, opts)
    return (p.kind, opts) if opts else (p.kind,)


def input_types(spec: NodeSpec) -> dict[str, dict[str, tuple[Any, ...]]]:
    out: dict[str, dict[str, tuple[Any, ...]]] = {"required": {}}
    for p in spec.inputs:
        out.setdefault("optional" if p.optional else "required", {})[p.name] = _v1_input(p)
    return out


def _node_class(spec: NodeSpec) -> type:
    run = specs.RUNNERS[spec.node_id]
    text_output = specs.UI_TEXT_OUTPUT.get(spec.node_id)

    def execute(self: Any, **kwargs: Any) -> Any:
        result = run(**kwargs)
        if text_output is not None:
            return {"ui": {"text": [str(result[text_output])]}, "result": result}
        return result

    attrs: dict[str, Any] = {
        "__module__": __name__,
        "__doc__": spec.description,
        "INPUT_TYPES": classmethod(lambda cls: input_types(spec)),
        "RETURN_TYPES": tuple(p.kind for p in spec.outputs),
        "RETURN_NAMES": tuple(p.label or p.name for p in spec.outputs),
        "OUTPUT_TOOLTIPS": tuple(p.tooltip for p in spec.outputs),
        "FUNCTION": "execute",
        "CATEGORY": specs.CATEGORY,
        "DESCRIPTION": spec.description,
        "OUTPUT_NODE": spec.output_node,
        "execute": execute,
    }
    if spec.node_id == specs.SAE_LOADER.node_id:

        def is_changed(cls: Any, bundle: str, repo_id: str = "") -> Any:
            if (repo_id or "").strip() or bundle == core.NO_BUNDLE:
                return f"{bundle}|{repo_id}"
            try:
                folder = core.bundle_path(bundle)
            except FileNotFoundError:
                return bundle
            return max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=0.0)

        attrs["IS_CHANGED"] = classmethod(is_changed)
    return type(spec.node_id + "V1", (), attrs)


NODE_CLASS_MAPPINGS: dict[str, type] = {s.node_id: _node_class(s) for s in specs.NODES}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {s.node_id: s.display_name for s in specs.NODES}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "input_types"]
