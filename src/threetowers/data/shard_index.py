"""Random access into webdataset tar shards: an index of where each sample's members lie.

Reading shards as a stream makes a resumed run see other samples than the uninterrupted one. With
an index (one sequential scan of the tar headers per shard) every sample has a global row number,
the batch at step s is a pure function of (seed, s, rank) as for arrays in memory, and a sample is
read with one seek.

A shard's index is two files under the index folder, named by `shard_name`:
    NAME.index.npy    a structured array, one record a sample: (offset, size) of its image and of its
                      caption member (-1: absent) and its key; memory-mapped when read, so processes
                      on a node share it through the page cache and RAM does not grow with the data
    NAME.index.json   written last (the mark of a finished index): the shard's identity
                      (`shard_identity`: path, size, mtime and a digest of its first and last 64 KiB),
                      the row count, and problems of the shard itself (cut short, unreadable)
A shard that was rewritten is never read through a stale index: its index is rebuilt, with a
message naming the shard and what changed.

Samples follow webdataset's grouping: a member `dir/KEY.EXT` belongs to sample `dir/KEY` (the
extension is everything after the first dot of the base name); the image is the first of
`IMAGE_EXTENSIONS` present, the caption the `txt` member.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from ..core.atomic import atomic_path
from ..core.formats import SHARD_INDEX_FORMAT, check_format, write_meta
from .samples import IMAGE_EXTENSIONS
from .shards import tar_is_truncated

_EDGE = 64 << 10  # bytes hashed at each end of a shard: catches a rewrite that keeps size and mtime


def shard_identity(path: str | Path) -> dict:
    """What a shard is, cheaply: resolved path, size, mtime and a digest of its first and last 64 KiB."""
    path = Path(path)
    st = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(_EDGE))
        if st.st_size > _EDGE:
            fh.seek(max(_EDGE, st.st_size - _EDGE))
            digest.update(fh.read(_EDGE))
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "edges": digest.hexdigest()[:32]}


def identity_change(recorded: dict, current: dict) -> str:
    """'' when the same, else what changed (for messages that name the shard and the reason)."""
    changes = [f"{what} changed ({recorded.get(field)} -> {current.get(field)})"
               for field, what in (("size", "its size"), ("mtime_ns", "its modification time"), ("edges", "its content"))
               if recorded.get(field) != current.get(field)]
    return ", ".join(changes)


def shard_name(url: str) -> str:
    """A file-name stem for what is stored about a shard: its base name and a digest of its resolved
    path (two shards of the same name in different folders do not collide)."""
    resolved = str(Path(url).resolve())
    return f"{Path(url).name}-{hashlib.sha256(resolved.encode()).hexdigest()[:12]}"


def index_shard(url: str) -> tuple[np.ndarray, dict]:
    """Scan a local tar's headers (tarfile skips over the data): (records, problems of the shard)."""
    bad: dict[str, int] = {}
    members: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(url, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                head, base = os.path.split(info.name)
                if "." not in base or base.startswith("."):
                    continue
                stem, ext = base.split(".", 1)
                members.setdefault(os.path.join(head, stem), {})[ext.lower()] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError):  # not a tar, or cut inside a member: what was read so far stays usable
        bad["unreadable_shard" if not members else "truncated_shard"] = 1
    if not bad and tar_is_truncated(url):
        bad["truncated_shard"] = 1
    keys = [k.encode("utf-8", "surrogateescape") for k in members]
    records = np.zeros(len(keys), dtype=[("image", "<i8", (2,)), ("caption", "<i8", (2,)),
                                         ("key", f"S{max(map(len, keys), default=1)}")])
    records["image"] = records["caption"] = -1
    records["key"] = keys
    for i, found in enumerate(members.values()):
        ext = next((e for e in IMAGE_EXTENSIONS if e in found), None)
        if ext is not None:
            records["image"][i] = found[ext]
        if "txt" in found:
            records["caption"][i] = found["txt"]
    return records, bad


def ensure_index(url: str, root: str | Path, report=print) -> dict:
    """The shard's index record (identity, rows, bad), building the index when it is missing,
    unfinished, unreadable or made for another version of the shard (said with the reason)."""
    name = shard_name(url)
    meta_path, npy = Path(root) / f"{name}.index.json", Path(root) / f"{name}.index.npy"
    current = shard_identity(url)
    if meta_path.is_file():
        try:
            meta = check_format(json.loads(meta_path.read_text()), SHARD_INDEX_FORMAT, meta_path)
            change = identity_change(meta["identity"], current)
            if not change and npy.is_file():
                return meta
            report(f"shard {url}: {change or 'its index file is missing'}; indexing it again")
        except (ValueError, KeyError, TypeError) as err:  # a damaged or foreign record: rebuild it
            report(f"shard {url}: its index record {meta_path} is unusable ({err}); indexing it again")
    records, bad = index_shard(url)
    with atomic_path(npy) as tmp:
        np.save(tmp, records)
    write_meta(meta_path, SHARD_INDEX_FORMAT,
               {"url": url, "name": name, "identity": current, "rows": len(records), "bad": bad})
    return json.loads(meta_path.read_text())


def open_index(root: str | Path, name: str) -> np.ndarray:
    """A shard's index records, memory-mapped."""
    return np.load(Path(root) / f"{name}.index.npy", mmap_mode="r")


def read_member(handle, where: np.ndarray) -> bytes | None:
    """The bytes at (offset, size) of an open shard, or None for an absent member (-1)."""
    offset, size = int(where[0]), int(where[1])
    if offset < 0:
        return None
    handle.seek(offset)
    return handle.read(size)
