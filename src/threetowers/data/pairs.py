"""Real image-text pairs: webdataset tar shards and CSV/TSV files, read the same way.

`build_pairs_dataset` makes a dataset from `DataConfig`; `load_csv_arrays` (a CSV decoded once
into arrays) and `stream_captions` (captions for the tokenizer) serve the step-indexed training
data of `threetowers.data.loader`, which also holds `StreamTrainData` for shards.

Every reader yields samples `{"image": float [3, S, S] in [0, 1], "caption": str, "key": str,
"bad_counts": ...}` made by the same `decode_rgb` + `image_transform`; `collate` batches them.
Captions stay text here; the training data (`data.loader`) tokenizes them.

Bad samples are skipped, never used, and counted by reason in a `BadSampleCounter`; each sample
gets one reason, the cheapest check first (image member present, caption, then image decode).
Reasons: missing_image, missing_caption, empty_caption, bad_text_encoding, unreadable_file,
corrupt_image, truncated_image, too_large, bad_aspect, unsupported_mode, unreadable_shard (a shard
that cannot be opened or read), truncated_shard (a local .tar that does not end with tar's
end-of-archive blocks: it was cut short, and what followed the cut is lost; its readable samples are
still used). A shard is counted once per visit, however many errors reading it raises.
Past `max_bad_fraction` (once `min_seen` samples were seen) reading stops with `BadDataError`,
which names example samples and their reasons.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import os
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm import tqdm

from threetowers.config import DataConfig
from threetowers.data.transforms import DEFAULT_MAX_PIXELS, SampleError, decode_rgb, image_transform

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset's output formats, in preference order
MIN_SEEN = 100


class BadDataError(ValueError):
    """Too many bad samples: the data (or its configuration) needs a look."""


# ----------------------------------------------------------------------------- counting


class BadSampleCounter:
    """Samples seen, bad samples by reason with a few examples, and the `max_bad_fraction` check.

    Counts are per process. A DataLoader worker is a new process and starts from zero (a copy of
    the counter notices the new pid); every sample carries its process's running counts in
    `sample["bad_counts"]`, `collate` keeps the latest per process, and `merge(batch["bad_counts"])`
    in the main process folds them in, so that `as_log()` there covers all workers. Each process
    also enforces the limit on its own counts, so a worker stops the run by itself.
    """

    def __init__(self, max_bad_fraction: float = 0.05, min_seen: int = MIN_SEEN, max_examples: int = 3) -> None:
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction={max_bad_fraction} must be in [0, 1]")
        self.max_bad_fraction = max_bad_fraction
        self.min_seen = min_seen
        self.max_examples = max_examples
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self.seen = 0
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._others: dict[str, dict] = {}  # latest snapshot from each other process

    def _own(self) -> None:
        if os.getpid() != self._pid:  # a copy inside a new worker process counts its own samples
            self._reset()

    @property
    def source(self) -> str:
        return f"pid{os.getpid()}"

    def ok(self) -> None:
        self._own()
        self.seen += 1

    def bad(self, reason: str, where: str, detail: str = "") -> None:
        """Count one skipped sample (or unreadable shard); raises `BadDataError` past the limit."""
        self._own()
        self.seen += 1
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(f"{where} ({detail})" if detail else where)
        self.check()

    def snapshot(self) -> dict[str, dict]:
        """This process's own counts, keyed by process, for `merge` elsewhere."""
        self._own()
        examples = {reason: list(kept) for reason, kept in self.examples.items()}
        return {self.source: {"seen": self.seen, "counts": dict(self.counts), "examples": examples}}

    def merge(self, snapshots: dict[str, dict] | None) -> None:
        """Fold in other processes' counts (from `batch["bad_counts"]`) and apply the limit to the total."""
        self._own()
        for source, snap in (snapshots or {}).items():
            if source != self.source:
                self._others[source] = snap
        self.check()

    def totals(self) -> tuple[int, Counter[str], dict[str, list[str]]]:
        seen, counts = self.seen, Counter(self.counts)
        examples = {k: list(v) for k, v in self.examples.items()}
        for snap in self._others.values():
            seen += snap["seen"]
            counts.update(snap["counts"])
            for reason, more in snap["examples"].items():
                kept = examples.setdefault(reason, [])
                kept.extend(more[: max(0, self.max_examples - len(kept))])
        return seen, counts, examples

    @property
    def num_bad(self) -> int:
        return sum(self.totals()[1].values())

    def check(self, final: bool = False) -> None:
        """Raise `BadDataError` past the limit; `final=True` (a whole pass is done) ignores `min_seen`."""
        seen, counts, _ = self.totals()
        bad = sum(counts.values())
        if (final or seen >= self.min_seen) and bad > self.max_bad_fraction * seen:
            raise BadDataError(
                f"too many bad samples: {self.summary()}, above data.max_bad_fraction={self.max_bad_fraction:.1%}. "
                "Fix or filter the data, or raise data.max_bad_fraction."
            )

    def summary(self) -> str:
        seen, counts, examples = self.totals()
        bad = sum(counts.values())
        text = f"{bad} of {seen} samples bad ({bad / max(seen, 1):.1%})"
        parts = [f"{reason} x{n} (e.g. {'; '.join(examples.get(reason, []))})" for reason, n in counts.most_common()]
        return text + (": " + ", ".join(parts) if parts else "")

    def as_log(self, prefix: str = "data/") -> dict[str, float]:
        """Scalars for the training log: samples seen, bad fraction, and count per reason."""
        seen, counts, _ = self.totals()
        log = {f"{prefix}seen": float(seen), f"{prefix}bad_fraction": sum(counts.values()) / max(seen, 1)}
        log.update({f"{prefix}bad/{reason}": float(n) for reason, n in counts.items()})
        return log


