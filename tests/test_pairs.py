import io
import json
import struct
import tarfile
import zlib
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from threetowers.config import Config, DataConfig, load_config
from threetowers.data.loader import StreamTrainData
from threetowers.data.csv_pairs import CsvPairs, load_csv_arrays
from threetowers.data.pairs import build_pairs_dataset
from threetowers.data.samples import BadDataError, collate
from threetowers.data.shards import ShardPairs
from threetowers.data.transforms import decode_rgb, image_transform

S = 16  # training image size in these tests


# ----------------------------------------------------------------------------- tiny files


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def solid(colour, size=(40, 30), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def png_rgb16(value: tuple[int, int, int], size=(8, 6)) -> bytes:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    w, h = size
    row = b"\0" + struct.pack(">3H", *value) * w

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(row * h)) + chunk(b"IEND", b"")


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def good_members(prefix: str, n: int) -> list[tuple[str, bytes]]:
    members = []
    for i in range(n):
        key = f"{prefix}{i:04d}"
        image = encode(solid((10 * i % 256, 100, 200)), "JPEG")
        members += [(f"{key}.jpg", image), (f"{key}.txt", f"caption {key}".encode())]
    return members


def make_shards(root: Path, num_shards: int = 4, per_shard: int = 6) -> list[Path]:
    return [write_tar(root / f"shard-{s:03d}.tar", good_members(f"s{s}-", per_shard)) for s in range(num_shards)]


def keys(dataset, n=None) -> list[str]:
    return [sample["key"] for sample in islice(iter(dataset), n)]


def lenient(urls, **kw) -> ShardPairs:
    return ShardPairs(urls, S, shuffle=False, max_bad_fraction=1.0, **kw)


# ----------------------------------------------------------------------------- transforms


def test_image_transform_shape_range_and_crop():
    img = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (32, 1, 3)))
    out = image_transform(S, augment=False)(img)
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.shape == (3, S, S)
    assert 0.0 <= out.min() and out.max() <= 1.0
    # Shorter side to 16, center crop: the middle half of the 64-wide gradient remains.
    assert out[0, 0, 0].item() == pytest.approx(0.25, abs=0.05)
    assert out[0, 0, -1].item() == pytest.approx(0.75, abs=0.05)
    torch.manual_seed(0)
    aug = image_transform(S, augment=True)(img)
    assert aug.shape == (3, S, S) and 0.0 <= aug.min() and aug.max() <= 1.0


