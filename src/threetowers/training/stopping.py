"""The ranks' agreement on when to stop for a signal and when to checkpoint for time, without a collective
of its own.

Every step already all-reduces a small tensor of its metrics (`all_mean` of the losses and the
gradient norm). Two flags ride along at its end:

- `signal`: 1 on a rank that received a stop signal (`core/preemption.py`), else 0. Its mean is > 0
  on every rank, at the same step, if and only if some rank was signalled: a signal to one rank
  stops them all at the same step.
- `time`: 1 on rank 0 when `train.checkpoint_minutes` have passed on its clock since the last
  checkpoint (or the loop's start); the other ranks always send 0, so rank 0's clock alone decides
  and clocks that drift apart cannot split the ranks.

Sums of separate elements do not mix, so the metrics are reduced exactly as before. On a GPU the
flags of step s are read after step s + 1 has been queued (a host read of the step just queued would
make the host wait for the device every step): the stop comes one step later there, on every rank
alike. On the CPU, where nothing runs ahead of the host, they are read at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..core.distributed import DistInfo
from ..core.preemption import stop_requested


@dataclass
class Agreed:
    """What every rank reads from the flags after a step."""

    stop: bool = False  # some rank received a stop signal
    time_up: bool = False  # rank 0: train.checkpoint_minutes have passed since the last checkpoint


class StopFlags:
    def __init__(self, checkpoint_minutes: float, info: DistInfo):
        self.seconds = 60 * checkpoint_minutes if checkpoint_minutes > 0 else math.inf
        self.device, self.is_main = info.device, info.is_main
        self.lag = 1 if info.device.type == "cuda" else 0
        self.pending: list[torch.Tensor] = []
        self.since = time.monotonic()

    def local(self) -> list[torch.Tensor]:
        """This rank's two flags, as 0-d tensors to stack with the step's metrics (filled on the device:
        no copy from the host)."""
        signal = 1.0 if stop_requested() else 0.0
        time_up = 1.0 if self.is_main and time.monotonic() - self.since >= self.seconds else 0.0
        return [torch.full((), signal, device=self.device), torch.full((), time_up, device=self.device)]

    def reduced(self, flags: torch.Tensor) -> None:
        """The flags as the step's all-reduce returned them (the mean over ranks)."""
        self.pending.append(flags)

    def agreed(self) -> Agreed:
        """The flags of the step `lag` steps back: the same on every rank."""
        if len(self.pending) <= self.lag:
            return Agreed()
        signal, time_up = self.pending.pop(0).tolist()
        return Agreed(stop=signal > 0, time_up=time_up > 0)

    def checkpointed(self) -> None:
        """A checkpoint was written: rank 0's clock starts again."""
        self.since = time.monotonic()
