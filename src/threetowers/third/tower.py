"""The frozen third tower h as a module: `ThirdTower` wraps what a source returns.

Every source (`third/sources.py`) returns a `FrozenImageModel`: a module mapping *normalised*
images at its input size to pooled features `[B, D]`, plus the preprocessing it expects and a
weights fingerprint. `ThirdTower` takes images in [0, 1] at whatever size the data has, applies h's
own resize and normalisation, and runs the module frozen, in eval mode, under `torch.no_grad()`.
`load_third_tower` is the one function that builds h from a config.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..core.sets import resize_batch
from .registry import FrozenImageModel, Preprocessing, get_source


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over parameter and buffer names, shapes and bytes: identifies h for the cache."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # reshape: 0-d tensors too
    return digest.hexdigest()


def preprocess(images: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """[0, 1] images at any size -> h's input: resized to prep.input_size and normalised."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"third tower expects images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    images = resize_batch(images.float(), prep.input_size, prep.interpolation)
    mean = torch.tensor(prep.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


class ThirdTower(nn.Module):
    """A frozen image model: eval mode always, no gradients, never in the optimizer."""

    def __init__(self, source: FrozenImageModel):
        super().__init__()
        self.module = source.module
        self.dim = source.dim
        self.preprocessing = source.preprocessing
        self.name = source.name
        self.fingerprint = source.fingerprint or weights_fingerprint(source.module)
        self.extra = source.extra
        self.module.requires_grad_(False)
        self.module.eval()
        # Channels-last after the fingerprint (which reads values, not layout): convolutional h's
        # run a third faster that way on the CPU (EfficientNet-Lite0 at 96 px: 1.75 -> 1.12 s per 256 images).
        self.module.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> "ThirdTower":
        # h's batch norms and dropouts stay in inference mode even while the rest trains.
        super().train(mode)
        self.module.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.module(preprocess(images, self.preprocessing).contiguous(memory_format=torch.channels_last))
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"third tower {self.name} returned shape {tuple(features.shape)}; expected [B, {self.dim}] pre-logits"
            )
        return features

    def info(self) -> dict:
        return {
            "name": self.name,
            "dim": self.dim,
            "preprocessing": self.preprocessing.to_dict(),
            "fingerprint": self.fingerprint,
        }


def load_third_tower(cfg) -> ThirdTower:
    """Build h from a `ThirdTowerConfig` (source, name, path, input_size) through the registry."""
    frozen = get_source(cfg.source)(cfg)
    if cfg.input_size:
        p = frozen.preprocessing
        frozen.preprocessing = Preprocessing(int(cfg.input_size), p.mean, p.std, p.interpolation)
    return ThirdTower(frozen)


def check_same_third(recorded: dict | None, found: dict | None, where: str) -> None:
    """Refuse an h whose weights differ from the one `where` was trained with (by fingerprint)."""
    if recorded and found and recorded["fingerprint"] != found["fingerprint"]:
        raise ValueError(f"{where} was trained with third tower {recorded['name']} (weights "
                         f"{recorded['fingerprint'][:12]}), not {found['name']} ({found['fingerprint'][:12]}); "
                         "give the same model.third settings it was trained with")
