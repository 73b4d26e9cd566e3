"""What the loop trains: a `Job` (a model, its data, and how its weights are written and read)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

from torch import nn


class TrainData(Protocol):
    """What the loop reads: one batch per step from any step on, and the bad samples counted so far."""

    def batches(self, start_step: int) -> Iterator[dict]: ...

    def bad_samples(self) -> dict[str, int]: ...


@dataclass
class Job:
    """What the loop trains, and how its weights are written to and read from a directory."""

    name: str
    model: nn.Module  # forward(batch) -> {"loss": scalar, other scalars to log, ...}
    data: TrainData
    save_model: Callable[[nn.Module, Path], None]
    load_weights: Callable[[nn.Module, Path], None]
