"""h's embeddings, computed once: the training cache on disk and the evaluation store in memory.

h is frozen, so its output depends only on its weights, its preprocessing and the image. Training
reads a cache on disk keyed by sample key (`build_feature_cache`, `FeatureCache`); evaluation keeps
h's features of each evaluation set in an `EvalFeatures` object that its owner (the demo, a
trainer's periodic evaluation, one `threetowers eval`) passes to every model it evaluates.

The training cache:

Layout of a cache directory:
    manifest.json      h's identity (name, weights fingerprint, preprocessing, dim, precision,
                       pixels), the dtype,
                       the dataset's identity, the shard list; written first with
                       "complete": false, rewritten with "complete": true at the end (atomically)
    shard_00000.npy    float16 [rows, dim] embeddings, in key order
    keys.json          the sample keys, in row order

Building is resumable: shards are written one at a time (temp file + rename) and a rebuild skips
the shards that exist and match; a stop signal (train.stop_signals) stops it between two shards. A cache whose manifest does not match the requested h or dataset
is refused with an error naming the mismatch; there is never a silent fallback to stale features.

What h sees is fixed by h alone, never by f: each image decoded at h's own input size (short side
resized, center crop, no augmentation; arrays held in memory, such as the world's, resized from
their stored size), then h's normalisation, at h's precision. The same pixels reach h when it runs
online (`data.third_embeddings=online`), so the two modes give the same embeddings; with
`data.augment=true` f sees augmented crops while h sees the plain image, in both modes. Everything
that decides h's input (h's identity with its preprocessing and precision, and `THIRD_PIXELS`) is
part of the cache's identity: a change of any of it builds the cache again.

Building runs h on h's device (the rank's GPU under torchrun), `data.cache_batch_size` images at a
time. The cache stores float16: values it cannot hold (non-finite, or beyond +-65504) stop the build
with an error rather than being written as inf.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from ..core.sets import as_float
from ..core.atomic import atomic_path, write_json_atomic, write_text_atomic
from ..core.formats import CACHE_FORMAT, check_format, stamp, write_meta
from ..core.preemption import preempted, stop_requested


class CacheMismatch(ValueError):
    """The cache on disk was made by another h, preprocessing or dataset."""


# How the data turns a sample into h's pixels (see above); change the tag when that changes, so
# that every cache made the old way is refused and rebuilt.
THIRD_PIXELS = "decoded-at-h-input-size-v1"
THIRD_IDENTITY = ("name", "fingerprint", "preprocessing", "dim", "precision")
FLOAT16_MAX = 65504.0


def third_identity(third_info: dict) -> dict:
    """What of h decides its cached embeddings (an h saved before precision was recorded: fp32)."""
    return {**{k: third_info.get(k) for k in THIRD_IDENTITY}, "precision": third_info.get("precision", "fp32"),
            "pixels": THIRD_PIXELS}


def to_float16(features: torch.Tensor, third_name: str, where: str) -> np.ndarray:
    """h's float32 features as the cache's float16, refusing what float16 cannot hold."""
    bad = ~torch.isfinite(features) | (features.abs() > FLOAT16_MAX)
    if bad.any():
        rows = bad.any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"h ({third_name}) gave embeddings float16 cannot store (non-finite, or beyond +-65504) for "
                         f"{len(rows)} image(s) of {where} (batch rows {rows[:5]}); the cache holds float16. Check h's "
                         "weights and its preprocessing, or use data.third_embeddings=online")
    return features.numpy().astype(np.float16)


def cache_identity(third_info: dict, dataset_id: str, num_rows: int) -> dict:
    return stamp(CACHE_FORMAT, {
        "third": third_identity(third_info),
        "dataset": dataset_id,
        "rows": num_rows,
        "dtype": "float16",
    })


def _check(manifest: dict, expected: dict, directory: Path) -> None:
    try:
        check_format(manifest, CACHE_FORMAT, directory / "manifest.json")
    except ValueError as err:
        raise CacheMismatch(f"{err}; delete it or choose another data.cache_dir") from None
    for field in ("dataset", "rows", "dtype"):
        if manifest.get(field) != expected[field]:
            raise CacheMismatch(
                f"embedding cache {directory} was built for {field}={manifest.get(field)!r}, "
                f"but this run needs {expected[field]!r}; delete it or choose another data.cache_dir"
            )
    for field, want in expected["third"].items():
        have = manifest["third"].get(field)
        if have != want:
            raise CacheMismatch(
                f"embedding cache {directory} was built with third tower {field}={have!r}, but this run's h has "
                f"{want!r}; delete it or choose another data.cache_dir"
            )


def cache_dir_for(root: str | Path, third_info: dict, dataset_id: str) -> Path:
    """One sub-directory per (h, dataset), so several third towers share a cache root."""
    # A hash of h's whole identity: any change of it (weights, preprocessing, precision, pixels) gets a
    # directory of its own, so the cache is built again rather than refused.
    digest = hashlib.sha256(json.dumps(third_identity(third_info), sort_keys=True).encode()).hexdigest()[:10]
    tag = f"{third_info['name']}-{digest}-{third_info['preprocessing']['input_size']}"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag)
    return Path(root) / safe / dataset_id


def build_feature_cache(
    directory: str | Path,
    third: Callable[[torch.Tensor], torch.Tensor],
    third_info: dict,
    dataset_id: str,
    keys: list[str],
    images: Callable[[int, int], torch.Tensor],
    batch_size: int = 256,
    shard_rows: int = 4096,
    progress: bool = True,
) -> "FeatureCache":
    """Run h over all rows and store its embeddings; resumes a build that was interrupted.

    `images(start, stop)` returns rows [start, stop) on the CPU, uint8 [B, H, W, 3] or float
    [B, 3, H, W] in [0, 1]; `third` is a `ThirdTower` (they go to its device) or any callable on them.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    expected = cache_identity(third_info, dataset_id, len(keys))
    manifest_path = directory / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        _check(manifest, expected, directory)
        if manifest.get("complete"):
            return FeatureCache(directory, expected)
    # The partial manifest records identity first, so a resumed build cannot mix two h's.
    write_json_atomic(manifest_path, {**expected, "complete": False})
    starts = list(range(0, len(keys), shard_rows))
    bar = tqdm(total=len(keys), desc=f"caching {third_info['name']}", unit="img", disable=not progress, leave=False)
    for index, start in enumerate(starts):
        stop = min(start + shard_rows, len(keys))
        path = directory / f"shard_{index:05d}.npy"
        if path.exists() and _rows_of(path) == (stop - start, third_info["dim"]):
            bar.update(stop - start)
            continue
        if stop_requested():  # a stop signal: between two shards, every finished one kept for the next run
            bar.close()
            raise preempted(f"while building h's embedding cache {directory} ({index} of {len(starts)} shards kept)")
        chunks = []
        embed = getattr(third, "embed", third)
        for s in range(start, stop, batch_size):
            with torch.no_grad():
                features = embed(images(s, min(s + batch_size, stop))).float().cpu()
            chunks.append(to_float16(features, third_info["name"], f"rows {s}..{s + len(features) - 1} of {directory}"))
            bar.update(len(features))
        with atomic_path(path) as tmp:
            np.save(tmp, np.concatenate(chunks))
    bar.close()
    write_text_atomic(directory / "keys.json", json.dumps(keys))
    write_json_atomic(manifest_path, {**expected, "complete": True, "shards": len(starts)})
    return FeatureCache(directory, expected)


