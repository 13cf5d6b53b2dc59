"""ShapesCanvas: a deterministic synthetic dataset, an UnlearnCanvas in miniature.

Every image shows one object (a shape) drawn in one style (a texture) and one color on a fixed plain
grey background, with a random size, position and rotation kept inside limits that leave every
attribute recognisable at 32 px. Captions read like UnlearnCanvas prompts ("a red star in striped
style"); synonyms and reordered templates are never used in training and serve robustness tests.

Drawing is batched torch on any device (polygon crossing test on a 2x supersampled grid, then box
averaging), so thousands of images per second render on one CPU core. Random parameters come from a
numpy ``Generator``: the same seed gives the same images.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

OBJECTS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")
STYLES: tuple[str, ...] = ("solid", "striped", "dotted", "checkered", "outline")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
DOMAINS: tuple[str, ...] = ("object", "style", "color")
VOCABULARIES: dict[str, tuple[str, ...]] = {"object": OBJECTS, "style": STYLES, "color": COLORS}
CONCEPTS: tuple[str, ...] = (*OBJECTS, *STYLES, *COLORS)
"""Every concept of every domain, in the vocabularies' order."""

RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 30),
    "purple": (150, 40, 200),
    "orange": (255, 135, 0),
}
BACKGROUND: tuple[int, int, int] = (120, 120, 120)
PAPER: tuple[int, int, int] = (255, 255, 255)  # the second tone of textured styles

# Held-out paraphrases: never in training captions.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "green": ("emerald", "lime"),
    "blue": ("azure", "cobalt"),
    "yellow": ("golden", "lemon"),
    "purple": ("violet", "lilac"),
    "orange": ("tangerine", "amber"),
    "circle": ("disc", "orb"),
    "square": ("box", "tile"),
    "triangle": ("trigon", "wedge"),
    "star": ("pentagram", "starburst"),
    "cross": ("plus", "crosshair"),
    "heart": ("valentine", "cardioid"),
    "solid": ("filled", "plain"),
    "striped": ("stripy", "lined"),
    "dotted": ("spotted", "polka"),
    "checkered": ("chequered", "checkerboard"),
    "outline": ("outlined", "hollow"),
}
# Held-out reorderings that use only training words.
PARAPHRASE_TEMPLATES: tuple[str, ...] = ("{a} {style} {color} {object}", "{color} {object}, {style} style")
# Words used in training captions besides the vocabularies (partial captions name a generic shape).
FILLER_WORDS: tuple[str, ...] = ("a", "an", "in", "style", "shape", ",")


@dataclass(frozen=True)
class RenderConfig:
    """Geometry limits (pixels) of the generator; the defaults suit 32 px images."""

    size: int = 32
    supersample: int = 2
    radius: tuple[float, float] = (9.5, 12.5)
    offset: float = 2.5
    max_angle_deg: float = 20.0


def article(word: str) -> str:
    """English indefinite article for ``word``."""
    return "an" if word[:1] in "aeiou" else "a"


def caption(obj: str | None, style: str | None, color: str | None, template: str | None = None) -> str:
    """Caption such as "a red star in striped style"; a ``None`` attribute is left out of the text.

    ``template`` (e.g. one of :data:`PARAPHRASE_TEMPLATES`) needs all three attributes; ``{a}`` becomes
    the article that fits the next word.
    """
    if template is not None:
        if None in (obj, style, color):
            raise ValueError("a template caption needs object, style and color")
        text = template.format(a="@", color=color, object=obj, style=style)
        words = text.split()
        return " ".join(article(words[i + 1]) if w == "@" else w for i, w in enumerate(words))
    if obj is None and style is None and color is None:
        return ""
    noun = obj or "shape"
    head = f"{color} {noun}" if color else noun
    text = f"{article(head)} {head}"
    return f"{text} in {style} style" if style else text


def synonym_caption(
    obj: str, style: str, color: str, which: int = 0, domains: Sequence[str] = DOMAINS
) -> str:
    """Canonical caption with the attributes of ``domains`` replaced by their ``which``-th synonym."""
    words = {"object": obj, "style": style, "color": color}
    for d in domains:
        words[d] = SYNONYMS[words[d]][which % len(SYNONYMS[words[d]])]
    return caption(words["object"], words["style"], words["color"])


def caption_words() -> list[str]:
    """Every word a caption or paraphrase can contain (for building the tokenizer vocabulary)."""
    words = set(FILLER_WORDS) | set(OBJECTS) | set(STYLES) | set(COLORS)
    for syns in SYNONYMS.values():
        words.update(syns)
    return sorted(words)


def combinations() -> list[tuple[str, str, str]]:
    """Every (object, style, color) combination in a fixed order."""
    return [(o, s, c) for o in OBJECTS for s in STYLES for c in COLORS]


@dataclass(frozen=True)
class BenchmarkPrompt:
    """A prompt with the attribute labels the image should show."""

    prompt: str
    object: str
    style: str
    color: str

    def label(self, domain: str) -> int:
        return VOCABULARIES[domain].index(getattr(self, domain))


