"""Pre-emption: a stop signal ends a run cleanly (every rank finishes its step, a checkpoint, exit status
75) and the run resumes bit-identically, on the world and on indexed shards with cached h, in 1 and 2
processes (a signal to one rank too); a signal during h's cache build stops between two shards; a
second signal while the checkpoint is written changes nothing; torchrun forwards SIGTERM, and its
--max-restarts group resumes by itself after a SIGKILL; checkpoints by wall time; bad settings.

The runs are the real command with the real loader (tests/train_helpers.py with TT_REAL_DATA=1, whose
knobs slow a run down, or SIGKILL a rank, without changing its numbers). Waits poll for a file or a
log line with a deadline.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, fake_third
from test_indexed_shards import make_shards
from threetowers.config import ConfigError, load_config
from threetowers.core.preemption import EXIT_PREEMPTED, STOP_FILE, Preempted, stop_on_signals, stop_requested
from threetowers.third.store import build_feature_cache
from threetowers.training.checkpoint import list_checkpoints, verify
from threetowers import train
from train_helpers import FAST, SyntheticData

DRIVER = Path(__file__).with_name("train_helpers.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TT_REAL_DATA": "1"}
RUN = ["train.device=cpu", "train.threads=1", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
       "train.keep_checkpoints=10", "eval.tasks=[]"]
SLOW = {"TT_STEP_DELAY": "0.05"}  # seconds per batch: the signal lands mid-run (no numerical change)


# ----------------------------------------------------------------------------- launching and waiting


class Launch:
    """A command's processes (one, a group of ranks, or torchrun), their output in files (no pipe to fill)."""

    def __init__(self, log: Path, commands: list[list[str]], envs: list[dict]):
        self.log = log
        self.files = [open(log.with_suffix(f".{i}.log"), "w") for i in range(len(commands))]
        self.procs = [subprocess.Popen(c, env=e, stdout=f, stderr=subprocess.STDOUT)
                      for c, e, f in zip(commands, envs, self.files)]

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def finish(self, timeout: float = 180) -> list[int]:
        codes = [p.wait(timeout=timeout) for p in self.procs]
        for f in self.files:
            f.close()
        return codes

    def text(self) -> str:
        return "".join(Path(f.name).read_text() for f in self.files)


def driver(*args: str) -> list[str]:
    return [sys.executable, str(DRIVER), *args]


def one(log: Path, args: list[str], **env: str) -> Launch:
    return Launch(log, [driver(*args)], [{**ENV, **env}])


def ranks(log: Path, args: list[str], n: int = 2, **env: str) -> Launch:
    """n processes of one group, started as torchrun would start them (env://), each signalled on its own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    envs = [{**ENV, **env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)} for r in range(n)]
    return Launch(log, [driver(*args)] * n, envs)


def torchrun(log: Path, args: list[str], *flags: str, **env: str) -> Launch:
    return Launch(log, [[str(TORCHRUN), "--standalone", "--nproc_per_node=2", *flags, str(DRIVER), *args]],
                  [{**ENV, **env}])


def wait_until(condition, launch: Launch, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert launch.running(), f"the run ended before {what}:\n{launch.text()[-3000:]}"
        assert time.time() < deadline, f"no {what} after {timeout} s:\n{launch.text()[-3000:]}"
        time.sleep(0.01)


def logged_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    steps = [0]
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except (ValueError, KeyError):
                pass  # a line being written
    return max(steps)


def reference(args: list[str]) -> Path:
    """The uninterrupted run of `threetowers train CONFIG overrides...`, in this process (its modules are
    imported already); on the CPU with one thread it computes what the command computes, bit for bit."""
    assert args[0] == "train"
    return train(load_config(args[1], args[2:])).output_dir


def finished(launch: Launch, codes: list[int]) -> str:
    got = launch.finish()
    text = launch.text()
    assert got == codes, f"exit status {got}, expected {codes}:\n{text[-4000:]}"
    return text


def assert_stopped_with_checkpoint(out: Path, text: str) -> int:
    """The stop's checkpoint is whole and the newest; the log ends at its step; the stop file says 75."""
    step, path = list_checkpoints(out)[0]
    assert verify(path) is None and not list((out / "checkpoints").glob(".tmp-*"))
    assert f"after step {step}, with checkpoint {path}" in text
    assert logged_step(out) == step
    assert json.loads((out / STOP_FILE).read_text())["exit_code"] == EXIT_PREEMPTED
    return step


