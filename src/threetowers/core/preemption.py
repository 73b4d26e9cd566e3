"""Stopping cleanly on a signal: the notice a cluster gives before it kills a job.

SLURM sends SIGTERM, or the signal chosen with `--signal`, before it kills a job; Kubernetes sends
SIGTERM and waits `terminationGracePeriodSeconds`; Ctrl-C sends SIGINT. `stop_on_signals` installs,
for the block it guards (a run: data preparation and training), a handler for each signal named in
`train.stop_signals` that only records the request: nothing is interrupted where it stands. The work
looks at `stop_requested()` at its stop points, finishes what it was doing there, saves it
(atomically, as always) and raises `Preempted`:

- the training loop, after each step: the ranks agree on the step (training/stopping.py), the run
  writes a checkpoint and flushes its logs;
- the shard index and h's embedding cache, between two shards (every finished shard is kept);
- the loop's start, for a signal that came while the data were prepared.

The command line turns `Preempted` into exit status 75 (`EXIT_PREEMPTED`, EX_TEMPFAIL in BSD's
sysexits.h: "a temporary failure; the user is invited to retry later"): distinct from an error (1),
a config error (2), Ctrl-C without a graceful stop (130) and a kill by a signal (128 + n, or -n from
Python's subprocess), so that a scheduler's script can requeue on it. torchrun does not pass a
worker's status on (it exits 1 whenever a worker fails), so rank 0 also writes `STOP_FILE` into the
output directory, which the next run removes when it starts (docs/scale.md, "Pre-emption and restarts").

A second signal while stopping is ignored (a line says so): the stop is already bounded by one step
and one checkpoint, and launchers deliver one request twice (a terminal sends Ctrl-C to torchrun and
to its workers, and torchrun forwards it again; SLURM signals every process of a job step). To end a
process at once, send SIGKILL or press Ctrl-\\ (SIGQUIT); the checkpoints on disk stay valid.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .atomic import write_json_atomic

EXIT_PREEMPTED = 75
STOP_FILE = "stopped.json"  # <output_dir>/stopped.json: the last run stopped on a signal, with its state saved
DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
_UNCATCHABLE = ("SIGKILL", "SIGSTOP")


class Preempted(Exception):
    """The run stopped on a stop signal at a stop point, after saving what it had done; run the same
    command again to go on (exit status 75 from the command line)."""


def signal_number(name: str) -> signal.Signals:
    """The signal called `name` (SIGTERM, or TERM); ValueError for a name this system has not or
    a signal no process can catch."""
    full = name.strip().upper()
    full = full if full.startswith("SIG") else "SIG" + full
    if full in _UNCATCHABLE:
        raise ValueError(f"{name} cannot be caught by any process, so it cannot stop a run cleanly")
    try:
        return signal.Signals[full]
    except KeyError:
        raise ValueError(f"{name!r} is not a signal of this system (e.g. {', '.join(DEFAULT_STOP_SIGNALS)})") from None


_requested: str | None = None  # the first stop signal's name, until a stop point has acted on it
_repeated = False
_owner = 0  # the process that installed the handlers (forked data workers inherit them, and ignore signals)


def stop_requested() -> str | None:
    """The name of the stop signal received (None: none), for the stop points to act on."""
    return _requested


def _record(signum: int, frame) -> None:
    """The handler: it only records the request (the stop points act on it). os.write, not print: a
    handler runs between two bytecodes of the main thread, maybe inside a print to the same stream."""
    global _requested, _repeated
    if os.getpid() != _owner:  # a forked data worker: its process stops with the run's
        return
    name = signal.Signals(signum).name
    if _requested is None:
        _requested = name
        os.write(2, f"threetowers: {name}: stopping at the next stop point (after this step and a checkpoint, "
                    "or between two shards)\n".encode())
    elif not _repeated:
        _repeated = True
        os.write(2, f"threetowers: {name} again: already stopping; SIGKILL or Ctrl-\\ ends the process at once "
                    "(the checkpoints on disk stay valid)\n".encode())


def preempted(where: str) -> Preempted:
    """The exception a stop point raises, `where` saying what was saved (e.g. "between two shards")."""
    why = _requested or "a stop signal to another rank"
    return Preempted(f"stopped on {why} {where}. Run the same command again to go on")


@contextmanager
def stop_on_signals(names, stop_file: Path | None = None) -> Iterator[None]:
    """Record the signals `names` as stop requests inside the block; the previous handlers are restored
    after. Only the main thread can install handlers: elsewhere (or with no names) nothing changes.

    `stop_file` (rank 0's `<output_dir>/stopped.json`): removed on entry, written when the block ends
    in `Preempted`, for a requeue script that cannot see the exit status (under torchrun).
    """
    global _requested, _repeated, _owner
    if not names or threading.current_thread() is not threading.main_thread():
        yield
        return
    _owner = os.getpid()
    _clear(stop_file)
    numbers = [signal_number(name) for name in names]
    previous = {number: signal.signal(number, _record) for number in numbers}
    try:
        yield
    except Preempted as err:
        _requested, _repeated = None, False  # acted on: a later run in this process starts afresh
        if stop_file is not None:
            _write_stop_file(stop_file, err)
        raise
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def record_stop_signals(names) -> None:
    """For the life of this process (a worker process that runs one job after another): the signals
    `names` are recorded as stop requests, for the next stop point of its next run to act on."""
    global _owner
    _owner = os.getpid()
    for name in names or ():
        signal.signal(signal_number(name), _record)


def _clear(stop_file: Path | None) -> None:
    if stop_file is not None:
        try:
            stop_file.unlink(missing_ok=True)
        except OSError:
            pass  # an unwritable output directory is reported by the run itself, with its name


def _write_stop_file(stop_file: Path, err: Preempted) -> None:
    try:
        write_json_atomic(stop_file, {"exit_code": EXIT_PREEMPTED, "message": str(err), "time": time.time()})
    except OSError:
        pass  # the exit status still says it; the checkpoint was written (or the stop came before any)
