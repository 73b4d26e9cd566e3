"""What h sees is fixed by h alone: its embeddings (cached or online) are h of each image decoded at
h's own input size, whatever f's size; everything that decides them is in the cache's identity."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, fake_third
from test_indexed_shards import shard_config
from test_pairs import encode, write_tar
from threetowers.config import load_config
from threetowers.data.loader import build_train_data
from threetowers.data.samples import BadSampleCounter, SampleDecoder
from threetowers.data.transforms import DEFAULT_MAX_PIXELS
from threetowers.third import ThirdTower
from threetowers.third.store import build_feature_cache


def noise(seed: int, size=(40, 30)) -> Image.Image:
    """Structured pixels: resizing at different sizes gives different images (solid colours would not)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def noise_shards(root, sizes=(10, 10, 12)):
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, n in enumerate(sizes):
        members = []
        for i in range(n):
            key = f"s{s}-{i:04d}"
            members += [(f"{key}.png", encode(noise(100 * s + i), "PNG")), (f"{key}.txt", f"caption {key}".encode())]
        paths.append(write_tar(root / f"shard-{s:03d}.tar", members))
    return paths


def decoded_for_h(image: bytes, size: int = 16) -> torch.Tensor:
    """The definition: the sample decoded at h's input size, no augmentation."""
    return SampleDecoder(size, False, BadSampleCounter(1.0), DEFAULT_MAX_PIXELS).decode(image, "x")[0]


def counting(h: ThirdTower) -> list[int]:
    calls: list[int] = []
    original = h.forward
    h.forward = lambda images: calls.append(len(images)) or original(images)
    return calls


def test_cached_embeddings_on_shards_are_h_of_the_image_at_hs_size_whatever_fs(tmp_path):
    shards = noise_shards(tmp_path / "d")
    h = fake_third()  # input size 16
    data = build_train_data(shard_config(tmp_path, shards, "3t", "model.image.image_size=32"), third=h)
    for row in range(0, len(data), 5):
        image, _, _, _ = data.rows.read(row)
        expected = h(decoded_for_h(image)[None])[0]
        assert torch.allclose(data.rows.third_embedding(row), expected.half().float())
    # f's size is not part of h's input: another f reuses the cache, h does not run again
    calls = counting(h)
    build_train_data(shard_config(tmp_path, shards, "3t", "model.image.image_size=16"), third=h)
    assert calls == []


def test_online_h_on_shards_sees_the_pixels_the_cache_holds(tmp_path):
    shards = noise_shards(tmp_path / "d")
    h = fake_third()
    cached = build_train_data(shard_config(tmp_path, shards, "3t", "model.image.image_size=32"), third=h)
    online = build_train_data(shard_config(tmp_path, shards, "3t", "model.image.image_size=32",
                                           "data.third_embeddings=online"), third=h)
    a, b = next(iter(cached.batches(3))), next(iter(online.batches(3)))
    assert a["keys"] == b["keys"] and "third" not in b
    assert b["image"].shape[-1] == 32 and b["third_image"].shape[-1] == 16
    assert torch.allclose(h(b["third_image"]).half().float(), a["third"])


def test_online_h_on_the_world_sees_the_pixels_the_cache_holds(tmp_path):
    base = TINY + ["model.method=3t", "model.third.source=checkpoint", "data.world.num_pairs=64",
                   "data.world.image_size=24", "train.batch_size=8", f"data.cache_dir={tmp_path / 'cache'}",
                   f"data.world.cache_dir={tmp_path / 'world'}", f"train.output_dir={tmp_path / 'run'}",
                   "model.image.image_size=32", "model.text.vocab_size=300"]
    h = fake_third()
    cached = build_train_data(load_config(None, base), third=h)
    online = build_train_data(load_config(None, base + ["data.third_embeddings=online"]), third=h)
    a, b = next(iter(cached.batches(2))), next(iter(online.batches(2)))
    assert a["keys"] == b["keys"]
    assert b["image"].dtype == torch.uint8 and b["image"].shape[1:] == (24, 24, 3)  # as stored; the model resizes
    assert torch.allclose(h(b["image"]).half().float(), a["third"])


def write_csv(tmp_path, n=20):
    folder = tmp_path / "images"
    folder.mkdir()
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i in range(n):
            noise(i).save(folder / f"{i}.png")
            writer.writerow([f"images/{i}.png", f"picture number {i}"])
    return tmp_path / "pairs.csv"


def test_csv_decodes_for_h_at_hs_own_size(tmp_path):
    path = write_csv(tmp_path)
    base = TINY + ["model.method=3t", "model.third.source=checkpoint", "data.source=csv", f"data.path={path}",
                   "train.batch_size=8", f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'run'}",
                   "model.image.image_size=32", "model.text.vocab_size=300"]
    h = fake_third()
    cached = build_train_data(load_config(None, base), third=h)
    online = build_train_data(load_config(None, base + ["data.third_embeddings=online"]), third=h)
    a, b = next(iter(cached.batches(1))), next(iter(online.batches(1)))
    assert a["keys"] == b["keys"] and b["image"].shape[1:] == (32, 32, 3) and b["third_image"].shape[1:] == (16, 16, 3)
    for key, row in zip(b["keys"][:3], a["third"]):
        expected = h(decoded_for_h((tmp_path / key).read_bytes())[None])[0]
        assert torch.allclose(row, expected, atol=2e-3)  # float16 rounding, and h over a batch of 8 against 1
    assert torch.allclose(h(b["third_image"]).half().float(), a["third"])


def test_a_change_of_hs_precision_builds_the_cache_again(tmp_path):
    shards = noise_shards(tmp_path / "d", sizes=(8, 8))
    fp32 = fake_third()
    cfg = shard_config(tmp_path, shards, "3t")
    first = build_train_data(cfg, third=fp32)
    bf16 = fake_third()
    bf16.precision = "bf16"
    calls = counting(bf16)
    second = build_train_data(cfg, third=bf16)
    assert sum(calls) == 16  # every sample again, into a cache of its own
    assert first.shards.embedding_dir != second.shards.embedding_dir
    assert not torch.equal(first.rows.third_embedding(0), second.rows.third_embedding(0))
    calls.clear()
    build_train_data(cfg, third=fp32)  # and the first is still there, untouched
    assert calls == []


def test_an_h_run_online_keeps_its_precision_under_the_trainers_autocast():
    h = fake_third()
    images = torch.rand(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = h(images)
    assert inside.dtype == torch.float32 and torch.equal(inside, h(images))  # fp32 h: autocast switched off


@pytest.mark.parametrize("value", [float("nan"), 1e5])
def test_embeddings_float16_cannot_hold_stop_the_cache_build(tmp_path, value):
    h = fake_third()
    broken = lambda images: torch.full((len(images), h.dim), value)  # noqa: E731
    keys = [f"k{i}" for i in range(6)]
    with pytest.raises(ValueError, match="float16 cannot store"):
        build_feature_cache(tmp_path / "c", broken, h.info(), "ds", keys, lambda s, e: torch.rand(e - s, 3, 16, 16),
                            batch_size=4, progress=False)
    assert not list((tmp_path / "c").glob("shard_*.npy"))  # nothing half-written
