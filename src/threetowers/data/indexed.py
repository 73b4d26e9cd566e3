"""Training batches by step from indexed webdataset shards: exact resume, and h's embeddings per shard.

Every sample of every shard has a global row (shards in `data.path` order, samples in tar order).
The batch at step s is a pure function of (seed, s, rank), as for arrays in memory
(`order.step_rows`). A bad sample (unreadable image, missing caption, ...) is counted by reason and
its place is taken by a substitute row from a stream seeded by (seed, step, place): deterministic,
so a resumed run still sees exactly what the uninterrupted one saw. Rows whose image h's cache
build could not decode are known bad and skipped without reading them again.

Preparing the shards (`prepare_shards`) scales out: each rank indexes, and for lit/3t runs each h over,
every world_size-th shard (resumably: finished shards are kept); then rank 0 writes one manifest
(row counts, shard problems, known-bad rows) that every rank reads, so that no rank has to open
every shard's files at start. While training, a process keeps a bounded number of shard files,
indexes and embedding files open (memory-mapped, least recently used closed first): memory does
not grow with the number of samples beyond 8 bytes a shard.

Batches are made by a DataLoader over steps (`data.num_workers` processes decode in parallel,
pinned memory on CUDA); each batch carries its worker's bad-sample counts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..core.atomic import write_json_atomic
from ..core.distributed import any_rank, barrier_all
from ..core.preemption import preempted, stop_requested
from ..schema import Config
from ..third.store import ShardEmbeddings, cache_dir_for
from .order import check_rows, step_loader, step_rows, substitutes
from .samples import BadSampleCounter, SampleDecoder, clean_caption, decode_chunk
from .shard_index import ensure_index, open_index, read_member, shard_name
from .shards import expand_shards
from .transforms import DEFAULT_MAX_PIXELS, SampleError

MAX_OPEN = 64  # shard files (and their index and embedding maps) a process keeps open


@dataclass
class ShardSet:
    """What training needs to know about its shards (from the manifest `prepare_shards` writes)."""

    urls: list[str]
    names: list[str]
    rows: list[int]
    index_dir: Path
    embedding_dirs: list[Path]  # each h's embeddings (model.thirds order), one .npy per shard ([]: CLIP, or h online)
    known_bad: dict[int, str]  # global row -> why its image could not be decoded when an h's cache was built
    shard_bad: dict[str, int]  # problems of whole shards (cut short, unreadable), by reason
    dataset_id: str  # changes when a shard is added, removed, reordered or rewritten

    @property
    def embedding_dir(self) -> Path | None:
        """The first h's embeddings (one h: its only ones); None without a cache."""
        return self.embedding_dirs[0] if self.embedding_dirs else None


class _Opened:
    """At most `limit` open things by key; the least recently used is closed first."""

    def __init__(self, limit: int, opener: Callable, closer: Callable = lambda item: None):
        self.items: OrderedDict = OrderedDict()
        self.limit, self.opener, self.closer = limit, opener, closer

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        item = self.items[key] = self.opener(key)
        if len(self.items) > self.limit:
            self.closer(self.items.popitem(last=False)[1])
        return item


class ShardRows:
    """The rows of the shards as one range [0, N): one seek reads a row's members."""

    def __init__(self, shards: ShardSet, max_open: int = MAX_OPEN):
        self.shards, self.max_open = shards, max_open
        self.starts = np.cumsum([0] + list(shards.rows))
        self._pid = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _open(self) -> None:
        """Per process: a DataLoader worker opens files of its own."""
        s = self.shards
        self.files = _Opened(self.max_open, lambda i: open(s.urls[i], "rb"), lambda fh: fh.close())
        self.indexes = _Opened(self.max_open, lambda i: open_index(s.index_dir, s.names[i]))
        # Keyed by (h, shard): each h's embedding file of a shard, under the same bound.
        self.third = _Opened(self.max_open, lambda key: np.load(s.embedding_dirs[key[0]] / f"{s.names[key[1]]}.npy",
                                                                mmap_mode="r"))
        self._pid = os.getpid()

    def locate(self, row: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.starts, row, side="right")) - 1
        return shard, row - int(self.starts[shard])

    def read(self, row: int, image: bool = True, caption: bool = True) -> tuple[bytes | None, bytes | None, str, str]:
        """(image bytes, caption bytes, key, where) of a row; a member not asked for is not read (None)."""
        if self._pid != os.getpid():
            self._open()
        shard, local = self.locate(row)
        record = self.indexes.get(shard)[local]
        key = record["key"].decode("utf-8", "surrogateescape")
        handle = self.files.get(shard) if image or caption else None
        return (read_member(handle, record["image"]) if image else None,
                read_member(handle, record["caption"]) if caption else None, key, f"{self.shards.urls[shard]}:{key}")

    def third_embedding(self, row: int, k: int = 0) -> torch.Tensor:
        """h_k's cached pre-logits of a row (k in model.thirds order), as float32."""
        if self._pid != os.getpid():
            self._open()
        shard, local = self.locate(row)
        return torch.from_numpy(self.third.get((k, shard))[local].astype(np.float32))