def clean_caption(raw: bytes | str | None) -> str:
    """Caption bytes or text -> one line of text, or `SampleError` (missing, empty, not UTF-8)."""
    if raw is None:
        raise SampleError("missing_caption", "no caption")
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise SampleError("bad_text_encoding", f"caption is not UTF-8: {err}") from None
    else:
        text = raw
        try:
            text.encode("utf-8")  # text read with errors="surrogateescape" keeps bad bytes as surrogates
        except UnicodeEncodeError as err:
            raise SampleError("bad_text_encoding", f"caption is not UTF-8: {err}") from None
    text = " ".join(text.split())
    if not text:
        raise SampleError("empty_caption", "caption is empty")
    return text


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images `[B, 3, S, S]`; captions and keys stay lists; bad counts: latest per process."""
    bad_counts: dict[str, dict] = {}
    for sample in samples:
        bad_counts.update(sample.get("bad_counts") or {})
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "bad_counts": bad_counts,
    }


class _Decoder:
    """Shared by both readers: (image source, caption) -> sample, or a counted skip."""

    def __init__(self, image_size: int, augment: bool, counter: BadSampleCounter, max_pixels: int) -> None:
        self.transform = image_transform(image_size, augment)
        self.keep_side = 2 * image_size  # decode large images at >= 2x the training size, no more
        self.counter = counter
        self.max_pixels = max_pixels

    def __call__(self, image: bytes | Path | None, caption: bytes | str | None, key: str, where: str) -> dict | None:
        try:
            if image is None:
                raise SampleError("missing_image", "no image")
            text = clean_caption(caption)
            rgb = decode_rgb(image, max_pixels=self.max_pixels, keep_side=self.keep_side)
        except SampleError as err:  # the caption's or the image's
            self.counter.bad(err.reason, where, err.detail)
            return None
        self.counter.ok()
        return {"image": self.transform(rgb), "caption": text, "key": key, "bad_counts": self.counter.snapshot()}


# ----------------------------------------------------------------------------- webdataset


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Brace patterns (`shards-{000..099}.tar`, several joined by `::`) and lists -> shard URLs.

    Local shards must exist; `pipe:` and other URLs are checked only when read.
    """
    urls = wds.shardlists.expand_urls(spec) if isinstance(spec, str) else [str(u) for u in spec]
    if not urls:
        raise ValueError(f"data.path={spec!r} names no shards")
    local = [u for u in urls if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", u)]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise ValueError(
            f"data.path={spec!r}: {len(missing)} of {len(urls)} shards do not exist, e.g. {', '.join(missing[:3])}"
        )
    return urls