def test_decode_downscales_large_images_early():
    big = encode(solid((0, 128, 255), size=(1600, 1200)), "JPEG")
    img = decode_rgb(big, keep_side=32)
    assert img.mode == "RGB" and 32 <= min(img.size) <= 64  # JPEG draft decoded at 1/8 scale
    png = decode_rgb(encode(solid((0, 128, 255), size=(800, 400)), "PNG"), keep_side=32)
    assert png.size == (64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees for display
    buf = io.BytesIO()
    solid((5, 5, 5), size=(40, 30)).save(buf, "JPEG", exif=exif)
    assert decode_rgb(buf.getvalue()).size == (30, 40)


# ----------------------------------------------------------------------------- broken samples


def test_shard_with_broken_samples_counts_each_reason(tmp_path):
    jpeg = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)), "JPEG")
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 20, 30))  # left half fully transparent
    gray16 = Image.fromarray(np.full((30, 40), 128 * 257, dtype=np.uint16))
    assert gray16.mode == "I;16"
    members = good_members("good", 3) + [
        ("good0003.json", b'{"url": "http://x"}'),  # optional metadata travels along
        ("good0003.jpeg", encode(solid((1, 2, 3)), "JPEG")),
        ("good0003.txt", b"\xef\xbb\xbfwith a BOM\n and  lines"),
        ("webp.webp", encode(solid((0, 255, 0)), "WEBP")),
        ("webp.txt", b"webp image"),
        ("cmyk.jpg", encode(solid((0, 255, 255, 0), mode="CMYK"), "JPEG")),
        ("cmyk.txt", b"cmyk image"),
        ("rgba.png", encode(rgba, "PNG")),
        ("rgba.txt", b"transparent left"),
        ("gray16.png", encode(gray16, "PNG")),
        ("gray16.txt", b"sixteen bit gray"),
        ("rgb16.png", png_rgb16((65535, 32896, 0))),
        ("rgb16.txt", b"sixteen bit colour"),
        ("palette.png", encode(solid((255, 255, 0)).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")),
        ("palette.txt", b"palette"),
        ("gray.jpg", encode(solid(77, mode="L"), "JPEG")),
        ("gray.txt", b"gray"),
        # bad ones, one reason each
        ("corrupt.jpg", b"\x00not an image at all" * 10),
        ("corrupt.txt", b"corrupt"),
        ("trunc.jpg", jpeg[: len(jpeg) // 2]),
        ("trunc.txt", b"truncated"),
        ("empty.jpg", jpeg),
        ("empty.txt", b" \n\t "),
        ("latin1.jpg", jpeg),
        ("latin1.txt", "un café".encode("latin-1")),
        ("noimage.txt", b"the image member is missing"),
        ("nocaption.jpg", jpeg),
        ("huge.png", encode(solid((9, 9, 9), size=(200, 200)), "PNG")),
        ("huge.txt", b"too many pixels"),
    ]
    shard = write_tar(tmp_path / "broken.tar", members)
    data = lenient(str(shard), max_pixels=10_000)
    samples = {s["key"]: s for s in data}

    counter = data.counter
    assert dict(counter.counts) == {
        "corrupt_image": 1, "truncated_image": 1, "empty_caption": 1, "bad_text_encoding": 1,
        "missing_image": 1, "missing_caption": 1, "too_large": 1,
    }
    assert counter.seen == 18
    assert sorted(samples) == sorted(
        ["good0000", "good0001", "good0002", "good0003", "webp", "cmyk", "rgba", "gray16", "rgb16", "palette", "gray"]
    )
    for s in samples.values():
        assert s["image"].dtype == torch.float32 and s["image"].shape == (3, S, S)
        assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0

    def centre(key, x=S // 2):
        return samples[key]["image"][:, S // 2, x]

    assert centre("cmyk").tolist() == pytest.approx([1.0, 0.0, 0.0], abs=0.03)  # no cyan/magenta ink = red
    assert centre("rgba", 1).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=0.01)  # transparent -> white
    assert centre("rgba", S - 2).tolist() == pytest.approx([1.0, 0.0, 0.0], abs=0.01)
    assert centre("gray16").tolist() == pytest.approx([128 / 255] * 3, abs=0.003)  # scaled, not clipped to white
    assert centre("rgb16").tolist() == pytest.approx([1.0, 128 / 255, 0.0], abs=0.005)
    assert centre("palette").tolist() == pytest.approx([1.0, 1.0, 0.0], abs=0.01)
    assert centre("gray").tolist() == pytest.approx([77 / 255] * 3, abs=0.02)
    assert samples["good0003"]["caption"] == "with a BOM and lines"
    assert samples["good0000"]["caption"] == "caption good0000"
    examples = counter.examples
    assert examples["bad_text_encoding"][0].startswith(f"{shard}:latin1")
    assert "max_pixels=10000" in examples["too_large"][0]
    log = counter.as_log()
    assert log["data/seen"] == 18 and log["data/bad/too_large"] == 1
    assert log["data/bad_fraction"] == pytest.approx(7 / 18)


def test_too_many_bad_samples_stop_with_examples(tmp_path):
    members = good_members("ok", 20)
    for i in range(10):
        members += [(f"bad{i:02d}.jpg", b"garbage"), (f"bad{i:02d}.txt", b"x")]
    shard = write_tar(tmp_path / "mostly.tar", members)
    data = ShardPairs(str(shard), S, shuffle=False, max_bad_fraction=0.1, min_seen=20)
    with pytest.raises(BadDataError) as err:
        list(data)
    message = str(err.value)
    assert "corrupt_image" in message and "mostly.tar:bad00" in message and "max_bad_fraction=10.0%" in message
    # 20 good first; the 3rd bad one makes 3 of 23 > 10%: stopped as soon as the limit was crossed.
    assert data.counter.seen == 23


def test_unreadable_shard_is_counted_and_skipped(tmp_path):
    good = make_shards(tmp_path, num_shards=1, per_shard=3)[0]
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"this is not a tar file" * 100)
    data = lenient([str(broken), str(good)])
    assert len(keys(data)) == 3
    assert data.counter.counts == {"unreadable_shard": 1}
    assert str(broken) in data.counter.examples["unreadable_shard"][0]


def test_missing_local_shard_is_a_config_error(tmp_path):
    make_shards(tmp_path, num_shards=2)
    with pytest.raises(ValueError, match=r"1 of 3 shards do not exist.*shard-002\.tar"):
        ShardPairs(str(tmp_path / "shard-{000..002}.tar"), S)


# ----------------------------------------------------------------------------- shard sources and splitting


def test_brace_pattern_and_pipe_url(tmp_path):
    shards = make_shards(tmp_path, num_shards=4, per_shard=3)
    every = {f"s{s}-{i:04d}" for s in range(4) for i in range(3)}
    braced = lenient(str(tmp_path / "shard-{000..003}.tar"))
    assert len(braced.urls) == 4 and set(keys(braced)) == every
    piped = lenient(f"pipe:cat {shards[2]}")
    assert keys(piped) == [f"s2-{i:04d}" for i in range(3)]


def test_two_ranks_split_without_duplicates(tmp_path):
    make_shards(tmp_path, num_shards=5, per_shard=4)
    pattern = str(tmp_path / "shard-{000..004}.tar")
    seen = [keys(ShardPairs(pattern, S, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(seen[0]) + len(seen[1]) == 20
    assert set(seen[0]).isdisjoint(seen[1]) and len(set(seen[0]) | set(seen[1])) == 20
    # Shuffled: the sample order is not the order in the shards, and the epoch changes it.
    data = ShardPairs(pattern, S, seed=3, rank=0, world_size=1, shuffle_buffer=100)
    first, second = keys(data), keys(data)
    assert sorted(first) == sorted(second) and first != second and first != sorted(first)


def test_split_follows_torch_distributed_environment(tmp_path, monkeypatch):
    make_shards(tmp_path, num_shards=4, per_shard=2)
    pattern = str(tmp_path / "shard-{000..003}.tar")
    seen = []
    for rank in range(2):  # no explicit rank: wds.split_by_node reads RANK/WORLD_SIZE (as torchrun sets them)
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append(set(keys(ShardPairs(pattern, S, seed=1))))
    assert len(seen[0]) == len(seen[1]) == 4 and seen[0].isdisjoint(seen[1])


def test_dataloader_workers_split_and_report_counts(tmp_path):
    make_shards(tmp_path, num_shards=4, per_shard=5)
    write_tar(tmp_path / "shard-004.tar", good_members("s4-", 4) + [("bad.jpg", b"junk"), ("bad.txt", b"x")])
    data = ShardPairs(str(tmp_path / "shard-{000..004}.tar"), S, rank=0, world_size=1, max_bad_fraction=1.0)
    loader = DataLoader(data, batch_size=4, num_workers=2, collate_fn=collate)
    got = []
    for batch in loader:
        assert batch["image"].shape[1:] == (3, S, S) and len(batch["caption"]) == len(batch["key"])
        got += batch["key"]
        data.counter.merge(batch["bad_counts"])
    assert len(got) == len(set(got)) == 24
    assert data.counter.seen == 0  # the main process decoded nothing itself ...
    seen, counts, examples = data.counter.totals()  # ... but knows what the workers counted
    assert seen == 25 and counts == {"corrupt_image": 1} and "bad" in examples["corrupt_image"][0]
    assert data.counter.as_log()["data/bad/corrupt_image"] == 1


def test_too_few_shards_for_ranks(tmp_path):
    make_shards(tmp_path, num_shards=1)
    with pytest.raises(ValueError, match="cannot be split across 2 ranks"):
        keys(ShardPairs(str(tmp_path / "shard-000.tar"), S, rank=1, world_size=2, resampled=False))


def test_resampled_is_endless_and_seeded_per_rank(tmp_path):
    make_shards(tmp_path, num_shards=3, per_shard=4)
    pattern = str(tmp_path / "shard-{000..002}.tar")
    every = {f"s{s}-{i:04d}" for s in range(3) for i in range(4)}

    def stream(rank, seed=0):
        return keys(ShardPairs(pattern, S, resampled=True, seed=seed, rank=rank, world_size=2, shuffle_buffer=10), 40)

    a = stream(0)
    assert len(a) == 40 and set(a) <= every and len(set(a)) < 40  # 40 samples from 12: drawn with replacement
    assert a == stream(0) and a != stream(1) and a != stream(0, seed=1)


# ----------------------------------------------------------------------------- CSV / TSV


def csv_fixture(root: Path) -> Path:
    folder = root / "set"
    (folder / "images").mkdir(parents=True)
    for name, colour in (("a.png", (255, 0, 0)), ("b.jpg", (0, 0, 255))):
        solid(colour).save(folder / "images" / name)
    (folder / "pairs.csv").write_text(
        'filepath,title\nimages/a.png,"A red one, plain"\nimages/missing.jpg,gone\nimages/b.jpg,a blue one\n'
        "images/a.png,\n"
    )
    return folder / "pairs.csv"


def test_csv_relative_paths_missing_file_and_substitution(tmp_path, monkeypatch):
    path = csv_fixture(tmp_path)
    monkeypatch.chdir(tmp_path)  # paths resolve against the CSV's folder, not the working directory
    data = CsvPairs(path, S, image_column="filepath", caption_column="title", max_bad_fraction=1.0)
    assert len(data) == 4
    first = data[0]
    assert first["key"] == "images/a.png" and first["caption"] == "A red one, plain"
    assert first["image"][:, 8, 8].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=0.01)
    replaced = data[1]  # the missing file is counted and the next row takes its place
    assert replaced["key"] == "images/b.jpg" and replaced["caption"] == "a blue one"
    wrapped = data[3]  # empty caption: wraps around to row 1
    assert wrapped["key"] == "images/a.png" and wrapped["caption"] == "A red one, plain"
    assert dict(data.counter.counts) == {"unreadable_file": 1, "empty_caption": 1}
    assert "pairs.csv row 2 (images/missing.jpg)" in data.counter.examples["unreadable_file"][0]
    batch = collate([data[0], data[2]])
    assert batch["image"].shape == (2, 3, S, S) and batch["caption"] == ["A red one, plain", "a blue one"]


def test_tsv_sniffed_and_bad_bytes_in_one_row(tmp_path):
    path = csv_fixture(tmp_path)
    other = tmp_path / "set" / "pairs.txt"  # no telling extension: the delimiter is sniffed
    other.write_bytes(b"image\tcaption\nimages/a.png\tred\nimages/b.jpg\tcaf\xe9\nimages/b.jpg\tblue\n")
    data = CsvPairs(other, S, max_bad_fraction=1.0)
    assert len(data) == 3 and data[0]["caption"] == "red"
    assert data[1]["caption"] == "blue"
    assert dict(data.counter.counts) == {"bad_text_encoding": 1}
    with pytest.raises(ValueError, match=r"no column 'image' \(data.image_column\).*filepath"):
        CsvPairs(path, S)


def test_build_pairs_dataset_dispatch(tmp_path):
    path = csv_fixture(tmp_path)
    make_shards(tmp_path, num_shards=2, per_shard=2)
    cfg = DataConfig(source="csv", path=str(path), image_column="filepath", caption_column="title")
    cfg.max_bad_fraction = 0.5
    data = build_pairs_dataset(cfg, S)
    assert isinstance(data, CsvPairs) and data.counter.max_bad_fraction == 0.5
    cfg = DataConfig(source="webdataset", path=str(tmp_path / "shard-{000..001}.tar"), resampled=False)
    shards = build_pairs_dataset(cfg, S, rank=0, world_size=1)
    assert isinstance(shards, ShardPairs) and len(keys(shards)) == 4
    with pytest.raises(ValueError, match="world"):
        build_pairs_dataset(DataConfig(source="world"), S)


# ----------------------------------------------------------------------------- training data for data/loader.py


def test_load_csv_arrays_skips_bad_rows_and_checks_the_whole_pass(tmp_path):
    path = csv_fixture(tmp_path)
    cfg = DataConfig(source="csv", path=str(path), image_column="filepath", caption_column="title")
    cfg.max_bad_fraction = 0.5
    images, captions, keys, bad, _ = load_csv_arrays(cfg, S, progress=False)
    assert bad == {"unreadable_file": 1, "empty_caption": 1}
    assert images.dtype == np.uint8 and images.shape == (2, S, S, 3)
    assert images[0, 8, 8].tolist() == [255, 0, 0]  # PNG: exact
    assert np.abs(images[1, 8, 8].astype(int) - [0, 0, 255]).max() <= 2  # JPEG
    assert captions == ["A red one, plain", "a blue one"] and keys == ["images/a.png", "images/b.jpg"]
    cfg.max_bad_fraction, cfg.num_workers = 0.25, 2  # 2 of 4 rows bad, counted in the workers
    with pytest.raises(BadDataError, match="2 of 4 samples bad.*unreadable_file"):
        load_csv_arrays(cfg, S, progress=False)
    cfg.augment = True
    with pytest.raises(ValueError, match="data.augment"):
        load_csv_arrays(cfg, S, progress=False)


def test_a_csv_for_training_is_decoded_once_to_a_memory_mapped_file(tmp_path, monkeypatch):
    path = csv_fixture(tmp_path)
    cfg = DataConfig(source="csv", path=str(path), image_column="filepath", caption_column="title")
    cfg.max_bad_fraction = 0.5
    in_ram = load_csv_arrays(cfg, S, progress=False)
    stored = load_csv_arrays(cfg, S, progress=False, store=tmp_path / "store")
    assert isinstance(stored.images, np.memmap) and not isinstance(in_ram.images, np.memmap)  # bounded RAM
    assert np.array_equal(stored.images, in_ram.images) and stored._replace(images=None) == in_ram._replace(images=None)
    monkeypatch.setattr("threetowers.data.csv_pairs.DataLoader", lambda *a, **k: pytest.fail("decoded again"))
    again = load_csv_arrays(cfg, S, progress=False, store=tmp_path / "store")  # the same rows: reused, same counts
    assert np.array_equal(again.images, in_ram.images) and again.bad == in_ram.bad
    monkeypatch.undo()
    solid((0, 255, 0), size=(50, 30)).save(tmp_path / "set" / "images" / "b.jpg")  # a replaced image
    fresh = load_csv_arrays(cfg, S, progress=False, store=tmp_path / "store")
    assert fresh.images[1, 8, 8].tolist() != in_ram.images[1, 8, 8].tolist()
    assert len(list((tmp_path / "store").iterdir())) == 2  # one folder per version of the rows


def stream_config(tmp_path: Path, **data) -> Config:
    return load_config(None, {
        "data": {"source": "webdataset", "path": str(tmp_path / "shard-{000..002}.tar"), "shuffle_buffer": 8, **data},
        "model": {"image": {"image_size": S}, "text": {"vocab_size": 300, "context_length": 8}},
        "train": {"batch_size": 4, "output_dir": str(tmp_path / "run")},
    })


def test_stream_train_data_batches_by_step(tmp_path):
    make_shards(tmp_path, num_shards=3, per_shard=4)
    data = StreamTrainData(stream_config(tmp_path, resampled=True))
    assert (tmp_path / "run" / "tokenizer.json").is_file()  # BPE trained on the shards' captions, saved with the run
    batches = list(islice(data.batches(0), 5))
    for batch in batches:
        assert batch["image"].shape == (4, 3, S, S) and batch["tokens"].shape == (4, 8) and len(batch["keys"]) == 4
        assert data.tokenizer.decode(batch["tokens"][0]) == f"caption {batch['keys'][0]}"
    assert [b["keys"] for b in islice(data.batches(0), 5)] == [b["keys"] for b in batches]
    assert [b["keys"] for b in islice(data.batches(5), 5)] != [b["keys"] for b in batches]  # resumed: re-seeded
    assert data.bad_samples() == {}
    # Epoch mode on rank 1 of 2 (one or two shards here) keeps going past the end of its shards.
    rank1 = StreamTrainData(stream_config(tmp_path, resampled=False), rank=1, world_size=2)
    assert len(list(islice(rank1.batches(0), 7))) == 7
    with pytest.raises(ValueError, match="third_embeddings=online"):
        cfg = stream_config(tmp_path)
        cfg.model.method = "lit"
        StreamTrainData(cfg)


def test_global_indices_visit_every_row_once_per_epoch_and_depend_only_on_the_step():
    from threetowers.data.order import _epoch_permutation, global_indices

    rows, batch = 10, 4  # epochs end mid-batch: step 2 holds rows of epochs 0 and 1
    seq = np.concatenate([global_indices(7, s, batch, rows) for s in range(5)])
    assert sorted(seq[:10]) == list(range(10)) and sorted(seq[10:20]) == list(range(10))
    assert not np.array_equal(seq[:10], seq[10:20])  # a fresh order each epoch
    _epoch_permutation.cache_clear()
    assert np.array_equal(global_indices(7, 3, batch, rows), seq[12:16])  # the same without the cache
    assert not np.array_equal(global_indices(8, 0, batch, rows), seq[:4])  # another seed, another order
    with pytest.raises(ValueError):
        _epoch_permutation(7, 0, rows, batch)[0] = 3  # shared between steps, so read-only


@pytest.mark.parametrize("rows,batch", [(1000, 128), (10, 4), (257, 128), (300, 100)])
def test_no_batch_holds_a_row_twice_across_epoch_boundaries(rows, batch):
    from threetowers.data.order import global_indices

    steps = 200
    seq = np.concatenate([global_indices(3, s, batch, rows) for s in range(steps)])
    for s in range(steps):
        assert len(set(seq[s * batch:(s + 1) * batch])) == batch, f"step {s} holds a row twice"
    for e in range(len(seq) // rows):  # and still every row once per epoch
        assert sorted(seq[e * rows:(e + 1) * rows]) == list(range(rows))


def test_too_few_rows_for_the_batch_is_refused():
    from threetowers.data.order import check_rows

    with pytest.raises(ValueError, match="needs at least 256"):
        check_rows(200, 128)


def test_a_stop_signal_during_a_csv_decode_keeps_what_was_decoded_and_the_next_call_goes_on(tmp_path, monkeypatch):
    """SIGTERM in the middle of decoding a CSV into its store: Preempted between two batches, the rows
    decoded so far kept (pixels flushed, a line of rows); a torn last line is redone; the next call
    goes on and gives what one uninterrupted decode gives, bad-row counts included."""
    import os
    import signal

    from threetowers.core.preemption import Preempted, stop_on_signals
    from threetowers.data import csv_pairs

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    lines = ["filepath,title"]
    for i in range(300):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,caption {i}" if i not in (5, 250) else f"img/missing{i}.png,caption {i}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source="csv", path=str(tmp_path / "pairs.csv"), image_column="filepath", caption_column="title")
    whole = load_csv_arrays(cfg, S, progress=False, store=tmp_path / "whole")
    monkeypatch.setattr(csv_pairs, "SAVE_EVERY", 1)
    row = csv_pairs._Rows.__getitem__

    def signalled(self, i):  # the signal arrives while row 130 is decoded (the third batch of 64)
        if i == 130:
            os.kill(os.getpid(), signal.SIGTERM)
        return row(self, i)

    monkeypatch.setattr(csv_pairs._Rows, "__getitem__", signalled)
    with pytest.raises(Preempted, match=r"while decoding pairs.csv \(192 of 300 rows"), stop_on_signals(["SIGTERM"]):
        load_csv_arrays(cfg, S, progress=False, store=tmp_path / "store")
    (folder,) = (tmp_path / "store").iterdir()
    assert not (folder / "images.npy").exists() and not (folder / "rows.json").exists()
    saved = (folder / "rows.partial.jsonl").read_text().splitlines()
    assert [json.loads(line)["rows"] for line in saved] == [64, 128, 192]
    with open(folder / "rows.partial.jsonl", "a") as f:
        f.write('{"rows": 256, "captions": ["cut')  # a kill in the middle of a line: its rows are redone
    monkeypatch.setattr(csv_pairs._Rows, "__getitem__", row)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(csv_pairs, "_decode_rows", killed)
    with pytest.raises(KeyboardInterrupt):  # a kill after reading the lines: the torn one is gone, the whole ones kept
        load_csv_arrays(cfg, S, progress=False, store=tmp_path / "store")
    assert (folder / "rows.partial.jsonl").read_text().splitlines() == saved
    monkeypatch.undo()
    again = load_csv_arrays(cfg, S, progress=False, store=tmp_path / "store")
    assert np.array_equal(np.asarray(again.images), np.asarray(whole.images))
    assert again.captions == whole.captions and again.keys == whole.keys and len(again.keys) == 298
    assert again.bad == whole.bad == {"unreadable_file": 2} and again.identity == whole.identity
    assert sorted(p.name for p in folder.iterdir()) == ["images.npy", "rows.json"]
