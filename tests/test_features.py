"""h's embedding cache: build, reuse, resume after an interruption, refusal on any mismatch."""

import json

import numpy as np
import pytest
import torch

from conftest import fake_third
from threetowers.third.store import CacheMismatch, FeatureCache, build_feature_cache, cache_dir_for

N = 40


def _images(seed=0):
    data = torch.rand(N, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    return lambda start, stop: data[start:stop]


def _build(directory, third, images, keys=None, info=None):
    keys = keys or [f"k{i}" for i in range(N)]
    return build_feature_cache(directory, third, info or third.info(), "ds-1", keys, images, batch_size=8,
                               shard_rows=16, progress=False)


def test_cache_holds_h_embeddings_by_row_and_key(tmp_path):
    third, images = fake_third(), _images()
    cache = _build(tmp_path / "c", third, images)
    expected = third(images(0, N))
    assert torch.allclose(cache.rows(np.arange(N)), expected, atol=2e-2)  # stored as float16
    assert torch.equal(cache.by_keys(["k3", "k0"]), cache.rows(np.array([3, 0])))
    with pytest.raises(CacheMismatch, match="no entry for keys"):
        cache.by_keys(["nope"])
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["third"]["fingerprint"] == third.fingerprint and manifest["complete"]


def test_reuse_does_not_run_h_again(tmp_path):
    third, images = fake_third(), _images()
    _build(tmp_path / "c", third, images)
    calls = []

    def counting(x):
        calls.append(len(x))
        return third(x)

    cache = _build(tmp_path / "c", counting, images, info=third.info())
    assert calls == [] and len(cache) == N


def test_an_interrupted_build_resumes_where_it_stopped(tmp_path):
    third, images = fake_third(), _images()
    calls = []

    def dies_after_first_shard(x):
        calls.append(len(x))
        if sum(calls) > 16:
            raise KeyboardInterrupt
        return third(x)

    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "c", dies_after_first_shard, images, info=third.info())
    assert (tmp_path / "c" / "shard_00000.npy").exists() and not (tmp_path / "c" / "shard_00001.npy").exists()
    with pytest.raises(CacheMismatch, match="incomplete"):
        FeatureCache(tmp_path / "c")
    calls.clear()

    def counting(x):
        calls.append(len(x))
        return third(x)

    cache = _build(tmp_path / "c", counting, images, info=third.info())
    assert sum(calls) == N - 16  # the first shard was kept
    assert torch.allclose(cache.rows(np.arange(N)), third(images(0, N)), atol=2e-2)


def test_a_mismatching_cache_is_refused(tmp_path):
    third, images = fake_third(), _images()
    _build(tmp_path / "c", third, images)
    other = fake_third(seed=7)
    with pytest.raises(CacheMismatch, match="fingerprint"):
        _build(tmp_path / "c", other, images)
    with pytest.raises(CacheMismatch, match="rows"):
        _build(tmp_path / "c", third, images, keys=[f"k{i}" for i in range(N - 1)])
    with pytest.raises(CacheMismatch, match="dataset"):
        build_feature_cache(tmp_path / "c", third, third.info(), "ds-2", [f"k{i}" for i in range(N)], images,
                            progress=False)


def test_cache_dir_separates_third_towers(tmp_path):
    a, b = fake_third().info(), fake_third(seed=7).info()
    assert cache_dir_for(tmp_path, a, "ds") != cache_dir_for(tmp_path, b, "ds")


def test_world_training_batches_carry_cached_h_rows_and_lit_skips_the_pixels(tmp_path):
    from conftest import tiny_config
    from threetowers.data.loader import build_train_data

    third = fake_third()
    common = ["data.world.num_pairs=48", "data.world.image_size=24", "train.batch_size=8",
              f"data.world.cache_dir={tmp_path / 'world'}", f"data.cache_dir={tmp_path / 'cache'}",
              f"train.output_dir={tmp_path / 'run'}", "model.text.vocab_size=300"]
    three = build_train_data(tiny_config("3t", *common), third=third).batch(3)
    lit = build_train_data(tiny_config("lit", *common), third=third).batch(3)  # reuses the cache
    # The pixels as stored (uint8, the world's 24 px; the model converts and resizes them on its device);
    # LiT on cached h needs none.
    assert three["image"].shape == (8, 24, 24, 3) and three["image"].dtype == torch.uint8 and "image" not in lit
    assert torch.equal(lit["third"], three["third"]) and lit["keys"] == three["keys"]
    assert torch.allclose(three["third"], third(three["image"]), atol=2e-2)  # the rows are h of this batch
