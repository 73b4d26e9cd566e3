"""CSV/TSV files of (image path, caption) rows: a random-access dataset, and the whole file
decoded once into arrays for step-indexed training (`load_csv_arrays`)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..core.atomic import write_json_atomic, write_text_atomic
from ..core.preemption import preempted, stop_requested
from ..schema import DataConfig
from .transforms import DEFAULT_MAX_PIXELS
from .samples import MIN_SEEN, BadDataError, BadSampleCounter, SampleDecoder, collate


# ----------------------------------------------------------------------------- CSV / TSV


class _Strings:
    """A column of strings in one byte buffer: no per-row Python objects, so DataLoader workers
    forked from the main process do not copy the whole column as reference counts change."""

    def __init__(self, values: list[str | None]) -> None:
        encoded = [b"\0" if v is None else b"\1" + v.encode("utf-8", "surrogateescape") for v in values]
        self.offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str | None:
        raw = self.buffer[self.offsets[i] : self.offsets[i + 1]].tobytes()
        return None if raw[:1] == b"\0" else raw[1:].decode("utf-8", "surrogateescape")


def _delimiter(path: Path, head: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "\t"
    if suffix == ".csv":
        return ","
    try:
        return csv.Sniffer().sniff(head, delimiters=",\t;|").delimiter
    except csv.Error:
        raise ValueError(f"cannot tell the delimiter of {path}; name it .csv or .tsv") from None


def read_columns(path: Path, columns: dict[str, str]) -> dict[str, list[str | None]]:
    """The named columns of a CSV/TSV file with a header row, in row order. `columns` maps each column
    to the setting that names it (for the message when the header lacks it)."""
    # surrogateescape: one row with broken bytes is a bad sample, not a broken file.
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f, delimiter=_delimiter(path, f.read(65536)))
        f.seek(0)
        header = reader.fieldnames or []
        for column, field in columns.items():
            if column not in header:
                raise ValueError(f"{path}: no column {column!r} ({field}); the header has {header}")
        values: dict[str, list[str | None]] = {column: [] for column in columns}
        for row in reader:
            for column, kept in values.items():
                kept.append(row[column])
    if not next(iter(values.values()), []):
        raise ValueError(f"{path} has a header but no rows")
    return values


class CsvPairs(Dataset):
    """Image-text pairs listed in a CSV/TSV file with a header row; image paths are relative to
    the file's folder (absolute paths work too). The key of a sample is its path as written.

    Map-style, so a bad row cannot just be dropped: it is counted and the next row (cyclically)
    takes its place, which keeps every batch full.
    """

    def __init__(
        self,
        path: str | Path,
        image_size: int,
        *,
        image_column: str = "image",
        caption_column: str = "caption",
        augment: bool = False,
        max_bad_fraction: float = 0.05,
        min_seen: int = MIN_SEEN,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"data.path={str(path)!r}: no such CSV/TSV file")
        columns = read_columns(self.path, {image_column: "data.image_column", caption_column: "data.caption_column"})
        self.images = _Strings([image or None for image in columns[image_column]])
        self.captions = _Strings(columns[caption_column])
        self.counter = BadSampleCounter(max_bad_fraction, min_seen)
        self.decode = SampleDecoder(image_size, augment, self.counter, max_pixels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        for step in range(n):
            sample = self.row((index + step) % n)
            if sample is not None:
                return sample
        raise BadDataError(f"no usable row in {self.path}: {self.counter.summary()}")

    def row(self, row: int) -> dict[str, Any] | None:
        """Row `row` as a sample, or None (counted) if it is bad; no substitution."""
        written = self.images[row]
        image = None if written is None else self.path.parent / written
        where = f"{self.path.name} row {row + 1} ({written})"
        return self.decode(image, self.captions[row], written or f"row{row + 1}", where)



class _Rows(Dataset):
    """CSV rows without substitution: a bad row becomes a marker that only carries the counts."""

    def __init__(self, pairs: CsvPairs) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, row: int) -> dict[str, Any]:
        return self.pairs.row(row) or {"bad_counts": self.pairs.counter.snapshot()}


def _collate_rows(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in samples if "image" in s]
    batch = collate(good) if good else {"image": None, "caption": [], "key": []}
    batch["bad_counts"] = {k: v for s in samples for k, v in s["bad_counts"].items()}
    return batch


class CsvArrays(NamedTuple):
    images: np.ndarray  # uint8 [N, S, S, 3], the usable rows in file order
    captions: list[str]
    keys: list[str]  # image paths as written in the file
    bad: dict[str, int]  # skipped rows by reason
    identity: str  # changes when a row, its order, or an image file (size, mtime) changes


def csv_identity(csv_path: Path, keys: Sequence[str]) -> str:
    """A digest of the file, every usable row's image path in order, and each image file's size and
    modification time: the cheap content check (one stat per row) that an h cache or a tokenizer built
    for these rows is keyed by, so that an edited CSV or a replaced image never reuses them."""
    return files_digest(str(csv_path.resolve()), csv_path.parent, keys)


def files_digest(salt: str, folder: Path, keys: Sequence[str]) -> str:
    """A digest of `salt` and each file `folder / key`'s path, size and modification time, in order."""
    digest = hashlib.sha256(salt.encode())
    for key in keys:
        try:
            st = (folder / key).stat()
            digest.update(f"{key}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        except OSError:
            digest.update(f"{key}\0missing\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def load_csv_arrays(cfg: DataConfig, image_size: int, progress: bool = True,
                    store: Path | None = None) -> CsvArrays:
    """Decode every usable CSV/TSV row once: uint8 images `[N, S, S, 3]`, captions, keys, bad counts.

    Bad rows are skipped and counted (and said on the console); the `max_bad_fraction` limit applies to
    the whole pass, however short the file. Rows are resized and center-cropped once, so `data.augment`
    cannot apply. With `store` (a folder, for training data) the images go to a memory-mapped
    `images.npy` there instead of RAM, beside `rows.json` (captions, keys, bad counts; written last):
    RAM stays bounded whatever the file's size, and a later run on the same rows reuses the decode.
    The folder is named by the rows' identity (every path, its size and mtime), so an edited CSV or a
    replaced image never reuses it. A decode into a store is resumable: a stop signal or a kill
    keeps what was decoded (`_decode_into`), and the next call goes on from there.
    """
    if cfg.augment:
        raise ValueError(
            "data.augment=true needs images decoded at every step, but data.source=csv decodes each row once "
            "into arrays; set data.augment=false, or write the pairs as webdataset shards"
        )
    pairs = CsvPairs(cfg.path, image_size, image_column=cfg.image_column, caption_column=cfg.caption_column,
                     max_bad_fraction=cfg.max_bad_fraction)
    folder = None
    if store is not None:
        written = [pairs.images[i] or f"row{i + 1}" for i in range(len(pairs))]
        folder = Path(store) / f"{pairs.path.stem}-{csv_identity(pairs.path, written)}-{image_size}px"
        kept = _read_decoded(folder)
        if kept is not None:
            if kept.bad and progress:
                print(f"{pairs.path.name}: {sum(kept.bad.values())} rows skipped when it was decoded "
                      f"({', '.join(f'{k} x{v}' for k, v in sorted(kept.bad.items()))}); reusing {folder}", flush=True)
            return kept
    if folder is None:
        images = np.empty((len(pairs), image_size, image_size, 3), dtype=np.uint8)
        captions, keys = _decode_rows(pairs, images, 0, [], [], cfg.num_workers, progress)
    else:
        captions, keys = _decode_into(folder, pairs, image_size, cfg.num_workers, progress)
    bad = dict(pairs.counter.totals()[1])
    if bad and progress:
        print(f"{pairs.path.name}: skipped {pairs.counter.summary()}", flush=True)
    arrays = CsvArrays(None, captions, keys, bad, csv_identity(pairs.path, keys))
    if folder is None:
        return arrays._replace(images=images[: len(keys)])
    (folder / "images.partial.npy").replace(folder / "images.npy")
    write_json_atomic(folder / "rows.json", {"captions": captions, "keys": keys, "bad": bad,
                                             "identity": arrays.identity})  # last: the decode is complete
    (folder / "rows.partial.jsonl").unlink(missing_ok=True)
    return _read_decoded(folder)


# A decode into a store saves its progress every this many batches of 64 rows (and where a stop signal stops it).
SAVE_EVERY = 16


def _decode_into(folder: Path, pairs: CsvPairs, image_size: int, num_workers: int,
                 progress: bool) -> tuple[list[str], list[str]]:
    """Decode into `folder/images.partial.npy`, resumably: after every `SAVE_EVERY` batches, the pixels
    are flushed, then one line appended to `rows.partial.jsonl` (rows read, their captions and keys, the
    bad counts so far); a stop signal saves and stops between two batches (`Preempted`). A later call
    goes on after the last whole line (a torn last line is redone)."""
    images_file, lines_file = folder / "images.partial.npy", folder / "rows.partial.jsonl"
    shape = (len(pairs), image_size, image_size, 3)
    done, captions, keys, earlier = 0, [], [], None
    if images_file.is_file() and lines_file.is_file():
        whole = []
        for line in lines_file.read_text(encoding="utf-8").splitlines():
            try:
                chunk = json.loads(line)
            except ValueError:
                # A line cut by a kill: its rows are decoded again, after the whole lines.
                write_text_atomic(lines_file, "".join(w + "\n" for w in whole))
                break
            whole.append(line)
            done, earlier = chunk["rows"], chunk["bad"]
            captions += chunk["captions"]
            keys += chunk["keys"]
        images = np.lib.format.open_memmap(images_file, mode="r+")
        if images.shape != shape:
            done, captions, keys, earlier = 0, [], [], None
    if done == 0:
        folder.mkdir(parents=True, exist_ok=True)
        images = np.lib.format.open_memmap(images_file, mode="w+", dtype=np.uint8, shape=shape)
        lines_file.write_text("", encoding="utf-8")
    elif progress:
        print(f"{pairs.path.name}: going on with its decode in {folder} after row {done} of {len(pairs)}", flush=True)
    if earlier is not None:
        pairs.counter.merge({"before": earlier})
    saved = len(keys)

    def save(rows: int) -> None:
        nonlocal saved
        images.flush()
        seen, counts, examples = pairs.counter.totals()
        line = {"rows": rows, "captions": captions[saved:], "keys": keys[saved:],
                "bad": {"seen": seen, "counts": dict(counts), "examples": examples}}
        with open(lines_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        saved = len(keys)

    try:
        return _decode_rows(pairs, images, done, captions, keys, num_workers, progress, save)
    finally:
        images.flush()


def _decode_rows(pairs: CsvPairs, images: np.ndarray, start: int, captions: list[str], keys: list[str],
                 num_workers: int, progress: bool, save: Callable[[int], None] | None = None) -> tuple[list[str], list[str]]:
    """Rows `start`.. of `pairs` decoded into `images` after the `keys` kept so far. With `save` (a
    decode into a store): `save(rows read)` every `SAVE_EVERY` batches, and before a stop signal stops
    it between two batches; in memory there is nothing to keep, so no stop point."""
    rows = Subset(_Rows(pairs), range(start, len(pairs)))
    loader = DataLoader(rows, batch_size=64, num_workers=num_workers, collate_fn=_collate_rows)
    read = start
    for i, batch in enumerate(tqdm(loader, desc=f"decoding {pairs.path.name}", unit="batch", disable=not progress,
                                   initial=start // 64, total=(len(pairs) + 63) // 64)):
        pairs.counter.merge(batch["bad_counts"])
        if batch["key"]:
            kept = len(keys)
            # The transform resized uint8 pixels, then divided by 255: this is exact.
            images[kept : kept + len(batch["key"])] = batch["image"].mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            captions += batch["caption"]
            keys += batch["key"]
        read = min(len(pairs), read + 64)
        if save is not None and stop_requested():
            save(read)
            raise preempted(f"while decoding {pairs.path.name} ({read} of {len(pairs)} rows done and kept)")
        if save is not None and (i + 1) % SAVE_EVERY == 0:
            save(read)
    pairs.counter.check(final=True)
    if not keys:
        raise BadDataError(f"no usable row in {pairs.path}: {pairs.counter.summary()}")
    return captions, keys


def _read_decoded(folder: Path) -> CsvArrays | None:
    """A decode stored by `load_csv_arrays`, memory-mapped; None if there is none (or it is unfinished)."""
    try:
        rows = json.loads((folder / "rows.json").read_text())
        images = np.load(folder / "images.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    return CsvArrays(images[: len(rows["keys"])], rows["captions"], rows["keys"], rows["bad"], rows["identity"])