def _rows_of(path: Path) -> tuple[int, ...] | None:
    try:
        return np.load(path, mmap_mode="r").shape
    except (ValueError, OSError):
        return None  # truncated shard from a killed build: rebuild it


class FeatureCache:
    """Read side: embeddings by row or by key, checked against the expected identity."""

    def __init__(self, directory: str | Path, expected: dict | None = None):
        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.exists():
            raise FileNotFoundError(f"no embedding cache at {self.directory} (manifest.json missing); run `threetowers cache`")
        self.manifest = json.loads(manifest_path.read_text())
        if expected is not None:
            _check(self.manifest, expected, self.directory)
        if not self.manifest.get("complete"):
            raise CacheMismatch(f"embedding cache {self.directory} is incomplete; rebuild it (the build resumes)")
        # Memory-mapped: a process keeps in RAM only the rows it reads.
        self.shards = [np.load(self.directory / f"shard_{i:05d}.npy", mmap_mode="r")
                       for i in range(self.manifest["shards"])]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.keys = json.loads((self.directory / "keys.json").read_text())
        if len(self.keys) != self.starts[-1]:
            raise CacheMismatch(f"embedding cache {self.directory}: {len(self.keys)} keys but {self.starts[-1]} rows")
        self._row = {k: i for i, k in enumerate(self.keys)}

    def rows(self, indices: np.ndarray) -> torch.Tensor:
        indices = np.asarray(indices, dtype=np.int64)
        shard = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty((len(indices), self.manifest["third"]["dim"]), np.float32)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.shards[s][indices[sel] - self.starts[s]]
        return torch.from_numpy(out)

    def by_keys(self, keys: list[str]) -> torch.Tensor:
        missing = [k for k in keys if k not in self._row]
        if missing:
            raise CacheMismatch(f"embedding cache {self.directory} has no entry for keys {missing[:3]}; rebuild it")
        return self.rows(np.array([self._row[k] for k in keys]))

    def __len__(self) -> int:
        return len(self.keys)


