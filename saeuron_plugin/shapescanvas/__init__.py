"""The embedded default, ShapesCanvas: its data (``data``), the small SD-1.x-shaped model (``model``),
its judges (``judges``), the VLM (``vlm``), the demo, and the recipes of their SAeUron bundles
(``build``: ``make bundle``, a recipe over the generic tuner; ``vlm_build``)."""