def assert_same_files(a: Path, b: Path, names=("model.safetensors",)) -> None:
    for name in names:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"{a / name} != {b / name}"


# ----------------------------------------------------------------------------- the world, one process


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("world")  # rendered once, shared by the runs


def world_args(world: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "tiny", *RUN, f"train.output_dir={out}", "data.world.num_pairs=64",
            f"data.world.cache_dir={world}", "train.steps=16", "train.checkpoint_every=5", *extra]


def test_sigterm_on_the_world_stops_after_the_step_and_resumes_to_the_same_weights_and_ema(tmp_path, world):
    ema = "train.ema_decay=0.9"
    full, out = reference(world_args(world, tmp_path / "full", ema)), tmp_path / "stopped"

    # TT_SLOW_CHECKPOINT: 0.3 s per file of a checkpoint, a window for a second signal while it is written.
    run = one(tmp_path / "stop", world_args(world, out, ema), **SLOW, TT_SLOW_CHECKPOINT="0.3")
    wait_until(lambda: logged_step(out) >= 1, run, "a logged step")
    run.procs[0].send_signal(signal.SIGTERM)
    wait_until(lambda: list((out / "checkpoints").glob(".tmp-*")), run, "a checkpoint being written")
    run.procs[0].send_signal(signal.SIGINT)  # Ctrl-C while it is written: noted, and the stop goes on
    text = finished(run, [EXIT_PREEMPTED])
    assert "SIGINT again: already stopping" in text
    step = assert_stopped_with_checkpoint(out, text)
    assert step < 16 and not (out / "model").exists()

    text = finished(one(tmp_path / "resume", world_args(world, out, ema)), [0])
    assert f"at step {step}" in text and not (out / STOP_FILE).exists()
    assert_same_files(full / "model", out / "model")  # the EMA (model/ holds it)
    assert_same_files(full / "checkpoints/step_0000016", out / "checkpoints/step_0000016",
                      ("model.safetensors", "ema.safetensors"))  # the raw weights and the EMA


# ----------------------------------------------------------------------------- indexed shards with cached h


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    """Four shards, an h (a saved classifier) and a cache of its embeddings, shared by the shard runs."""
    from threetowers.third.classifier import Classifier, save_classifier

    root = tmp_path_factory.mktemp("shards")
    paths = make_shards(root / "d", bad={2: {3: b"garbage"}})
    save_classifier(Classifier(load_config(None, TINY).model.image, 3), root / "h", ["a", "b", "c"])
    return {"paths": paths, "h": root / "h", "cache": root / "cache"}


def shard_args(shards: dict, out: Path, cache: Path | None = None) -> list[str]:
    return ["train", "tiny", *TINY, *RUN, "model.method=3t", "model.third.source=checkpoint",
            f"model.third.path={shards['h']}", "data.source=webdataset",
            f"data.path={'::'.join(map(str, shards['paths']))}", f"data.cache_dir={cache or shards['cache']}",
            f"train.output_dir={out}", "train.batch_size=8", "train.steps=12", "train.checkpoint_every=5",
            "model.text.vocab_size=300", "data.num_workers=1", "data.max_bad_fraction=0.5"]


def test_on_shards_a_signal_during_the_cache_build_stops_between_shards_and_the_run_resumes(tmp_path, shards):
    full, out, cache = reference(shard_args(shards, tmp_path / "full")), tmp_path / "stopped", tmp_path / "cache"

    # SIGTERM while h's embeddings are built (TT_SLOW_SHARD: 0.5 s before each of the 4 shards).
    records = lambda: list(cache.rglob("shards/*.json"))  # noqa: E731  (a shard's record is written last)
    run = one(tmp_path / "cache", shard_args(shards, out, cache), TT_SLOW_SHARD="0.5")
    wait_until(lambda: records(), run, "a finished shard")
    run.procs[0].send_signal(signal.SIGTERM)
    text = finished(run, [EXIT_PREEMPTED])
    kept = {path: path.stat().st_mtime_ns for path in records()}
    assert 1 <= len(kept) < 4 and "while preparing the shards" in text
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]  # nothing half-written
    assert not list_checkpoints(out) and (out / STOP_FILE).is_file()

    # The next run builds the other shards only, and trains to the weights of the uninterrupted run.
    finished(one(tmp_path / "resume", shard_args(shards, out, cache)), [0])
    assert len(records()) == 4 and all(path.stat().st_mtime_ns == t for path, t in kept.items())  # kept as they were
    assert_same_files(full / "model", out / "model")


