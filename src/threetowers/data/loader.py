"""Training batches by step: config -> data + tokenizer (+ h's cached embeddings) -> batches.

Every source yields, for each step, this rank's share of the global batch. For the world, CSV
files and indexed webdataset shards the batch at step s is a pure function of (seed, s, rank)
(`data/order.py`), so resuming at step s sees exactly the batches an uninterrupted run would have
seen, with no loader state to save. `ArrayTrainData` serves rows held in memory (the world, CSV),
`ShardTrainData` (data/indexed.py) indexed shards, `StreamTrainData` shards read as a stream
(`data.shard_access=stream`: any URL; on resume the order is re-seeded from the step, statistically
equivalent, not bit-identical).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..core.atomic import write_text_atomic
from ..core.distributed import rank0_first
from ..schema import Config, ConfigError, third_sections
from ..third.store import FeatureCache, build_feature_cache, cache_dir_for
from ..third.tower import per_third
from ..world import World
from .clip_bpe import open_clip_tokenizer
from .csv_pairs import load_csv_arrays
from .indexed import ShardTrainData, prepare_shards, shard_urls
from .order import check_rows, global_indices, step_loader
from .samples import collate
from .shards import ShardPairs, stream_captions
from .tokenizer import Tokenizer, load_tokenizer


class ArrayTrainData:
    """Rows held as arrays (uint8 images, token ids or labels, optional cached embeddings of each h),
    served by step through the DataLoader every source uses (`data.num_workers`, pinned memory on CUDA).

    Images leave as stored, uint8 [B, H, W, 3] (a quarter of float32's bytes to ship); the model
    converts and resizes them on its device. `third_images`: h's own pixels of the rows (CSV decoded
    at h's input size) when h runs online and they differ from `images`. `third_caches`: one cache per h
    (model.thirds order); a batch then carries `third`, the h's embeddings of its rows side by side,
    [B, sum of their dims] (one tensor: the trainer ships and splits a batch's tensors).
    """

    def __init__(self, images: np.ndarray, columns: dict[str, torch.Tensor], keys: list[str], cfg: Config,
                 rank: int = 0, world_size: int = 1, third_caches: list[FeatureCache] | None = None, tokenizer=None,
                 with_images: bool = True, third_images: np.ndarray | None = None,
                 bad: dict[str, int] | None = None):
        check_rows(len(images), cfg.train.batch_size)
        self.images, self.columns, self.keys = images, columns, keys
        self.seed, self.batch_size = cfg.train.seed, cfg.train.batch_size
        self.rank, self.world_size = rank, world_size
        self.num_workers = cfg.data.num_workers
        self.third_caches = list(third_caches or [])
        self.third_images = third_images
        self.tokenizer = tokenizer
        self.with_images = with_images  # False: LiT on cached h never looks at the pixels
        self.bad = dict(bad or {})  # rows skipped when the arrays were built, by reason

    def __len__(self) -> int:
        return len(self.images)

    @property
    def third_cache(self) -> FeatureCache | None:
        """The first h's cache (one h: its only one)."""
        return self.third_caches[0] if self.third_caches else None

    def batch(self, step: int) -> dict:
        per_rank = self.batch_size // self.world_size
        idx = global_indices(self.seed, step, self.batch_size, len(self))[self.rank * per_rank:(self.rank + 1) * per_rank]
        batch = {"keys": [self.keys[i] for i in idx]}
        if self.with_images:
            batch["image"] = _take(self.images, idx)
        if self.third_images is not None:
            batch["third_image"] = _take(self.third_images, idx)
        for name, column in self.columns.items():
            batch[name] = column[idx]
        if self.third_caches:
            batch["third"] = torch.cat([cache.rows(idx) for cache in self.third_caches], dim=1)
        return batch

    def batches(self, start_step: int) -> Iterator[dict]:
        return iter(step_loader(self.batch, start_step, self.num_workers))

    def bad_samples(self) -> dict[str, int]:
        return dict(self.bad)


def _take(images: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    """Rows `idx` of a uint8 array as a tensor; sorted reads are kinder to a memory-mapped array, and
    the order within the batch is restored."""
    order = np.argsort(idx)
    out = np.empty((len(idx), *images.shape[1:]), dtype=np.uint8)
    out[order] = images[idx[order]]
    return torch.from_numpy(out)


def dataset_id(kind: str, *parts: object) -> str:
    return f"{kind}-" + hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


TOKENIZER_SOURCE = "tokenizer.source"  # beside tokenizer.json: what it was trained on


def load_or_train_tokenizer(cfg: Config, captions: Iterable[str], output_dir: str | Path | None, data_id: str):
    """The run's tokenizer: a given tokenizer.json, the one saved with this run (resume), or BPE
    trained on the training captions (and saved with the run).

    The saved one is reused only if it was trained on the same data (`data_id`, recorded beside it)
    with the same vocabulary size: a new run on other data in the same output directory trains its own.
    """
    context = cfg.model.text.context_length
    if cfg.model.text.kind == "hf" or cfg.model.init_from:  # a pretrained g reads its own tokenizer (saved with the run)
        tokenizer = open_clip_tokenizer(cfg.model) if cfg.model.init_from else \
            load_tokenizer(Path(cfg.model.text.name) / "tokenizer.json", cfg.model.text)
        if output_dir:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            tokenizer.save(Path(output_dir) / "tokenizer.json")
        return tokenizer
    if cfg.data.tokenizer:
        return Tokenizer.from_file(cfg.data.tokenizer, context)
    saved = Path(output_dir) / "tokenizer.json" if output_dir else None
    source = f"{data_id} vocab={cfg.model.text.vocab_size}"
    if saved is not None and saved.exists():
        recorded = saved.with_name(TOKENIZER_SOURCE)
        if recorded.is_file() and recorded.read_text(encoding="utf-8").strip() == source:
            return Tokenizer.from_file(saved, context)
        print(f"{saved} was trained on other data or with another vocabulary size; training a new one in its "
              "place", flush=True)
    tokenizer = Tokenizer.train(captions, cfg.model.text.vocab_size, context)
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(saved)
        write_text_atomic(saved.with_name(TOKENIZER_SOURCE), source + "\n")
    return tokenizer


def third_caches_for(cfg: Config, thirds: list, ds_id: str, keys: list[str],
                     pixels: Callable[[int], Callable[[], np.ndarray]], progress: bool = True) -> list[FeatureCache]:
    """Each h's embeddings over the training rows (one cache per h, model.thirds order), built once
    (resumably) and reused across runs; [] when training does not read a cache.
    `pixels(size)()`: h's pixels of the rows for an h of input size `size` (uint8 [N, H, W, 3], at that
    size or as stored), loaded only if a cache has to be built."""
    if not caches_third(cfg, thirds):
        return []
    caches = []
    for third in thirds:
        directory = cache_dir_for(cache_root(cfg), third.info(), ds_id)
        rows = pixels(third.preprocessing.input_size)
        # Rank 0 builds (or resumes) the cache; the other ranks then find it complete and only read it.
        caches.append(rank0_first(lambda: build_feature_cache(
            directory, third, third.info(), ds_id, keys, lambda s, e: torch.from_numpy(np.array(rows()[s:e])),
            batch_size=cfg.data.cache_batch_size, progress=progress)))
    return caches


def caches_third(cfg: Config, thirds: list) -> bool:
    """Whether training reads the h's embeddings from caches (and so never runs an h in a step)."""
    return cfg.model.method != "clip" and cfg.data.third_embeddings == "cache" and bool(thirds)


def online_third_size(cfg: Config, thirds: list) -> int:
    """The h's input size when they run in every step (their pixels then travel in the batch, once for
    them all); 0 otherwise. h's of several input sizes would each need pixels of their own: refused
    where the data decodes pixels for h (CSV, shards); the world's stored pixels serve every h."""
    if not (cfg.model.method != "clip" and cfg.data.third_embeddings == "online" and thirds):
        return 0
    sizes = sorted({t.preprocessing.input_size for t in thirds})
    if len(sizes) > 1 and cfg.data.source != "world":
        raise ConfigError(f"data.third_embeddings=online with data.source={cfg.data.source}: the h's of model.thirds "
                          f"take input sizes {sizes}, and online h's share one decoding of the pixels; give them one "
                          "input_size, or use data.third_embeddings=cache")
    return sizes[-1]


def _csv_third_images(cfg: Config, size: int, keys: list[str], progress: bool) -> Callable[[], np.ndarray]:
    """The CSV's rows decoded at h's input size `size`, for h (loaded on first use: a complete cache needs none).
    No collective inside: the cache build calls it on rank 0 alone; callers on every rank wrap it in
    `rank0_first`."""
    held: list[np.ndarray] = []

    def load() -> np.ndarray:
        if not held:
            arrays = load_csv_arrays(cfg.data, size, progress=progress, store=cache_root(cfg) / "csv")
            if arrays.keys != keys:  # the same rows decode at any size; a difference means the files changed
                raise ValueError(f"data.path={cfg.data.path}: the rows decoded at h's input size "
                                 f"({size} px) differ from those at f's; was the CSV or an "
                                 "image changed during the run? Run again")
            held.append(arrays.images)
        return held[0]

    return load


def build_train_data(cfg: Config, rank: int = 0, world_size: int = 1,
                     third=None) -> ArrayTrainData | ShardTrainData | StreamTrainData:
    """Contrastive training data for `cfg`: images, tokens and, for lit/3t with the cache, each h's
    embeddings. `third`: the built h's (a list in model.thirds order; one h alone will do)."""
    thirds = [t for t in per_third(third, len(third_sections(cfg.model)), "third") if t is not None]
    source = cfg.data.source
    if source == "world":
        world = World(cfg.data.world, progress=rank == 0)
        pairs = rank0_first(lambda: world.pairs("train"))  # rank 0 renders, the others read its cache
        images, captions, keys = pairs.images, pairs.captions, pairs.keys
        ds_id = dataset_id("world", cfg.data.world.seed, pairs.keys[0], len(keys))  # keys carry the world's hash
        bad: dict[str, int] = {}
        third_images = lambda size: lambda: images  # noqa: E731  (every h sees the rendered pixels, resized to its own size)
    elif source == "csv":
        # Decoded once into a memory-mapped file under the cache root (rank 0 decodes, the others map it).
        images, captions, keys, bad, identity = rank0_first(lambda: load_csv_arrays(
            cfg.data, cfg.model.image.image_size, progress=rank == 0, store=cache_root(cfg) / "csv"))
        ds_id = dataset_id("csv", identity, len(keys))
        third_images = lambda size: _csv_third_images(cfg, size, keys, rank == 0)  # noqa: E731  (at each h's size)
    elif cfg.data.shard_access == "stream":
        return StreamTrainData(cfg, rank, world_size, third_size=online_third_size(cfg, thirds))
    else:
        return indexed_shard_data(cfg, rank, world_size, thirds)
    tokenizer = rank0_first(lambda: load_or_train_tokenizer(cfg, captions, cfg.train.output_dir, ds_id))
    tokens = tokenizer(captions)
    caches = third_caches_for(cfg, thirds, ds_id, keys, third_images, progress=rank == 0)
    # Online h on a CSV decoded at f's size needs its own pixels when its size differs (rank 0 decodes,
    # the others map its files); the world's stored pixels serve f and h alike.
    size = online_third_size(cfg, thirds)
    own_pixels = rank0_first(third_images(size)) if source == "csv" and size not in (0, cfg.model.image.image_size) \
        else None
    return ArrayTrainData(images, {"tokens": tokens}, keys, cfg, rank, world_size, caches, tokenizer,
                          with_images=cfg.model.method != "lit" or not caches, third_images=own_pixels,
                          bad=bad if rank == 0 else {})  # the trainer sums ranks' counts; one pass, counted once


def indexed_shard_data(cfg: Config, rank: int = 0, world_size: int = 1, thirds: list | None = None) -> ShardTrainData:
    """Indexed local shards: the ranks index (and, for lit/3t with the cache, run each h over) their share
    of the shards, resumably, then every rank reads the manifest of them all."""
    report = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    thirds = list(thirds or [])
    cached = caches_third(cfg, thirds)
    urls = shard_urls(cfg)
    shards = prepare_shards(cfg, urls, cache_root(cfg), thirds if cached else [], rank, world_size, report)
    tokenizer = rank0_first(lambda: load_or_train_tokenizer(cfg, stream_captions(urls), cfg.train.output_dir,
                                                            shards.dataset_id))
    return ShardTrainData(cfg, shards, tokenizer, rank, world_size, third_size=online_third_size(cfg, thirds))


def cache_summary(data: ArrayTrainData | ShardTrainData, thirds: list) -> str:
    """One line per h on its embedding cache of `data`, for `threetowers cache`."""
    if isinstance(data, ShardTrainData):
        bad: dict[str, int] = {}
        for reason in data.shards.known_bad.values():
            bad[reason] = bad.get(reason, 0) + 1
        unreadable = f"; images unreadable: {', '.join(f'{k} x{v}' for k, v in sorted(bad.items()))}" if bad else ""
        return "\n".join(f"{len(data)} samples in {len(data.shards.urls)} shards: embeddings of {third.name} "
                         f"({third.dim}-d) in {directory}{unreadable}"
                         for third, directory in zip(thirds, data.shards.embedding_dirs))
    return "\n".join(f"{len(cache)} embeddings of {third.name} ({third.dim}-d) in {cache.directory}"
                     for third, cache in zip(thirds, data.third_caches))


def cache_root(cfg: Config) -> Path:
    """Where h's embeddings and shard indexes live: data.cache_dir, else <output_dir>/../cache."""
    return Path(cfg.data.cache_dir or Path(cfg.train.output_dir).parent / "cache")


def labelled_train_data(train, cfg: Config, rank: int = 0, world_size: int = 1) -> ArrayTrainData:
    """Batches {"image", "label"} over a `LabelledSet`, for supervised pretraining of a third tower."""
    keys = [f"labelled-{i:07d}" for i in range(len(train.labels))]
    return ArrayTrainData(train.images, {"label": torch.as_tensor(train.labels, dtype=torch.long)}, keys, cfg,
                          rank, world_size)


class StreamTrainData:
    """Webdataset shards as training batches by step: `{"image", "keys", "tokens"}` for this rank.

    The shards stream through a DataLoader (`data.num_workers`); on resume at step s the sample order
    is re-seeded from s (statistically equivalent to the uninterrupted run, not identical). Without
    `data.resampled` the shards are read epoch after epoch, forever. h's embeddings cannot be cached
    by row for a stream, so lit/3t need `data.third_embeddings=online` (the trainer runs h).
    """

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, third_size: int = 0) -> None:
        if cfg.model.method != "clip" and cfg.data.third_embeddings == "cache":
            raise ValueError(
                f"data.shard_access=stream reads samples as a stream, so h's embeddings cannot be cached for "
                f"model.method={cfg.model.method}; set data.third_embeddings=online, or use data.shard_access=indexed "
                "(local shards)"
            )
        self.per_rank = cfg.train.batch_size // world_size
        self.num_workers = cfg.data.num_workers
        self.dataset = ShardPairs(
            cfg.data.path, cfg.model.image.image_size, augment=cfg.data.augment, resampled=cfg.data.resampled,
            shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.train.seed, rank=rank, world_size=world_size,
            max_bad_fraction=cfg.data.max_bad_fraction, third_size=third_size,
        )
        # A generator: the shards are only read if a tokenizer has to be trained.
        shards = dataset_id("shards", [(u, os.path.getsize(u) if os.path.isfile(u) else None) for u in self.dataset.urls])
        self.tokenizer = load_or_train_tokenizer(cfg, stream_captions(self.dataset.urls), cfg.train.output_dir, shards)

    def batches(self, start_step: int) -> Iterator[dict]:
        for restart in itertools.count():
            self.dataset.set_epoch(start_step + restart)  # also seeds the order: a resume gets a fresh one
            loader = DataLoader(self.dataset, batch_size=self.per_rank, num_workers=self.num_workers,
                                collate_fn=collate, drop_last=True)
            empty = True
            for batch in loader:
                empty = False
                self.dataset.counter.merge(batch["bad_counts"])
                out = {"image": batch["image"], "keys": batch["key"], "tokens": self.tokenizer(batch["caption"])}
                if "third_image" in batch:
                    out["third_image"] = batch["third_image"]
                yield out
            if empty:
                raise ValueError(
                    f"data.path={self.dataset.urls[0]!r}...: this rank got fewer than one batch "
                    f"({self.per_rank} samples) from its shards; use more shards or data.resampled=true"
                )

    def bad_samples(self) -> dict[str, int]:
        return dict(self.dataset.counter.totals()[1])
