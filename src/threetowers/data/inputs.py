"""A user's own images and captions to embed with a trained model: a folder of images, a CSV's image
column, a text file of captions; each read in a fixed, sorted order and cut into chunks for a tower.

Images are decoded as the h cache decodes a shard (`SampleDecoder` at the tower's input size: short
side resized, centre crop, no augmentation), so one picture gives the same pixels whichever reader
brought it. A row that cannot be used (a broken image, an empty caption) is marked bad by reason in
its chunk; the caller keeps its place (zeros) and lists it, so rows never shift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .csv_pairs import read_columns
from .samples import IMAGE_EXTENSIONS, BadSampleCounter, SampleDecoder, clean_caption, decode_chunk
from .transforms import DEFAULT_MAX_PIXELS, SampleError


def folder_images(root: Path) -> list[tuple[str, Path]]:
    """(key, file) of the images under `root`, recursively, sorted by key: the relative POSIX path."""
    suffixes = {f".{ext}" for ext in IMAGE_EXTENSIONS}
    keys = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix.lower() in suffixes and p.is_file())
    if not keys:
        raise ValueError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)} files, searched recursively); "
                         "give a folder of images, a CSV/TSV with an image column, or .tar shards")
    return [(key, root / key) for key in keys]


def csv_images(path: Path, column: str) -> list[tuple[str, Path | None]]:
    """(key, file) of a CSV/TSV's image `column`, in file order, each image once (a retrieval CSV lists
    an image once per caption). The key is the path as written (relative to the file's folder, or
    absolute); an empty cell is kept as a row without an image, `rowN`, to be counted as bad."""
    items: dict[str, Path | None] = {}
    for i, written in enumerate(read_columns(path, {column: "--image-column"})[column]):
        if written:
            items.setdefault(written, path.parent / written)
        else:
            items[f"row{i + 1}"] = None
    return list(items.items())


def read_lines(path: Path) -> list[str]:
    """A text file's lines, one caption each (undecodable bytes kept, to be counted per line)."""
    return path.read_text(encoding="utf-8-sig", errors="surrogateescape").splitlines()


class FileChunks(Dataset):
    """Item i: files [i·b, (i+1)·b) decoded at `image_size` (see the module docstring); a missing
    file or a `None` (a CSV row without an image) is a bad row."""

    def __init__(self, files: Sequence[Path | None], image_size: int, chunk: int):
        self.files, self.chunk = list(files), chunk
        self.decoder = SampleDecoder(image_size, False, BadSampleCounter(1.0), DEFAULT_MAX_PIXELS)

    def __len__(self) -> int:
        return (len(self.files) + self.chunk - 1) // self.chunk

    def __getitem__(self, i: int) -> dict:
        rows = range(i * self.chunk, min((i + 1) * self.chunk, len(self.files)))
        return decode_chunk((row, lambda file=self.files[row]: self.decoder.decode_image(file)) for row in rows)


def text_chunks(lines: Sequence[str], tokenize: Callable[[list[str]], torch.Tensor],
                chunk: int) -> Iterator[dict]:
    """Chunks of captions as {"rows", "inputs": tokens, "bad": {row: reason}}; an empty or
    undecodable line is a bad row (`clean_caption`'s reasons)."""
    for start in range(0, len(lines), chunk):
        good, texts, bad = [], [], {}
        for row in range(start, min(start + chunk, len(lines))):
            try:
                texts.append(clean_caption(lines[row]))
                good.append(row)
            except SampleError as err:
                bad[row] = err.reason
        yield {"rows": torch.tensor(good, dtype=torch.long), "inputs": tokenize(texts) if texts else None, "bad": bad}
