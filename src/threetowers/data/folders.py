"""A user's labelled images: a folder with one subfolder per class, read into a `LabelledSet`.

Used by `pretrain.dataset=folder:PATH` (a classifier to serve as h) and by the eval task
`zeroshot:PATH`. Images are decoded like training images (`transforms.decode_rgb`, shorter side
resized, center crop), a seeded subset is taken when there are more than asked for, and
unreadable files are skipped and counted, never fatal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from ..core.sets import LabelledSet
from .transforms import decode_rgb, image_transform


def class_folder(root: str | Path, image_size: int, max_images: int, seed: int, what: str,
                 min_classes: int = 1) -> LabelledSet:
    """Up to `max_images` images of `root/<class>/*`, labels = class indices in sorted folder order.

    `what` names the setting in error messages (e.g. "pretrain.dataset=folder:/data/pets"). The
    chosen images keep their seeded-permutation order, so the first k are a random k-subset.
    """
    path = Path(root)
    if not path.is_dir():
        raise ValueError(f"{what}: {root} is not a folder (expected one subfolder of images per class)")
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if len(classes) < min_classes:
        raise ValueError(f"{what}: needs at least {min_classes} class subfolders in {root}, found {classes}")
    try:
        samples = make_dataset(str(path), {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:  # torchvision's message names the empty class folder
        raise ValueError(f"{what}: {err}") from None
    order = np.random.default_rng(seed).permutation(len(samples))[:max_images]
    to_tensor = image_transform(image_size)
    images, labels, bad = [], [], []
    for i in order:
        file, label = samples[i]
        try:
            images.append(to_tensor(decode_rgb(file)))
        except Exception as err:  # any undecodable file: skipped and counted, as in training data
            bad.append(f"{file} ({type(err).__name__})")
            continue
        labels.append(label)
    if bad:
        print(f"{what}: skipped {len(bad)} unreadable images, e.g. {bad[0]}", flush=True)
    if not images:
        raise ValueError(f"{what}: none of the {len(order)} images in {root} could be read")
    arr = (torch.stack(images).permute(0, 2, 3, 1) * 255).round().byte().numpy()
    return LabelledSet(arr, np.asarray(labels, np.int64), classes)
