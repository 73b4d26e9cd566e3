"""The collectives around rank-0 phases: a configurable timeout whose expiry names its setting, a loss
that communicates only when told to, and errors that reach the other ranks intact (two gloo processes)."""

import json
import pickle
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import tiny_config
from threetowers.config import ConfigError
from threetowers.core import distributed
from threetowers.core.distributed import DistInfo, gather_with_grad, on_main, rank0_first
from threetowers.data.transforms import ImageError, SampleError
from threetowers.model.losses import Term, TermLoss

SLOW = 3.5  # seconds rank 0 spends alone in a phase
SHORT = 2.0  # a group timeout shorter than that phase


class TwoArgError(Exception):
    """Pickles, but cannot be rebuilt from its message alone (as SampleError could not)."""

    def __init__(self, what: str, why: str):
        super().__init__(f"{what}: {why}")


def _unpicklable() -> None:
    err = ValueError("the real cause")
    err.callback = lambda: None  # a lambda attribute: pickle.dumps fails
    raise err


def _two_arg() -> None:
    raise TwoArgError("shard 7", "bad header")


def _image_error() -> None:
    raise ImageError("decode", "a.jpg is truncated")


def _local_loss_inputs():
    g = torch.Generator().manual_seed(0)
    return {k: F.normalize(torch.randn(8, 4, generator=g), dim=-1) for k in ("x", "y")}


def _errors(info: DistInfo) -> dict:
    out = {}
    for name, fn in [("unpicklable", _unpicklable), ("two_arg", _two_arg), ("image", _image_error)]:
        try:
            on_main(info, fn)
        except Exception as err:  # noqa: BLE001
            out[name] = [type(err).__name__, str(err), getattr(err, "reason", None), getattr(err, "detail", None)]
    return out


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    results: dict = {}
    info = DistInfo(rank, 2, 0, torch.device("cpu"), owns_group=False)

    def phase():
        if rank == 0:
            time.sleep(SLOW)
        return "made"

    dist.init_process_group("gloo", init_method=f"file://{folder}/long", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        results["long"] = rank0_first(phase)  # the same phase as below, under a generous timeout
        if rank == 0:  # a loss on rank 0 alone; rank 1 goes on to the next collective
            start = time.perf_counter()
            results["alone"] = float(TermLoss([Term("x", "y", 1.0)])(_local_loss_inputs())[0].detach())
            results["alone_seconds"] = time.perf_counter() - start
        results["errors"] = _errors(info)
        dist.barrier()
    finally:
        dist.destroy_process_group()

    dist.init_process_group("gloo", init_method=f"file://{folder}/short", rank=rank, world_size=2,
                            timeout=timedelta(seconds=SHORT))
    try:
        results["short"] = rank0_first(phase)
    except RuntimeError as err:
        results["short"] = [type(err).__name__, str(err)]
    finally:
        dist.destroy_process_group()
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(results))


def test_rank0_phases_loss_and_errors_across_two_processes(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    # A: the waiting rank outlasts the short timeout with a message that names the setting, the wrapper
    # and where it was called; under the longer timeout the same phase passes.
    assert r0["long"] == r1["long"] == "made"
    kind, message = r1["short"]
    assert kind == "CollectiveTimeout"
    assert "train.dist_timeout_minutes" in message and "rank0_first" in message
    assert "test_collectives.py" in message and "raise train.dist_timeout_minutes" in message

    # B: a loss computed on rank 0 alone is the local loss, at once (it used to wait in an all-gather).
    assert r0["alone"] == pytest.approx(float(TermLoss([Term("x", "y", 1.0)])(_local_loss_inputs())[0].detach()))
    assert r0["alone_seconds"] < 5

    # D: rank 0 raises its own exceptions; the other rank gets them intact when they survive pickling,
    # and otherwise a RuntimeError with the original type and message (not a TypeError, not a hang).
    e0, e1 = r0["errors"], r1["errors"]
    assert e0["unpicklable"][:2] == ["ValueError", "the real cause"]
    assert e0["two_arg"][0] == "TwoArgError"
    assert e1["unpicklable"][0] == "RuntimeError" and "builtins.ValueError: the real cause" in e1["unpicklable"][1]
    assert e1["two_arg"][0] == "RuntimeError" and "TwoArgError: shard 7: bad header" in e1["two_arg"][1]
    assert e1["image"] == e0["image"] == ["ImageError", "decode: a.jpg is truncated", "decode", "a.jpg is truncated"]


@pytest.mark.parametrize("cls", [SampleError, ImageError])
def test_sample_errors_survive_pickling(cls):
    err = pickle.loads(pickle.dumps(cls("too_small", "3x3 pixels")))
    assert type(err) is cls and (err.reason, err.detail, str(err)) == ("too_small", "3x3 pixels", "too_small: 3x3 pixels")


def test_init_distributed_gives_the_process_group_the_configured_timeout(monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_init(backend, **kwargs):
        seen.update(kwargs, backend=backend)
        raise Stop

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "init_process_group", fake_init)
    with pytest.raises(Stop):
        distributed.init_distributed("cpu", 45.0)
    assert seen["backend"] == "gloo" and seen["timeout"] == timedelta(minutes=45)


def test_dist_timeout_minutes_is_validated():
    assert tiny_config("clip").train.dist_timeout_minutes == 120
    assert tiny_config("clip", "train.dist_timeout_minutes=0.5").train.dist_timeout_minutes == 0.5
    for bad in ("0", "-1", "inf", "nan"):
        with pytest.raises(ConfigError, match="train.dist_timeout_minutes"):
            tiny_config("clip", f"train.dist_timeout_minutes={bad}")


def test_gather_with_grad_communicates_only_when_asked():
    x = torch.ones(2, 3)
    assert gather_with_grad(x, 1) is x
    with pytest.raises(RuntimeError, match="gather over 2 ranks"):
        gather_with_grad(x, 2)  # no process group: told of 2 ranks, it refuses rather than computes a local loss
