"""`threetowers pretrain`: supervised pretraining of the classifier that later serves as h.

The same loop as contrastive training (bf16, checkpoints, exact resume, logs, DDP); only the job
differs: a `Classifier` (model.image's architecture + a linear head) on a labelled set chosen by
`pretrain.dataset`. Held-out top-1 is evaluated every `eval.every` steps and at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..data.sets import LabelledSet, as_float
from .checkpoint import check_writable
from .distributed import init_distributed, shutdown
from .loop import Job, TrainResult, on_main, resolve_config, run, runtime


def labelled_sets(cfg: Config) -> tuple[LabelledSet, LabelledSet]:
    """(train, held-out) sets of `pretrain.dataset`, with at most num_images / num_heldout images."""
    p = cfg.pretrain
    if p.dataset in ("world_object", "world_scene"):
        from ..data.world import World

        world = World(cfg.data.world)
        kind = p.dataset.split("_", 1)[1]
        return world.labelled(kind, p.num_images), world.labelled(kind, p.num_heldout, split="heldout")
    if p.dataset == "fashion_mnist":
        return _fashion_mnist(p.num_images, p.num_heldout)
    return _folder(p.dataset[len("folder:"):], cfg.model.image.image_size, p.num_images, p.num_heldout, cfg.train.seed)


def _fashion_mnist(n_train: int, n_heldout: int) -> tuple[LabelledSet, LabelledSet]:
    """The plain Fashion-MNIST classification task (train split / test split), grey images as RGB."""
    from ..data.sprites import FashionMNISTSource

    source = FashionMNISTSource()  # a clear message (how to install) when the files are missing

    def split(heldout: bool, n: int) -> LabelledSet:
        images, labels = source.arrays(heldout)
        return LabelledSet(np.repeat(images[:n, ..., None], 3, axis=-1), labels[:n], list(source.classes))

    return split(False, n_train), split(True, n_heldout)


def _folder(root: str, size: int, n_train: int, n_heldout: int, seed: int) -> tuple[LabelledSet, LabelledSet]:
    """A folder with one subfolder per class; a seeded split into held-out and train images."""
    from ..data.folders import class_folder

    data = class_folder(root, size, n_heldout + n_train, seed, f"pretrain.dataset=folder:{root}", min_classes=2)
    held = min(n_heldout, len(data.labels) // 2)  # a small folder: half of it held out
    return (LabelledSet(data.images[held:], data.labels[held:], data.class_names),
            LabelledSet(data.images[:held], data.labels[:held], data.class_names))


def heldout_top1(model: nn.Module, heldout: LabelledSet, image_size: int, batch_size: int) -> float:
    """Top-1 accuracy of a model whose forward({"image", "label"}) reports "acc"."""
    from ..data.loader import resize_batch

    device = next(model.parameters()).device
    correct = 0.0
    for start in range(0, len(heldout.labels), batch_size):
        images = resize_batch(as_float(heldout.images[start:start + batch_size]), image_size).to(device)
        labels = torch.as_tensor(heldout.labels[start:start + batch_size], device=device)
        correct += float(model({"image": images, "label": labels})["acc"]) * len(labels)
    return correct / len(heldout.labels)


def pretrain(cfg_or_preset: Config | str | Path, overrides: list[str] | dict | None = None) -> TrainResult:
    """Train a classifier as configured; result["heldout_top1"] is its held-out top-1 accuracy.
    The model is saved to <output_dir>/model and loads as h with model.third.source=checkpoint."""
    from ..data.loader import labelled_train_data
    from ..models.classifier import Classifier, load_classifier, save_classifier

    cfg = resolve_config(cfg_or_preset, overrides)
    info = init_distributed(cfg.train.device)
    try:
        with runtime(cfg, info):
            on_main(info, lambda: check_writable(cfg.train.output_dir))
            t0 = time.perf_counter()
            train_set, heldout = labelled_sets(cfg)
            size = cfg.model.image.image_size
            data = labelled_train_data(train_set, cfg, info.rank, info.world_size, image_size=size)
            data_seconds = time.perf_counter() - t0
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed)
                model = Classifier(cfg.model.image, len(train_set.class_names))
            names = list(train_set.class_names)

            def load_weights(m: nn.Module, directory: Path) -> None:
                m.load_state_dict(load_classifier(directory)[0].state_dict())

            def evaluate(m: nn.Module, step: int) -> dict:
                return {"heldout_top1": heldout_top1(m, heldout, size, cfg.eval.batch_size)}

            job = Job("pretrain", model, data, lambda m, d: save_classifier(m, d, names), load_weights)
            result = run(cfg, job, info, evaluate)
        result.data_seconds = data_seconds
        if info.is_main:
            print(f"held-out top-1: {100 * result['heldout_top1']:.1f}% ({len(heldout.labels)} images, "
                  f"{len(names)} classes, chance {100 / len(names):.1f}%)", flush=True)
        return result
    finally:
        shutdown(info)
