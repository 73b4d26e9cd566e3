"""The order in which training rows are read: the batch at step s is a pure function of (seed, s).

Two samplers, one contract (every row once per epoch; no batch holds a row twice, also one that
straddles two epochs; nothing to store for an exact resume):

- `global_indices` for rows held in memory (the world): an explicit seeded permutation per epoch,
  cached, with rows that would repeat across an epoch boundary swapped out of the straddling batch.
- `step_rows` for rows read from disk at any scale (indexed shards): a Feistel network computes the
  permutation per position in O(batch) memory, where an explicit one would cost 8 bytes a row per
  process (3.2 GB at 400M rows); a row that would repeat is replaced from `substitutes`, a stream
  seeded by (seed, step, place) that also replaces bad samples.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def check_rows(num_rows: int, batch_size: int, what: str = "the training data") -> None:
    if num_rows < 2 * batch_size:
        raise ValueError(f"{what} has {num_rows} rows; train.batch_size={batch_size} needs at least "
                         f"{2 * batch_size} (two batches), so that no batch holds a row twice: use more data or a "
                         "smaller train.batch_size")


def global_indices(seed: int, step: int, batch_size: int, num_rows: int) -> np.ndarray:
    """Rows of the global batch at `step`: epoch-wise seeded permutations, read in order.

    Every row comes once per epoch, and no batch holds a row twice, also a batch that straddles two
    epochs (a repeated row would be its own false negative in the contrastive loss). That needs at
    least two batches' worth of rows (`check_rows`).
    """
    positions = step * batch_size + np.arange(batch_size)
    epochs = positions // num_rows
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = _epoch_permutation(seed, int(epoch), num_rows, batch_size)[positions[sel] % num_rows]
    return out


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_rows: int, batch_size: int) -> np.ndarray:
    """One epoch's row order, drawn once per epoch, not per step (11 ms per step at a million rows).

    The first batch of an epoch may begin with the last `r` rows of the previous epoch. Rows of this
    epoch's first `k = batch - r` places that are among them are swapped with later places (never
    with this epoch's own last `batch` places, which the next epoch reads in the same way), so the
    order stays a pure function of (seed, epoch) and needs no earlier epoch but its raw permutation.
    """
    perm = _raw_permutation(seed, epoch, num_rows)
    carried = (epoch * num_rows) % batch_size  # rows of the previous epoch in this epoch's first batch
    if epoch and carried:
        previous_tail = _raw_permutation(seed, epoch - 1, num_rows)[num_rows - carried:]
        head = batch_size - carried
        clash = np.flatnonzero(np.isin(perm[:head], previous_tail))
        if clash.size:
            region = np.arange(head, num_rows - ((epoch + 1) * num_rows) % batch_size)
            free = region[~np.isin(perm[region], previous_tail)][: clash.size]
            perm[clash], perm[free] = perm[free], perm[clash].copy()
    perm.flags.writeable = False  # shared by every step of the epoch
    return perm


def _raw_permutation(seed: int, epoch: int, num_rows: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-spread hash of uint64 values."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (x ^ (x >> np.uint64(31))) & _MASK64


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded bijection of [0, n) applied to `positions`: a 4-round Feistel network on the
    smallest even number of bits covering n, cycle-walking the values that land at n or above."""
    bits = max(2, int(n - 1).bit_length())
    bits += bits % 2
    half, mask = np.uint64(bits // 2), np.uint64((1 << (bits // 2)) - 1)
    keys = np.random.default_rng([seed, epoch, 0xFE15]).integers(0, 2**63, size=4, dtype=np.uint64)

    def rounds(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for key in keys:
            with np.errstate(over="ignore"):
                left, right = right, left ^ (_mix(right + key) & mask)
        return (left << half) | right

    out = rounds(positions.astype(np.uint64))
    while (outside := out >= np.uint64(n)).any():  # at most a few passes: the domain is < 4n
        out[outside] = rounds(out[outside])
    return out.astype(np.int64)


def substitutes(seed: int, step: int, place: int, n: int) -> Iterator[int]:
    """Candidate rows for place `place` of the global batch at `step`, in a fixed order."""
    rng = np.random.default_rng([seed, step, place, 0x5B])
    while True:
        yield from rng.integers(0, n, size=16).tolist()


def step_rows(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """The rows of the global batch at `step` (no row twice, also across an epoch boundary)."""
    positions = step * batch_size + np.arange(batch_size, dtype=np.int64)
    rows = np.empty(batch_size, np.int64)
    epochs = positions // n
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        rows[sel] = permute(positions[sel] % n, n, seed, int(epoch))
    seen: set[int] = set()
    for place, row in enumerate(rows.tolist()):
        if row in seen:  # only where the batch straddles two epochs
            row = next(r for r in substitutes(seed, step, place, n) if r not in seen and r not in rows[place:])
            rows[place] = row
        seen.add(row)
    return rows


# ----------------------------------------------------------------------------- batches by step


class _ByStep(Dataset):
    """Item s: the batch at step s, as `make(s)` builds it."""

    def __init__(self, make: Callable[[int], dict]):
        self.make = make

    def __getitem__(self, step: int) -> dict:
        return self.make(step)


class _Steps(Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def step_loader(make: Callable[[int], dict], start_step: int, num_workers: int) -> DataLoader:
    """Batches start_step, start_step + 1, ... without end: `num_workers` processes build them ahead
    of the step (the training loop then waits only when they fall behind), into pinned memory when a
    GPU will read them. Every data source with batches by step serves them through this."""
    return DataLoader(_ByStep(make), batch_size=None, sampler=_Steps(start_step), num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), prefetch_factor=2 if num_workers else None)
