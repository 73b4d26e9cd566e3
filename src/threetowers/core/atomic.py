"""Atomic file writes: a file is either its old version or the complete new one, never half written.

Everything the project writes that a user keeps or that a later run reads back (models, checkpoints'
files, configs, caches, reports, plots) goes through `atomic_path`: the content is written to a
temporary file in the same folder, flushed to disk, and renamed over the target (a rename within a
filesystem is atomic). A failure or a kill mid-write leaves the old file and, at worst, a hidden
`.NAME.PID-XXXX.tmp` file; the temporary is removed on any exception.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on normal exit it replaces `path`.

    The temporary keeps `path`'s suffix (np.save and savefig choose formats by it) and is unique per
    process and call, so concurrent writers (ranks, workers) never share one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))
