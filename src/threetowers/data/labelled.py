"""Labelled image sets for supervised pretraining (`pretrain.dataset`): the world's object- or
scene-labelled sets, Fashion-MNIST, or a user's class folder."""

from __future__ import annotations

import numpy as np

from ..core.sets import LabelledSet
from ..schema import Config
from ..world import World
from ..world.sprites import FashionMNISTSource
from .folders import class_folder


def labelled_sets(cfg: Config) -> tuple[LabelledSet, LabelledSet]:
    """(train, held-out) sets of `pretrain.dataset`, with at most num_images / num_heldout images."""
    p = cfg.pretrain
    if p.dataset in ("world_object", "world_scene"):
        world = World(cfg.data.world)
        kind = p.dataset.split("_", 1)[1]
        return world.labelled(kind, p.num_images), world.labelled(kind, p.num_heldout, split="heldout")
    if p.dataset == "fashion_mnist":
        return _fashion_mnist(p.num_images, p.num_heldout)
    return _folder(p.dataset[len("folder:"):], cfg.model.image.image_size, p.num_images, p.num_heldout, cfg.train.seed)


def _fashion_mnist(n_train: int, n_heldout: int) -> tuple[LabelledSet, LabelledSet]:
    """The plain Fashion-MNIST classification task (train split / test split), grey images as RGB."""
    source = FashionMNISTSource()  # a clear message (how to install) when the files are missing

    def split(heldout: bool, n: int) -> LabelledSet:
        images, labels = source.arrays(heldout)
        return LabelledSet(np.repeat(images[:n, ..., None], 3, axis=-1), labels[:n], list(source.classes))

    return split(False, n_train), split(True, n_heldout)


def _folder(root: str, size: int, n_train: int, n_heldout: int, seed: int) -> tuple[LabelledSet, LabelledSet]:
    """A folder with one subfolder per class; a seeded split into held-out and train images."""
    data = class_folder(root, size, n_heldout + n_train, seed, f"pretrain.dataset=folder:{root}", min_classes=2)
    held = min(n_heldout, len(data.labels) // 2)  # a small folder: half of it held out
    return (LabelledSet(data.images[held:], data.labels[held:], data.class_names),
            LabelledSet(data.images[:held], data.labels[:held], data.class_names))
