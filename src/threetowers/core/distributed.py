"""Multi-process training with torchrun: process group from the environment, DDP, rank-0 duties.

`torchrun --nproc_per_node=N -m threetowers train ...` sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; multi-node runs add `--nnodes`, `--node_rank` and a rendezvous
endpoint (torchrun's usual flags). Without those variables everything here is a no-op on one
process. gloo on CPU, NCCL on GPU.

Ranks wait for rank 0 in collectives (`rank0_first`, `on_main`, barriers) while it renders, decodes,
builds caches or evaluates; the group's timeout, `train.dist_timeout_minutes`, bounds that wait, and
a wrapper whose wait times out says which phase it was and which setting to raise. Nothing here
communicates unless called: the loss gathers only when told the world size (`TermLoss.distribute`).
"""

from __future__ import annotations

import gc
import inspect
import linecache
import os
import pickle
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .preemption import Preempted, preempted


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


_timeout_minutes: float | None = None  # the timeout of the group init_distributed created, for messages


def init_distributed(device: str = "auto", timeout_minutes: float = 120.0) -> DistInfo:
    """Join the process group described by torchrun's environment (or one created by the caller).

    `timeout_minutes` (`train.dist_timeout_minutes`) bounds every collective, above all the other
    ranks' wait while rank 0 alone prepares data or evaluates: torch's default is only 10 minutes.
    """
    global _timeout_minutes
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(0, 1, 0, dev, owns_group=False)
    if restarts_share_agent_store() and os.environ.get("RANK") == "0":
        print("note: torchrun may restart this group (--max-restarts), and its workers share the agent's store: "
              "with torch 2.14 a restarted gloo group could not connect (stale addresses) until "
              "train.dist_timeout_minutes ran out. Set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun "
              "(docs/scale.md, \"Pre-emption and restarts\")", file=sys.stderr, flush=True)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None,
                            timeout=timedelta(minutes=timeout_minutes))
    _timeout_minutes = timeout_minutes
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns_group=True)


def restarts_share_agent_store() -> bool:
    """Whether torchrun may restart this worker group while its workers use the agent's own store
    (torch's default since 2.5; TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 turns it off)."""
    return (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0)


def shutdown(info: DistInfo) -> None:
    global _timeout_minutes
    if info.owns_group and dist.is_initialized():
        _timeout_minutes = None
        # Drop finished collectives' work objects (they hold tensors) while the interpreter is fully
        # alive: freed later, at exit, gloo's threads can abort the process.
        gc.collect()
        dist.destroy_process_group()


class CollectiveTimeout(RuntimeError):
    """A wait for the other ranks outlasted the process group's timeout (`train.dist_timeout_minutes`)."""


def _collective(wrapper: str, op: Callable[[], Any]) -> Any:
    """`op()`, with a timeout re-raised as a CollectiveTimeout that names the waiting phase and the setting.

    gloo raises a plain RuntimeError ("Timed out waiting 2000ms for recv ..."), NCCL a DistBackendError
    (a RuntimeError); there is no dedicated type, so the text decides. (NCCL's watchdog may instead end
    the process with "Watchdog caught collective operation timeout"; the setting is the same.)
    """
    try:
        return op()
    except RuntimeError as err:
        text = str(err).lower()
        if isinstance(err, CollectiveTimeout) or ("timed out" not in text and "timeout" not in text):
            raise
        frame = sys._getframe(1)
        while frame.f_back is not None and frame.f_code.co_filename == __file__:  # the caller outside this module
            frame = frame.f_back
        where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
        limit = f"{_timeout_minutes:g} minutes" if _timeout_minutes is not None else "the process group's timeout"
        raise CollectiveTimeout(
            f"rank {dist.get_rank()} waited longer than {limit} (train.dist_timeout_minutes) in {wrapper} at "
            f"{where}{f' ({line})' if line else ''}. If rank 0 was only slow there (rendering, decoding, building a "
            "cache, evaluating), raise train.dist_timeout_minutes; otherwise look for an error in the other ranks' "
            f"output. The collective's own error: {err}"
        ) from err


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
    return _collective("broadcast_object", lambda: _broadcast(obj, info))


def _broadcast(obj: Any, info: DistInfo) -> Any:
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    _collective("gather_objects", lambda: dist.all_gather_object(out, obj))
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
        _collective("barrier", dist.barrier)


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _shippable(err: Exception) -> Exception:
    """`err` if it survives pickling (how it travels to the other ranks), else a RuntimeError with its type
    and message: an exception whose constructor pickle cannot call again would arrive as a TypeError."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001  (anything pickle raises, or the exception's own constructor)
        return RuntimeError(f"on rank 0: {type(err).__module__}.{type(err).__qualname__}: {err}")


def on_main(info: DistInfo, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only; every rank gets its result, or raises its exception (on the other ranks,
    a RuntimeError with its type and message if it does not survive pickling)."""
    if not info.enabled:
        return fn()
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001  (re-raised below, on every rank)
            error = err
    shipped = _shippable(error) if error is not None else None
    result, shipped = _collective("on_main", lambda: _broadcast((result, shipped), info))
    if error is not None:
        raise error  # rank 0: the original, with its traceback
    if shipped is not None:
        raise shipped
    return result


def rank0_first(make: Callable[[], Any]) -> Any:
    """Run `make` on rank 0, then on the other ranks (which find its files on disk and reuse them).

    A stop signal that stops rank 0's `make` between two of its parts (`Preempted`, e.g. between two
    shards of h's cache) stops every rank here, rather than leaving them waiting for rank 0."""
    if not is_distributed():
        return make()
    result, stopped = None, None
    if dist.get_rank() == 0:
        try:
            result = make()
        except Preempted as err:
            stopped = err
    if any_rank(stopped is not None, "rank0_first"):  # also the barrier: the other ranks wait for rank 0 here
        raise stopped or preempted("while rank 0 prepared the data (what it finished is kept)")
    return result if dist.get_rank() == 0 else make()


def any_rank(flag: bool, wrapper: str = "any_rank") -> bool:
    """Whether `flag` is true on any rank (`flag` itself without a process group): one small
    all-reduce, which is also a barrier. For decisions every rank must take alike, such as a stop."""
    if not is_distributed():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([float(flag)], device=device)
    _collective(wrapper, lambda: dist.all_reduce(value, op=dist.ReduceOp.MAX))
    return bool(value.item())


def gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """All ranks' rows concatenated in rank order; gradients flow back to the rank they came from.

    The caller says how many ranks take part (1: `x` itself, no communication), so that code on one
    rank alone, such as an evaluation hook, never waits on a collective it did not ask for.
    """
    if world_size <= 1:
        return x
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world_size:
        group = f"{dist.get_world_size()} ranks" if dist.is_initialized() else "no process group"
        raise RuntimeError(f"gather over {world_size} ranks, but there are {group}")
    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


def barrier_all() -> None:
    """Wait for every rank of the process group, if there is one (no `DistInfo` needed)."""
    if is_distributed():
        _collective("barrier_all", dist.barrier)
