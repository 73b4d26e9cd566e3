"""Writing the two tar layouts the project exchanges with other tools: CLIP_benchmark's `wds/` test
sets and the tar shards themselves (KEY.ext members, as img2dataset and webdataset write them).

A sample is {"__key__": key, ext: bytes, ...}. Every file is written atomically (`core.atomic`),
so an interrupted write leaves no half-written shard under a final name, and tar members carry
fixed metadata (mtime 0, no owner), so the same samples give byte-identical tars.

CLIP_benchmark's layout (what its `build_wds_dataset` reads):
    ROOT/SPLIT/0.tar, 1.tar, ...   KEY.png + KEY.cls (class index as text) or KEY.txt (captions, one a line)
    ROOT/SPLIT/nshards.txt
    ROOT/dataset_type.txt          "retrieval" for retrieval sets
    ROOT/classnames.txt, ROOT/zeroshot_classification_templates.txt (with {c}) for zero-shot sets
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from .atomic import atomic_path, write_text_atomic

WDS_SHARD = 10_000  # samples a test-set shard


def write_tar(path: Path, samples: list[dict]) -> None:
    """A tar of samples {"__key__": key, ext: bytes, ...}, members KEY.ext in order."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def chunks(items: list, size: int) -> list[list]:
    """`items` in runs of `size` (one empty run for no items: a set with no samples still has a shard)."""
    return [items[i:i + size] for i in range(0, len(items), size)] or [[]]


def write_wds_split(root: Path, split: str, samples: list[dict]) -> None:
    """ROOT/SPLIT/N.tar and ROOT/SPLIT/nshards.txt."""
    shards = chunks(samples, WDS_SHARD)
    for n, shard in enumerate(shards):
        write_tar(root / split / f"{n}.tar", shard)
    write_text_atomic(root / split / "nshards.txt", f"{len(shards)}\n")


def write_retrieval_set(root: Path, samples: list[dict]) -> Path:
    """A retrieval set (samples with png and txt: an image's captions one a line) as ROOT/test."""
    write_wds_split(root, "test", samples)
    write_text_atomic(root / "dataset_type.txt", "retrieval\n")
    return root


def write_classification_set(root: Path, splits: dict[str, list[dict]], classes: list[str],
                             templates: list[str]) -> Path:
    """A zero-shot set (samples with png and cls) per split; templates hold `{c}` for the class name."""
    for split, samples in splits.items():
        write_wds_split(root, split, samples)
    write_text_atomic(root / "classnames.txt", "\n".join(classes) + "\n")
    write_text_atomic(root / "zeroshot_classification_templates.txt", "\n".join(templates) + "\n")
    return root
