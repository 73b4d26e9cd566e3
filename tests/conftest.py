"""Shared test helpers: tiny configs and a tiny frozen third tower, so every test runs in seconds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread per test worker: `pytest -n 2` on 2 cores would otherwise oversubscribe them.
torch.set_num_threads(1)

from threetowers.config import load_config  # noqa: E402
from threetowers.third import FrozenImageModel, Preprocessing, ThirdTower  # noqa: E402
from threetowers.towers.vit import VisionTransformer  # noqa: E402

TINY = [
    "model.image.image_size=16", "model.image.patch_size=4", "model.image.width=32", "model.image.depth=1",
    "model.image.heads=2", "model.text.width=32", "model.text.depth=1", "model.text.heads=2",
    "model.text.vocab_size=64", "model.text.context_length=12", "model.embed_dim=16",
]


def tiny_config(method: str = "clip", *overrides: str):
    extra = [] if method == "clip" else ["model.third.source=checkpoint"]
    return load_config(None, TINY + [f"model.method={method}"] + extra + list(overrides))


def fake_third(seed: int = 123, dim: int = 24) -> ThirdTower:
    """A small randomly initialised frozen image model standing in for a pretrained h."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = VisionTransformer(image_size=16, patch_size=4, width=dim, depth=1, heads=2)
    return ThirdTower(FrozenImageModel(module, dim, Preprocessing(16), "fake-h"))


@pytest.fixture
def third() -> ThirdTower:
    return fake_third()
