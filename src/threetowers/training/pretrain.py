"""`threetowers pretrain`: supervised pretraining of the classifier that later serves as h.

The same loop as contrastive training (bf16, checkpoints, exact resume, logs, DDP); only the job
differs: a `Classifier` (model.image's architecture + a linear head) on a labelled set chosen by
`pretrain.dataset`. Held-out top-1 is evaluated every `eval.every` steps and at the end.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from ..config import resolve_config
from ..core.distributed import init_distributed, on_main, shutdown
from ..core.sets import LabelledSet, as_float, resize_batch
from ..data.labelled import labelled_sets
from ..data.loader import labelled_train_data
from ..schema import Config
from ..third.classifier import Classifier, load_classifier, save_classifier
from .checkpoint import check_writable
from .trainer import Job, TrainResult, run, runtime


def heldout_top1(model: nn.Module, heldout: LabelledSet, image_size: int, batch_size: int) -> float:
    """Top-1 accuracy of a model whose forward({"image", "label"}) reports "acc"."""
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
    cfg = resolve_config(cfg_or_preset, overrides)
    info = init_distributed(cfg.train.device, cfg.train.dist_timeout_minutes)
    try:
        with runtime(cfg, info):
            on_main(info, lambda: check_writable(cfg.train.output_dir))
            t0 = time.perf_counter()
            train_set, heldout = labelled_sets(cfg)
            size = cfg.model.image.image_size
            data = labelled_train_data(train_set, cfg, info.rank, info.world_size)
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
