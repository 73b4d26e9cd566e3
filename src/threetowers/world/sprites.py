"""Drawing for the embedded world: sprite sources (the object classes) and scene backgrounds.

A sprite source maps (class, box size, angle, variant) to a `Sprite`: an alpha mask the world
tints with a named colour (shapes, Fashion-MNIST), or an image with its own colours (a folder of
labelled pictures). Sprites are drawn once with PIL and then composited with numpy, which is what
keeps rendering fast. Backgrounds are vectorised numpy patterns over a pixel grid.

Every sprite's visible extent is about `EXTENT` of its square box, so a rotated sprite stays in
its box and sizes mean the same thing for every source.
"""

from __future__ import annotations

import colorsys
import gzip
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

EXTENT = 0.72  # the shape spans this fraction of its box; rotation by <= 30 deg stays inside
ANGLES = tuple(float(a) for a in np.linspace(-30.0, 30.0, 9))  # limited so a cross never becomes an x
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class Sprite:
    """Precomputed compositing terms, so pasting is `region = region * keep + edge * outline + cover * tint (+ own)`.

    Arrays are [b, b] (or channel-first [3, b, b]): the world composites channel-first, where numpy's
    inner loops run over pixels rather than over 3 channels.
    """

    keep: np.ndarray  # float32 [b, b]: 1 - coverage of sprite and outline
    edge: np.ndarray  # float32 [b, b]: outline ring (dilated alpha minus alpha)
    cover: np.ndarray  # float32 [b, b]: alpha x texture shading, multiplies the tint (zeros when untinted)
    own: np.ndarray | None = None  # float32 [3, b, b]: alpha x own colours (untinted sources)


def _make_sprite(alpha: np.ndarray, shade: np.ndarray | None = None, own: np.ndarray | None = None) -> Sprite:
    """Compositing terms from coverage alpha [b, b] in [0, 1], with a 1-2 px outline ring around it.

    shade [b, b]: texture that multiplies the tint (Fashion-MNIST); own [3, b, b]: the sprite's own
    colours, premultiplied by alpha (folder images, not tinted).
    """
    box = alpha.shape[0]
    radius = max(1, round(box / 24))
    padded = np.zeros((box + 2 * radius,) * 2, np.float32)  # np.pad is slow for tiny arrays
    padded[radius:-radius, radius:-radius] = alpha
    dilated = alpha.copy()
    for dy in range(2 * radius + 1):  # square max filter: the outline keeps objects visible on any background
        for dx in range(2 * radius + 1):
            np.maximum(dilated, padded[dy : dy + box, dx : dx + box], out=dilated)
    keep, edge = (1 - dilated).astype(np.float32), (dilated - alpha).astype(np.float32)
    if own is not None:
        return Sprite(keep=keep, edge=edge, cover=np.zeros_like(keep), own=own.astype(np.float32))
    return Sprite(keep=keep, edge=edge, cover=(alpha if shade is None else alpha * shade).astype(np.float32))


