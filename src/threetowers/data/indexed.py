"""Training batches by step from indexed webdataset shards: exact resume, and h's embeddings per shard.

Every sample of every shard has a global row (shards in `data.path` order, samples in tar order).
The batch at step s is a pure function of (seed, s, rank), as for arrays in memory: positions
s·B .. s·B+B−1 of an endless sequence of epochs, each epoch a seeded pseudo-random permutation of
the rows. The permutation is a Feistel network over the rows (`permute`): computed per position,
in O(batch) time and memory, so 400M rows cost nothing to hold (an explicit permutation would be
3.2 GB per process). Within an epoch every row comes once; a batch never holds a row twice.

A bad sample (unreadable image, missing caption, ...) is counted by reason and its place is taken
by a substitute row drawn from a stream seeded by (seed, step, place): deterministic, so a resumed
run still sees exactly what the uninterrupted one saw. Rows whose image h's cache build could not
decode are known bad and skipped without reading them again.

Batches are made by a DataLoader over steps (`data.num_workers` processes decode in parallel,
pinned memory on CUDA); each batch carries its worker's bad-sample counts.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core.distributed import barrier_all
from ..schema import Config
from ..third.store import ShardEmbeddings, cache_dir_for
from .order import check_rows, step_rows, substitutes
from .samples import BadSampleCounter, SampleDecoder, clean_caption
from .shard_index import ShardIndex, load_or_build_index, shard_name
from .shards import expand_shards
from .transforms import DEFAULT_MAX_PIXELS, SampleError

class ShardRows:
    """The rows of several indexed shards as one range [0, N); reads a row's members with one seek."""

    def __init__(self, indexes: list[ShardIndex]):
        self.indexes = indexes
        self.starts = np.cumsum([0] + [len(i) for i in indexes])
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, row: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, row, side="right")) - 1
        return shard, row - int(self.starts[shard])

    def read(self, row: int) -> tuple[bytes | None, bytes | None, str, str]:
        """(image bytes, caption bytes, key, where) of a row."""
        shard, local = self.locate(row)
        index = self.indexes[shard]
        if os.getpid() != self._pid:  # a DataLoader worker: open its own files
            self._handles, self._pid = {}, os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = open(index.url, "rb")
        image, caption = index.read(local, handle)
        return image, caption, index.keys[local], f"{index.url}:{index.keys[local]}"


class StepBatches(Dataset):
    """Item s: this rank's share of the global batch at step s, decoded (map-style, by step)."""

    def __init__(self, rows: ShardRows, cfg: Config, rank: int, world_size: int,
                 embeddings: list[ShardEmbeddings] | None, with_images: bool):
        self.rows, self.cfg = rows, cfg
        self.seed, self.batch_size = cfg.train.seed, cfg.train.batch_size
        self.rank, self.per_rank = rank, cfg.train.batch_size // world_size
        self.counter = BadSampleCounter(cfg.data.max_bad_fraction)
        self.decoder = SampleDecoder(cfg.model.image.image_size, cfg.data.augment, self.counter, DEFAULT_MAX_PIXELS)
        self.embeddings = embeddings
        self.with_images = with_images
        # rows whose image h's cache build could not decode: skipped without reading them again
        self.known_bad = {int(rows.starts[i]) + r: why for i, e in enumerate(embeddings or []) for r, why in e.bad.items()}

    def _sample(self, row: int) -> dict | None:
        image, caption, key, where = self.rows.read(row)
        try:
            if row in self.known_bad:
                raise SampleError(self.known_bad[row], "its image was unreadable when h's embeddings were built")
            if self.with_images:
                pixels, text = self.decoder.decode(image, caption)
            else:  # LiT on cached h: the pixels are never looked at
                pixels, text = None, clean_caption(caption)
        except SampleError as err:
            self.counter.bad(err.reason, where, err.detail)
            return None
        self.counter.ok()
        sample = {"image": pixels, "caption": text, "key": key}
        if self.embeddings is not None:
            shard, local = self.rows.locate(row)
            sample["third"] = torch.from_numpy(self.embeddings[shard].embeddings[local].astype(np.float32))
        return sample

    def __getitem__(self, step: int) -> dict:
        rows = step_rows(self.seed, step, self.batch_size, len(self.rows))
        taken = set(rows.tolist())
        out = []
        for place in range(self.rank * self.per_rank, (self.rank + 1) * self.per_rank):
            # Augmentation draws from a generator seeded by (seed, step, place): the same on resume.
            with torch.random.fork_rng(devices=[], enabled=self.cfg.data.augment):
                if self.cfg.data.augment:
                    torch.manual_seed(hash((self.seed, step, place)) & 0x7FFFFFFF)
                sample = self._sample(int(rows[place]))
                candidates = substitutes(self.seed, step, place, len(self.rows))
                while sample is None:
                    row = next(r for r in candidates if r not in taken)
                    taken.add(row)
                    sample = self._sample(row)
            out.append(sample)
        batch = {"caption": [s["caption"] for s in out], "keys": [s["key"] for s in out],
                 "bad_counts": self.counter.snapshot()}
        if self.with_images:
            batch["image"] = torch.stack([s["image"] for s in out])
        if self.embeddings is not None:
            batch["third"] = torch.stack([s["third"] for s in out])
        return batch


