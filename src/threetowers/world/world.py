"""The embedded benchmark world: procedurally rendered captioned scenes, deterministic from a seed.

Sample i of a stream ("pairs/train", "labelled/object/train", "zeroshot/scene", ...) is rendered
from its own generator seeded by (seed, stream, i). Samples therefore do not depend on N or order,
any one can be rendered alone (`World.sample`), and streams never share seeds, so evaluation sets
are disjoint from training data.

A sample is a background from one of `SCENES` in muted colours, with 1-3 objects: a class from
the sprite sources, a named colour, a size, a position and a small rotation. Captions are
compositional English naming the objects, their colours, sizes, counts and spatial relations and
the background; a `caption_noise` fraction is corrupted the way web alt-text is.

The paper's questions map onto it: `labelled("object")` (single objects on mild backgrounds,
labelled by object class) plays JFT's role, `labelled("scene")` (backgrounds with distractors,
labelled by scene class) Places365's, and captions carry colour, count, size and relations,
which no label does. Large sets are rendered once into a uint8 .npy cache (memory-mapped on read)
keyed by `world_hash`.

`World` composes the parts: sprite sources (sprites.py, shapes.py), pictures (renderer.py,
backdrops.py), words (captions.py), the disk cache (cache.py), the sets (tasks.py) and a PNG grid (grid.py).
"""

from __future__ import annotations

import hashlib
import zlib
from functools import partial

import numpy as np

from ..core.sets import CaptionedSet, LabelledSet
from ..schema import WorldConfig
from .backdrops import SCENES
from .cache import SetCache, sources_hash
from .captions import SCENE_WORDS, Captioner, relation
from .grid import write_grid
from .renderer import COLOURS, Recipe, Renderer
from .sprites import make_sources, union_classes
from .tasks import Pairs, Sets, check_kind


class World:
    """The embedded benchmark. Sets of at least `cache_min` images are cached on disk."""

    def __init__(self, cfg: WorldConfig, *, cache_min: int = 4096, progress: bool = True) -> None:
        if cfg.image_size < 24:
            raise ValueError(f"data.world.image_size={cfg.image_size} is too small; objects need >= 24 px images")
        if not 0.0 <= cfg.caption_noise <= 1.0:
            raise ValueError(f"data.world.caption_noise={cfg.caption_noise} must be in [0, 1]")
        self.cfg = cfg
        self.sources = make_sources(cfg.sprites)
        self.hash = sources_hash(cfg, self.sources)
        self.object_classes, members, self.synonyms = union_classes(self.sources)
        self.scene_classes = list(SCENES)
        self.colours = list(COLOURS)
        self._renderer = Renderer(cfg.image_size, self.sources, self.object_classes, members, cfg.object_scale)
        self._captioner = Captioner(cfg.image_size, self.object_classes, self.synonyms, cfg.caption_noise,
                                    cfg.colour_words, cfg.scene_words)
        self._cache = SetCache(cfg, self.hash, cache_min, progress)
        self._sets = Sets(self._render, self.hash, cfg.num_pairs, self.object_classes, self.scene_classes,
                          cfg.max_objects)

    # ------------------------------------------------------------------ words (for tests and eval)

    def object_words(self, name: str) -> list[str]:
        """Every word a clean caption may use for an object class (synonyms and their plurals)."""
        return self._captioner.object_words(name)

    @staticmethod
    def scene_words(name: str) -> list[str]:
        return SCENE_WORDS[name]

    _relation = staticmethod(relation)  # the spatial-relation words, checkable without rendering

    # ------------------------------------------------------------------ one sample

    def sample(self, split: str, index: int) -> tuple[np.ndarray, dict]:
        """Training pair `index` of `split` alone: (uint8 [S, S, 3], record with captions/objects/scene/noise)."""
        return self._sample(f"pairs/{split}", self._sets.pairs_recipe, index)

    def _sample(self, stream: str, recipe: Recipe, index: int) -> tuple[np.ndarray, dict]:
        # One generator per sample, consumed in a fixed order: layout, then pixels, then captions.
        rng = np.random.default_rng([self.cfg.seed, zlib.crc32(stream.encode()), index])
        heldout = not stream.startswith(("pairs/", "labelled/"))  # eval streams: e.g. Fashion-MNIST test images
        image, scene, objs = self._renderer.draw(rng, recipe, index, heldout)
        noise, captions = self._captioner.describe(rng, scene, objs, recipe.captions, recipe.noisy)
        return image, {"scene": scene, "objects": objs, "captions": captions, "noise": noise}

    def _render(self, stream: str, recipe: Recipe, n: int, tag: str = "") -> tuple[np.ndarray, list[dict]]:
        """n samples of a stream, from the cache when the set is large (rendered into it on a miss).
        The recipe is part of the cached set's name: a stream drawn another way is never read stale."""
        digest = hashlib.sha256(repr(recipe).encode()).hexdigest()[:8]
        return self._cache.get(stream, n, partial(self._sample, stream, recipe), f"{tag}-r{digest}")

    # ------------------------------------------------------------------ sets

    def pairs(self, split: str = "train", n: int | None = None) -> Pairs:
        """Captioned pairs; n defaults to cfg.num_pairs for train and a tenth of it for other splits."""
        return self._sets.pairs(split, n)

    def labelled(self, kind: str, n: int, split: str = "train") -> LabelledSet:
        """Pretraining data for a third tower: "object" (single object on a mild background, JFT's role)
        or "scene" (background with 0-2 distractors, Places365's role). Classes are balanced."""
        return self._sets.labelled(kind, n, split)

    def zeroshot(self, kind: str, n: int) -> LabelledSet:
        """Held-out zero-shot classification set, with class names and several prompt templates."""
        return self._sets.zeroshot(kind, n)

    def fewshot(self, kind: str, shots: int, n_test: int, seed: int = 0) -> tuple[LabelledSet, LabelledSet]:
        """(train with exactly `shots` images per class, test), both from held-out seeds."""
        return self.fewshot_train(kind, shots, seed), self.fewshot_test(kind, n_test)

    def fewshot_train(self, kind: str, shots: int, seed: int = 0) -> LabelledSet:
        """Exactly `shots` held-out images per class; another `seed` draws other images."""
        return self._sets.fewshot_train(kind, shots, seed)

    def fewshot_test(self, kind: str, n: int) -> LabelledSet:
        """The few-shot probes' test set: the same for every shot count and seed."""
        return self._sets.fewshot_test(kind, n)

    def retrieval(self, n_images: int, captions_per_image: int = 5) -> CaptionedSet:
        """Held-out scenes with several different clean paraphrases each."""
        return self._sets.retrieval(n_images, captions_per_image)

    # ------------------------------------------------------------------ looking at it

    def show(self, path: str, n: int = 16, what: str = "pairs") -> None:
        """PNG grid of samples with their captions ("pairs") or labels ("object" | "scene"); noisy captions in red."""
        if what == "pairs":
            pairs = self.pairs("train", n)
            images = pairs.images
            texts = [(c, "red" if k else "black") for c, k in zip(pairs.captions, pairs.noise)]
        else:
            check_kind(what)
            data = self.labelled(what, n)
            images = data.images
            texts = [(data.class_names[y], "black") for y in data.labels]
        write_grid(path, images, texts)
