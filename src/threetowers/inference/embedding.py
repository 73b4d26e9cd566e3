"""`threetowers embed`: a trained tower's embeddings of a user's input, stored part by part.

Layout of OUT (one file pair a part: a shard, or `part_size` rows of a folder, CSV or text file):
    PART.npy     [rows, dim] L2-normalised embeddings (float16 or float32), rows in input order; a
                 row whose image or caption could not be used holds zeros
    PART.json    written last, the mark of a finished part (h's per-shard record, `third/store.py`):
                 the tower's identity, the part's input identity, rows, keys, bad rows by reason
    index/       the shards' indexes (shards only)
    index.json   written at the end: the parts in order with their row and bad counts; what
                 `load_embeddings` reads

The parts are built by h's per-shard machinery (`ShardEmbeddings`) with the model's tower as the
embedder, so they resume and refuse as h's cache does: a killed run redoes only unfinished parts, and
a part made by another model, tower, dtype or precision, or from an input changed since, is built
again with a message naming it and why. Under torchrun part i is embedded on rank i % world_size,
and rank 0 writes index.json once every rank is done. OUT holds one input's embeddings: another
input is refused rather than mixed in.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..core.distributed import barrier, gather_objects, init_distributed, shutdown
from ..core.formats import EMBEDDINGS_FORMAT, read_meta, write_meta
from ..model.factory import recorded_thirds
from ..third.store import ShardEmbeddings
from .parts import Part, open_input
from .tower import DTYPES, TowerEmbedder, check_model_dir, choose_tower


class PartEmbeddings(ShardEmbeddings):
    """h's per-shard record, made by a trained tower from any part (its messages name them so)."""

    MAKER = "model, tower, dtype or precision"
    SOURCE = "its input"


@dataclass
class EmbedResult:
    """What `embed` wrote: OUT, its parts in order, and the rows that could not be embedded."""

    out: Path
    kind: str  # folder, csv, shards or texts
    parts: list[str]
    rows: int
    bad: dict[str, int]  # bad rows by reason (zeros in their rows, listed in each PART.json)
    examples: dict[str, list[str]] = field(default_factory=dict)  # a few bad keys by reason
    problems: dict[str, int] = field(default_factory=dict)  # problems of whole shards (cut short, unreadable)
    built: list[str] = field(default_factory=list)  # parts built by this run (the rest were reused)

    def summary(self) -> str:
        parts = f"{len(self.parts)} {'part' if len(self.parts) == 1 else 'parts'}"
        lines = [f"{self.rows} rows in {parts} ({len(self.built)} built, {len(self.parts) - len(self.built)} reused) "
                 f"in {self.out}"]
        if self.bad:
            n = sum(self.bad.values())
            reasons = ", ".join(f"{reason} x{count} (e.g. {', '.join(self.examples.get(reason, []))})"
                                for reason, count in sorted(self.bad.items()))
            lines.append(f"{n} {'row' if n == 1 else 'rows'} could not be embedded (zeros, listed in the part's "
                         f".json): {reasons}")
        if self.problems:
            lines.append("shard problems: " + ", ".join(f"{k} x{n}" for k, n in sorted(self.problems.items())))
        return "\n".join(lines)


def check_options(device: str, batch_size: int, dtype: str) -> None:
    """The options' errors, before any work."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be at least 1")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device}: choose auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device auto or cpu")


def embed(model_dir: str | Path, input: str | Path, out: str | Path, *, tower: str | None = None,
          texts: bool = False, image_column: str = "image", dtype: str = "float16", part_size: int = 4096,
          batch_size: int = 256, num_workers: int = 0, device: str = "auto", amp: bool = False,
          progress: bool = True, report: Callable[[str], None] = print) -> EmbedResult:
    """Embed `input` (a folder of images, a CSV/TSV's image column, webdataset shards, or with
    `texts=True` a text file of captions) with `model_dir`'s `tower` into `out` (see the module
    docstring); the Python twin of `threetowers embed`. Resumes; under torchrun the ranks split the parts."""
    directory, meta = check_model_dir(model_dir)
    tower = choose_tower(meta["config"]["model"]["method"], tower, texts, len(recorded_thirds(meta)))
    check_options(device, batch_size, dtype)
    out = Path(out)
    kind, parts = open_input(str(input), out / "index", texts, image_column, part_size)
    source = input_source(kind, str(input), parts)
    check_out(out, source, str(input))
    info = init_distributed(device)
    try:
        embedder = TowerEmbedder(directory, tower, dtype, amp, info.device)
        say = report if info.world_size == 1 else (lambda message: report(f"[rank {info.rank}] {message}"))
        mine = [part for i, part in enumerate(parts) if i % info.world_size == info.rank]
        extra = {"model": str(directory.resolve()), "tower": tower, "rank": info.rank}
        built = embed_parts(mine, embedder, out, batch_size, num_workers, extra, progress, say)
        built = [name for names in gather_objects(built, info) for name in names]
        if info.is_main:
            write_index(out, kind, str(input), source, parts, embedder, directory)
        barrier(info)  # every rank returns the finished index
    finally:
        shutdown(info)
    return result_of(out, built)


def embed_parts(parts: list[Part], embedder: TowerEmbedder, out: Path, batch_size: int, num_workers: int,
                extra: dict, progress: bool, report: Callable[[str], None]) -> list[str]:
    """Build each part that has no valid embeddings yet; the names of those built."""
    built = []
    identity = embedder.info()
    known = sum(part.rows or 0 for part in parts)  # a shard's rows are known once it is indexed
    with tqdm(total=known, unit="row", desc=f"embedding ({embedder.name})", disable=not progress) as bar:
        for part in parts:
            source, rows, keys, problems = part.identify(report)
            if part.rows is None:
                bar.total += rows
                bar.refresh()
            found, why = PartEmbeddings.open(out, part.name, identity, source, rows)
            if found is not None:
                bar.update(rows)
                continue
            if why != "not built yet":
                report(f"{part.where}: embedding it again: {why}")
            batches = counted(part.batches(embedder, batch_size, num_workers), bar)
            PartEmbeddings.build(out, part.name, embedder, source, rows, batches, embedder.dtype,
                                 {**extra, "keys": keys, "problems": problems})
            built.append(part.name)
    return built


def counted(batches: Iterable[dict], bar: tqdm) -> Iterator[dict]:
    for batch in batches:
        bar.update(len(batch["rows"]) + len(batch["bad"]))
        yield batch


def input_source(kind: str, spec: str, parts: list[Part]) -> str:
    """What OUT's embeddings are of: the kind and the resolved path (shards: a digest of their paths)."""
    if kind != "shards":
        return f"{kind}:{Path(spec).resolve()}"
    urls = "\n".join(str(Path(part.url).resolve()) for part in parts)
    return f"shards:{hashlib.sha256(urls.encode()).hexdigest()[:16]}"


