"""Where h comes from: the contract every third-tower source fulfils, and the one registry of sources.

A source is a function `ThirdTowerConfig -> FrozenImageModel`. The built-in sources
(`third/sources.py`) register themselves when `threetowers.third` is imported, which happens
before anyone can read the registry (this module lives in that package), so the registry is never
seen half-filled. Config validation asks `source_names()`; a plugin registers with
`@register_source("name")` and is then accepted everywhere, validation included.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from torch import nn


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


Source = Callable[..., FrozenImageModel]  # (ThirdTowerConfig) -> FrozenImageModel
_SOURCES: dict[str, Source] = {}


def register_source(name: str) -> Callable[[Source], Source]:
    """Decorator: make `fn(cfg: ThirdTowerConfig) -> FrozenImageModel` the source `model.third.source=name`."""
    if not name or name == "none":
        raise ValueError(f"a third-tower source cannot be named {name!r}")

    def wrap(fn: Source) -> Source:
        _SOURCES[name] = fn
        return fn

    return wrap


def source_names() -> tuple[str, ...]:
    """The registered source names, sorted: what `model.third.source` may be (besides `none`)."""
    return tuple(sorted(_SOURCES))


def list_sources() -> dict[str, str]:
    """{name: the first line of its docstring}, for `--help` and users."""
    return {name: (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "" for name, fn in sorted(_SOURCES.items())}


def get_source(name: str) -> Source:
    if name not in _SOURCES:
        raise ValueError(f"model.third.source={name!r} is unknown; choose one of {', '.join(source_names())}")
    return _SOURCES[name]