class ShardPairs(IterableDataset):
    """Image-text pairs from webdataset tar shards in img2dataset layout (`KEY.jpg` + `KEY.txt`).

    Split without duplicates: each epoch the shard list is shuffled with a seed shared by all
    ranks, then rank r takes every world_size-th shard and each DataLoader worker every
    num_workers-th of those. Ranks can receive different numbers of samples, so for
    DistributedDataParallel prefer `resampled=True`: each rank and worker then draws shards
    with replacement from its own seeded stream, endlessly (stop by step count).
    `rank`/`world_size` default to torch.distributed (or RANK/WORLD_SIZE); pass them to override.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        image_size: int,
        *,
        augment: bool = False,
        resampled: bool = False,
        shuffle: bool = True,
        shuffle_buffer: int = 2000,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        max_bad_fraction: float = 0.05,
        min_seen: int = MIN_SEEN,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__()
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then torch.distributed decides)")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.urls = expand_shards(urls)
        self.resampled = resampled
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.counter = BadSampleCounter(max_bad_fraction, min_seen)
        self.decode = _Decoder(image_size, augment, self.counter, max_pixels)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Shard order and shuffling depend on the epoch (each `iter()` also advances it)."""
        self.epoch = epoch

    def _shards(self, epoch: int, rank: int, world: int, worker: int) -> Iterator[dict]:
        if self.resampled:
            stream_seed = (rank * 1000 + worker) * 100_003 + epoch  # own stream per rank, worker, epoch
            return iter(wds.ResampledShards(self.urls, seed=self.seed, deterministic=True,
                                            worker_seed=lambda: stream_seed))
        order = list(self.urls)
        if self.shuffle:
            random.Random(f"shards/{self.seed}/{epoch}").shuffle(order)  # same order on every rank
        if world > len(order):
            raise ValueError(
                f"{len(order)} shards cannot be split across {world} ranks without duplicates; "
                "use more shards or data.resampled=true"
            )
        shards: Iterator[dict] = (dict(url=u) for u in order)
        shards = wds.split_by_node(shards) if self.rank is None else itertools.islice(shards, rank, None, world)
        return wds.split_by_worker(shards)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, worker, num_workers = wds.utils.pytorch_worker_info()
        if self.rank is not None:
            rank, world = self.rank, self.world_size
        epoch = self.epoch
        self.epoch += 1
        if not self.resampled and num_workers > 1 and len(self.urls) < world * num_workers:
            warnings.warn(
                f"{len(self.urls)} shards for {world} ranks x {num_workers} workers: some workers get no shards",
                stacklevel=2,
            )
        samples = wds.tarfile_to_samples(handler=self._shard_error)(self._visit(self._shards(epoch, rank, world, worker)))
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(f"samples/{self.seed}/{epoch}/{rank}/{worker}")
            # Shuffle the raw bytes, before decoding: a buffer of encoded images is small.
            samples = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 1000), rng=rng)(samples)
        for raw in samples:
            key = raw["__key__"]
            image = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
            sample = self.decode(image, raw.get("txt"), key, f"{raw.get('__url__')}:{key}")
            if sample is not None:
                yield sample

    def _visit(self, shards: Iterator[dict]) -> Iterator[dict]:
        """Each shard as it is opened: a cut-short local tar is counted here, before its samples are read.

        Python's tarfile reads a tar cut inside a member header as a normal end of archive, so without
        this check the rest of such a shard would be lost uncounted.
        """
        for shard in shards:
            url = shard["url"]
            # Shards are opened one after the other in a process, so errors until the next one are this one's.
            self._visit_counted = tar_is_truncated(url)
            if self._visit_counted:
                self.counter.bad("truncated_shard", url, "no end-of-archive marker: the file was cut short")
            yield shard

    def _shard_error(self, exn: Exception) -> bool:
        """webdataset handler: a shard that cannot be opened or read is counted (once a visit), then skipped.

        (webdataset can report one broken shard twice: from the tar reader, then from the sample grouper.)
        """
        if not getattr(self, "_visit_counted", False):
            url = next((a for a in reversed(exn.args) if isinstance(a, str)), "?")
            self.counter.bad("unreadable_shard", url, f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
            self._visit_counted = True
        return True


def tar_is_truncated(url: str) -> bool:
    """A local uncompressed tar that does not end in whole 512-byte blocks with two zero blocks last
    (the end-of-archive marker every tar writer adds). Other URLs, compressed shards and files that
    are not tars at all (no ustar header; the reader counts those as unreadable): False."""
    if not url.endswith(".tar") or not os.path.isfile(url):
        return False
    size = os.path.getsize(url)
    with open(url, "rb") as fh:
        if fh.read(512)[257:262] != b"ustar":
            return False
        if size % 512 or size < 1536:  # a header, and the two end blocks
            return True
        fh.seek(size - 1024)
        return fh.read(1024).count(0) != 1024


# ----------------------------------------------------------------------------- CSV / TSV


class _Strings:
    """A column of strings in one byte buffer: no per-row Python objects, so DataLoader workers
    forked from the main process do not copy the whole column as reference counts change."""

    def __init__(self, values: list[str | None]) -> None:
        encoded = [b"\0" if v is None else b"\1" + v.encode("utf-8", "surrogateescape") for v in values]
        self.offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str | None:
        raw = self.buffer[self.offsets[i] : self.offsets[i + 1]].tobytes()
        return None if raw[:1] == b"\0" else raw[1:].decode("utf-8", "surrogateescape")


def _delimiter(path: Path, head: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    try:
        return csv.Sniffer().sniff(head, delimiters=",\t;|").delimiter
    except csv.Error:
        raise ValueError(f"cannot tell the delimiter of {path}; name it .csv or .tsv") from None


class CsvPairs(Dataset):
    """Image-text pairs listed in a CSV/TSV file with a header row; image paths are relative to
    the file's folder (absolute paths work too). The key of a sample is its path as written.

    Map-style, so a bad row cannot just be dropped: it is counted and the next row (cyclically)
    takes its place, which keeps every batch full.
    """

    def __init__(
        self,
        path: str | Path,
        image_size: int,
        *,
        image_column: str = "image",
        caption_column: str = "caption",
        augment: bool = False,
        max_bad_fraction: float = 0.05,
        min_seen: int = MIN_SEEN,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"data.path={str(path)!r}: no such CSV/TSV file")
        # surrogateescape: one row with broken bytes is a bad sample, not a broken file.
        with open(self.path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.DictReader(f, delimiter=_delimiter(self.path, f.read(65536)))
            f.seek(0)
            header = reader.fieldnames or []
            for column, field in ((image_column, "data.image_column"), (caption_column, "data.caption_column")):
                if column not in header:
                    raise ValueError(f"{self.path}: no column {column!r} ({field}); the header has {header}")
            images, captions = [], []
            for row in reader:
                images.append(row[image_column] or None)
                captions.append(row[caption_column])
        if not images:
            raise ValueError(f"{self.path} has a header but no rows")
        self.images, self.captions = _Strings(images), _Strings(captions)
        self.counter = BadSampleCounter(max_bad_fraction, min_seen)
        self.decode = _Decoder(image_size, augment, self.counter, max_pixels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        for step in range(n):
            sample = self.row((index + step) % n)
            if sample is not None:
                return sample
        raise BadDataError(f"no usable row in {self.path}: {self.counter.summary()}")

    def row(self, row: int) -> dict[str, Any] | None:
        """Row `row` as a sample, or None (counted) if it is bad; no substitution."""
        written = self.images[row]
        image = None if written is None else self.path.parent / written
        where = f"{self.path.name} row {row + 1} ({written})"
        return self.decode(image, self.captions[row], written or f"row{row + 1}", where)


# ----------------------------------------------------------------------------- from config


def build_pairs_dataset(
    cfg: DataConfig, image_size: int, *, seed: int = 0, rank: int | None = None, world_size: int | None = None
) -> ShardPairs | CsvPairs:
    """`DataConfig` -> a dataset of real pairs; its `.counter` holds the bad-sample counts."""
    common = dict(augment=cfg.augment, max_bad_fraction=cfg.max_bad_fraction)
    if cfg.source == "webdataset":
        return ShardPairs(
            cfg.path, image_size, resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer,
            seed=seed, rank=rank, world_size=world_size, **common,
        )
    if cfg.source == "csv":
        columns = dict(image_column=cfg.image_column, caption_column=cfg.caption_column)
        return CsvPairs(cfg.path, image_size, **columns, **common)
    raise ValueError(f"data.source={cfg.source!r}: build_pairs_dataset reads webdataset | csv (the world has its own)")


# ----------------------------------------------------------------------------- training data (data/loader.py)

TOKENIZER_CAPTIONS = 20_000  # captions read from the shards to train BPE when no tokenizer is given


class _Rows(Dataset):
    """CSV rows without substitution: a bad row becomes a marker that only carries the counts."""

    def __init__(self, pairs: CsvPairs) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, row: int) -> dict[str, Any]:
        return self.pairs.row(row) or {"bad_counts": self.pairs.counter.snapshot()}


def _collate_rows(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in samples if "image" in s]
    batch = collate(good) if good else {"image": None, "caption": [], "key": []}
    batch["bad_counts"] = {k: v for s in samples for k, v in s["bad_counts"].items()}
    return batch


class CsvArrays(NamedTuple):
    images: np.ndarray  # uint8 [N, S, S, 3], the usable rows in file order
    captions: list[str]
    keys: list[str]  # image paths as written in the file
    bad: dict[str, int]  # skipped rows by reason
    identity: str  # changes when a row, its order, or an image file (size, mtime) changes


def csv_identity(csv_path: Path, keys: Sequence[str]) -> str:
    """A digest of the file, every usable row's image path in order, and each image file's size and
    modification time: the cheap content check (one stat per row) that an h cache or a tokenizer built
    for these rows is keyed by, so that an edited CSV or a replaced image never reuses them."""
    digest = hashlib.sha256(str(csv_path.resolve()).encode())
    for key in keys:
        try:
            st = (csv_path.parent / key).stat()
            digest.update(f"{key}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        except OSError:
            digest.update(f"{key}\0missing\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def load_csv_arrays(cfg: DataConfig, image_size: int, progress: bool = True) -> CsvArrays:
    """Decode every usable CSV/TSV row once: uint8 images `[N, S, S, 3]`, captions, keys, bad counts.

    Bad rows are skipped and counted (and said on the console); the `max_bad_fraction` limit applies to
    the whole pass, however short the file. Rows are resized and center-cropped once, so `data.augment`
    cannot apply.
    """
    if cfg.augment:
        raise ValueError(
            "data.augment=true needs images decoded at every step, but data.source=csv decodes each row once "
            "into arrays; set data.augment=false, or write the pairs as webdataset shards"
        )
    pairs = CsvPairs(cfg.path, image_size, image_column=cfg.image_column, caption_column=cfg.caption_column,
                     max_bad_fraction=cfg.max_bad_fraction)
    loader = DataLoader(_Rows(pairs), batch_size=64, num_workers=cfg.num_workers, collate_fn=_collate_rows)
    images = np.empty((len(pairs), image_size, image_size, 3), dtype=np.uint8)
    captions: list[str] = []
    keys: list[str] = []
    for batch in tqdm(loader, desc=f"decoding {pairs.path.name}", unit="batch", disable=not progress):
        pairs.counter.merge(batch["bad_counts"])
        if batch["key"]:
            start = len(keys)
            # The transform resized uint8 pixels, then divided by 255: this is exact.
            pixels = batch["image"].mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1)
            images[start : start + len(batch["key"])] = pixels.numpy()
            captions += batch["caption"]
            keys += batch["key"]
    pairs.counter.check(final=True)
    if not keys:
        raise BadDataError(f"no usable row in {pairs.path}: {pairs.counter.summary()}")
    bad = dict(pairs.counter.totals()[1])
    if bad and progress:
        print(f"{pairs.path.name}: skipped {pairs.counter.summary()}", flush=True)
    return CsvArrays(images[: len(keys)], captions, keys, bad, csv_identity(pairs.path, keys))


def stream_captions(urls: Sequence[str], limit: int = TOKENIZER_CAPTIONS) -> Iterator[str]:
    """Up to `limit` usable captions from the shards, in order, reading only their `.txt` members."""
    samples = wds.tarfile_to_samples(handler=wds.warn_and_continue, select_files=lambda name: name.endswith(".txt"))(
        dict(url=u) for u in urls
    )
    count = 0
    for raw in samples:
        if count >= limit:
            return
        try:
            text = clean_caption(raw.get("txt"))
        except SampleError:
            continue
        count += 1
        yield text
