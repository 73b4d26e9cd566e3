"""Random access into webdataset tar shards: an index of where each sample's members lie.

Reading shards as a stream makes a resumed run see other samples than the uninterrupted one. With
an index (one sequential scan of the tar headers per shard, stored beside h's embeddings) every
sample has a global row number, the batch at step s is a pure function of (seed, s, rank) as for
arrays in memory, and a sample is read with one seek. The index of a shard records the shard's
identity (`shard_identity`: path, size, modification time and a digest of its first and last
64 KiB), so a shard that was rewritten is never read through a stale index: its index is rebuilt,
with a message naming the shard and what changed.

Samples follow webdataset's grouping: a member `dir/KEY.EXT` belongs to sample `dir/KEY` (the
extension is everything after the first dot of the base name); the image is the first of
`IMAGE_EXTENSIONS` present, the caption the `txt` member.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.atomic import write_text_atomic
from .samples import IMAGE_EXTENSIONS
from .shards import tar_is_truncated

INDEX_VERSION = 1
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


@dataclass
class ShardIndex:
    """Where each sample of one shard lies: keys, (offset, size) of image and caption members (-1: none)."""

    url: str
    identity: dict
    keys: list[str]
    image: np.ndarray  # int64 [n, 2]: offset and size of the image member
    caption: np.ndarray  # int64 [n, 2]: the txt member
    bad: dict[str, int]  # problems of the shard itself, by reason (truncated_shard, unreadable_shard)

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, row: int, handle) -> tuple[bytes | None, bytes | None]:
        """(image bytes, caption bytes) of sample `row`, from an open binary file of this shard."""
        return _read(handle, self.image[row]), _read(handle, self.caption[row])

    def to_json(self) -> dict:
        return {"version": INDEX_VERSION, "url": self.url, "identity": self.identity, "keys": self.keys,
                "image": self.image.tolist(), "caption": self.caption.tolist(), "bad": self.bad}

    @classmethod
    def from_json(cls, data: dict) -> "ShardIndex":
        return cls(data["url"], data["identity"], list(data["keys"]), np.asarray(data["image"], np.int64).reshape(-1, 2),
                   np.asarray(data["caption"], np.int64).reshape(-1, 2), dict(data.get("bad", {})))


def _read(handle, where: np.ndarray) -> bytes | None:
    offset, size = int(where[0]), int(where[1])
    if offset < 0:
        return None
    handle.seek(offset)
    return handle.read(size)


def index_shard(url: str) -> ShardIndex:
    """Scan a local tar's headers (tarfile skips over the data) and group members into samples."""
    identity = shard_identity(url)
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
    keys = list(members)
    image = np.full((len(keys), 2), -1, np.int64)
    caption = np.full((len(keys), 2), -1, np.int64)
    for i, key in enumerate(keys):
        found = members[key]
        ext = next((e for e in IMAGE_EXTENSIONS if e in found), None)
        if ext is not None:
            image[i] = found[ext]
        if "txt" in found:
            caption[i] = found["txt"]
    return ShardIndex(url, identity, keys, image, caption, bad)


def shard_name(url: str) -> str:
    """A file-name stem for what is stored about a shard: its base name and a digest of its resolved
    path (two shards of the same name in different folders do not collide)."""
    resolved = str(Path(url).resolve())
    return f"{Path(url).name}-{hashlib.sha256(resolved.encode()).hexdigest()[:12]}"


def index_path(root: str | Path, url: str) -> Path:
    return Path(root) / f"{shard_name(url)}.index.json"


def load_or_build_index(url: str, root: str | Path, report=print) -> ShardIndex:
    """The shard's index from `root`, rebuilt when missing, unreadable, or made for another version of
    the shard (the message names the shard and the reason). Written atomically."""
    path = index_path(root, url)
    if path.is_file():
        try:
            index = ShardIndex.from_json(json.loads(path.read_text()))
            change = identity_change(index.identity, shard_identity(url))
            if not change:
                return index
            report(f"shard {url}: {change} since it was indexed; indexing it again")
        except (ValueError, KeyError, TypeError) as err:  # a damaged index file: rebuild it
            report(f"shard {url}: its index {path} is unreadable ({type(err).__name__}); indexing it again")
    index = index_shard(url)
    write_text_atomic(path, json.dumps(index.to_json(), separators=(",", ":")))  # compact: one row a sample
    return index
