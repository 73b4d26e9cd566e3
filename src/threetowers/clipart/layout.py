"""The build's pairs in the output layouts: img2dataset's webdataset shards for training,
CLIP_benchmark's `wds/` folders for tests (written by `core.tar_layouts`: atomically, and
byte-identical for the same pairs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..core.atomic import write_json_atomic
from ..core.tar_layouts import chunks, write_classification_set, write_retrieval_set, write_tar

TRAIN_SHARD = 1_000    # samples a training shard, as img2dataset's default


@dataclass(frozen=True)
class Pair:
    source: str
    origin: str
    caption: str
    category: str | None
    png: bytes
    digest: str  # sha256 of `png`
    also: tuple[str, ...] = ()  # test sets: the captions of identical images dropped as duplicates

    @property
    def text(self) -> str:
        """A retrieval sample's KEY.txt: the caption, then the other names of the same image, one a line."""
        return "\n".join((self.caption, *self.also))


def write_train(out: Path, pairs: list[Pair]) -> str:
    """train/NNNNN.tar with KEY.png, KEY.txt, KEY.json and NNNNN_stats.json, as img2dataset writes them;
    KEY is the 9-digit running number. Returns the shards' brace pattern relative to `out`."""
    shards = chunks(pairs, TRAIN_SHARD)
    for shard_id, shard in enumerate(shards):
        samples = []
        for i, pair in enumerate(shard, start=shard_id * TRAIN_SHARD):
            key = f"{i:09d}"
            meta = {"key": key, "caption": pair.caption, "source": pair.source, "origin": pair.origin,
                    "category": pair.category}
            samples.append({"__key__": key, "png": pair.png, "txt": pair.caption.encode("utf-8"),
                            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
        write_tar(out / "train" / f"{shard_id:05d}.tar", samples)
        write_json_atomic(out / "train" / f"{shard_id:05d}_stats.json", {
            "count": len(shard), "successes": len(shard), "failed_to_download": 0, "failed_to_resize": 0,
            "status_dict": {"success": len(shard)} if shard else {}})
    return f"train/{{00000..{len(shards) - 1:05d}}}.tar"


def write_retrieval(root: Path, pairs: list[Pair]) -> None:
    """CLIP_benchmark's retrieval layout: test/N.tar of KEY.png + KEY.txt (one caption a line),
    test/nshards.txt, dataset_type.txt = retrieval."""
    write_retrieval_set(root, [{"__key__": f"{i:09d}", "png": p.png, "txt": p.text.encode("utf-8")}
                               for i, p in enumerate(pairs)])


def write_classification(root: Path, splits: dict[str, list[Pair]], classes: list[str], templates: list[str]) -> None:
    """CLIP_benchmark's zero-shot classification layout: SPLIT/N.tar of KEY.png + KEY.cls (the class index as
    text), SPLIT/nshards.txt, classnames.txt, zeroshot_classification_templates.txt (with {c})."""
    write_classification_set(root, {split: [{"__key__": f"{i:09d}", "png": p.png,
                                             "cls": str(classes.index(p.category)).encode()}
                                            for i, p in enumerate(pairs)] for split, pairs in splits.items()},
                             classes, templates)
