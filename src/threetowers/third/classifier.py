"""A supervised image classifier: an image tower plus one linear head.

`threetowers pretrain` trains it; saved with `save_classifier`, it loads back as a frozen third
tower h (source `checkpoint`) whose embedding is the tower's pooled output, exactly what the head
consumes (the pre-logits).
"""

from __future__ import annotations

from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.sets import image_floats, resize_batch
from ..core.formats import CLASSIFIER_FORMAT, load_weights, read_meta, save_safetensors_atomic, saved_dir, write_meta
from ..schema import ImageTowerConfig, fill_added_fields
from ..towers.build import build_image_tower
from .registry import Preprocessing


class Classifier(nn.Module):
    """Image tower f (images in [0, 1] -> [B, dim]) followed by `nn.Linear(dim, num_classes)`."""

    def __init__(self, image: ImageTowerConfig, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got num_classes={num_classes}")
        self.image_cfg = image
        self.num_classes = num_classes
        self.tower = build_image_tower(image)
        self.head = nn.Linear(self.tower.dim, num_classes)

    @property
    def dim(self) -> int:
        return self.tower.dim

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-logits [B, dim]: the tower's pooled features, the head's exact input."""
        return self.tower(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))

    def forward(self, batch: dict) -> dict:
        """batch: image (uint8 [B, H, W, 3] as stored, or float [B, 3, H, W] in [0, 1], any size),
        label Long [B] -> loss (fp32 cross-entropy), top-1 acc."""
        images = resize_batch(image_floats(batch["image"]), self.image_cfg.image_size)  # on the batch's device
        logits = self.logits(images).float()  # CE in fp32 even under bf16 autocast
        labels = batch["label"]
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=-1) == labels).float().mean().detach()
        return {"loss": loss, "acc": acc}

    def preprocessing(self) -> Preprocessing:
        """What the tower needs from a [0, 1] image: its training size and nothing else.

        Our towers (ViT, TimmTower) normalise their own input, so the recorded mean/std are the
        identity; recording the tower's own mean/std here would normalise twice."""
        return Preprocessing(int(self.image_cfg.image_size), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "bilinear")


def save_classifier(model: Classifier, directory: str | Path, class_names: list[str],
                    extra: dict | None = None) -> Path:
    """model.safetensors + model.json in `directory`, each written atomically (json last)."""
    if len(class_names) != model.num_classes:
        raise ValueError(f"{len(class_names)} class names given for a classifier with {model.num_classes} classes")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_safetensors_atomic(state, directory / "model.safetensors")
    write_meta(directory / "model.json", CLASSIFIER_FORMAT, {
        "image": asdict(model.image_cfg),
        "num_classes": model.num_classes,
        "class_names": list(class_names),
        "preprocessing": model.preprocessing().to_dict(),
        **(extra or {}),
    })
    return directory


def read_classifier_meta(directory: str | Path) -> dict:
    """model.json of a classifier checkpoint; anything else is refused with what it is instead."""
    return read_meta(saved_dir(directory) / "model.json", CLASSIFIER_FORMAT,
                     "a classifier is written by `threetowers pretrain`")


def load_classifier(directory: str | Path) -> tuple[Classifier, dict]:
    """Rebuild a saved classifier (eval mode) and return it with its model.json."""
    meta = read_classifier_meta(directory)
    directory = saved_dir(directory)
    known = {f.name for f in fields(ImageTowerConfig)}
    unknown = sorted(set(meta["image"]) - known)
    if unknown:
        raise ValueError(f"{directory}/model.json: unknown image tower fields {unknown}")
    # The tower's original init weights (model.image.weights) are superseded by the checkpoint.
    image = replace(ImageTowerConfig(**fill_added_fields(meta["image"], ("model", "image"))), weights="")
    model = Classifier(image, int(meta["num_classes"]))
    load_weights(model, directory / "model.safetensors", what=f"classifier in {directory}")
    return model.eval(), meta