class EvalFeatures:
    """h's features of evaluation image sets, one tensor per (h, set), kept while this object lives.

    Evaluating several models that share an h on the same sets (the demo's runs, a trainer's
    periodic evaluation) then runs h once per set instead of once per model. A set is identified by
    its array object (held here, so the identity cannot be reused), h by its fingerprint and
    preprocessing. Nothing is global: whoever creates the store decides what it serves.

    `third`: the h to use for a model that holds none (trained on cached embeddings, whose h is kept
    off the accelerator while it trains), or a list of them (model.thirds order); each visits the
    evaluation's device only to fill the store.
    """

    def __init__(self, third=None) -> None:
        self.thirds = list(third) if isinstance(third, (list, tuple)) else [] if third is None else [third]
        self._sets: dict[tuple, tuple[np.ndarray, torch.Tensor]] = {}

    def features(self, third: Callable[[torch.Tensor], torch.Tensor], images: np.ndarray, batch_size: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
        """h(images) as float32 [N, D] on the CPU; uint8 images [N, H, W, 3] go through h in batches."""
        key = (third.fingerprint, third.preprocessing, id(images))
        held = self._sets.get(key)
        if held is not None and held[0] is images:
            return held[1]
        home = getattr(third, "device", None)
        moved = home is not None and home != torch.device(device)
        if moved:
            third.to(device)
        try:
            with torch.no_grad():
                chunks = [third(as_float(images[s:s + batch_size]).to(device)).float().cpu()
                          for s in range(0, len(images), batch_size)]
        finally:
            if moved:
                third.to(home)
        features = torch.cat(chunks) if chunks else torch.zeros(0, third.dim)
        self._sets[key] = (images, features)
        return features


# ----------------------------------------------------------------------------- shards: one file per shard


class ShardEmbeddings:
    """h's embeddings of one webdataset shard: `<name>.npy` (float16 [rows, dim], in the shard's index
    order) and `<name>.json`, written last, which records h's identity, the shard's identity, the row
    count and the rows whose image could not be decoded (by reason). The .json is the mark of a
    finished shard: a build killed mid-shard leaves none, and that shard alone is built again.

    `open` refuses (returns None with the reason) a file made for another h, another version of the
    shard, or another row count; it never hands out stale embeddings.

    Any embedder with `info()` (name, fingerprint, preprocessing, dim, precision) and `embed(inputs)`
    can play h's part, over any input part with an identity dict: `threetowers embed` stores a trained
    tower's embeddings of shards, folders and text files this way (a subclass names the maker and the
    source in its messages; `extra` adds its own fields to the .json).
    """

    MAKER = "h or for other pixels"  # what made the embeddings, in "it was built with another ..."
    SOURCE = "the shard"  # what they were made from, in "... was rewritten since"

    def __init__(self, embeddings: np.ndarray, bad: dict[int, str]):
        self.embeddings = embeddings  # memory-mapped: a process reads only the rows it needs
        self.bad = bad

    @staticmethod
    def paths(directory: Path, name: str) -> tuple[Path, Path]:
        return directory / f"{name}.npy", directory / f"{name}.json"

    @classmethod
    def open(cls, directory: Path, name: str, third_info: dict, shard: dict,
             rows: int) -> tuple["ShardEmbeddings | None", str]:
        """(the embeddings, "") or (None, why they cannot be used)."""
        npy, meta_path = cls.paths(directory, name)
        if not meta_path.is_file():
            return None, "not built yet" if not npy.exists() else "its build did not finish"
        try:
            meta = check_format(json.loads(meta_path.read_text()), CACHE_FORMAT, meta_path)
        except ValueError as err:
            return None, f"its record is unreadable ({err})"
        recorded = meta.get("third", {})
        for field, want in third_identity(third_info).items():
            if recorded.get(field) != want:
                return None, f"it was built with another {cls.MAKER} ({field} {recorded.get(field)!r} -> {want!r})"
        # Every field of the source's identity but its path (a shard: size, mtime_ns and edges).
        for field in (f for f in shard if f != "path"):
            if meta.get("shard", {}).get(field) != shard.get(field):
                was = meta["shard"].get(field)
                return None, f"{cls.SOURCE} was rewritten since ({field} {was} -> {shard.get(field)})"
        if meta.get("rows") != rows:
            return None, f"it holds {meta.get('rows')} rows, the shard's index {rows}"
        try:
            embeddings = np.load(npy, mmap_mode="r")
        except (OSError, ValueError) as err:  # deleted or damaged after its record was written
            return None, f"its array {npy.name} is unreadable ({type(err).__name__})"
        if embeddings.shape != (rows, third_info["dim"]):
            return None, f"its array has shape {embeddings.shape}, expected {(rows, third_info['dim'])}"
        return cls(embeddings, {int(r): reason for r, reason in meta.get("bad", {}).items()}), ""

    @staticmethod
    def compute(third, rows: int, batches: Iterable[dict], where: str,
                dtype: str = "float16") -> tuple[np.ndarray, dict[int, str]]:
        """(embeddings [rows, dim] in `dtype`, bad rows by reason) of decoded batches covering every row once.

        A batch is {"rows": int tensor, "image" (or "inputs": whatever `third.embed` takes), "bad":
        {row: reason}}; images are float [b, 3, S, S] in [0, 1] at the embedder's input size. Bad
        rows get zeros and are returned."""
        info = third.info()
        embeddings = np.zeros((rows, info["dim"]), dtype)
        bad: dict[int, str] = {}
        done = 0
        for batch in batches:
            bad.update({int(r): reason for r, reason in batch["bad"].items()})
            if len(batch["rows"]):
                features = third.embed(batch["inputs"] if "inputs" in batch else batch["image"])
                embeddings[batch["rows"].numpy()] = (to_float16(features, info["name"], where) if dtype == "float16"
                                                     else features.float().numpy())
            done += len(batch["rows"]) + len(batch["bad"])
        if done != rows:
            raise RuntimeError(f"embedding build of {where}: {done} of {rows} rows came back")
        return embeddings, bad

    @classmethod
    def build(cls, directory: Path, name: str, third, shard: dict, rows: int,
              batches: Iterable[dict], dtype: str = "float16", extra: dict | None = None) -> "ShardEmbeddings":
        """Run h over one shard's decoded rows (see `compute`) and write its two files atomically (.json last)."""
        embeddings, bad = cls.compute(third, rows, batches, f"shard {shard['path']}", dtype)
        npy, meta_path = cls.paths(directory, name)
        with atomic_path(npy) as tmp:
            np.save(tmp, embeddings)
        write_meta(meta_path, CACHE_FORMAT, {
            "third": third_identity(third.info()), "shard": shard, "rows": rows, "dtype": dtype,
            "bad": {str(r): reason for r, reason in sorted(bad.items())}, **(extra or {})})
        return cls(np.load(npy, mmap_mode="r"), bad)
