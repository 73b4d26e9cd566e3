"""The built-in sprite source: geometric shapes, drawn from a table of primitives and tinted by the world.

Each shape is a few polygons, ellipses and pie slices in unit coordinates, drawn once per
(class, box size, angle) with supersampling and kept: the bank is finite, so every sprite is
drawn at most once per world.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .sprite import ANGLES, EXTENT, Sprite, make_sprite, pixels

# Each shape is a list of primitives in unit coordinates (x right, y up, extent [-1, 1]):
# ("poly", points) | ("ellipse", cx, cy, rx, ry) | ("pie", cx, cy, r, start_deg, end_deg);
# a primitive named with a leading "-" carves (draws alpha 0).


def _regular(n: int, r: float = 1.0, phase: float = 90.0) -> list[tuple[float, float]]:
    t = np.deg2rad(phase + 360.0 * np.arange(n) / n)
    return list(zip(r * np.cos(t), r * np.sin(t)))


def _star(n: int, outer: float, inner: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(2 * n):
        r = outer if i % 2 == 0 else inner
        t = np.deg2rad(90.0 + 180.0 * i / n)
        pts.append((r * np.cos(t), r * np.sin(t)))
    return pts


SHAPES: dict[str, list[tuple]] = {
    "circle": [("ellipse", 0, 0, 0.95, 0.95)],
    "oval": [("ellipse", 0, 0, 1.0, 0.52)],
    "square": [("poly", [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])],
    "rectangle": [("poly", [(-1, -0.42), (1, -0.42), (1, 0.42), (-1, 0.42)])],
    "triangle": [("poly", [(0, 1), (-1, -0.75), (1, -0.75)])],
    "diamond": [("poly", [(0, 1), (0.6, 0), (0, -1), (-0.6, 0)])],
    "pentagon": [("poly", _regular(5))],
    "hexagon": [("poly", _regular(6, phase=0.0))],
    "star": [("poly", _star(5, 1.0, 0.42))],
    "heart": [("ellipse", -0.45, 0.38, 0.52, 0.52), ("ellipse", 0.45, 0.38, 0.52, 0.52),
              ("poly", [(-0.95, 0.2), (0.95, 0.2), (0, -0.95)])],
    "cross": [("poly", [(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)]),
              ("poly", [(-0.3, -1), (0.3, -1), (0.3, 1), (-0.3, 1)])],
    "ring": [("ellipse", 0, 0, 1.0, 1.0), ("-ellipse", 0, 0, 0.52, 0.52)],
    "frame": [("poly", [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]),
              ("-poly", [(-0.42, -0.42), (0.42, -0.42), (0.42, 0.42), (-0.42, 0.42)])],
    "arrow": [("poly", [(-1, -0.22), (0.15, -0.22), (0.15, -0.7), (1, 0), (0.15, 0.7), (0.15, 0.22), (-1, 0.22)])],
    "crescent": [("ellipse", 0, 0, 1.0, 1.0), ("-ellipse", 0.5, 0.2, 0.85, 0.85)],
    "semicircle": [("pie", 0, -0.45, 1.0, 180, 360)],
    "trapezoid": [("poly", [(-1, -0.6), (1, -0.6), (0.45, 0.6), (-0.45, 0.6)])],
    "lightning bolt": [("poly", [(0.1, 1), (-0.7, -0.12), (-0.1, -0.12), (-0.4, -1), (0.7, 0.2), (0.1, 0.2),
                                 (0.6, 1)])],
    "drop": [("ellipse", 0, -0.35, 0.63, 0.63), ("poly", [(-0.6, -0.18), (0.6, -0.18), (0, 1)])],
    "flower": [("ellipse", 0.62 * np.cos(t), 0.62 * np.sin(t), 0.38, 0.38) for t in np.deg2rad(90 + 72 * np.arange(5))]
    + [("ellipse", 0, 0, 0.35, 0.35)],
    "hourglass": [("poly", [(-0.8, 1), (0.8, 1), (0.1, 0), (0.8, -1), (-0.8, -1), (-0.1, 0)])],
    "chevron": [("poly", [(-1, -0.2), (0, 0.8), (1, -0.2), (0.62, -0.6), (0, 0.02), (-0.62, -0.6)])],
    "tree": [("poly", [(-0.9, -0.55), (0.9, -0.55), (0, 0.4)]), ("poly", [(-0.7, -0.05), (0.7, -0.05), (0, 1)]),
             ("poly", [(-0.2, -1), (0.2, -1), (0.2, -0.5), (-0.2, -0.5)])],
    "mushroom": [("pie", 0, -0.15, 1.0, 180, 360), ("poly", [(-0.3, -1), (0.3, -1), (0.3, -0.1), (-0.3, -0.1)])],
    "cloud": [("ellipse", -0.52, -0.2, 0.45, 0.45), ("ellipse", 0.05, 0.15, 0.58, 0.58),
              ("ellipse", 0.55, -0.18, 0.45, 0.45),
              ("poly", [(-0.52, -0.65), (0.55, -0.65), (0.55, -0.2), (-0.52, -0.2)])],
    "spade": [("ellipse", -0.42, -0.22, 0.46, 0.46), ("ellipse", 0.42, -0.22, 0.46, 0.46),
              ("poly", [(-0.86, -0.1), (0.86, -0.1), (0, 1)]), ("poly", [(0, -0.4), (-0.35, -1), (0.35, -1)])],
    "club": [("ellipse", 0, 0.45, 0.4, 0.4), ("ellipse", -0.46, -0.18, 0.4, 0.4), ("ellipse", 0.46, -0.18, 0.4, 0.4),
             ("poly", [(0, 0.1), (-0.32, -1), (0.32, -1)])],
    "house": [("poly", [(-0.7, -1), (0.7, -1), (0.7, 0.1), (-0.7, 0.1)]), ("poly", [(-1, 0.05), (1, 0.05), (0, 1)])],
}

SHAPE_SYNONYMS: dict[str, list[str]] = {
    "circle": ["circle", "disc", "disk"], "oval": ["oval", "ellipse"], "square": ["square", "box"],
    "rectangle": ["rectangle", "bar", "block"], "triangle": ["triangle"], "diamond": ["diamond", "rhombus"],
    "pentagon": ["pentagon"], "hexagon": ["hexagon"], "star": ["star"], "heart": ["heart"],
    "cross": ["cross", "plus sign"], "ring": ["ring", "donut", "hoop"], "frame": ["frame", "hollow square"],
    "arrow": ["arrow"], "crescent": ["crescent", "crescent moon", "moon"], "semicircle": ["semicircle", "half disc"],
    "trapezoid": ["trapezoid", "trapezium"], "lightning bolt": ["lightning bolt", "bolt", "flash"],
    "drop": ["drop", "teardrop", "raindrop"], "flower": ["flower", "blossom"], "hourglass": ["hourglass", "bow tie"],
    "chevron": ["chevron", "caret"], "tree": ["tree", "fir tree"], "mushroom": ["mushroom", "toadstool"],
    "cloud": ["cloud"], "spade": ["spade"], "club": ["club", "clover"], "house": ["house", "hut"],
}


def draw_shape(name: str, canvas: int = 128) -> Image.Image:
    """The shape as an 8-bit mask, its extent EXTENT of the canvas, centred."""
    img = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(img)
    c, r = canvas / 2.0, EXTENT * canvas / 2.0

    def px(x: float, y: float) -> tuple[float, float]:
        return (c + x * r, c - y * r)

    for prim in SHAPES[name]:
        kind, fill = prim[0].lstrip("-"), 0 if prim[0].startswith("-") else 255
        if kind == "poly":
            draw.polygon([px(x, y) for x, y in prim[1]], fill=fill)
        elif kind == "ellipse":
            _, cx, cy, rx, ry = prim
            draw.ellipse([px(cx - rx, cy + ry), px(cx + rx, cy - ry)], fill=fill)
        else:  # pie: PIL angles run clockwise from 3 o'clock
            _, cx, cy, rad, start, end = prim
            draw.pieslice([px(cx - rad, cy + rad), px(cx + rad, cy - rad)], start, end, fill=fill)
    return img


class ShapeSource:
    """Built-in geometric shapes, tinted by the world with a named colour."""

    name = "shapes"
    tintable = True
    max_angle = 30.0

    def __init__(self) -> None:
        self.classes = list(SHAPES)
        self.synonyms = SHAPE_SYNONYMS
        self._rotated: dict[tuple[int, int, int], Image.Image] = {}
        self._sprites: dict[tuple[int, int, int], Sprite] = {}

    def identity(self) -> str:
        return "shapes-v1"

    def variants(self, cls: int, heldout: bool) -> int:
        return 1

    def sprite(self, cls: int, box: int, angle: int, variant: int, heldout: bool) -> Sprite:
        key = (cls, box, angle)
        spr = self._sprites.get(key)
        if spr is None:  # a finite bank (classes x sizes x angles), filled lazily
            canvas = 128 if box <= 32 else 256 if box <= 64 else 512  # >= 4x supersampling
            rot = self._rotated.get((cls, angle, canvas))
            if rot is None:
                rot = draw_shape(self.classes[cls], canvas).rotate(ANGLES[angle], Image.Resampling.BICUBIC)
                self._rotated[(cls, angle, canvas)] = rot
            spr = self._sprites[key] = make_sprite(pixels(rot, box))
        return spr
