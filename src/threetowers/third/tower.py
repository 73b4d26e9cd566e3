"""The frozen third tower h as a module: `ThirdTower` wraps what a source returns.

Every source (`third/sources.py`) returns a `FrozenImageModel`: a module mapping *normalised*
images at its input size to pooled features `[B, D]`, plus the preprocessing it expects and a
weights fingerprint. `ThirdTower` takes images in [0, 1] at whatever size the data has, applies h's
own resize and normalisation, and runs the module frozen, in eval mode, under `torch.no_grad()`.
`load_third_tower` is the one function that builds h from a config, on the device it will run on.

h's precision is part of its identity (`info()["precision"]`, so part of the cache's): bf16
autocast where h allows it (`model.third.precision`, auto = bf16 on CUDA, fp32 on the CPU), set by
h itself whatever autocast the caller runs under, so that an h run online and the same h building
a cache compute the same thing.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from ..core.sets import image_floats, resize_batch, to_device
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


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """`model.third.precision` on `device`: auto -> bf16 on CUDA (h's throughput), fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"model.third.precision={precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def preprocess(images: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Images (uint8 [B, H, W, 3] or float [B, 3, H, W] in [0, 1]) at any size -> h's input: resized
    to prep.input_size and normalised."""
    images = image_floats(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"third tower expects images [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    images = resize_batch(images.float(), prep.input_size, prep.interpolation)
    mean = torch.tensor(prep.mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


class ThirdTower(nn.Module):
    """A frozen image model: eval mode always, no gradients, never in the optimizer."""

    def __init__(self, source: FrozenImageModel, precision: str = "fp32"):
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"ThirdTower precision {precision!r}; expected fp32 or bf16 (resolve auto first)")
        self.precision = precision
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

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters(), torch.empty(0)).device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """h's pre-logits, float32 [B, D], of images on h's device (uint8 [B, H, W, 3] or float
        [B, 3, H, W] in [0, 1], any size). Its own precision, whatever autocast surrounds the call."""
        inputs = preprocess(images, self.preprocessing).contiguous(memory_format=torch.channels_last)
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            features = self.module(inputs)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"third tower {self.name} returned shape {tuple(features.shape)}; expected [B, {self.dim}] pre-logits"
            )
        return features.float()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """h's pre-logits of a CPU batch, back on the CPU: the batch goes to h's device (pinned,
        non-blocking on CUDA) as it is given, so uint8 batches ship a quarter of the bytes."""
        return self(to_device(images, self.device)).cpu()

    def info(self) -> dict:
        return {
            "name": self.name,
            "dim": self.dim,
            "preprocessing": self.preprocessing.to_dict(),
            "fingerprint": self.fingerprint,
            "precision": self.precision,
        }


def load_third_tower(cfg, device: torch.device | str = "cpu") -> ThirdTower:
    """Build h from a `ThirdTowerConfig` (source, name, path, input_size, precision) through the
    registry, on `device` (where it runs: the rank's GPU for a cache build or online h)."""
    frozen = get_source(cfg.source)(cfg)
    if cfg.input_size:
        p = frozen.preprocessing
        frozen.preprocessing = Preprocessing(int(cfg.input_size), p.mean, p.std, p.interpolation)
    return ThirdTower(frozen, resolve_precision(getattr(cfg, "precision", "auto"), device)).to(device)


def check_same_third(recorded: dict | None, found: dict | None, where: str) -> None:
    """Refuse an h whose weights differ from the one `where` was trained with (by fingerprint)."""
    if recorded and found and recorded["fingerprint"] != found["fingerprint"]:
        raise ValueError(f"{where} was trained with third tower {recorded['name']} (weights "
                         f"{recorded['fingerprint'][:12]}), not {found['name']} ({found['fingerprint'][:12]}); "
                         "give the same h settings (model.third, or model.thirds) it was trained with")


def per_third(value, count: int, what: str) -> list:
    """One entry per h: a list as given, None for each, or one value when there is one h (the
    convenience of single-h callers: third=h, third_info=info)."""
    if value is None:
        return [None] * count
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(f"{what}: {len(value)} given, but the model has {count} third tower(s)")
        return list(value)
    if count != 1:
        raise ValueError(f"{what}: one given, but the model has {count} third towers; give a list, one per h "
                         "in model.thirds order")
    return [value]