def _put(cache: dict, key: tuple, value: object, limit: int) -> None:
    """Insert into a per-source cache, emptied when full: memory stays bounded for large folders."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


def _pixels(img: Image.Image, box: int, resample: Image.Resampling = Image.Resampling.BOX) -> np.ndarray:
    return np.asarray(img.resize((box, box), resample), dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------- shapes

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
            spr = self._sprites[key] = _make_sprite(_pixels(rot, box))
        return spr


# ----------------------------------------------------------------------------- Fashion-MNIST

FASHION_CLASSES = ["t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
FASHION_SYNONYMS = {
    "t-shirt": ["t-shirt", "tee", "top"], "pair of trousers": ["pair of trousers", "pair of pants"],
    "pullover": ["pullover", "sweater", "jumper"], "dress": ["dress", "gown"], "coat": ["coat", "jacket"],
    "sandal": ["sandal"], "shirt": ["shirt", "blouse"], "sneaker": ["sneaker", "trainer", "running shoe"],
    "bag": ["bag", "handbag", "purse"], "ankle boot": ["ankle boot", "boot"],
}


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


class FashionMNISTSource:
    """Fashion-MNIST garments, tinted with a named colour; their grayscale texture shades the tint.

    Training streams use the 60k training images, held-out (evaluation) streams the 10k test images.
    """

    name = "fashion_mnist"
    tintable = True
    max_angle = 15.0

    def __init__(self, root: Path = FASHION_DIR) -> None:
        self.root = Path(root)
        files = {"train": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
                 "test": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
        self._files = {k: self.root / v for k, v in files.items()}
        missing = [str(p) for p in self._files.values() if not p.is_file()]
        if missing:
            raise ValueError(
                f"data.world.sprites=fashion_mnist needs the Fashion-MNIST files, missing: {', '.join(missing)}; "
                "install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or use sprites=shapes"
            )
        self.classes = list(FASHION_CLASSES)
        self.synonyms = FASHION_SYNONYMS
        self._data: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}

    def identity(self) -> str:
        return "fashion_mnist-" + "-".join(str(p.stat().st_size) for p in self._files.values())

    def arrays(self, heldout: bool) -> tuple[np.ndarray, np.ndarray]:
        """The plain dataset: uint8 grey images [N, 28, 28] and int64 labels of the train or test split."""
        split = "test" if heldout else "train"
        images = _read_idx(self._files[split], 16).reshape(-1, 28, 28)
        return images, _read_idx(self._files[split + "_labels"], 8).astype(np.int64)

    def _split(self, heldout: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        split = "test" if heldout else "train"
        if split not in self._data:
            images, labels = self.arrays(heldout)
            self._data[split] = (images, [np.flatnonzero(labels == c) for c in range(10)])
        return self._data[split]

    def variants(self, cls: int, heldout: bool) -> int:
        return len(self._split(heldout)[1][cls])

    def sprite(self, cls: int, box: int, angle: int, variant: int, heldout: bool) -> Sprite:
        # Not cached: with 70k garments a sprite is almost never drawn twice.
        images, index = self._split(heldout)
        pad = (round(28 / EXTENT) - 28) // 2
        canvas = np.zeros((28 + 2 * pad,) * 2, np.uint8)  # margin so that the extent matches the shapes'
        canvas[pad:-pad, pad:-pad] = images[index[cls][variant]]
        img = Image.fromarray(canvas).rotate(ANGLES[angle] * self.max_angle / 30.0, Image.Resampling.BILINEAR)
        grey = _pixels(img, box, Image.Resampling.BILINEAR)
        # Faint pixels count as solid, so dark garments keep their silhouette; relative brightness shades the
        # tint, so the colour name stays true for dark and bright garments alike.
        return _make_sprite(np.clip(grey * 8.0, 0.0, 1.0), shade=0.4 + 0.6 * grey / max(float(grey.max()), 1e-3))


# ----------------------------------------------------------------------------- folder of images


class FolderSource:
    """Any folder of labelled images, one subfolder per class; pictures keep their own colours.

    Images with an alpha channel are cut out along it; others are pasted as square tiles. Every
    image serves all splits (there is no held-out subset of a folder).
    """

    name = "folder"
    tintable = False
    max_angle = 15.0

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ValueError(
                f"data.world.sprites=folder:{root}: {self.root} is not a folder (want one subfolder per class)"
            )
        self._files: list[list[Path]] = []
        self.classes = []
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir()):
            files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if files:
                self.classes.append(sub.name.replace("_", " ").lower())
                self._files.append(files)
        if not self.classes:
            raise ValueError(
                f"data.world.sprites=folder:{root}: no class subfolders with images "
                f"({', '.join(IMAGE_SUFFIXES)}) in {self.root}"
            )
        self.synonyms = {c: [c] for c in self.classes}
        self._bases: dict[tuple[int, int], Image.Image] = {}
        self._sprites: dict[tuple, Sprite] = {}

    def identity(self) -> str:
        h = hashlib.sha1()
        for files in self._files:
            for f in files:
                st = f.stat()
                h.update(f"{f.relative_to(self.root)}:{st.st_size}:{st.st_mtime_ns};".encode())
        return "folder-" + h.hexdigest()[:16]

    def variants(self, cls: int, heldout: bool) -> int:
        return len(self._files[cls])

    def _base(self, cls: int, variant: int) -> Image.Image:
        canvas = self._bases.get((cls, variant))
        if canvas is None:
            path = self._files[cls][variant]
            try:
                with Image.open(path) as im:
                    im = im.convert("RGBA").convert("RGBa")  # premultiplied: no dark fringes when resampled
            except OSError as err:
                raise ValueError(f"data.world.sprites=folder:{self.root}: cannot read image {path}: {err}") from None
            scale = 128 * EXTENT / max(im.size)  # fit the longer side to the sprite extent, up or down
            fitted = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            im = im.resize(fitted, Image.Resampling.BICUBIC)
            canvas = Image.new("RGBa", (128, 128), (0, 0, 0, 0))
            canvas.paste(im, ((128 - im.width) // 2, (128 - im.height) // 2))
            _put(self._bases, (cls, variant), canvas, 512)
        return canvas

    def sprite(self, cls: int, box: int, angle: int, variant: int, heldout: bool) -> Sprite:
        key = (cls, box, angle, variant)
        spr = self._sprites.get(key)
        if spr is None:
            rot = self._base(cls, variant).rotate(ANGLES[angle] * self.max_angle / 30.0, Image.Resampling.BICUBIC)
            rgba = _pixels(rot, box)  # premultiplied RGBa
            spr = _make_sprite(rgba[..., 3], own=rgba[..., :3].transpose(2, 0, 1))
            _put(self._sprites, key, spr, 4096)
        return spr


def make_source(spec: str) -> ShapeSource | FashionMNISTSource | FolderSource:
    """One entry of `data.world.sprites`: shapes | fashion_mnist | folder:PATH."""
    spec = spec.strip()
    if spec == "shapes":
        return ShapeSource()
    if spec == "fashion_mnist":
        return FashionMNISTSource()
    if spec.startswith("folder:") and spec[len("folder:"):]:
        return FolderSource(spec[len("folder:"):])
    raise ValueError(
        f"data.world.sprites: unknown sprite source {spec!r}; use shapes, fashion_mnist or folder:PATH "
        "(comma-separated to mix)"
    )


# ----------------------------------------------------------------------------- backgrounds

SCENES = ["plain", "striped", "dotted", "checkered", "gradient", "grid", "noisy", "wavy", "brick", "rippled", "marbled"]


def _frac(t: np.ndarray) -> np.ndarray:
    return t - np.floor(t)  # much faster than t % 1.0 in numpy


class Backdrop:
    """Scene backgrounds at one image size: a pixel grid and one pattern function per scene class.

    Each pattern returns a mixing map m [S, S] in [0, 1]; the picture is c1 + m (c2 - c1) for two
    colours of similar hue, channel-first. Axis-aligned patterns work on a row (1, S) and a column
    (S, 1) and broadcast at the end. Lengths are in units of size/48, so a pattern looks the same at
    every size.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.unit = size / 48.0
        coords = np.arange(size, dtype=np.float32) + 0.5
        self.x, self.y = coords[None, :], coords[:, None]
        # bilinear upsampling matrix for smooth random fields (marble): field = A @ G @ A.T
        knots = 6
        pos = (np.arange(size) + 0.5) / size * (knots - 1)
        lo = np.clip(np.floor(pos).astype(int), 0, knots - 2)
        frac = (pos - lo).astype(np.float32)
        self.upsample = np.zeros((size, knots), np.float32)
        self.upsample[np.arange(size), lo] = 1 - frac
        self.upsample[np.arange(size), lo + 1] = frac
        self._patterns = [getattr(self, "_" + name) for name in SCENES]

    def draw(self, scene: int, rng: np.random.Generator, contrast: float = 1.0) -> np.ndarray:
        """float32 [3, S, S] in [0, 1] (channel-first)."""
        c1, c2 = self._colours(rng)
        m = self._patterns[scene](rng)
        return c1[:, None, None] + m[None] * ((c2 - c1) * np.float32(contrast))[:, None, None]

    def _colours(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        # Muted colours (low saturation), so the saturated named object colours stand out.
        hue, sat = rng.random(), 0.1 + 0.35 * rng.random()
        v1 = 0.5 + 0.4 * rng.random()
        v2 = v1 - 0.3 - 0.2 * rng.random()
        if rng.random() < 0.5:
            v1, v2 = v2, v1
        c1 = colorsys.hsv_to_rgb(hue, sat, v1)
        c2 = colorsys.hsv_to_rgb((hue + 0.1 * rng.standard_normal()) % 1.0, 0.1 + 0.35 * rng.random(), v2)
        return np.asarray(c1, np.float32), np.asarray(c2, np.float32)

    def _length(self, rng: np.random.Generator, lo: float, hi: float) -> float:
        return rng.uniform(lo, hi) * self.unit

    def _plain(self, rng: np.random.Generator) -> np.ndarray:
        return np.zeros((self.size, self.size), np.float32)

    def _striped(self, rng: np.random.Generator) -> np.ndarray:
        t = np.deg2rad(45.0 * rng.integers(4) + rng.uniform(-10, 10))
        p = self._length(rng, 5, 10)
        phase = (self.x * (np.cos(t) / p) + rng.random()) + self.y * (np.sin(t) / p)
        return (_frac(phase) < 0.5).astype(np.float32)

    def _dotted(self, rng: np.random.Generator) -> np.ndarray:
        p = self._length(rng, 7, 11)
        r = rng.uniform(0.22, 0.34)
        ox, oy = rng.random(2)
        dx = _frac(self.x / p + ox) - 0.5
        dy = _frac(self.y / p + oy) - 0.5
        return (dx * dx + dy * dy < r * r).astype(np.float32)

    def _checkered(self, rng: np.random.Generator) -> np.ndarray:
        p = self._length(rng, 5, 10)
        ox, oy = rng.random(2)
        cells = np.floor(self.x / p + ox) + np.floor(self.y / p + oy)
        return (_frac(cells * 0.5) > 0.25).astype(np.float32)  # odd cells

    def _gradient(self, rng: np.random.Generator) -> np.ndarray:
        t = rng.uniform(0, 2 * np.pi)
        half = self.size / 2
        d = (self.x - half) * (np.cos(t) / self.size) + ((self.y - half) * (np.sin(t) / self.size) + 0.5)
        return np.clip(d, 0.0, 1.0)

    def _grid(self, rng: np.random.Generator) -> np.ndarray:
        p = self._length(rng, 7, 12)
        w = max(1.0, self.unit * rng.uniform(1.0, 1.8)) / p
        ox, oy = rng.random(2)
        return ((_frac(self.x / p + ox) < w) | (_frac(self.y / p + oy) < w)).astype(np.float32)

    def _noisy(self, rng: np.random.Generator) -> np.ndarray:
        return rng.random((self.size, self.size), dtype=np.float32)

    def _wavy(self, rng: np.random.Generator) -> np.ndarray:
        amp, wavelength, p = self._length(rng, 2.0, 3.5), self._length(rng, 14, 22), self._length(rng, 6, 10)
        along, across = (self.x, self.y) if rng.random() < 0.5 else (self.y, self.x)
        wave = amp * np.sin(along * (2 * np.pi / wavelength) + rng.uniform(0, 2 * np.pi)) + rng.random() * p
        return (_frac((across + wave) / p) < 0.5).astype(np.float32)

    def _brick(self, rng: np.random.Generator) -> np.ndarray:
        h = self._length(rng, 5, 8)
        w = 2 * h
        mortar = max(1.0, self.unit)
        rows = (self.y + rng.uniform(0, h)) / h
        shift = _frac(np.floor(rows) * 0.5)  # 0 or 0.5 brick: alternate rows are offset
        joints = _frac(self.x / w + rng.random() + shift) < mortar / w
        return ((_frac(rows) < mortar / h) | joints).astype(np.float32)

    def _rippled(self, rng: np.random.Generator) -> np.ndarray:
        cx, cy = rng.uniform(-0.25, 1.25, 2) * self.size
        p = self._length(rng, 5, 9)
        d = np.sqrt((self.x - cx) ** 2 + (self.y - cy) ** 2)
        return (_frac(d / p + rng.random()) < 0.5).astype(np.float32)

    def _marbled(self, rng: np.random.Generator) -> np.ndarray:
        f = self.upsample @ rng.standard_normal((6, 6), dtype=np.float32) @ self.upsample.T
        lo, hi = f.min(), f.max()
        return (f - lo) / max(hi - lo, 1e-6)
