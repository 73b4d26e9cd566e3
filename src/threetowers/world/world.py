"""The embedded benchmark world: procedurally rendered captioned scenes, deterministic from a seed.

Sample i of a stream ("pairs/train", "labelled/object/train", "zeroshot/scene", ...) is rendered
from its own generator seeded by (seed, stream, i). Samples therefore do not depend on N or order,
any one can be rendered alone (`World.sample`), and streams never share seeds, so evaluation sets
are disjoint from training data.

A sample is a background from one of `SCENES` in muted colours, with 1-3 objects: a class from
the sprite sources, a named colour, a size, a position and a small rotation. Captions are
compositional English (templates, synonyms, optional clauses) naming the objects, their colours,
sizes, counts and spatial relations and the background; a `caption_noise` fraction is corrupted
the way web alt-text is (wrong colour, wrong or missing object, wrong background, or generic).

The paper's questions map onto it: `labelled("object")` (single objects on mild backgrounds,
labelled by object class) plays JFT's role, `labelled("scene")` (backgrounds with distractors,
labelled by scene class) Places365's, and captions carry colour, count, size and relations,
which no label does. Large sets are rendered once into a uint8 .npy cache (memory-mapped on read)
keyed by `world_hash`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import textwrap
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from threetowers.core.atomic import atomic_path, write_text_atomic
from threetowers.config import WorldConfig
from threetowers.core.sets import CaptionedSet, LabelledSet
from threetowers.world.sprites import ANGLES, EXTENT, SCENES, Backdrop, make_source

RENDER_VERSION = 1  # bump when pixels or captions change for the same config

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.1, 0.1), "orange": (1.0, 0.55, 0.0), "yellow": (0.98, 0.86, 0.08), "green": (0.1, 0.62, 0.15),
    "cyan": (0.0, 0.8, 0.85), "blue": (0.12, 0.25, 0.92), "purple": (0.55, 0.15, 0.78), "pink": (1.0, 0.5, 0.78),
    "white": (0.97, 0.97, 0.97), "black": (0.07, 0.07, 0.07),
}
COLOUR_WORDS = {c: [c] for c in COLOURS} | {"purple": ["purple", "violet"], "cyan": ["cyan", "turquoise"]}
SCENE_PHRASES: dict[str, list[str]] = {
    "plain": ["a plain background", "a blank background", "a plain backdrop", "a solid background"],
    "striped": ["a striped background", "a background with stripes", "stripes", "a striped backdrop"],
    "dotted": ["a dotted background", "a polka dot background", "a background of dots", "dots"],
    "checkered": ["a checkered background", "a checkerboard", "a checkered pattern", "a chessboard pattern"],
    "gradient": ["a gradient background", "a smooth gradient", "a colour gradient", "a fading background"],
    "grid": ["a grid background", "a grid of lines", "a grid pattern", "graph paper"],
    "noisy": ["a noisy background", "a grainy background", "random noise", "a speckled backdrop"],
    "wavy": ["a wavy background", "wavy lines", "a background of waves", "waves"],
    "brick": ["a brick wall", "a brick background", "bricks", "a brick pattern"],
    "rippled": ["a rippled background", "ripples", "a rippled pattern", "a target pattern"],
    "marbled": ["a marbled background", "a marble texture", "a blotchy background", "a mottled backdrop"],
}
# The words a clean caption uses for each scene (tests check captions against these).
SCENE_WORDS = {
    "plain": ["plain", "blank", "solid"], "striped": ["striped", "stripes"], "dotted": ["dotted", "dots", "polka dot"],
    "checkered": ["checkered", "checkerboard", "chessboard"], "gradient": ["gradient", "fading"],
    "grid": ["grid", "graph paper"], "noisy": ["noisy", "grainy", "noise", "speckled"], "wavy": ["wavy", "waves"],
    "brick": ["brick", "bricks"], "rippled": ["rippled", "ripples", "target"],
    "marbled": ["marbled", "marble", "blotchy", "mottled"],
}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
RELATIONS = {
    "left": ["to the left of", "left of", "on the left of"], "right": ["to the right of", "right of"],
    "above": ["above", "over"], "below": ["below", "under", "beneath"],
}
THINGS = ["objects", "things", "items"]
COUNTS = {2: "two", 3: "three"}
TEMPLATES_1 = ["{a} on {bg}.", "{a} in front of {bg}.", "{bg} with {a}.", "a picture of {a} on {bg}.",
               "there is {a} on {bg}.", "an image of {a} against {bg}.", "{a}, with {bg} behind it.",
               "one {a_} on {bg}."]
TEMPLATES_2 = ["{a} {rel} {b} on {bg}.", "{bg} with {a} {rel} {b}.", "two {things} on {bg}: {a} and {b}.",
               "{a} and {b} on {bg}.", "on {bg}, {a} is {rel} {b}.", "a picture of {a} and {b} in front of {bg}."]
TEMPLATES_3 = ["three {things} on {bg}: {a}, {b} and {c}.", "{a}, {b} and {c} on {bg}.",
               "from left to right: {l0}, {l1} and {l2}, on {bg}.", "{bg} with {a} {rel} {b}, and {c}.",
               "a picture of {a}, {b} and {c} against {bg}."]
TEMPLATES_GROUPED = ["{list} on {bg}.", "{bg} with {list}.", "a picture of {list} in front of {bg}.",
                     "{count} {things} on {bg}: {list}."]
GENERIC = ["nice picture", "image", "untitled", "click to enlarge", "photo", "my new wallpaper", "stock image",
           "no description available", "screenshot", "best patterns of the year", "download free", "IMG_{:04d}.jpg"]
NOISE_KINDS = ["wrong_colour", "wrong_object", "missing_object", "wrong_background", "generic"]
NOISE_CDF = [0.25, 0.45, 0.6, 0.75]  # cumulative probabilities of the first four kinds
# Zero-shot prompts: class names are substituted for "{}" (no "a {}", which would read "a oval").
OBJECT_TEMPLATES = ["a picture of the {}.", "the {} on a background.", "one {} in front of a pattern.",
                    "a drawing of one {}.", "there is one {} in the image."]
SCENE_TEMPLATES = ["a picture with a {} background.", "something on a {} background.", "a {} background.",
                   "objects in front of a {} pattern.", "a {} backdrop."]
KINDS = ("object", "scene")


@dataclass(frozen=True)
class _Recipe:
    """How one kind of set is drawn."""

    objects: tuple[int, int]  # min, max number of objects
    label: str = ""  # "object" | "scene": that class is fixed to index % num_classes (balanced sets)
    contrast: tuple[float, float] = (1.0, 1.0)  # background pattern contrast range
    captions: int = 1
    noisy: bool = False


_PAIRS = _Recipe((1, 3), noisy=True)
_RECIPES = {  # sets labelled by object or scene class: pretraining (labelled), zero-shot, few-shot
    ("labelled", "object"): _Recipe((1, 1), "object", contrast=(0.15, 0.45), captions=0),
    ("labelled", "scene"): _Recipe((0, 2), "scene", captions=0),
    ("eval", "object"): _Recipe((1, 1), "object", captions=0),
    ("eval", "scene"): _Recipe((1, 3), "scene", captions=0),
}
_BOX = {1: (0.44, 0.8), 2: (0.42, 0.6), 3: (0.4, 0.5)}  # sprite box / image size, by number of objects


@dataclass
class Pairs:
    """Captioned training images.

    objects[i]: one dict per object with name (class), colour (None for sources with their own colours),
    size ("small" | "large" | "" for medium), x, y (top-left of its square sprite box) and box (side, px).
    """

    images: np.ndarray  # uint8 [N, S, S, 3] (a copy-on-write memmap when loaded from the cache)
    captions: list[str]
    keys: list[str]  # f"world-{world_hash}-{split}-{index:07d}": same config, same keys
    objects: list[list[dict]]
    scene: np.ndarray  # int64 [N] index into World.scene_classes
    noise: list[str] = field(default_factory=list)  # "" for a clean caption, else one of NOISE_KINDS

    def __len__(self) -> int:
        return len(self.captions)


def _sources(cfg: WorldConfig) -> list:
    specs = [s for s in cfg.sprites.split(",") if s.strip()]
    if not specs:
        raise ValueError("data.world.sprites is empty; use shapes, fashion_mnist or folder:PATH (comma-separated)")
    return [make_source(s) for s in specs]


def _hash(cfg: WorldConfig, sources: list) -> str:
    ident = {"v": RENDER_VERSION, "seed": cfg.seed, "size": cfg.image_size, "noise": cfg.caption_noise,
             "sprites": [s.identity() for s in sources]}
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def world_hash(cfg: WorldConfig) -> str:
    """Short hash of everything that changes pixels or captions (not num_pairs or cache_dir)."""
    return _hash(cfg, _sources(cfg))


def cache_root(cfg: WorldConfig) -> Path:
    """cfg.cache_dir, else $THREETOWERS_CACHE/world, else ~/.cache/threetowers/world."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("THREETOWERS_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "threetowers") / "world"


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(name: str) -> str:
    words = name.split(" ")
    i = words.index("of") - 1 if "of" in words else len(words) - 1  # "pair of trousers" -> "pairs of trousers"
    w = words[i]
    words[i] = w + "es" if w.endswith(("s", "x", "sh", "ch")) else w + "s"
    return " ".join(words)


