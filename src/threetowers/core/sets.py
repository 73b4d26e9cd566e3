"""Plain containers for evaluation and labelled sets, shared by the world, folders and the eval suite.

Images are uint8 arrays `[N, H, W, 3]` (RGB); `as_float` turns a slice into the model's input
convention: float tensors `[B, 3, H, W]` in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


def as_float(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [0, 1]. A read-only array (a memory-mapped
    file) is copied first: torch tensors must not alias memory they cannot write."""
    array = np.ascontiguousarray(images) if images.flags.writeable else np.array(images)
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div_(255.0)


def to_device(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU batch onto `device`; on CUDA from pinned memory without blocking, so that the copy
    overlaps the work already queued on the GPU."""
    device = torch.device(device)
    if images.device == device:
        return images
    if device.type == "cuda" and images.device.type == "cpu":
        return images.pin_memory().to(device, non_blocking=True)
    return images.to(device)


def image_floats(images: torch.Tensor) -> torch.Tensor:
    """A batch as the towers take it: uint8 [B, H, W, 3] (as stored: a quarter of the bytes to ship)
    or float [B, 3, H, W] in [0, 1] -> float [B, 3, H, W] in [0, 1], on the batch's device."""
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be [B, H, W, 3], got shape {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float().div_(255.0)
    return images


def resize_batch(images: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Float images [B, 3, H, W] -> [B, 3, size, size] (antialiased when bilinear or bicubic); a
    no-op at that size."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    smooth = mode in ("bilinear", "bicubic")
    return F.interpolate(images, size=(size, size), mode=mode, align_corners=False if smooth else None, antialias=smooth)


@dataclass
class LabelledSet:
    """Images with one class label each (pretraining, zero-shot, few-shot)."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int64 [N]
    class_names: list[str]
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])  # zero-shot prompts, "{}" = name


@dataclass
class CaptionedSet:
    """Images with several captions each (retrieval). Caption j belongs to image image_of_text[j]."""

    images: np.ndarray  # uint8 [N, H, W, 3]
    captions: list[str]
    image_of_text: np.ndarray  # int64 [M]