class StepBatches(Dataset):
    """Item s: this rank's share of the global batch at step s, decoded (map-style, by step)."""

    def __init__(self, rows: ShardRows, cfg: Config, rank: int, world_size: int, with_images: bool,
                 third_size: int = 0):
        self.rows, self.cfg = rows, cfg
        self.seed, self.batch_size = cfg.train.seed, cfg.train.batch_size
        self.rank, self.per_rank = rank, cfg.train.batch_size // world_size
        self.counter = BadSampleCounter(cfg.data.max_bad_fraction)
        self.decoder = SampleDecoder(cfg.model.image.image_size, cfg.data.augment, self.counter, DEFAULT_MAX_PIXELS,
                                     third_size)
        self.with_images = with_images
        self.with_third = bool(rows.shards.embedding_dirs)

    def _sample(self, row: int) -> dict | None:
        known_bad = row in self.rows.shards.known_bad  # then nothing but the index is read
        image, caption, key, where = self.rows.read(row, image=self.with_images and not known_bad,
                                                     caption=not known_bad)
        try:
            if known_bad:
                raise SampleError(self.rows.shards.known_bad[row], "its image was unreadable when h's cache was built")
            if self.with_images:
                sample = self.decoder.decode_views(image, caption)
            else:  # LiT on cached h: the pixels are never looked at
                sample = {"image": None, "caption": clean_caption(caption)}
        except SampleError as err:
            self.counter.bad(err.reason, where, err.detail)
            return None
        self.counter.ok()
        sample["key"] = key
        if self.with_third:
            # The h's side by side, [sum of their dims], as the model takes them (one tensor to collate and ship).
            sample["third"] = torch.cat([self.rows.third_embedding(row, k) for k in range(len(self.rows.shards.embedding_dirs))])
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
        if self.decoder.third is not None:
            batch["third_image"] = torch.stack([s["third_image"] for s in out])
        if self.with_third:
            batch["third"] = torch.stack([s["third"] for s in out])
        return batch


class ShardTrainData:
    """Indexed webdataset shards as training batches by step: {"image", "tokens", "keys"[, "third"]}; "third"
    holds every h's cached embeddings side by side, [B, sum of their dims] in model.thirds order."""

    def __init__(self, cfg: Config, shards: ShardSet, tokenizer, rank: int = 0, world_size: int = 1,
                 third_size: int = 0):
        """`third_size`: h's input size when h runs online (batches then carry its pixels, `third_image`)."""
        self.rows = ShardRows(shards)
        check_rows(len(self.rows), cfg.train.batch_size)
        self.cfg, self.tokenizer, self.shards, self.rank = cfg, tokenizer, shards, rank
        with_images = cfg.model.method != "lit" or not shards.embedding_dirs
        self.dataset = StepBatches(self.rows, cfg, rank, world_size, with_images, third_size)

    def __len__(self) -> int:
        return len(self.rows)

    def batches(self, start_step: int) -> Iterator[dict]:
        for batch in step_loader(self.dataset.__getitem__, start_step, self.cfg.data.num_workers):
            self.dataset.counter.merge(batch.pop("bad_counts"))
            batch["tokens"] = self.tokenizer(batch.pop("caption"))
            yield batch

    def bad_samples(self) -> dict[str, int]:
        counts = dict(self.dataset.counter.totals()[1])
        for reason, n in (self.shards.shard_bad.items() if self.rank == 0 else ()):  # whole shards: counted once
            counts[reason] = counts.get(reason, 0) + n
        return counts


# ----------------------------------------------------------------------------- preparing the shards


def shard_urls(cfg: Config) -> list[str]:
    urls = expand_shards(cfg.data.path)
    remote = [u for u in urls if not os.path.isfile(u)]
    if remote:
        raise ValueError(f"data.path: {remote[0]} is not a local file; indexed shards (exact resume, h's cache) need "
                         "shards on a (shared) filesystem. For remote shards set data.shard_access=stream "
                         "(and data.third_embeddings=online for lit/3t)")
    return urls


