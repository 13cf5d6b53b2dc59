"""Charts as PNG, drawn with Pillow (no plotting library needed at run time): blocks × τ heatmaps and
line charts (e.g. UA against attack iterations)."""

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


PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def draw_curves(
    path: str | Path,
    panels: dict[str, dict[str, dict[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    y_range: tuple[float, float] = (0.0, 100.0),
) -> Path:
    """Write line charts: ``panels[panel][line] = {x: y}``, one panel per key, one colour per line."""
    from PIL import Image, ImageDraw

    pw, ph, margin = 260, 190, 40
    lines = list(dict.fromkeys(name for panel in panels.values() for name in panel))
    width = margin + len(panels) * (pw + margin)
    height = 30 + ph + 60 + 14 * len(lines)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((6, 4), title, fill="black")
    xs_all = [x for panel in panels.values() for pts in panel.values() for x in pts] or [0.0, 1.0]
    x0, x1 = min(xs_all), max(xs_all) if max(xs_all) > min(xs_all) else min(xs_all) + 1
    y0, y1 = y_range
    for p, (name, panel) in enumerate(panels.items()):
        left, top = margin + p * (pw + margin), 30

        def at(x: float, y: float, left: int = left, top: int = top) -> tuple[float, float]:
            return left + (x - x0) / (x1 - x0) * pw, top + ph - (y - y0) / (y1 - y0) * ph

        draw.rectangle([left, top, left + pw, top + ph], outline="black")
        draw.text((left + 4, top + 2), name, fill="black")
        for frac in (0.0, 0.5, 1.0):
            y = y0 + frac * (y1 - y0)
            draw.text((left - 30, at(x0, y)[1] - 6), f"{y:g}", fill="black")
        for x in sorted({x for pts in panel.values() for x in pts}):
            draw.text((at(x, y0)[0] - 4, top + ph + 4), f"{x:g}", fill="black")
        for i, line in enumerate(lines):
            pts = sorted(panel.get(line, {}).items())
            colour = PALETTE[i % len(PALETTE)]
            xy = [at(x, y) for x, y in pts]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
            for cx, cy in xy:
                draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
    draw.text((margin, 30 + ph + 20), f"x: {x_label}; y: {y_label}", fill="black")
    for i, line in enumerate(lines):
        y = 30 + ph + 38 + 14 * i
        draw.rectangle([margin, y + 3, margin + 10, y + 9], fill=PALETTE[i % len(PALETTE)])
        draw.text((margin + 16, y), line, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


__all__ = ["draw_curves", "draw_heatmap"]
