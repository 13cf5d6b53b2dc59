"""The nodes in ComfyUI's V3 schema (``comfy_api.latest``: ``io.ComfyNode``, ``comfy_entrypoint``).

Built from the shared table in :mod:`.specs`; ``execute`` calls the same functions as the V1
adapters. Importing this module needs ComfyUI ≥ 0.3.47 (``comfy_api.latest``).
"""

from __future__ import annotations

from typing import Any

from comfy_api.latest import ComfyExtension, io, ui

from . import core, specs
from .specs import NodeSpec, Param

SaeBundle = io.Custom(specs.SAE_TYPE)
_SOCKETS = {
    "MODEL": io.Model,
    "CONDITIONING": io.Conditioning,
    "LATENT": io.Latent,
    specs.SAE_TYPE: SaeBundle,
    "STRING": io.String,
}


def _input(p: Param) -> Any:
    common = {"tooltip": p.tooltip or None, "optional": p.optional}
    if p.kind == "COMBO":
        return io.Combo.Input(p.name, options=specs.options_of(p), default=p.default, **common)
    if p.kind == "FLOAT":
        return io.Float.Input(p.name, default=p.default, min=p.min, max=p.max, step=p.step, **common)
    if p.kind == "INT":
        return io.Int.Input(p.name, default=p.default, min=p.min, max=p.max, **common)
    if p.kind == "STRING":
        return io.String.Input(p.name, default=p.default, multiline=p.multiline, **common)
    return _SOCKETS[p.kind].Input(p.name, **common)


def _output(p: Param) -> Any:
    return _SOCKETS[p.kind].Output(p.name, display_name=p.label or p.name, tooltip=p.tooltip or None)


def schema_for(spec: NodeSpec) -> io.Schema:
    return io.Schema(
        node_id=spec.node_id,
        display_name=spec.display_name,
        category=specs.CATEGORY,
        description=spec.description,
        inputs=[_input(p) for p in spec.inputs],
        outputs=[_output(p) for p in spec.outputs],
        is_output_node=spec.output_node,
    )


def _node_class(spec: NodeSpec) -> type[io.ComfyNode]:
    run = specs.RUNNERS[spec.node_id]
    text_output = specs.UI_TEXT_OUTPUT.get(spec.node_id)

    @classmethod  # type: ignore[misc]
    def define_schema(cls: type[io.ComfyNode]) -> io.Schema:
        return schema_for(spec)

    @classmethod  # type: ignore[misc]
    def execute(cls: type[io.ComfyNode], **kwargs: Any) -> io.NodeOutput:
        result = run(**kwargs)
        if text_output is not None:
            return io.NodeOutput(*result, ui=ui.PreviewText(str(result[text_output])))
        return io.NodeOutput(*result)

    if spec.node_id == specs.SAE_LOADER.node_id:

        @classmethod  # type: ignore[misc]
        def fingerprint_inputs(cls: type[io.ComfyNode], bundle: str, repo_id: str = "") -> Any:
            """Reload when the bundle folder changes on disk."""
            if (repo_id or "").strip() or bundle == core.NO_BUNDLE:
                return (bundle, repo_id)
            try:
                folder = core.bundle_path(bundle)
            except FileNotFoundError:
                return (bundle, None)
            return (bundle, max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=0.0))

        extra = {"fingerprint_inputs": fingerprint_inputs}
    else:
        extra = {}
    attrs = {
        "define_schema": define_schema,
        "execute": execute,
        "__module__": __name__,
        "__doc__": spec.description,
        **extra,
    }
    return type(spec.node_id, (io.ComfyNode,), attrs)


NODE_CLASSES: list[type[io.ComfyNode]] = [_node_class(s) for s in specs.NODES]
globals().update({cls.__name__: cls for cls in NODE_CLASSES})


class SAeUronExtension(ComfyExtension):
    async def on_load(self) -> None:
        core.register_sae_folder()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)


async def comfy_entrypoint() -> SAeUronExtension:
    """ComfyUI's V3 entry point: the extension listing the SAeUron nodes."""
    core.register_sae_folder()
    return SAeUronExtension()


__all__ = ["NODE_CLASSES", "SAeUronExtension", "comfy_entrypoint", "schema_for"]