def test_two_ranks_on_shards_stop_together_when_only_one_is_signalled(tmp_path, shards):
    full, out = tmp_path / "full", tmp_path / "stopped"
    finished(ranks(tmp_path / "full", shard_args(shards, full)), [0, 0])

    run = ranks(tmp_path / "stop", shard_args(shards, out), **SLOW)
    wait_until(lambda: logged_step(out) >= 1, run, "a logged step")
    run.procs[1].send_signal(signal.SIGUSR1)  # rank 1 alone
    text = finished(run, [EXIT_PREEMPTED, EXIT_PREEMPTED])
    step = assert_stopped_with_checkpoint(out, text)
    assert "stopped on SIGUSR1" in text and "stopped on a stop signal to another rank" in text
    state = torch.load(list_checkpoints(out)[0][1] / "train_state.pt", weights_only=True)
    assert state["step"] == step and state["world_size"] == 2 and len(state["rng"]) == 2

    text = finished(ranks(tmp_path / "resume", shard_args(shards, out)), [0, 0])
    assert f"at step {step}" in text
    assert_same_files(full / "model", out / "model")


# ----------------------------------------------------------------------------- torchrun: SIGTERM, --max-restarts


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_torchrun_forwards_sigterm_and_its_restarted_group_resumes_after_a_sigkill(tmp_path, world):
    full, out = tmp_path / "full", tmp_path / "run"
    finished(ranks(tmp_path / "full", world_args(world, full)), [0, 0])  # what torchrun would start

    # SIGTERM to torchrun: it forwards it to its workers, which both stop after the same step; torchrun
    # itself exits 1 (it never passes a worker's status on), and stopped.json says what happened.
    run = torchrun(tmp_path / "stop", world_args(world, out), **SLOW)
    wait_until(lambda: logged_step(out) >= 1, run, "a logged step")
    run.procs[0].send_signal(signal.SIGTERM)
    text = finished(run, [1])
    step = assert_stopped_with_checkpoint(out, text)
    assert text.count(f"stopped on SIGTERM after step {step}") == 2  # each worker's last words (exit status 75)

    # A group torchrun may restart once; rank 1 SIGKILLs itself when asked for the batch after the next
    # checkpoint. The restarted group resumes from that checkpoint by itself (train.resume=auto).
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: with torch 2.14's shared agent store, the restarted gloo group
    # cannot connect (docs/scale.md).
    killed_after = (step // 5 + 1) * 5
    marker = tmp_path / "killed.marker"
    run = torchrun(tmp_path / "restart", world_args(world, out), "--max-restarts=1",
                   TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", TT_SIGKILL_AT_STEP=str(killed_after),
                   TT_SIGKILL_RANK="1", TT_SIGKILL_MARKER=str(marker))
    text = finished(run, [0])
    assert marker.exists() and re.search(r"exitcode\s*:\s*-9", text), text[-3000:]
    assert f"at step {step}" in text and f"step_{killed_after:07d} at step {killed_after}" in text
    assert_same_files(full / "model", out / "model")
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 17))


# ----------------------------------------------------------------------------- in the process


