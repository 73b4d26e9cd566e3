"""The frozen third tower h: any pretrained image model that yields pre-logits.

Every source (our own `pretrain` checkpoints, timm, torchvision, the packaged EfficientNet-Lite0,
a user's `package.module:callable`) returns a `FrozenImageModel`: the module mapping *normalised*
images at its input size to pooled features `[B, D]`, plus the preprocessing it expects and a
weights fingerprint. `ThirdTower` wraps it: it takes images in [0, 1] at whatever size the data
has, applies h's own resize and normalisation, and runs the module frozen, in eval mode, under
`torch.no_grad()`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from ..data.sets import resize_batch


@dataclass(frozen=True)
class Preprocessing:
    """What h expects: square input size and per-channel mean/std applied to [0, 1] images."""

    input_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(int(d["input_size"]), tuple(d["mean"]), tuple(d["std"]), d.get("interpolation", "bilinear"))


@dataclass
class FrozenImageModel:
    """What a third-tower source returns."""

    module: nn.Module  # normalised images [B, 3, S, S] -> pre-logits [B, dim]
    dim: int
    preprocessing: Preprocessing
    name: str  # e.g. "timm:resnet18", "efficientnet_lite0", "checkpoint:/path/to/run"
    fingerprint: str = ""  # sha256 of the weights; computed from the module when empty
    extra: dict = field(default_factory=dict)  # e.g. class names of a classifier


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


class _FeatureMemo:
    """h's outputs by input batch, kept while `reuse_third_features()` is active (LRU, bounded in bytes).

    h is frozen, so its output depends only on its weights and the input. Evaluating many models that
    share an h on the same sets (the demo's runs, a trainer's periodic evaluation) then runs h once per
    batch instead of once per model. Training batches are never looked up: the memo is off outside the
    context, and training with h online does not enter it.
    """

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self.active = 0
        self.entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = 0

    @staticmethod
    def key(tower: "ThirdTower", images: torch.Tensor) -> tuple:
        data = images.detach().cpu().contiguous()
        digest = hashlib.blake2b(data.reshape(-1).view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
        device = images.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return tower.fingerprint, tower.preprocessing, autocast, tuple(data.shape), str(data.dtype), digest

    def get(self, key: tuple) -> torch.Tensor | None:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        return None

    def put(self, key: tuple, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.max_bytes:
            return
        self.entries[key] = features
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()


_MEMO = _FeatureMemo()


@contextmanager
def reuse_third_features() -> Iterator[None]:
    """Within the block, a frozen h given a batch it has seen before returns the stored features."""
    _MEMO.active += 1
    try:
        yield
    finally:
        _MEMO.active -= 1


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

    def train(self, mode: bool = True) -> "ThirdTower":
        # h's batch norms and dropouts stay in inference mode even while the rest trains.
        super().train(mode)
        self.module.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        key = _MEMO.key(self, images) if _MEMO.active else None
        features = _MEMO.get(key) if key else None
        if features is not None:
            return features.to(images.device)
        features = self.module(preprocess(images, self.preprocessing))
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(
                f"third tower {self.name} returned shape {tuple(features.shape)}; expected [B, {self.dim}] pre-logits"
            )
        if key:
            _MEMO.put(key, features.cpu())
        return features

    def info(self) -> dict:
        return {
            "name": self.name,
            "dim": self.dim,
            "preprocessing": self.preprocessing.to_dict(),
            "fingerprint": self.fingerprint,
        }


# Sources register themselves here: name -> function(ThirdTowerConfig) -> FrozenImageModel.
SOURCES: dict[str, Callable] = {}


def register_source(name: str) -> Callable:
    def wrap(fn: Callable) -> Callable:
        SOURCES[name] = fn
        return fn

    return wrap


def load_third_tower(cfg) -> ThirdTower:
    """Build h from a `ThirdTowerConfig` (source, name, path, input_size)."""
    from . import sources  # noqa: F401  (registers the built-in sources)

    if cfg.source not in SOURCES:
        raise ValueError(f"model.third.source={cfg.source!r} is unknown; choose one of {', '.join(sorted(SOURCES))}")
    frozen = SOURCES[cfg.source](cfg)
    if cfg.input_size:
        p = frozen.preprocessing
        frozen.preprocessing = Preprocessing(int(cfg.input_size), p.mean, p.std, p.interpolation)
    return ThirdTower(frozen)
