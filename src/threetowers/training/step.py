"""One training step's forward and backward: micro-batches, autocast, and DDP's one gradient sync.

Gradient accumulation: each step's batch (this rank's share of `train.batch_size`) is split into
`train.grad_accum` micro-batches, and each micro-batch is a contrastive batch of its own: its
negatives are the other rows of that micro-batch on all ranks (batch_size / grad_accum rows), not
the whole step's batch. Gradients are summed over the micro-batches before the one update. This is
the usual trade (open_clip's default): accumulation saves memory but does not add negatives.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def split_batch(batch: dict, parts: int) -> list[dict]:
    """`parts` equal micro-batches along the first dimension (tensors and lists alike)."""
    if parts == 1:
        return [batch]
    rows = batch_rows(batch)
    size = rows // parts
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(parts)]


def batch_rows(batch: dict) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError(f"a training batch needs at least one tensor; got keys {sorted(batch)}")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def forward_backward(model: nn.Module, batch: dict, grad_accum: int, device: torch.device,
                     precision: str) -> dict[str, torch.Tensor]:
    """Forward and backward over the step's micro-batches; gradients accumulate in `.grad`.

    Returns the mean over micro-batches of every scalar the model reported (detached). Under DDP the
    gradients are all-reduced once, after the last micro-batch.
    """
    sums: dict[str, torch.Tensor] = {}
    micro = split_batch(batch, grad_accum)
    ddp = getattr(model, "_orig_mod", model)  # under torch.compile, the DDP module it wraps
    for i, part in enumerate(micro):
        part = _to_device(part, device)
        last = i == len(micro) - 1
        with ddp.no_sync() if isinstance(ddp, DistributedDataParallel) and not last else nullcontext():
            with autocast(device, precision):
                out = model(part)
            (out["loss"] / len(micro)).backward()
        for key, value in out.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                sums[key] = sums.get(key, 0.0) + value.detach().float().reshape(())
    return {k: v / len(micro) for k, v in sums.items()}