def test_a_signal_stops_the_array_cache_build_between_shards_and_the_next_build_goes_on(tmp_path):
    h = fake_third()
    calls = []

    def embed(images):  # h, which this process signals itself during the second shard
        calls.append(len(images))
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return h.embed(images)

    images = np.random.default_rng(0).integers(0, 255, (20, 16, 16, 3), dtype=np.uint8)
    build = lambda: build_feature_cache(  # noqa: E731
        tmp_path / "cache", embed, h.info(), "test-data", [f"k{i}" for i in range(20)],
        lambda s, e: torch.from_numpy(images[s:e]), batch_size=4, shard_rows=8, progress=False)
    with pytest.raises(Preempted, match=r"SIGTERM while building h's embedding cache .* \(2 of 3 shards kept\)"):
        with stop_on_signals(["SIGTERM"]):
            build()
    # The shard in progress (rows 8..15) was finished and kept; the third was never started.
    assert sorted(p.name for p in (tmp_path / "cache").glob("shard_*.npy")) == ["shard_00000.npy", "shard_00001.npy"]
    assert calls == [4, 4, 4, 4] and stop_requested() is None
    cache = build()
    assert calls[4:] == [4] and len(cache) == 20  # only the third shard was left to build
    expected = torch.cat([h.embed(torch.from_numpy(images[s:s + 4])) for s in range(0, 20, 4)])
    assert torch.equal(cache.rows(np.arange(20)), expected.half().float())


def test_stop_on_signals_records_and_restores_and_writes_the_stop_file(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    stop_file = tmp_path / STOP_FILE
    stop_file.write_text("{}")  # a previous run's: removed when this one starts
    with pytest.raises(Preempted, match="stopped on SIGUSR1"):
        with stop_on_signals(["SIGUSR1"], stop_file):
            assert not stop_file.exists()
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop_requested() == "SIGUSR1"
            from threetowers.core.preemption import preempted
            raise preempted("in a test")
    assert signal.getsignal(signal.SIGUSR1) is before and stop_requested() is None
    assert json.loads(stop_file.read_text())["exit_code"] == 75


def test_checkpoints_by_wall_time_come_between_the_checkpoint_every_ones(tmp_path):
    cfg = load_config("tiny", FAST + [f"train.output_dir={tmp_path / 'run'}", "train.tensorboard=false",
                                      "train.steps=10", "train.checkpoint_every=1000", "train.keep_checkpoints=20",
                                      "train.checkpoint_minutes=0.001"])  # 60 ms; a step takes 50 ms or more here
    train(cfg, data=SyntheticData(cfg, delay=0.05))
    steps = sorted(s for s, _ in list_checkpoints(tmp_path / "run"))
    assert steps[-1] == 10 and 2 <= len(steps) <= 10


@pytest.mark.parametrize("override,message", [
    ("train.stop_signals=[SIGTERM,SIGNOPE]", "train.stop_signals.*'SIGNOPE' is not a signal"),
    ("train.stop_signals=[SIGKILL]", "train.stop_signals.*SIGKILL cannot be caught"),
    ("train.checkpoint_minutes=-5", "train.checkpoint_minutes=-5.0 must be > 0"),
    ("train.checkpoint_minutes=inf", "train.checkpoint_minutes=inf must be > 0"),
])
def test_bad_stop_settings_are_refused_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_the_ranks_read_the_flags_alike_a_step_late_on_a_gpu_and_only_rank_0s_clock_counts():
    from threetowers.core.distributed import DistInfo
    from threetowers.training.stopping import Agreed, StopFlags

    cpu = torch.device("cpu")
    now = StopFlags(0.0, DistInfo(0, 2, 0, cpu, owns_group=False))
    now.reduced(torch.tensor([0.5, 0.0]))  # the mean over 2 ranks: one was signalled
    assert now.agreed() == Agreed(stop=True)
    late = StopFlags(0.0, DistInfo(0, 2, 0, cpu, owns_group=False))
    late.lag = 1  # as on a GPU: step s's flags are read after step s + 1
    late.reduced(torch.tensor([0.5, 0.0]))
    assert late.agreed() == Agreed()
    late.reduced(torch.tensor([0.0, 0.0]))
    assert late.agreed() == Agreed(stop=True)
    clocks = [StopFlags(0.005, DistInfo(rank, 2, rank, cpu, owns_group=False)) for rank in (0, 1)]  # 0.3 s
    time.sleep(0.35)
    assert [float(flags.local()[1]) for flags in clocks] == [1.0, 0.0]  # rank 0's clock alone says time is up
    clocks[0].checkpointed()
    assert float(clocks[0].local()[1]) == 0.0  # and it starts again at a checkpoint
