"""The on-disk cache of rendered sets, and `world_hash`, the key that says which world a cached set belongs to.

Large sets are rendered once into <cache root>/<hash>-<stream>-<n>.npy (uint8 images, memory-mapped
copy-on-write on read) with a .json of the samples' records beside it. Both are written atomically,
and a set is trusted only when both exist and agree with a fresh render of a few samples, so a
killed writer or a stale file costs a rebuild, never wrong data.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..core.atomic import atomic_path, write_text_atomic
from ..schema import WorldConfig
from .sprites import Source, make_sources

RENDER_VERSION = 1  # bump when pixels or captions change for the same config

# Sample i of a stream: (uint8 [S, S, 3], its JSON-able record).
Sample = Callable[[int], tuple[np.ndarray, dict]]


def sources_hash(cfg: WorldConfig, sources: list[Source]) -> str:
    """`world_hash` for sources already built (building a folder source lists its files)."""
    ident = {"v": RENDER_VERSION, "seed": cfg.seed, "size": cfg.image_size, "noise": cfg.caption_noise,
             "sprites": [s.identity() for s in sources]}
    # added later: counted only when set, so older worlds keep their hash
    for field, default in (("colour_words", 1.0), ("scene_words", 1.0), ("max_objects", 3), ("object_scale", 1.0)):
        if getattr(cfg, field) != default:
            ident[field] = getattr(cfg, field)
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def world_hash(cfg: WorldConfig) -> str:
    """Short hash of everything that changes pixels or captions (not num_pairs or cache_dir)."""
    return sources_hash(cfg, make_sources(cfg.sprites))


def cache_root(cfg: WorldConfig) -> Path:
    """cfg.cache_dir, else $THREETOWERS_CACHE/world, else ~/.cache/threetowers/world."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("THREETOWERS_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "threetowers") / "world"


class SetCache:
    """Renders sets of one world: in memory below `min_n` images, else through the cache on disk."""

    def __init__(self, cfg: WorldConfig, world_hash: str, min_n: int, progress: bool) -> None:
        self.cfg = cfg
        self.hash = world_hash
        self.min_n = min_n
        self.progress = progress

    def get(self, stream: str, n: int, sample: Sample, tag: str = "") -> tuple[np.ndarray, list[dict]]:
        """Samples 0..n-1 of a stream; `tag` tells apart cached sets of one stream drawn differently."""
        if n < self.min_n:
            return self._in_memory(stream, n, sample)
        base = cache_root(self.cfg) / f"{self.hash}-{(stream + tag).replace('/', '_')}-{n}"
        npy, meta = Path(f"{base}.npy"), Path(f"{base}.json")
        loaded = self._load(npy, meta, n, sample)
        if loaded is not None:
            return loaded
        records: list[dict] = []
        try:
            # Streamed chunk by chunk: memory stays bounded for any n. The images first, then the
            # records: a set counts as cached only once both exist and agree (see _load).
            with atomic_path(npy) as tmp, open(tmp, "wb") as f:
                shape = (n, self.cfg.image_size, self.cfg.image_size, 3)
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                f.writelines(chunk.tobytes() for chunk in self._chunks(stream, n, sample, records))
            write_text_atomic(meta, json.dumps({"hash": self.hash, "stream": stream, "n": n, "records": records}))
        except OSError as err:
            warnings.warn(f"world cache {npy.parent} is not writable ({err}); rendering {n} images in memory")
            return self._in_memory(stream, n, sample)
        return np.load(npy, mmap_mode="c"), records

    def _chunks(self, stream: str, n: int, sample: Sample, records: list[dict]) -> Iterator[np.ndarray]:
        """Render samples 0..n-1 in chunks of uint8 images, appending their records; a progress bar for big sets."""
        size = self.cfg.image_size
        with tqdm(total=n, desc=f"rendering world {stream}", unit="img", disable=not self.progress or n < 2000) as bar:
            for start in range(0, n, 1024):
                chunk = np.empty((min(1024, n - start), size, size, 3), np.uint8)
                for i in range(len(chunk)):
                    chunk[i], record = sample(start + i)
                    records.append(record)
                bar.update(len(chunk))
                yield chunk

    def _in_memory(self, stream: str, n: int, sample: Sample) -> tuple[np.ndarray, list[dict]]:
        images = np.empty((n, self.cfg.image_size, self.cfg.image_size, 3), np.uint8)
        records: list[dict] = []
        for chunk in self._chunks(stream, n, sample, records):
            images[len(records) - len(chunk) : len(records)] = chunk
        return images, records

    def _load(self, npy: Path, meta: Path, n: int, sample: Sample) -> tuple[np.ndarray, list[dict]] | None:
        """A cached set, or None when missing, partial, corrupt or stale (then it is rebuilt)."""
        if not (npy.is_file() and meta.is_file()):
            return None
        try:
            images = np.load(npy, mmap_mode="c")  # copy-on-write: writable for torch, shared pages
            data = json.loads(meta.read_text())
            records = data["records"]
            ok = images.shape == (n, self.cfg.image_size, self.cfg.image_size, 3) and images.dtype == np.uint8
            ok = ok and data["hash"] == self.hash and data["n"] == n == len(records)
            for i in sorted({0, n // 2, n - 1}) if ok else []:  # spot check against a fresh render
                image, record = sample(i)
                ok = ok and np.array_equal(images[i], image) and records[i] == record
        except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
            warnings.warn(f"world cache {npy} is unreadable ({err}); rebuilding it")
            return None
        if not ok:
            warnings.warn(f"world cache {npy} does not match this world; rebuilding it")
            return None
        return images, records