def benchmark_prompts(
    domains: Sequence[str] = DOMAINS, variant: str = "canonical", which: int = 0
) -> list[BenchmarkPrompt]:
    """One prompt per object x style x color combination.

    ``variant``: "canonical" (the training template), "synonym" (attributes of ``domains`` replaced by a
    held-out synonym), or "paraphrase" (held-out template number ``which``).
    """
    out = []
    for o, s, c in combinations():
        if variant == "canonical":
            text = caption(o, s, c)
        elif variant == "synonym":
            text = synonym_caption(o, s, c, which, domains)
        elif variant == "paraphrase":
            text = caption(o, s, c, PARAPHRASE_TEMPLATES[which % len(PARAPHRASE_TEMPLATES)])
        else:
            raise ValueError(f"unknown variant {variant!r}; use canonical, synonym or paraphrase")
        out.append(BenchmarkPrompt(text, o, s, c))
    return out


def _polygon(obj: str) -> np.ndarray:
    """Outline of ``obj`` in a unit frame (y up, circumradius about 1) as [K, 2] vertices."""
    if obj == "circle":
        t = np.linspace(0, 2 * np.pi, 28, endpoint=False)
        return 0.88 * np.stack([np.cos(t), np.sin(t)], 1)
    if obj == "square":
        h = 0.74
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    if obj == "triangle":
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(t), np.sin(t) - 0.12], 1)
    if obj == "star":
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.05, 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if obj == "cross":
        a, w = 0.95, 0.32
        return np.array(
            [
                [w, w],
                [w, a],
                [-w, a],
                [-w, w],
                [-a, w],
                [-a, -w],
                [-w, -w],
                [-w, -a],
                [w, -a],
                [w, -w],
                [a, -w],
                [a, w],
            ]
        )
    if obj == "heart":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return np.stack([x, y + 6.0], 1) / 15.5
    raise ValueError(f"unknown object {obj!r}; choose from {OBJECTS}")


_POLYGONS = {o: _polygon(o) for o in OBJECTS}


def _inside(points: torch.Tensor, verts: torch.Tensor) -> torch.Tensor:
    """Even-odd crossing test: points [N, 2], vertices [B, K, 2] -> bool [B, N] (one edge at a time)."""
    x, y = points[None, :, 0], points[None, :, 1]
    inside = torch.zeros(verts.shape[0], points.shape[0], dtype=torch.bool, device=points.device)
    k = verts.shape[1]
    for i in range(k):
        xi, yi = verts[:, i, 0:1], verts[:, i, 1:2]
        xj, yj = verts[:, (i + 1) % k, 0:1], verts[:, (i + 1) % k, 1:2]
        dy = torch.where(yj == yi, torch.ones_like(yj), yj - yi)
        slope = (xj - xi) / dy
        straddle = (yi > y) != (yj > y)
        inside ^= straddle & (x < xi + (y - yi) * slope)
    return inside


def _erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary erosion of [B, S, S] by a (2r+1) square (separable min filter)."""
    inv = (~mask).float()[:, None]
    k = 2 * radius + 1
    inv = F.max_pool2d(inv, (1, k), stride=1, padding=(0, radius))
    inv = F.max_pool2d(inv, (k, 1), stride=1, padding=(radius, 0))
    return inv[:, 0] < 0.5


def _patterns(size: int, ss: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Texture masks [S, S] in image coordinates (pixel units), shared by all images."""
    c = (torch.arange(size * ss, device=device, dtype=torch.float32) + 0.5) / ss
    y, x = torch.meshgrid(c, c, indexing="ij")
    stripes = torch.remainder(x + y, 6.0) < 3.0
    dots = (torch.remainder(x, 5.0) - 2.5) ** 2 + (torch.remainder(y, 5.0) - 2.5) ** 2 < 1.3**2
    checks = torch.remainder(torch.floor(x / 4) + torch.floor(y / 4), 2) == 0
    return {"striped": stripes, "dotted": dots, "checkered": checks}


@dataclass
class ShapeParams:
    """Per-image random geometry: radius and centre in pixels, rotation in radians."""

    radius: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    angle: np.ndarray

    @classmethod
    def sample(cls, n: int, rng: np.random.Generator, cfg: RenderConfig = RenderConfig()) -> ShapeParams:
        mid = cfg.size / 2
        return cls(
            radius=rng.uniform(*cfg.radius, n),
            cx=mid + rng.uniform(-cfg.offset, cfg.offset, n),
            cy=mid + rng.uniform(-cfg.offset, cfg.offset, n),
            angle=np.deg2rad(rng.uniform(-cfg.max_angle_deg, cfg.max_angle_deg, n)),
        )


