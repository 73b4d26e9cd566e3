"""Drawing one sample's picture: the layout a `Recipe` asks for, then the backdrop with the sprites pasted on it.

A layout is the scene class and 1-3 object records (class, named colour, size word, square box);
the records are also what captions are written from, so pixels and words describe the same scene.
Both steps draw from the sample's own generator, in a fixed order (see `World._sample`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backdrops import SCENES, Backdrop
from .sprite import ANGLES, EXTENT
from .sprites import Source

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.1, 0.1), "orange": (1.0, 0.55, 0.0), "yellow": (0.98, 0.86, 0.08), "green": (0.1, 0.62, 0.15),
    "cyan": (0.0, 0.8, 0.85), "blue": (0.12, 0.25, 0.92), "purple": (0.55, 0.15, 0.78), "pink": (1.0, 0.5, 0.78),
    "white": (0.97, 0.97, 0.97), "black": (0.07, 0.07, 0.07),
}
_BOX = {1: (0.44, 0.8), 2: (0.42, 0.6), 3: (0.4, 0.5)}  # sprite box / image size, by number of objects


@dataclass(frozen=True)
class Recipe:
    """How one kind of set is drawn."""

    objects: tuple[int, int]  # min, max number of objects
    label: str = ""  # "object" | "scene": that class is fixed to index % num_classes (balanced sets)
    contrast: tuple[float, float] = (1.0, 1.0)  # background pattern contrast range
    captions: int = 1
    noisy: bool = False


def below(rng: np.random.Generator, k: int) -> int:
    """Uniform integer in [0, k): rng.integers is several times slower for single draws."""
    return int(rng.random() * k)


class Renderer:
    """Pictures of one world: its image size, sprite sources and object classes."""

    def __init__(self, size: int, sources: list[Source], classes: list[str], members: list[list[tuple[int, int]]],
                 object_scale: float = 1.0) -> None:
        self.size = size
        self.object_scale = object_scale
        self.sources = sources
        self.classes = classes
        self.members = members  # class -> [(source, class within source)], see sprites.union_classes
        self._colours = list(COLOURS)
        self._rgb = np.asarray(list(COLOURS.values()), np.float32)
        self._backdrop = Backdrop(size)

    def draw(self, rng: np.random.Generator, recipe: Recipe, index: int, heldout: bool) -> tuple[np.ndarray, int, list]:
        """(uint8 [S, S, 3], scene class, object records) of sample `index`; heldout: an evaluation stream."""
        scene, objs, sprites = self._layout(rng, recipe, index, heldout)
        return self._paint(rng, scene, objs, sprites, rng.uniform(*recipe.contrast)), scene, objs

    def _layout(self, rng: np.random.Generator, recipe: Recipe, index: int, heldout: bool) -> tuple[int, list, list]:
        """Scene class, object records (name, colour, size word, box position) and their sprites."""
        size = self.size
        scene = index % len(SCENES) if recipe.label == "scene" else below(rng, len(SCENES))
        n = recipe.objects[0] + below(rng, recipe.objects[1] - recipe.objects[0] + 1)
        lo, hi = (min(1.0, f * self.object_scale) for f in _BOX.get(n, _BOX[3]))
        objs, sprites = [], []
        for _ in range(n):
            k = len(self.classes)
            cls = index % k if recipe.label == "object" else below(rng, k)
            members = self.members[cls]
            s, local = members[below(rng, len(members))] if len(members) > 1 else members[0]
            src = self.sources[s]
            box = round(size * rng.uniform(lo, hi))
            angle = below(rng, len(ANGLES))
            variant = below(rng, src.variants(local, heldout))
            colour = below(rng, len(COLOURS)) if src.tintable else None
            x, y = self._place(rng, box, objs)
            frac = box / size
            objs.append({"name": self.classes[cls], "colour": None if colour is None else self._colours[colour],
                         "size": "small" if frac < 0.5 else "large" if frac >= 0.65 else "",
                         "x": x, "y": y, "box": box})
            sprites.append((src.sprite(local, box, angle, variant, heldout), colour))
        return scene, objs, sprites

    def _paint(self, rng: np.random.Generator, scene: int, objs: list, sprites: list, contrast: float) -> np.ndarray:
        """uint8 [S, S, 3]. Works channel-first in float32, where numpy's inner loops run over pixels."""
        img = self._backdrop.draw(scene, rng, contrast)
        for o, (spr, colour) in zip(objs, sprites):
            region = img[:, o["y"] : o["y"] + o["box"], o["x"] : o["x"] + o["box"]]
            region *= spr.keep
            if spr.own is None:
                fill = np.clip(self._rgb[colour] + rng.normal(0.0, 0.03, 3).astype(np.float32), 0.0, 1.0)
                outline = fill * np.float32(0.3) if fill.sum() > 0.6 else np.full(3, 0.75, np.float32)
                region += spr.cover * fill[:, None, None]
            else:
                outline = np.full(3, 0.1, np.float32)
                region += spr.own
            region += spr.edge * outline[:, None, None]
        # every blend above is convex, so values stay in [0, 1]
        return (img * np.float32(255.0) + np.float32(0.5)).transpose(1, 2, 0).astype(np.uint8)

    def _place(self, rng: np.random.Generator, box: int, objs: list[dict]) -> tuple[int, int]:
        """Top-left corner for a new sprite: the first of 25 random spots where it stays clear of the
        others (centre distance >= 1.1 x the sum of visible radii), else the clearest spot tried."""
        best, best_gap = (0, 0), -1.0
        for _ in range(25):
            x, y = below(rng, self.size - box + 1), below(rng, self.size - box + 1)
            gap = min((((x - o["x"] + (box - o["box"]) / 2) ** 2 + (y - o["y"] + (box - o["box"]) / 2) ** 2) ** 0.5
                       / (EXTENT * (box + o["box"]) / 2) for o in objs), default=2.0)
            if gap > best_gap:
                best, best_gap = (x, y), gap
            if gap >= 1.1:
                break
        return best
