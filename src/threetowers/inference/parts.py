"""An input to embed, cut into parts: one part a webdataset shard, or a fixed run of `part_size`
rows of a folder of images, a CSV's image column or a text file of captions.

A part is the unit of work and of storage (`PART.npy` + `PART.json`): it is built whole or not at
all, so a killed run redoes only unfinished parts, and under torchrun ranks split parts. Each part
knows its identity, the cheap check that decides whether stored embeddings still describe it: a
shard's (size, mtime, a digest of its ends: `shard_index.shard_identity`), each image file's path,
size and mtime (`csv_pairs.files_digest`), or the captions themselves.

Everything here is checked when the input is opened, before a model is loaded; shards are indexed
(one scan of their headers) only by the rank that embeds them.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

from torch.utils.data import DataLoader

from ..data.csv_pairs import files_digest
from ..data.indexed import ShardChunks
from ..data.inputs import FileChunks, csv_images, folder_images, read_lines, text_chunks
from ..data.shard_index import ensure_index, open_index, shard_name
from ..data.shards import expand_shards

CSV_SUFFIXES = (".csv", ".tsv", ".tab")
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # pipe:, s3:, https: ... (not local files)


class ShardPart:
    """One local webdataset shard; its rows are the samples of its index (an image each, no caption needed)."""

    def __init__(self, url: str, index_dir: Path):
        self.url, self.index_dir = url, index_dir
        self.rows = None  # known once indexed
        self.name, self.where = shard_name(url), f"shard {url}"

    def identify(self, report=print) -> tuple[dict, int, list[str], dict[str, int]]:
        """(identity, rows, keys, problems of the whole shard by reason), indexing the shard if needed."""
        meta = ensure_index(self.url, self.index_dir, report)
        keys = [k.decode("utf-8", "surrogateescape") for k in open_index(self.index_dir, self.name)["key"]]
        return meta["identity"], meta["rows"], keys, dict(meta["bad"])

    def batches(self, embedder, batch_size: int, num_workers: int) -> Iterable[dict]:
        chunks = ShardChunks(self.url, self.index_dir, self.name, embedder.input_size, batch_size, captions=False)
        return DataLoader(chunks, batch_size=None, num_workers=num_workers, pin_memory=embedder.device.type == "cuda")


class FilesPart:
    """Rows [start, stop) of a list of image files (a folder's, or a CSV's image column)."""

    def __init__(self, source: Path, folder: Path, items: list[tuple[str, Path | None]], index: int, start: int):
        self.source, self.folder, self.items, self.start = source, folder, items, start
        self.rows = len(items)
        self.name = f"part-{index:05d}"
        self.where = f"{self.name} of {source} (rows {start + 1}..{start + len(items)})"

    def identify(self, report=print) -> tuple[dict, int, list[str], dict[str, int]]:
        keys = [key for key, _ in self.items]
        identity = {"path": str(self.source), "first_row": self.start,
                    "digest": files_digest(f"{self.source}\0{self.start}", self.folder, keys)}
        return identity, len(keys), keys, {}

    def batches(self, embedder, batch_size: int, num_workers: int) -> Iterable[dict]:
        chunks = FileChunks([file for _, file in self.items], embedder.input_size, batch_size)
        return DataLoader(chunks, batch_size=None, num_workers=num_workers, pin_memory=embedder.device.type == "cuda")


class TextsPart:
    """Lines [start, stop) of a text file, one caption each; a row's key is its line number."""

    def __init__(self, source: Path, lines: list[str], index: int, start: int):
        self.source, self.lines, self.start = source, lines, start
        self.rows = len(lines)
        self.name = f"part-{index:05d}"
        self.where = f"{self.name} of {source} (lines {start + 1}..{start + len(lines)})"

    def identify(self, report=print) -> tuple[dict, int, list[str], dict[str, int]]:
        digest = hashlib.sha256("\n".join(self.lines).encode("utf-8", "surrogateescape")).hexdigest()[:16]
        identity = {"path": str(self.source), "first_row": self.start, "digest": digest}
        return identity, len(self.lines), [str(self.start + i + 1) for i in range(len(self.lines))], {}

    def batches(self, embedder, batch_size: int, num_workers: int) -> Iterable[dict]:
        return text_chunks(self.lines, embedder.tokenizer, batch_size)


Part = ShardPart | FilesPart | TextsPart


def input_kind(spec: str, texts: bool) -> str:
    """texts, folder, csv or shards; an input that is none of them is refused with what to give."""
    path = Path(spec)
    if texts:
        if not path.is_file():
            raise FileNotFoundError(f"--texts {spec}: no such file (give a text file with one caption a line)")
        return "texts"
    if path.is_dir():
        return "folder"
    if path.is_file() and path.suffix.lower() in CSV_SUFFIXES:
        return "csv"
    if (path.is_file() and path.name.endswith(".tar")) or "{" in spec or "::" in spec:
        return "shards"
    what = "no such file or folder" if not path.exists() else "not a folder, a .csv/.tsv file or a .tar shard"
    raise FileNotFoundError(f"INPUT {spec}: {what}; give a folder of images, a CSV/TSV with an image column, "
                            "webdataset shards (a .tar or a brace pattern such as 'shards/{000..009}.tar'), or a "
                            "text file of captions with --texts")


def open_input(spec: str, index_dir: Path, texts: bool = False, image_column: str = "image",
               part_size: int = 4096) -> tuple[str, list[Part]]:
    """(the input's kind, its parts in order). Shards are indexed into `index_dir` when embedded."""
    if part_size < 1:
        raise ValueError(f"--part-size {part_size}: must be at least 1")
    kind = input_kind(spec, texts)
    if kind == "shards":
        urls = expand_shards(spec)
        remote = [u for u in urls if URL.match(u) or not os.path.isfile(u)]
        if remote:
            raise ValueError(f"INPUT {spec}: {remote[0]} is not a local file; shards are embedded through their "
                             "index, which needs them on a (shared) filesystem: download them first")
        return kind, [ShardPart(u, Path(index_dir)) for u in urls]
    source = Path(spec).resolve()
    if kind == "texts":
        lines = read_lines(source)
        if not lines:
            raise ValueError(f"--texts {spec} is empty; give a text file with one caption a line")
        starts = range(0, len(lines), part_size)
        return kind, [TextsPart(source, lines[s:s + part_size], i, s) for i, s in enumerate(starts)]
    folder = source if kind == "folder" else source.parent
    items = folder_images(source) if kind == "folder" else csv_images(source, image_column)
    starts = range(0, len(items), part_size)
    return kind, [FilesPart(source, folder, items[s:s + part_size], i, s) for i, s in enumerate(starts)]
