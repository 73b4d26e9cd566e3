"""Multi-process training with torchrun: process group from the environment, DDP, rank-0 duties.

`torchrun --nproc_per_node=N -m threetowers train ...` sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; multi-node runs add `--nnodes`, `--node_rank` and a rendezvous
endpoint (torchrun's usual flags). Without those variables everything here is a no-op on one
process. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import gc
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # True when we created the process group (and so must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def world_size_from_env() -> int:
    """The world size torchrun announced (1 without torchrun); known before any group exists."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(kind: str, local_rank: int = 0) -> torch.device:
    """`train.device`: auto | cpu | cuda -> the device of this process."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available; use train.device=auto or cpu")
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment (or one created by the caller)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(0, 1, 0, dev, owns_group=False)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=True)


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        # Drop finished collectives' work objects (they hold tensors) while the interpreter is fully
        # alive: freed later, at exit, gloo's threads can abort the process.
        gc.collect()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP around the model on several processes; the model itself on one.

    Every trainable parameter is used in every step (frozen h has no gradients at all), so
    `find_unused_parameters=False`. Buffers are not re-broadcast each step: nothing trainable
    updates them (h's batch norms stay in eval mode).
    """
    if not info.enabled:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    # torch >= 2.14 renamed broadcast_buffers (per-forward buffer sync) to forward_sync_buffers.
    new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers" if new_name else "broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False, **no_sync)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank (pickled; for small things such as a resume decision)."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Element-wise mean of a small tensor over ranks."""
    if not info.enabled:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def on_main(info: DistInfo, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only; every rank gets its result, or raises its exception."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001  (re-raised below, on every rank)
            if not info.enabled:
                raise
            error = err
    result, error = broadcast_object((result, error), info)
    if error is not None:
        raise error
    return result


def rank0_first(make: Callable[[], Any]) -> Any:
    """Run `make` on rank 0, then on the other ranks (which find its files on disk and reuse them)."""
    if not is_distributed():
        return make()
    result = make() if dist.get_rank() == 0 else None
    dist.barrier()
    return result if dist.get_rank() == 0 else make()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows concatenated in rank order; gradients flow back to the rank they came from."""
    if not is_distributed():
        return x
    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


def barrier_all() -> None:
    """Wait for every rank of the process group, if there is one (no `DistInfo` needed)."""
    if is_distributed():
        dist.barrier()