def check_out(out: Path, source: str, spec: str) -> None:
    """Refuse an OUT that holds another input's embeddings (its index.json says whose)."""
    index_path = out / "index.json"
    if index_path.is_file():
        previous = read_meta(index_path, EMBEDDINGS_FORMAT)
        if previous.get("source") != source:
            raise ValueError(f"--out {out} holds the embeddings of another input ({previous.get('input')}), not "
                             f"of {spec}; give another --out, or delete {out} to start over")


def write_index(out: Path, kind: str, spec: str, source: str, parts: list[Part], embedder: TowerEmbedder,
                model_dir: Path) -> None:
    """index.json, after every part is built: the parts in order, row and bad counts. Parts an earlier
    run of this input listed and this one does not (another --part-size) are removed first."""
    index_path = out / "index.json"
    names = [part.name for part in parts]
    if index_path.is_file():
        for old in read_meta(index_path, EMBEDDINGS_FORMAT)["parts"]:
            if old["name"] not in names:
                for path in PartEmbeddings.paths(out, old["name"]):
                    path.unlink(missing_ok=True)
    records = [json.loads(PartEmbeddings.paths(out, name)[1].read_text()) for name in names]
    bad: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    for name, record in zip(names, records):
        for row, reason in record["bad"].items():
            bad[reason] += 1
            kept = examples.setdefault(reason, [])
            if len(kept) < 3:
                kept.append(f"{record['keys'][int(row)]} in {name}")
        problems.update(record.get("problems", {}))
    info = embedder.info()
    write_meta(index_path, EMBEDDINGS_FORMAT, {
        "input": spec, "source": source, "kind": kind, "model": str(model_dir.resolve()), "tower": embedder.tower,
        "name": info["name"], "fingerprint": info["fingerprint"], "precision": info["precision"], "dim": info["dim"],
        "dtype": embedder.dtype, "rows": sum(r["rows"] for r in records), "bad": dict(bad), "examples": examples,
        "problems": dict(problems), "parts": [{"name": n, "rows": r["rows"], "bad": len(r["bad"])}
                                              for n, r in zip(names, records)]})


def result_of(out: Path, built: list[str]) -> EmbedResult:
    index = read_meta(out / "index.json", EMBEDDINGS_FORMAT)
    return EmbedResult(out, index["kind"], [p["name"] for p in index["parts"]], index["rows"], index["bad"],
                       index["examples"], index["problems"], built)


def load_embeddings(out: str | Path, skip_bad: bool = False) -> tuple[list[str], np.ndarray]:
    """(keys, embeddings [rows, dim]) of everything `embed` wrote to `out`, in input order, loaded into
    memory (for outputs that fit; for larger ones read index.json and each PART.npy memory-mapped).
    A bad row is zeros; `skip_bad=True` leaves bad rows out."""
    out = Path(out)
    index = read_meta(out / "index.json", EMBEDDINGS_FORMAT, "give the --out folder of `threetowers embed`")
    keys: list[str] = []
    arrays = []
    for part in index["parts"]:
        npy, meta_path = PartEmbeddings.paths(out, part["name"])
        record = json.loads(meta_path.read_text())
        array = np.load(npy)
        keep = [row for row in range(len(array)) if not (skip_bad and str(row) in record["bad"])]
        keys += [record["keys"][row] for row in keep]
        arrays.append(array[keep] if skip_bad else array)
    return keys, np.concatenate(arrays)
