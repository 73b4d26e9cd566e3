"""What both readers of real pairs share: a decoded sample, its caption cleaning, the batch
collation and the counting of bad samples (`BadSampleCounter`, `BadDataError`).

Bad samples are skipped, never used, and counted by reason; each sample gets one reason, the
cheapest check first (image member present, caption, then image decode). The reasons are listed
in `data/pairs.py`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .transforms import SampleError, decode_rgb, image_transform

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # img2dataset's output formats, in preference order
MIN_SEEN = 100


class BadDataError(ValueError):
    """Too many bad samples: the data (or its configuration) needs a look."""


# ----------------------------------------------------------------------------- counting


class BadSampleCounter:
    """Samples seen, bad samples by reason with a few examples, and the `max_bad_fraction` check.

    Counts are per process. A DataLoader worker is a new process and starts from zero (a copy of
    the counter notices the new pid); every sample carries its process's running counts in
    `sample["bad_counts"]`, `collate` keeps the latest per process, and `merge(batch["bad_counts"])`
    in the main process folds them in, so that `as_log()` there covers all workers. Each process
    also enforces the limit on its own counts, so a worker stops the run by itself.
    """

    def __init__(self, max_bad_fraction: float = 0.05, min_seen: int = MIN_SEEN, max_examples: int = 3) -> None:
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction={max_bad_fraction} must be in [0, 1]")
        self.max_bad_fraction = max_bad_fraction
        self.min_seen = min_seen
        self.max_examples = max_examples
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self.seen = 0
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._others: dict[str, dict] = {}  # latest snapshot from each other process

    def _own(self) -> None:
        if os.getpid() != self._pid:  # a copy inside a new worker process counts its own samples
            self._reset()

    @property
    def source(self) -> str:
        return f"pid{os.getpid()}"

    def ok(self) -> None:
        self._own()
        self.seen += 1

    def bad(self, reason: str, where: str, detail: str = "") -> None:
        """Count one skipped sample (or unreadable shard); raises `BadDataError` past the limit."""
        self._own()
        self.seen += 1
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(f"{where} ({detail})" if detail else where)
        self.check()

    def snapshot(self) -> dict[str, dict]:
        """This process's own counts, keyed by process, for `merge` elsewhere."""
        self._own()
        examples = {reason: list(kept) for reason, kept in self.examples.items()}
        return {self.source: {"seen": self.seen, "counts": dict(self.counts), "examples": examples}}

    def merge(self, snapshots: dict[str, dict] | None) -> None:
        """Fold in other processes' counts (from `batch["bad_counts"]`) and apply the limit to the total."""
        self._own()
        for source, snap in (snapshots or {}).items():
            if source != self.source:
                self._others[source] = snap
        self.check()

    def totals(self) -> tuple[int, Counter[str], dict[str, list[str]]]:
        seen, counts = self.seen, Counter(self.counts)
        examples = {k: list(v) for k, v in self.examples.items()}
        for snap in self._others.values():
            seen += snap["seen"]
            counts.update(snap["counts"])
            for reason, more in snap["examples"].items():
                kept = examples.setdefault(reason, [])
                kept.extend(more[: max(0, self.max_examples - len(kept))])
        return seen, counts, examples

    @property
    def num_bad(self) -> int:
        return sum(self.totals()[1].values())

    def check(self, final: bool = False) -> None:
        """Raise `BadDataError` past the limit; `final=True` (a whole pass is done) ignores `min_seen`."""
        seen, counts, _ = self.totals()
        bad = sum(counts.values())
        if (final or seen >= self.min_seen) and bad > self.max_bad_fraction * seen:
            raise BadDataError(
                f"too many bad samples: {self.summary()}, above data.max_bad_fraction={self.max_bad_fraction:.1%}. "
                "Fix or filter the data, or raise data.max_bad_fraction."
            )

    def summary(self) -> str:
        seen, counts, examples = self.totals()
        bad = sum(counts.values())
        text = f"{bad} of {seen} samples bad ({bad / max(seen, 1):.1%})"
        parts = [f"{reason} x{n} (e.g. {'; '.join(examples.get(reason, []))})" for reason, n in counts.most_common()]
        return text + (": " + ", ".join(parts) if parts else "")

    def as_log(self, prefix: str = "data/") -> dict[str, float]:
        """Scalars for the training log: samples seen, bad fraction, and count per reason."""
        seen, counts, _ = self.totals()
        log = {f"{prefix}seen": float(seen), f"{prefix}bad_fraction": sum(counts.values()) / max(seen, 1)}
        log.update({f"{prefix}bad/{reason}": float(n) for reason, n in counts.items()})
        return log