class _Steps(Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class ShardTrainData:
    """Indexed webdataset shards as training batches by step: {"image", "tokens", "keys"[, "third"]}."""

    def __init__(self, cfg: Config, indexes: list[ShardIndex], tokenizer, rank: int = 0, world_size: int = 1,
                 embeddings: list[ShardEmbeddings] | None = None):
        self.rows = ShardRows(indexes)
        check_rows(len(self.rows), cfg.train.batch_size)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.third_embeddings = embeddings
        with_images = cfg.model.method != "lit" or embeddings is None
        self.dataset = StepBatches(self.rows, cfg, rank, world_size, embeddings, with_images)
        # problems of whole shards (cut short, unreadable), counted once, by rank 0
        self.shard_bad: dict[str, int] = {}
        for index in indexes if rank == 0 else []:
            for reason, n in index.bad.items():
                self.shard_bad[reason] = self.shard_bad.get(reason, 0) + n

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, start_step: int) -> Iterator[dict]:
        workers = self.cfg.data.num_workers
        loader = DataLoader(self.dataset, batch_size=None, sampler=_Steps(start_step), num_workers=workers,
                            pin_memory=torch.cuda.is_available(), prefetch_factor=2 if workers else None)
        for batch in loader:
            self.dataset.counter.merge(batch.pop("bad_counts"))
            batch["tokens"] = self.tokenizer(batch.pop("caption"))
            yield batch

    def bad_samples(self) -> dict[str, int]:
        counts = dict(self.dataset.counter.totals()[1])
        for reason, n in self.shard_bad.items():
            counts[reason] = counts.get(reason, 0) + n
        return counts


def shard_urls(cfg: Config) -> list[str]:
    urls = expand_shards(cfg.data.path)
    remote = [u for u in urls if not os.path.isfile(u)]
    if remote:
        raise ValueError(f"data.path: {remote[0]} is not a local file; indexed shards (exact resume, h's cache) need "
                         "shards on a (shared) filesystem. For remote shards set data.shard_access=stream "
                         "(and data.third_embeddings=online for lit/3t)")
    return urls


def index_shards(urls: list[str], root: Path, rank: int, world_size: int, report) -> list[ShardIndex]:
    """Every shard's index: each rank builds (or checks) every world_size-th, then all read all."""
    for i, url in enumerate(urls):
        if i % world_size == rank:
            load_or_build_index(url, root, report)
    barrier_all()
    return [load_or_build_index(url, root, report) for url in urls]


# ----------------------------------------------------------------------------- h's embeddings, shard by shard


class _ShardChunks(Dataset):
    """Item i: rows [i·b, (i+1)·b) of one shard, decoded without augmentation (what h sees)."""

    def __init__(self, index: ShardIndex, image_size: int, chunk: int):
        self.index, self.chunk = index, chunk
        self.rows = ShardRows([index])
        self.decoder = SampleDecoder(image_size, False, BadSampleCounter(1.0), DEFAULT_MAX_PIXELS)

    def __len__(self) -> int:
        return (len(self.index) + self.chunk - 1) // self.chunk

    def __getitem__(self, i: int) -> dict:
        good, images, bad = [], [], {}
        for row in range(i * self.chunk, min((i + 1) * self.chunk, len(self.index))):
            image, caption, _, _ = self.rows.read(row)
            try:
                images.append(self.decoder.decode(image, caption)[0])
                good.append(row)
            except SampleError as err:
                bad[row] = err.reason
        return {"rows": torch.tensor(good, dtype=torch.long),
                "image": torch.stack(images) if images else torch.zeros(0), "bad": bad}


def shard_embeddings(cfg: Config, third, indexes: list[ShardIndex], root: Path, rank: int, world_size: int,
                     report, progress: bool = True) -> list[ShardEmbeddings]:
    """h's embeddings of every shard: each rank builds the missing or stale ones of every
    world_size-th shard (decoding in `data.num_workers` processes), then all ranks open all.
    A shard whose embeddings were made for another h or another version of the shard is rebuilt,
    with a message naming it and the reason; a build killed mid-shard redoes only that shard."""
    info = third.info()
    directory = cache_dir_for(root, info, "shards")
    names = [shard_name(i.url) for i in indexes]
    mine = [i for i in range(len(indexes)) if i % world_size == rank]
    for n, i in enumerate(mine):
        index = indexes[i]
        found, why = ShardEmbeddings.open(directory, names[i], info, index.identity, len(index))
        if found is not None:
            continue
        if why != "not built yet":
            report(f"shard {index.url}: building h's embeddings again: {why}")
        chunks = DataLoader(_ShardChunks(index, cfg.model.image.image_size, 256), batch_size=None,
                            num_workers=cfg.data.num_workers)
        if progress:
            report(f"h's embeddings: shard {n + 1} of {len(mine)} on this rank ({index.url}, {len(index)} samples)")
        ShardEmbeddings.build(directory, names[i], third, index.identity, len(index), chunks)
    barrier_all()
    out = []
    for i, index in enumerate(indexes):
        found, why = ShardEmbeddings.open(directory, names[i], info, index.identity, len(index))
        if found is None:
            raise RuntimeError(f"h's embeddings of shard {index.url} are unusable after the build: {why}")
        out.append(found)
    return out