def prepare_shards(cfg: Config, urls: list[str], root: Path, thirds: list | None, rank: int, world_size: int,
                   report: Callable[[str], None]) -> ShardSet:
    """Index the shards and, for each h of `thirds`, cache its embeddings of every sample (one embedding
    folder per h); return the ShardSet.

    Each rank checks or builds every world_size-th shard (a killed build redoes only the shard it
    was in; a shard rewritten since, or embeddings made by another h, are rebuilt with a message
    naming the shard and the reason); then rank 0 writes the manifest every rank reads. A stop signal
    stops each rank between two of its shards (`Preempted` on every rank, what is finished kept)."""
    index_dir = root / "index"
    thirds = list(thirds or [])
    embedding_dirs = [cache_dir_for(root, third.info(), "shards") for third in thirds]
    mine = [i for i in range(len(urls)) if i % world_size == rank]
    ready = len(mine)
    for n, i in enumerate(mine):
        if stop_requested():  # between two shards: every finished one is kept, the next run goes on from here
            ready = n
            break
        meta = ensure_index(urls[i], index_dir, report)
        for third, embedding_dir in zip(thirds, embedding_dirs):
            found, why = ShardEmbeddings.open(embedding_dir, meta["name"], third.info(), meta["identity"], meta["rows"])
            if found is not None:
                continue
            if why != "not built yet":
                report(f"shard {urls[i]}: building the embeddings of h {third.name} again: {why}")
            if cfg.train.progress:
                report(f"embeddings of h {third.name}: shard {n + 1} of {len(mine)} on this rank ({urls[i]}, "
                       f"{meta['rows']} samples)")
            # h's pixels: decoded at h's own input size (never f's), as online h gets them too.
            chunks = DataLoader(ShardChunks(urls[i], index_dir, meta["name"], third.preprocessing.input_size,
                                             cfg.data.cache_batch_size),
                                batch_size=None, num_workers=cfg.data.num_workers,
                                pin_memory=third.device.type == "cuda")
            ShardEmbeddings.build(embedding_dir, meta["name"], third, meta["identity"], meta["rows"], chunks)
    if any_rank(ready < len(mine)):  # also the barrier before the manifest
        raise preempted(f"while preparing the shards ({ready} of this rank's {len(mine)} ready and kept)")
    # Named by the shards and each h's whole identity (its embedding folder), so that runs with other h's, or
    # one h in two precisions, never share a manifest.
    tag = hashlib.sha256(json.dumps([urls, [str(d) for d in embedding_dirs] or None]).encode())
    manifest_path = root / "manifests" / f"{tag.hexdigest()[:20]}.json"
    if rank == 0:
        write_json_atomic(manifest_path, _manifest(urls, index_dir, embedding_dirs))
    barrier_all()
    m = json.loads(manifest_path.read_text())
    return ShardSet(urls, m["names"], m["rows"], index_dir, embedding_dirs, {int(r): w for r, w in m["known_bad"].items()},
                    m["shard_bad"], m["dataset_id"])


def _manifest(urls: list[str], index_dir: Path, embedding_dirs: list[Path]) -> dict:
    """Rank 0, after every shard is ready: what the other ranks need, in one file."""
    names = [shard_name(u) for u in urls]
    metas = [json.loads((index_dir / f"{name}.index.json").read_text()) for name in names]
    known_bad: dict[int, str] = {}
    start = 0
    for name, meta in zip(names, metas):
        for embedding_dir in embedding_dirs:  # a row any h could not decode (at its own size) is skipped
            record = json.loads((embedding_dir / f"{name}.json").read_text())
            known_bad.update({start + int(r): why for r, why in record.get("bad", {}).items()})
        start += meta["rows"]
    shard_bad: dict[str, int] = {}
    for meta in metas:
        for reason, n in meta["bad"].items():
            shard_bad[reason] = shard_bad.get(reason, 0) + n
    identity = [(m["identity"]["path"], m["identity"]["size"], m["identity"]["edges"]) for m in metas]
    return {"names": names, "rows": [m["rows"] for m in metas], "known_bad": {str(k): v for k, v in known_bad.items()},
            "shard_bad": shard_bad, "dataset_id": "shards-" + hashlib.sha256(repr(identity).encode()).hexdigest()[:16]}


class ShardChunks(Dataset):
    """Item i: rows [i·b, (i+1)·b) of one shard, decoded at h's input size without augmentation (what h sees).

    `captions=False` (embedding a trained tower's view of images): a row needs its image only."""

    def __init__(self, url: str, index_dir: Path, name: str, image_size: int, chunk: int, captions: bool = True):
        self.url, self.index_dir, self.name, self.chunk, self.captions = url, index_dir, name, chunk, captions
        self.rows = len(open_index(index_dir, name))
        self.decoder = SampleDecoder(image_size, False, BadSampleCounter(1.0), DEFAULT_MAX_PIXELS)

    def __len__(self) -> int:
        return (self.rows + self.chunk - 1) // self.chunk

    def __getitem__(self, i: int) -> dict:
        records = open_index(self.index_dir, self.name)
        with open(self.url, "rb") as fh:
            def pixels(record) -> torch.Tensor:
                image = read_member(fh, record["image"])
                if not self.captions:
                    return self.decoder.decode_image(image)
                return self.decoder.decode(image, read_member(fh, record["caption"]))[0]

            rows = range(i * self.chunk, min((i + 1) * self.chunk, self.rows))
            return decode_chunk((row, lambda record=records[row]: pixels(record)) for row in rows)