def _below(rng: np.random.Generator, k: int) -> int:
    """Uniform integer in [0, k): rng.integers is several times slower for single draws."""
    return int(rng.random() * k)


def _pick(rng: np.random.Generator, words: list[str]) -> str:
    """The first (canonical) word more often than each synonym, so prompts with class names match captions."""
    return words[0] if len(words) == 1 or rng.random() < 0.6 else words[_below(rng, len(words))]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


class World:
    """The embedded benchmark. Sets of at least `cache_min` images are cached on disk."""

    def __init__(self, cfg: WorldConfig, *, cache_min: int = 4096, progress: bool = True) -> None:
        if cfg.image_size < 24:
            raise ValueError(f"data.world.image_size={cfg.image_size} is too small; objects need >= 24 px images")
        if not 0.0 <= cfg.caption_noise <= 1.0:
            raise ValueError(f"data.world.caption_noise={cfg.caption_noise} must be in [0, 1]")
        self.cfg = cfg
        self.cache_min = cache_min
        self.progress = progress
        self.sources = _sources(cfg)
        self.hash = _hash(cfg, self.sources)
        self.object_classes: list[str] = []
        self._members: list[list[tuple[int, int]]] = []  # class -> [(source, class within source)]
        self.synonyms: dict[str, list[str]] = {}
        for s, src in enumerate(self.sources):
            for local, name in enumerate(src.classes):  # the class list is the union; same name, same class
                if name not in self.synonyms:
                    self.object_classes.append(name)
                    self._members.append([])
                    self.synonyms[name] = list(src.synonyms[name])
                self._members[self.object_classes.index(name)].append((s, local))
        self.scene_classes = list(SCENES)
        self.colours = list(COLOURS)
        self._rgb = np.asarray(list(COLOURS.values()), np.float32)
        self._backdrop = Backdrop(cfg.image_size)

    # ------------------------------------------------------------------ words (for tests and eval)

    def object_words(self, name: str) -> list[str]:
        """Every word a clean caption may use for an object class (synonyms and their plurals)."""
        return self.synonyms[name] + [_plural(w) for w in self.synonyms[name]]

    @staticmethod
    def scene_words(name: str) -> list[str]:
        return SCENE_WORDS[name]

    # ------------------------------------------------------------------ one sample

    def sample(self, split: str, index: int) -> tuple[np.ndarray, dict]:
        """Training pair `index` of `split` alone: (uint8 [S, S, 3], record with captions/objects/scene/noise)."""
        return self._sample(f"pairs/{split}", _PAIRS, index)

    def _sample(self, stream: str, recipe: _Recipe, index: int) -> tuple[np.ndarray, dict]:
        # One generator per sample, consumed in a fixed order: layout, then pixels, then captions.
        rng = np.random.default_rng([self.cfg.seed, zlib.crc32(stream.encode()), index])
        heldout = not stream.startswith(("pairs/", "labelled/"))  # eval streams: e.g. Fashion-MNIST test images
        scene, objs, sprites = self._layout(rng, recipe, index, heldout)
        image = self._paint(rng, scene, objs, sprites, rng.uniform(*recipe.contrast))
        record = {"scene": scene, "objects": objs, "captions": [], "noise": ""}
        if recipe.noisy and rng.random() < self.cfg.caption_noise:
            record["noise"], caption = self._corrupt(rng, scene, objs)
            record["captions"].append(caption)
        tries = 0
        while len(record["captions"]) < recipe.captions:  # distinct paraphrases when several are asked for
            caption = self._caption(rng, scene, objs)
            tries += 1
            if caption not in record["captions"] or tries > 4 * recipe.captions:
                record["captions"].append(caption)
        return image, record

    def _layout(self, rng: np.random.Generator, recipe: _Recipe, index: int, heldout: bool) -> tuple[int, list, list]:
        """Scene class, object records (name, colour, size word, box position) and their sprites."""
        size = self.cfg.image_size
        scene = index % len(SCENES) if recipe.label == "scene" else _below(rng, len(SCENES))
        n = recipe.objects[0] + _below(rng, recipe.objects[1] - recipe.objects[0] + 1)
        lo, hi = _BOX.get(n, _BOX[3])
        objs, sprites = [], []
        for _ in range(n):
            k = len(self.object_classes)
            cls = index % k if recipe.label == "object" else _below(rng, k)
            members = self._members[cls]
            s, local = members[_below(rng, len(members))] if len(members) > 1 else members[0]
            src = self.sources[s]
            box = round(size * rng.uniform(lo, hi))
            angle = _below(rng, len(ANGLES))
            variant = _below(rng, src.variants(local, heldout))
            colour = _below(rng, len(COLOURS)) if src.tintable else None
            x, y = self._place(rng, box, objs)
            frac = box / size
            objs.append({"name": self.object_classes[cls], "colour": None if colour is None else self.colours[colour],
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
            x, y = _below(rng, self.cfg.image_size - box + 1), _below(rng, self.cfg.image_size - box + 1)
            gap = min((((x - o["x"] + (box - o["box"]) / 2) ** 2 + (y - o["y"] + (box - o["box"]) / 2) ** 2) ** 0.5
                       / (EXTENT * (box + o["box"]) / 2) for o in objs), default=2.0)
            if gap > best_gap:
                best, best_gap = (x, y), gap
            if gap >= 1.1:
                break
        return best

    # ------------------------------------------------------------------ captions

    def _phrase(self, rng: np.random.Generator, o: dict) -> str:
        words = [_pick(rng, SIZE_WORDS[o["size"]])] if o["size"] and rng.random() < 0.6 else []
        name = _pick(rng, self.synonyms[o["name"]])
        if o["colour"] is None:
            return " ".join(words + [name])
        colour = _pick(rng, COLOUR_WORDS[o["colour"]])
        if rng.random() < 0.15:
            return " ".join(words + [name]) + " in " + colour
        return " ".join(words + [colour, name])

    def _caption(self, rng: np.random.Generator, scene: int, objs: list[dict]) -> str:
        bg = _pick(rng, SCENE_PHRASES[SCENES[scene]])
        order = [objs[i] for i in rng.permutation(len(objs))]
        groups: dict[tuple, list[dict]] = {}
        for o in order:
            groups.setdefault((o["name"], o["colour"]), []).append(o)
        things = THINGS[_below(rng, len(THINGS))]
        if len(groups) < len(objs):  # repeated objects: counted ("two red circles")
            parts = [_article(self._phrase(rng, g[0])) if len(g) == 1 else
                     " ".join([COUNTS[len(g)]] + ([g[0]["colour"]] if g[0]["colour"] else []) + [_plural(g[0]["name"])])
                     for g in groups.values()]
            template = TEMPLATES_GROUPED[_below(rng, len(TEMPLATES_GROUPED))]
            return template.format(list=_join(parts), bg=bg, count=COUNTS[len(objs)], things=things)
        bare = [self._phrase(rng, o) for o in order]
        names = [_article(p) for p in bare]
        fields = {"bg": bg, "things": things, "a_": bare[0]} | dict(zip("abc", names))
        if len(order) >= 2:
            fields["rel"] = self._relation(rng, order[0], order[1])
            by_x = sorted(range(len(order)), key=lambda i: order[i]["x"] + order[i]["box"] / 2)
            fields |= {f"l{k}": names[i] for k, i in enumerate(by_x)}
        templates = {1: TEMPLATES_1, 2: TEMPLATES_2}.get(len(order), TEMPLATES_3)
        caption = templates[_below(rng, len(templates))].format(**fields)
        if len(order) == 1 and rng.random() < 0.3:  # optional clause: where the object is
            caption = caption[:-1] + ", " + self._position(rng, order[0]) + "."
        return caption

    def _relation(self, rng: np.random.Generator, a: dict, b: dict) -> str:
        dx = (b["x"] + b["box"] / 2) - (a["x"] + a["box"] / 2)
        dy = (b["y"] + b["box"] / 2) - (a["y"] + a["box"] / 2)  # image y grows downwards
        key = ("left" if dx > 0 else "right") if abs(dx) >= abs(dy) else ("above" if dy > 0 else "below")
        return _pick(rng, RELATIONS[key])

    def _position(self, rng: np.random.Generator, o: dict) -> str:
        third = self.cfg.image_size / 3
        cx, cy = o["x"] + o["box"] / 2, o["y"] + o["box"] / 2
        h = "left" if cx < third else "right" if cx > 2 * third else ""
        v = "top" if cy < third else "bottom" if cy > 2 * third else ""
        if h and v:
            return f"in the {v} {h} corner"
        if h or v:
            return f"on the {h}" if h else f"at the {v}"
        return _pick(rng, ["in the centre", "in the middle"])

    def _corrupt(self, rng: np.random.Generator, scene: int, objs: list[dict]) -> tuple[str, str]:
        """A web-alt-text-like caption: partly wrong, or uninformative."""
        kind = NOISE_KINDS[bisect.bisect(NOISE_CDF, rng.random())]
        objs = [dict(o) for o in objs]
        coloured = [o for o in objs if o["colour"] is not None]
        if kind == "wrong_colour" and not coloured or kind == "missing_object" and len(objs) < 2:
            kind = "wrong_object"
        if kind == "generic":
            text = GENERIC[_below(rng, len(GENERIC))]
            return kind, text.format(_below(rng, 10000))
        if kind == "wrong_colour":
            o = coloured[_below(rng, len(coloured))]
            k = len(self.colours)
            o["colour"] = self.colours[(self.colours.index(o["colour"]) + 1 + _below(rng, k - 1)) % k]
        elif kind == "wrong_object":
            o = objs[_below(rng, len(objs))]
            k = len(self.object_classes)
            o["name"] = self.object_classes[(self.object_classes.index(o["name"]) + 1 + _below(rng, k - 1)) % k]
        elif kind == "missing_object":
            objs.pop(_below(rng, len(objs)))
        else:
            scene = (scene + 1 + _below(rng, len(SCENES) - 1)) % len(SCENES)
        return kind, self._caption(rng, scene, objs)

    # ------------------------------------------------------------------ sets

    def _render(self, stream: str, recipe: _Recipe, n: int, tag: str = "") -> tuple[np.ndarray, list[dict]]:
        """n samples of a stream, from the cache when the set is large (rendered into it on a miss)."""
        if n < self.cache_min:
            return self._in_memory(stream, recipe, n)
        base = cache_root(self.cfg) / f"{self.hash}-{(stream + tag).replace('/', '_')}-{n}"
        npy, meta = Path(f"{base}.npy"), Path(f"{base}.json")
        loaded = self._load(npy, meta, stream, recipe, n)
        if loaded is not None:
            return loaded
        records: list[dict] = []
        try:
            # Streamed chunk by chunk: memory stays bounded for any n. The images first, then the
            # records: a set counts as cached only once both exist and agree (see _load).
            with atomic_path(npy) as tmp, open(tmp, "wb") as f:
                shape = (n, self.cfg.image_size, self.cfg.image_size, 3)
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                f.writelines(chunk.tobytes() for chunk in self._chunks(stream, recipe, n, records))
            write_text_atomic(meta, json.dumps({"hash": self.hash, "stream": stream, "n": n, "records": records}))
        except OSError as err:
            warnings.warn(f"world cache {npy.parent} is not writable ({err}); rendering {n} images in memory")
            return self._in_memory(stream, recipe, n)
        return np.load(npy, mmap_mode="c"), records

    def _chunks(self, stream: str, recipe: _Recipe, n: int, records: list[dict]) -> Iterator[np.ndarray]:
        """Render samples 0..n-1 in chunks of uint8 images, appending their records; a progress bar for big sets."""
        size = self.cfg.image_size
        with tqdm(total=n, desc=f"rendering world {stream}", unit="img", disable=not self.progress or n < 2000) as bar:
            for start in range(0, n, 1024):
                chunk = np.empty((min(1024, n - start), size, size, 3), np.uint8)
                for i in range(len(chunk)):
                    chunk[i], record = self._sample(stream, recipe, start + i)
                    records.append(record)
                bar.update(len(chunk))
                yield chunk

    def _in_memory(self, stream: str, recipe: _Recipe, n: int) -> tuple[np.ndarray, list[dict]]:
        images = np.empty((n, self.cfg.image_size, self.cfg.image_size, 3), np.uint8)
        records: list[dict] = []
        for chunk in self._chunks(stream, recipe, n, records):
            images[len(records) - len(chunk) : len(records)] = chunk
        return images, records

    def _load(
        self, npy: Path, meta: Path, stream: str, recipe: _Recipe, n: int
    ) -> tuple[np.ndarray, list[dict]] | None:
        """A cached set, or None when missing, partial, corrupt or stale (then it is rebuilt)."""
        if not (npy.is_file() and meta.is_file()):
            return None
        try:
            images = np.load(npy, mmap_mode="c")  # copy-on-write: writable for torch, shared pages
            data = json.loads(meta.read_text())
            records = data["records"]
            ok = images.shape == (n, self.cfg.image_size, self.cfg.image_size, 3) and images.dtype == np.uint8
            ok = ok and data["hash"] == self.hash and data["n"] == n == len(records)
            for i in sorted({0, n // 2, n - 1}) if ok else []:  # spot check against a fresh render
                image, record = self._sample(stream, recipe, i)
                ok = ok and np.array_equal(images[i], image) and records[i] == record
        except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
            warnings.warn(f"world cache {npy} is unreadable ({err}); rebuilding it")
            return None
        if not ok:
            warnings.warn(f"world cache {npy} does not match this world; rebuilding it")
            return None
        return images, records

    def pairs(self, split: str = "train", n: int | None = None) -> Pairs:
        """Captioned pairs; n defaults to cfg.num_pairs for train and a tenth of it for other splits."""
        n = (self.cfg.num_pairs if split == "train" else max(1, self.cfg.num_pairs // 10)) if n is None else n
        images, records = self._render(f"pairs/{split}", _PAIRS, n)
        return Pairs(
            images=images,
            captions=[r["captions"][0] for r in records],
            keys=[f"world-{self.hash}-{split}-{i:07d}" for i in range(n)],
            objects=[r["objects"] for r in records],
            scene=np.asarray([r["scene"] for r in records], np.int64),
            noise=[r["noise"] for r in records],
        )

    def _labelled(self, stream: str, recipe: _Recipe, n: int, kind: str) -> LabelledSet:
        images, records = self._render(stream, recipe, n)
        if kind == "object":
            classes = {c: i for i, c in enumerate(self.object_classes)}
            labels = [classes[r["objects"][0]["name"]] for r in records]
            names, templates = list(self.object_classes), list(OBJECT_TEMPLATES)
        else:
            labels = [r["scene"] for r in records]
            names, templates = list(self.scene_classes), list(SCENE_TEMPLATES)
        return LabelledSet(images=images, labels=np.asarray(labels, np.int64), class_names=names, templates=templates)

    def _check_kind(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not a world label kind; use 'object' or 'scene'")

    def labelled(self, kind: str, n: int, split: str = "train") -> LabelledSet:
        """Pretraining data for a third tower: "object" (single object on a mild background, JFT's role)
        or "scene" (background with 0-2 distractors, Places365's role). Classes are balanced."""
        self._check_kind(kind)
        return self._labelled(f"labelled/{kind}/{split}", _RECIPES["labelled", kind], n, kind)

    def zeroshot(self, kind: str, n: int) -> LabelledSet:
        """Held-out zero-shot classification set, with class names and several prompt templates."""
        self._check_kind(kind)
        return self._labelled(f"zeroshot/{kind}", _RECIPES["eval", kind], n, kind)

    def fewshot(self, kind: str, shots: int, n_test: int, seed: int = 0) -> tuple[LabelledSet, LabelledSet]:
        """(train with exactly `shots` images per class, test), both from held-out seeds."""
        return self.fewshot_train(kind, shots, seed), self.fewshot_test(kind, n_test)

    def fewshot_train(self, kind: str, shots: int, seed: int = 0) -> LabelledSet:
        """Exactly `shots` held-out images per class; another `seed` draws other images."""
        self._check_kind(kind)
        classes = len(self.object_classes if kind == "object" else self.scene_classes)
        return self._labelled(f"fewshot/{kind}/train/{seed}", _RECIPES["eval", kind], shots * classes, kind)

    def fewshot_test(self, kind: str, n: int) -> LabelledSet:
        """The few-shot probes' test set: the same for every shot count and seed."""
        self._check_kind(kind)
        return self._labelled(f"fewshot/{kind}/test", _RECIPES["eval", kind], n, kind)

    def retrieval(self, n_images: int, captions_per_image: int = 5) -> CaptionedSet:
        """Held-out scenes with several different clean paraphrases each."""
        recipe = _Recipe(_PAIRS.objects, captions=captions_per_image)
        images, records = self._render("retrieval", recipe, n_images, tag=f"-c{captions_per_image}")
        captions = [c for r in records for c in r["captions"]]
        owner = np.repeat(np.arange(n_images), [len(r["captions"]) for r in records]).astype(np.int64)
        return CaptionedSet(images=images, captions=captions, image_of_text=owner)

    # ------------------------------------------------------------------ looking at it

    def show(self, path: str, n: int = 16, what: str = "pairs") -> None:
        """PNG grid of samples with their captions ("pairs") or labels ("object" | "scene"); noisy captions in red."""
        from matplotlib.figure import Figure  # no pyplot: no global figure state

        if what == "pairs":
            pairs = self.pairs("train", n)
            images = pairs.images
            texts = [(c, "red" if k else "black") for c, k in zip(pairs.captions, pairs.noise)]
        else:
            self._check_kind(what)
            data = self.labelled(what, n)
            images = data.images
            texts = [(data.class_names[y], "black") for y in data.labels]
        cols = min(4, n)
        rows = -(-n // cols)
        fig = Figure(figsize=(2.6 * cols, 3.0 * rows), dpi=100)
        for i in range(n):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.imshow(images[i], interpolation="nearest")
            ax.set_title("\n".join(textwrap.wrap(texts[i][0], 30)), fontsize=7, color=texts[i][1])
            ax.axis("off")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