def clean_caption(raw: bytes | str | None) -> str:
    """Caption bytes or text -> one line of text, or `SampleError` (missing, empty, not UTF-8)."""
    if raw is None:
        raise SampleError("missing_caption", "no caption")
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise SampleError("bad_text_encoding", f"caption is not UTF-8: {err}") from None
    else:
        text = raw
        try:
            text.encode("utf-8")  # text read with errors="surrogateescape" keeps bad bytes as surrogates
        except UnicodeEncodeError as err:
            raise SampleError("bad_text_encoding", f"caption is not UTF-8: {err}") from None
    text = " ".join(text.split())
    if not text:
        raise SampleError("empty_caption", "caption is empty")
    return text


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack images `[B, 3, S, S]`; captions and keys stay lists; bad counts: latest per process."""
    bad_counts: dict[str, dict] = {}
    for sample in samples:
        bad_counts.update(sample.get("bad_counts") or {})
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
        "bad_counts": bad_counts,
    }
    if samples and "third_image" in samples[0]:
        batch["third_image"] = torch.stack([s["third_image"] for s in samples])
    return batch


def decode_chunk(rows: Iterable[tuple[int, Callable[[], torch.Tensor]]]) -> dict:
    """A chunk of rows decoded without augmentation, for a frozen or trained tower to embed:
    {"rows": int tensor of the rows decoded, "image": float [b, 3, S, S], "bad": {row: reason}}.

    Each row comes with a callable that decodes it; a `SampleError` marks the row bad (by reason)
    instead of stopping the chunk, so that one broken image costs one row, never a part."""
    good, images, bad = [], [], {}
    for row, decode in rows:
        try:
            images.append(decode())
            good.append(row)
        except SampleError as err:
            bad[row] = err.reason
    return {"rows": torch.tensor(good, dtype=torch.long), "image": torch.stack(images) if images else torch.zeros(0),
            "bad": bad}


class SampleDecoder:
    """Shared by both readers: (image source, caption) -> sample, or a counted skip.

    `third_size` > 0 (h runs online): the sample also carries h's own pixels, `third_image`, decoded
    exactly as h's embedding cache decodes them (a decoder of h's input size, no augmentation), so
    online h and cached h see the same image whatever f sees."""

    def __init__(self, image_size: int, augment: bool, counter: BadSampleCounter, max_pixels: int,
                 third_size: int = 0) -> None:
        self.transform = image_transform(image_size, augment)
        self.keep_side = 2 * image_size  # decode large images at >= 2x the training size, no more
        self.counter = counter
        self.max_pixels = max_pixels
        self.third = SampleDecoder(third_size, False, counter, max_pixels) if third_size else None

    def decode(self, image: bytes | Path | None, caption: bytes | str | None) -> tuple[torch.Tensor, str]:
        """(image float [3, S, S] in [0, 1], caption text), or `SampleError` naming the reason; uncounted."""
        if image is None:
            raise SampleError("missing_image", "no image")
        text = clean_caption(caption)
        return self.decode_image(image), text

    def decode_image(self, image: bytes | Path | None) -> torch.Tensor:
        """The image alone (no caption needed: embedding a user's images), or `SampleError`; uncounted."""
        if image is None:
            raise SampleError("missing_image", "no image")
        return self.transform(decode_rgb(image, max_pixels=self.max_pixels, keep_side=self.keep_side))

    def decode_views(self, image: bytes | Path | None, caption: bytes | str | None) -> dict:
        """{"image", "caption"[, "third_image"]}, or `SampleError`; uncounted."""
        pixels, text = self.decode(image, caption)
        sample = {"image": pixels, "caption": text}
        if self.third is not None:
            sample["third_image"] = self.third.decode(image, caption)[0]
        return sample

    def __call__(self, image: bytes | Path | None, caption: bytes | str | None, key: str, where: str) -> dict | None:
        try:
            sample = self.decode_views(image, caption)
        except SampleError as err:  # the caption's or the image's
            self.counter.bad(err.reason, where, err.detail)
            return None
        self.counter.ok()
        return {**sample, "key": key, "bad_counts": self.counter.snapshot()}

