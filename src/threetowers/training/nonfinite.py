"""Steps whose loss or gradient is non-finite: not applied, counted, and the run stopped by policy.

The decision is taken on the device, so that a step never makes the host wait for the GPU. Fused
AdamW (every CUDA run) takes it as a device tensor, `found_inf` (the contract torch's GradScaler
uses): the kernel leaves weights, moments and the step count alone when it is set. An optimizer
without that contract (the CPU's, where nothing runs ahead of the host anyway) reads the one flag
at once. The counts stay on the device; `check` reads them in one transfer at log lines and before
anything is evaluated or written, and applies `train.on_nonfinite` and its limits there.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..schema import TrainConfig


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite loss); the last good checkpoint is intact."""


class NonFiniteSteps:
    def __init__(self, optimizer: torch.optim.Optimizer, tc: TrainConfig, skipped: int, device: torch.device):
        self.optimizer, self.tc = optimizer, tc
        self.on_device = all(group.get("fused") for group in optimizer.param_groups)
        self.skipped = torch.tensor(float(skipped), device=device)
        self.in_a_row = torch.zeros((), device=device)  # skipped steps in a row, now
        self.longest = torch.zeros((), device=device)  # the longest such run since the last check
        self.first = torch.full((), -1.0, device=device)  # the first skipped step since the last check
        self.values: torch.Tensor | None = None  # what the last skipped step reported (for the message)
        self.keys: list[str] = []
        self.known = skipped  # skipped steps at the last check

    def apply(self, keys: list[str], values: torch.Tensor, step: int, update: Callable[[], None]) -> torch.Tensor:
        """Run `update` unless `values` (the step's loss, gradient norm, ...) hold a non-finite number;
        returns the device flag, 1.0 for a skipped step."""
        bad = (~torch.isfinite(values).all()).float()
        if self.on_device:
            self.optimizer.found_inf = bad
            update()
        elif not bool(bad):
            update()
        self.keys = keys
        self.skipped = self.skipped + bad
        self.in_a_row = (self.in_a_row + 1) * bad
        self.longest = torch.maximum(self.longest, self.in_a_row)
        self.first = torch.where((bad > 0) & (self.first < 0), float(step), self.first)
        last = values if self.values is None else self.values
        self.values = torch.where(bad > 0, values.float(), last.float())
        return bad

    def check(self, step: int, last_checkpoint: str | None, write: Callable[[str], None]) -> int:
        """Apply the policy to the steps since the last check (one host read); returns the skipped count."""
        read = torch.stack([self.skipped, self.longest, self.first, *(self.values if self.values is not None else [])])
        skipped, longest, first, *values = read.tolist()
        skipped, longest, first = int(skipped), int(longest), int(first)
        if skipped == self.known:
            return skipped
        detail = ", ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in zip(self.keys, values)
                           if k.startswith(("train/loss", "train/grad_norm")))
        fallback = f"The last good checkpoint is {last_checkpoint or 'none (none was written yet)'}"
        if self.tc.on_nonfinite == "stop":
            raise TrainingStopped(
                f"non-finite loss or gradient at step {first} ({detail}); that step was not applied. {fallback}; "
                "resume from it with a lower optim.lr, check the data, or set train.on_nonfinite=skip")
        where = f"step {first}" if first == step else f"steps {first}..{step}"
        write(f"{where}: {skipped - self.known} step(s) with a non-finite loss or gradient ({detail}); skipped "
              f"({skipped} skipped so far)")
        if longest >= self.tc.max_consecutive_skips or skipped >= self.tc.max_skipped_steps:
            raise TrainingStopped(
                f"{longest} steps in a row and {skipped} in all were skipped for a non-finite loss or gradient "
                f"(limits: train.max_consecutive_skips={self.tc.max_consecutive_skips}, train.max_skipped_steps="
                f"{self.tc.max_skipped_steps}); the run is not learning. {fallback}; lower optim.lr or check the data")
        self.known, self.first, self.longest = skipped, torch.full_like(self.first, -1.0), self.in_a_row.clone()
        return skipped
