"""The embedded benchmark world: determinism, captions that match the pictures, disjoint eval sets, cache."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from threetowers.config import WorldConfig
from threetowers.world import World
from threetowers.world import captions as world_mod
from threetowers.world.cache import world_hash
from threetowers.world.captions import COLOUR_WORDS, GENERIC
from threetowers.world.sprites import FASHION_DIR, FashionMNISTSource


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(seed=0, caption_noise=0.0), progress=False)


def _mentions(caption: str, words: list[str]) -> bool:
    return any(re.search(rf"\b{re.escape(w)}\b", caption) for w in words)


def _image_hashes(images: np.ndarray) -> set[bytes]:
    return {bytes(img.tobytes()) for img in images}


def test_classes_and_shapes(world):
    assert len(world.object_classes) >= 24 and len(set(world.object_classes)) == len(world.object_classes)
    assert len(world.scene_classes) >= 8 and len(world.colours) >= 8
    pairs = world.pairs("train", 12)
    assert pairs.images.shape == (12, 48, 48, 3) and pairs.images.dtype == np.uint8
    assert pairs.scene.dtype == np.int64 and pairs.scene.shape == (12,)
    assert len(pairs.captions) == len(pairs.keys) == len(pairs.objects) == len(pairs) == 12
    assert pairs.keys[3] == f"world-{world_hash(world.cfg)}-train-0000003"
    assert all(1 <= len(objs) <= 3 for objs in pairs.objects)
    assert all(0 <= s < len(world.scene_classes) for s in pairs.scene)
    # pictures are not blank: several distinct colours in each
    assert all(len(np.unique(img.reshape(-1, 3), axis=0)) > 5 for img in pairs.images)
    big = World(replace(world.cfg, image_size=64), progress=False).pairs("train", 3)
    assert big.images.shape == (3, 64, 64, 3)


def test_deterministic_and_independent_of_n(world):
    a = world.pairs("train", 10)
    b = World(WorldConfig(seed=0, caption_noise=0.0), progress=False).pairs("train", 6)
    assert np.array_equal(a.images[:6], b.images) and a.captions[:6] == b.captions and a.keys[:6] == b.keys
    image, record = world.sample("train", 7)  # one index alone == the same index in a batch
    assert np.array_equal(image, a.images[7]) and record["captions"][0] == a.captions[7]
    assert record["objects"] == a.objects[7]
    other = World(WorldConfig(seed=1, caption_noise=0.0), progress=False).pairs("train", 10)
    assert not np.array_equal(other.images, a.images) and other.captions != a.captions
    assert other.keys != a.keys


def test_clean_captions_describe_the_picture(world):
    for scene, phrases in world_mod.SCENE_PHRASES.items():
        assert all(_mentions(p, world.scene_words(scene)) for p in phrases), scene
    pairs = world.pairs("train", 300)
    assert pairs.noise == [""] * 300
    for caption, objs, scene in zip(pairs.captions, pairs.objects, pairs.scene):
        assert caption == caption.strip() and caption.endswith(".")
        assert _mentions(caption, world.scene_words(world.scene_classes[scene])), caption
        for o in objs:
            assert _mentions(caption, world.object_words(o["name"])), (caption, o)
            assert _mentions(caption, COLOUR_WORDS[o["colour"]]), (caption, o)
    counts = [c for c, objs in zip(pairs.captions, pairs.objects) if len(objs) == 3]
    assert any(_mentions(c, ["three"]) for c in counts)  # captions carry counts...
    relations = ["left of", "right of", "above", "below", "over", "under", "beneath"]
    assert sum(_mentions(c, relations) for c in pairs.captions) > 30  # ...and spatial relations
    assert len(set(pairs.captions)) == 300


def test_relations_follow_positions(world):
    rng = np.random.default_rng(0)
    a, b = {"x": 2, "y": 20, "box": 16}, {"x": 30, "y": 22, "box": 16}
    assert "left" in world._relation(rng, a, b) and "right" in world._relation(rng, b, a)
    top, bottom = {"x": 15, "y": 0, "box": 16}, {"x": 18, "y": 30, "box": 16}
    assert world._relation(rng, top, bottom) in ("above", "over")
    assert world._relation(rng, bottom, top) in ("below", "under", "beneath")


def test_caption_noise_rate_and_kinds():
    w = World(WorldConfig(seed=3, caption_noise=0.3), progress=False)
    pairs = w.pairs("train", 1500)
    noisy = [k != "" for k in pairs.noise]
    assert 0.26 < np.mean(noisy) < 0.34
    kinds = {k for k in pairs.noise if k}
    assert kinds == set(world_mod.NOISE_KINDS)
    generic = {g.split("{")[0] for g in GENERIC}
    for caption, kind, objs, scene in zip(pairs.captions, pairs.noise, pairs.objects, pairs.scene):
        if kind == "wrong_background":
            assert not _mentions(caption, w.scene_words(w.scene_classes[scene])), caption
        elif kind == "generic":
            assert any(caption.startswith(g) for g in generic), caption
        elif kind == "missing_object":
            assert len(objs) >= 2
    assert World(WorldConfig(caption_noise=0.0), progress=False).pairs("train", 200).noise == [""] * 200


def test_eval_sets_are_disjoint_from_training(world):
    train = world.pairs("train", 200)
    val = world.pairs("val", 50)
    assert not set(train.keys) & set(val.keys)
    seen = _image_hashes(train.images)
    for images in (val.images, world.retrieval(40).images, world.zeroshot("object", 60).images,
                   world.zeroshot("scene", 60).images, world.fewshot("scene", 2, 20)[1].images,
                   world.labelled("object", 60).images):
        assert not _image_hashes(images) & seen
    assert not _image_hashes(world.zeroshot("object", 60).images) & _image_hashes(world.labelled("object", 60).images)


def test_labelled_zeroshot_and_fewshot_sets(world):
    n_obj, n_scene = len(world.object_classes), len(world.scene_classes)
    objects = world.labelled("object", 2 * n_obj)
    assert objects.images.shape == (2 * n_obj, 48, 48, 3) and objects.labels.dtype == np.int64
    assert np.array_equal(np.bincount(objects.labels), np.full(n_obj, 2))
    assert objects.class_names == world.object_classes
    scenes = world.labelled("scene", 3 * n_scene, split="val")
    assert np.array_equal(np.bincount(scenes.labels), np.full(n_scene, 3))
    assert scenes.class_names == world.scene_classes
    zs = world.zeroshot("scene", 22)
    assert zs.class_names == world.scene_classes and len(zs.templates) >= 3
    assert all("{}" in t for t in zs.templates) and "a picture with a {} background." in zs.templates
    zo = world.zeroshot("object", 28)
    assert all("{}" in t for t in zo.templates) and len(zo.templates) >= 3
    train, test = world.fewshot("object", 3, 40, seed=1)
    assert np.array_equal(np.bincount(train.labels, minlength=n_obj), np.full(n_obj, 3))
    assert len(test.labels) == 40
    other, _ = world.fewshot("object", 3, 40, seed=2)
    assert not np.array_equal(other.images, train.images)
    with pytest.raises(ValueError, match="kind='colour'"):
        world.labelled("colour", 4)


def test_retrieval_has_distinct_clean_paraphrases(world):
    ret = world.retrieval(12, captions_per_image=5)
    assert ret.images.shape == (12, 48, 48, 3) and len(ret.captions) == 60
    assert np.array_equal(ret.image_of_text, np.repeat(np.arange(12), 5))
    for i in range(12):
        assert len(set(ret.captions[5 * i : 5 * i + 5])) == 5


def test_cache_is_reused_and_rebuilt_when_broken(tmp_path, monkeypatch):
    cfg = WorldConfig(seed=5, cache_dir=str(tmp_path))
    first = World(cfg, cache_min=40, progress=False).pairs("train", 60)
    files = sorted(tmp_path.glob("*"))
    assert [f.suffix for f in files] == [".json", ".npy"]  # no temp files left
    npy = files[1]
    calls = []
    original = World._sample

    def counting(self, *args):
        calls.append(args[-1])
        return original(self, *args)

    monkeypatch.setattr(World, "_sample", counting)
    again = World(cfg, cache_min=40, progress=False).pairs("train", 60)
    assert isinstance(again.images, np.memmap) and len(calls) <= 3  # loaded, only spot-checked
    assert np.array_equal(again.images, first.images) and again.captions == first.captions
    assert again.objects == first.objects and again.keys == first.keys
    expected = np.array(first.images)
    del first, again  # drop the maps before damaging the file in place (else SIGBUS on truncation)

    # truncated (a killed writer) -> rebuilt
    data = npy.read_bytes()
    npy.write_bytes(data[: len(data) // 2])
    calls.clear()
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = World(cfg, cache_min=40, progress=False).pairs("train", 60)
    assert len(calls) >= 60 and np.array_equal(rebuilt.images, expected)
    del rebuilt
    # stale content (a spot-checked image altered) -> rebuilt
    arr = np.load(npy, mmap_mode="r+")
    arr[30] = 0
    arr.flush()
    del arr
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = World(cfg, cache_min=40, progress=False).pairs("train", 60)
    assert np.array_equal(rebuilt.images, expected)
    captions = rebuilt.captions
    # broken metadata -> rebuilt
    files[0].write_text("{not json")
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = World(cfg, cache_min=40, progress=False).pairs("train", 60)
    assert rebuilt.captions == captions
    assert json.loads(files[0].read_text())["n"] == 60


def test_world_hash_tracks_what_changes_pixels():
    base = WorldConfig()
    assert world_hash(base) == world_hash(replace(base, num_pairs=5, cache_dir="/elsewhere"))
    for change in ({"seed": 1}, {"image_size": 64}, {"caption_noise": 0.5}, {"colour_words": 0.5},
                   {"max_objects": 2}, {"object_scale": 1.3}):
        assert world_hash(replace(base, **change)) != world_hash(base)
    assert world_hash(base) == "281ad77d5090"  # worlds rendered before colour_words existed keep their caches


def test_colour_words_leave_colour_out_of_captions_but_not_out_of_pictures(world):
    mono = World(WorldConfig(seed=0, caption_noise=0.0, colour_words=0.0), progress=False).pairs("train", 200)
    plain = world.pairs("train", 200)
    assert np.array_equal(mono.images, plain.images)  # the same pictures
    all_colours = [w for words in COLOUR_WORDS.values() for w in words]
    assert not any(_mentions(c, all_colours) for c in mono.captions)
    for caption, objs in zip(mono.captions, mono.objects):
        assert all(_mentions(caption, world.object_words(o["name"])) for o in objs), caption
    half = World(WorldConfig(seed=0, caption_noise=0.0, colour_words=0.5), progress=False).pairs("train", 300)
    named = sum(_mentions(c, all_colours) for c in half.captions)
    assert 100 < named < 290  # some captions name a colour, many do not


def test_max_objects_and_object_scale_shape_the_training_pictures(world):
    plain = world.pairs("train", 200)
    one = World(WorldConfig(seed=0, max_objects=1), progress=False)
    pairs = one.pairs("train", 200)
    assert {len(o) for o in pairs.objects} == {1} and max(len(o) for o in plain.objects) == 3
    assert {len(r["objects"]) for r in [one.sample("train", i)[1] for i in range(20)]} == {1}
    retrieval_objects = one.retrieval(20, 2)  # the held-out retrieval pictures follow the same recipe
    assert retrieval_objects.images.shape[0] == 20
    big = World(WorldConfig(seed=0, object_scale=1.3), progress=False).pairs("train", 200)
    boxes = lambda p: np.mean([o["box"] for objs in p.objects for o in objs if len(objs) == 1])  # noqa: E731
    assert boxes(big) > 1.2 * boxes(plain)
    assert all(o["box"] <= 48 for objs in big.objects for o in objs)  # capped at the image side


def test_show_writes_png(world, tmp_path):
    out = tmp_path / "grid" / "world.png"
    world.show(str(out), n=6)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        assert im.width > 200 and im.height > 200
    assert [p.name for p in out.parent.iterdir()] == ["world.png"]


def _write_folder(root: Path) -> None:
    (root / "red_apple").mkdir(parents=True)
    (root / "cup").mkdir()
    for i in range(3):
        im = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
        im.paste((200, 30 + 20 * i, 20, 255), (6, 6, 34, 34))
        im.save(root / "red_apple" / f"{i}.png")
        Image.new("RGB", (30, 40), (30, 60, 200 - 10 * i)).save(root / "cup" / f"{i}.png")
    (root / "cup" / "notes.txt").write_text("not an image")


def test_folder_source_mixes_with_shapes(tmp_path):
    _write_folder(tmp_path / "pics")
    cfg = WorldConfig(sprites=f"shapes,folder:{tmp_path / 'pics'}", caption_noise=0.0)
    w = World(cfg, progress=False)
    assert w.object_classes[-2:] == ["cup", "red apple"] and len(w.object_classes) == 30
    objects = w.labelled("object", 2 * len(w.object_classes))
    cup = objects.images[objects.labels == w.object_classes.index("cup")]
    # the cup keeps its own blue colour
    assert (cup[..., 2].astype(int) - cup[..., 0] > 100).sum(axis=(1, 2)).min() > 50
    pairs = w.pairs("train", 400)
    own = [(c, o) for c, objs in zip(pairs.captions, pairs.objects) for o in objs if o["name"] in ("cup", "red apple")]
    assert own and all(o["colour"] is None and o["name"] in c for c, o in own)
    before = world_hash(cfg)
    Image.new("RGB", (8, 8)).save(tmp_path / "pics" / "cup" / "new.png")
    assert world_hash(cfg) != before


def test_fashion_mnist_source():
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    w = World(WorldConfig(sprites="fashion_mnist", caption_noise=0.0), progress=False)
    assert len(w.object_classes) == 10 and "sneaker" in w.object_classes
    pairs = w.pairs("train", 20)
    for caption, objs in zip(pairs.captions, pairs.objects):
        assert all(_mentions(caption, w.object_words(o["name"])) for o in objs), caption
    zs = w.zeroshot("object", 20)  # held-out streams draw from the test images
    assert zs.images.shape == (20, 48, 48, 3) and np.array_equal(zs.labels, np.arange(20) % 10)


def test_missing_or_unknown_sources_are_clear(tmp_path):
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTSource(root=tmp_path)
    with pytest.raises(ValueError, match="shapes, fashion_mnist or folder:PATH"):
        World(WorldConfig(sprites="shapes,clipart"))
    with pytest.raises(ValueError, match="not a folder"):
        World(WorldConfig(sprites=f"folder:{tmp_path / 'nope'}"))
    with pytest.raises(ValueError, match="no class subfolders"):
        World(WorldConfig(sprites=f"folder:{tmp_path}"))
    with pytest.raises(ValueError, match="data.world.sprites is empty"):
        World(WorldConfig(sprites=" , "))
