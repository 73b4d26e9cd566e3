"""Webdataset tar shards in img2dataset layout (`KEY.jpg` + `KEY.txt`) as a stream of pairs."""

from __future__ import annotations

import itertools
import os
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import webdataset as wds
from torch.utils.data import IterableDataset

from .transforms import DEFAULT_MAX_PIXELS, SampleError
from .samples import IMAGE_EXTENSIONS, MIN_SEEN, BadSampleCounter, SampleDecoder, clean_caption


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
        third_size: int = 0,
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
        self.decode = SampleDecoder(image_size, augment, self.counter, max_pixels, third_size)  # h's pixels too
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



TOKENIZER_CAPTIONS = 20_000  # captions read from the shards to train BPE when no tokenizer is given


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
