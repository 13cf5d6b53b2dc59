"""Blocks × τ heatmaps as PNG, drawn with Pillow (no plotting library needed at run time)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

CELL_W, CELL_H, LABEL_W, HEADER_H = 44, 16, 320, 34


def _colour(value: float | None, limit: float) -> tuple[int, int, int]:
    """Diverging: blue (−limit) · white (0) · red (+limit); grey for no value."""
    if value is None or not math.isfinite(value):
        return (200, 200, 200)
    t = max(-1.0, min(1.0, value / limit))
    fade = int(255 * (1 - abs(t)))
    return (255, fade, fade) if t >= 0 else (fade, fade, 255)


def draw_heatmap(
    path: str | Path,
    rows: Sequence[str],
    values: Sequence[Sequence[float | None]],
    *,
    title: str,
    limit: float = 3.0,
    column_label: str = "tau bucket",
) -> Path:
    """Write a heatmap of ``values[row][column]`` (one row per site, one column per τ bucket)."""
    from PIL import Image, ImageDraw

    columns = max((len(v) for v in values), default=0)
    width = LABEL_W + CELL_W * columns + 10
    height = HEADER_H + CELL_H * len(rows) + 24
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((6, 4), title, fill="black")
    # ASCII only: Pillow's built-in font has no Greek letters
    draw.text(
        (LABEL_W, 18), f"{column_label} 0 (tau~0, clean) ... {columns - 1} (tau~1, noise)", fill="black"
    )
    for r, (label, row) in enumerate(zip(rows, values)):
        y = HEADER_H + r * CELL_H
        draw.text((6, y + 2), label if len(label) <= 50 else "..." + label[-47:], fill="black")
        for c, value in enumerate(row):
            x = LABEL_W + c * CELL_W
            draw.rectangle([x, y, x + CELL_W - 1, y + CELL_H - 1], fill=_colour(value, limit))
            if value is not None and math.isfinite(value):
                draw.text((x + 3, y + 2), f"{value:+.2f}"[:6], fill="black")
    draw.text(
        (6, height - 18), f"colour: blue −{limit:g} · white 0 · red +{limit:g}; grey: no value", fill="black"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


__all__ = ["draw_heatmap"]
