"""The sprite sources, which give the world its object classes: Fashion-MNIST garments and folders of
pictures here, the built-in geometric shapes in shapes.py.

A sprite source maps (class, box size, angle, variant) to a `Sprite`: an alpha mask the world
tints with a named colour (shapes, Fashion-MNIST), or an image with its own colours (a folder of
labelled pictures). `data.world.sprites` names the sources (comma-separated to mix them);
`make_sources` builds them and `union_classes` merges their class lists into the world's.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from .shapes import ShapeSource
from .sprite import ANGLES, EXTENT, Sprite, make_sprite, pixels

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _put(cache: dict, key: tuple, value: object, limit: int) -> None:
    """Insert into a per-source cache, emptied when full: memory stays bounded for large folders."""
    if len(cache) >= limit:
        cache.clear()
    cache[key] = value


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
        grey = pixels(img, box, Image.Resampling.BILINEAR)
        # Faint pixels count as solid, so dark garments keep their silhouette; relative brightness shades the
        # tint, so the colour name stays true for dark and bright garments alike.
        return make_sprite(np.clip(grey * 8.0, 0.0, 1.0), shade=0.4 + 0.6 * grey / max(float(grey.max()), 1e-3))


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
            rgba = pixels(rot, box)  # premultiplied RGBa
            spr = make_sprite(rgba[..., 3], own=rgba[..., :3].transpose(2, 0, 1))
            _put(self._sprites, key, spr, 4096)
        return spr


# ----------------------------------------------------------------------------- the sources together

Source = ShapeSource | FashionMNISTSource | FolderSource


def make_source(spec: str) -> Source:
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


def make_sources(specs: str) -> list[Source]:
    """The sources named by `data.world.sprites` (comma-separated)."""
    names = [s for s in specs.split(",") if s.strip()]
    if not names:
        raise ValueError("data.world.sprites is empty; use shapes, fashion_mnist or folder:PATH (comma-separated)")
    return [make_source(s) for s in names]


def union_classes(sources: list[Source]) -> tuple[list[str], list[list[tuple[int, int]]], dict[str, list[str]]]:
    """The world's object classes: the union of the sources' classes (same name, same class).

    Returns (class names, class -> [(source, class within source)], class -> synonyms of its first source).
    """
    names: list[str] = []
    members: list[list[tuple[int, int]]] = []
    synonyms: dict[str, list[str]] = {}
    for s, src in enumerate(sources):
        for local, name in enumerate(src.classes):
            if name not in synonyms:
                names.append(name)
                members.append([])
                synonyms[name] = list(src.synonyms[name])
            members[names.index(name)].append((s, local))
    return names, members, synonyms