def render_batch(
    objects: Sequence[int],
    styles: Sequence[int],
    colors: Sequence[int],
    params: ShapeParams,
    cfg: RenderConfig = RenderConfig(),
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Render label-index triples with their geometry -> float images [B, 3, H, W] in [0, 1]."""
    device = torch.device(device)
    n, ss, s = len(objects), cfg.supersample, cfg.size * cfg.supersample
    obj = np.asarray(objects)
    c = (torch.arange(s, device=device, dtype=torch.float32) + 0.5) / ss
    gy, gx = torch.meshgrid(c, c, indexing="ij")
    points = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    mask = torch.zeros(n, s * s, dtype=torch.bool, device=device)
    for k, name in enumerate(OBJECTS):
        idx = np.nonzero(obj == k)[0]
        if len(idx) == 0:
            continue
        poly = torch.as_tensor(_POLYGONS[name], dtype=torch.float32, device=device)
        ang = torch.as_tensor(params.angle[idx], dtype=torch.float32, device=device)[:, None]
        rad = torch.as_tensor(params.radius[idx], dtype=torch.float32, device=device)[:, None]
        px, py = poly[None, :, 0], poly[None, :, 1]
        vx = (px * torch.cos(ang) - py * torch.sin(ang)) * rad
        vy = (px * torch.sin(ang) + py * torch.cos(ang)) * rad
        cx = torch.as_tensor(params.cx[idx], dtype=torch.float32, device=device)[:, None]
        cy = torch.as_tensor(params.cy[idx], dtype=torch.float32, device=device)[:, None]
        verts = torch.stack([cx + vx, cy - vy], -1)  # image y points down
        mask[torch.as_tensor(idx, device=device)] = _inside(points, verts)
    mask = mask.view(n, s, s)
    rim = mask & ~_erode(mask, ss)  # 1 px border keeps textured silhouettes readable
    ring = mask & ~_erode(mask, 2 * ss)  # 2 px outline style
    pats = _patterns(cfg.size, ss, device)
    sty = torch.as_tensor(np.asarray(styles), device=device)
    colored = torch.zeros_like(mask)
    paper = torch.zeros_like(mask)
    for k, name in enumerate(STYLES):
        sel = sty == k
        if not bool(sel.any()):
            continue
        m = mask[sel]
        if name == "solid":
            col, pap = m, torch.zeros_like(m)
        elif name == "outline":
            col, pap = ring[sel], torch.zeros_like(m)
        else:
            col = m & (pats[name][None] | rim[sel])
            pap = m & ~col
        colored[sel], paper[sel] = col, pap
    palette = torch.tensor([RGB[c] for c in COLORS], dtype=torch.float32, device=device) / 255
    rgb = palette[torch.as_tensor(np.asarray(colors), device=device)][:, :, None, None]
    bg = torch.tensor(BACKGROUND, dtype=torch.float32, device=device).view(1, 3, 1, 1) / 255
    white = torch.tensor(PAPER, dtype=torch.float32, device=device).view(1, 3, 1, 1) / 255
    img = bg.expand(n, 3, s, s)
    img = torch.where(paper[:, None], white, img)
    img = torch.where(colored[:, None], rgb, img)
    return F.avg_pool2d(img, ss)


def render(
    obj: str, style: str, color: str, rng: np.random.Generator, cfg: RenderConfig = RenderConfig()
) -> np.ndarray:
    """One image as a uint8 array [H, W, 3]."""
    params = ShapeParams.sample(1, rng, cfg)
    img = render_batch([OBJECTS.index(obj)], [STYLES.index(style)], [COLORS.index(color)], params, cfg)
    return to_uint8(img)[0]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float images [B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3]."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class Batch:
    """Images in [0, 1] with their labels (index tensors per domain) and captions."""

    images: torch.Tensor
    labels: dict[str, torch.Tensor]
    captions: list[str]


def partial_caption(o: str, s: str, c: str, rng: np.random.Generator, p_drop: float, p_empty: float) -> str:
    """Training caption: each attribute left out with ``p_drop``, all of it with ``p_empty`` (CFG)."""
    if rng.random() < p_empty:
        return ""
    keep = rng.random(3) >= p_drop
    return caption(o if keep[0] else None, s if keep[1] else None, c if keep[2] else None) or caption(o, s, c)


def sample_batch(
    n: int,
    rng: np.random.Generator,
    device: torch.device | str = "cpu",
    cfg: RenderConfig = RenderConfig(),
    p_drop: float = 0.0,
    p_empty: float = 0.0,
) -> Batch:
    """``n`` images with uniformly random attributes and geometry, plus their (training) captions."""
    labels = {d: rng.integers(0, len(v), n) for d, v in VOCABULARIES.items()}
    params = ShapeParams.sample(n, rng, cfg)
    images = render_batch(labels["object"], labels["style"], labels["color"], params, cfg, device)
    caps = [
        partial_caption(OBJECTS[o], STYLES[s], COLORS[c], rng, p_drop, p_empty)
        for o, s, c in zip(labels["object"], labels["style"], labels["color"])
    ]
    return Batch(images, {d: torch.as_tensor(v, device=device) for d, v in labels.items()}, caps)


def batches(
    batch_size: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    cfg: RenderConfig = RenderConfig(),
    p_drop: float = 0.0,
    p_empty: float = 0.0,
    start: int = 0,
) -> Iterator[Batch]:
    """Endless deterministic stream: batch ``i`` depends only on (seed, i), so resuming at ``start`` works."""
    i = start
    while True:
        rng = np.random.default_rng([seed, i])
        yield sample_batch(batch_size, rng, device, cfg, p_drop, p_empty)
        i += 1
