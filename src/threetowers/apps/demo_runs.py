"""The demo's grid of runs: one at a time in this process, or `jobs` at once in worker processes.

A run trains one `Config` and scores it (a `Scoring`), and gives its row of results.json. It trains
and is scored under its own `train.threads` wherever it runs, and CPU kernels are deterministic for a
fixed thread count, so a demo's results do not depend on `jobs`; only its wall time does. On a CPU,
two runs of one thread each do more work in a second than one run of two threads (small towers
use a second core poorly: 1.27-1.75x more steps a second for the demo's runs on 2 cores,
benchmarks/bench_demo_jobs.py).

Two runs never build one cache of h's embeddings at once: the first run that reads h's cache builds
it (its `cached` names the h's), and any other run that reads it waits until it is built. In worker
processes, each run's console output goes to `runs/<run>.log`; this process prints a line as each
run starts and ends. A failed run stops the demo (the runs already finished are kept, and the same
command goes on from there). A stop signal (`train.stop_signals`), to this process or to all of
them, stops every running run at its next stop point with its state saved, starts no other, and
ends the demo in `Preempted` (exit status 75): the same command goes on.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch

from ..core.preemption import Preempted, preempted, record_stop_signals, signal_number, stop_on_signals, stop_requested
from ..schema import Config
from ..training.contrastive import train


class Scoring(Protocol):
    """Scores a trained model: (model, tokenizer, its config) -> (metrics, mixing per h). Picklable:
    worker processes receive it once and build what it needs there."""

    def __call__(self, model, tokenizer, cfg: Config) -> tuple[dict, dict]: ...


@dataclass
class Run:
    method: str
    third: str | None
    seed: int
    cfg: Config
    cached: tuple[str, ...] = ()  # the h's whose embedding caches it reads

    @property
    def label(self) -> str:
        return f"seed {self.seed}: training {self.method}{f' with h={self.third}' if self.third else ''}"

    @property
    def log_file(self) -> Path:
        """Its console output when it runs in a worker (beside its folder, which holds only the run's files)."""
        out = Path(self.cfg.train.output_dir)
        return out.with_name(out.name + ".log")

    @property
    def cost(self) -> int:
        """Rough relative run time, to start long runs first: LiT trains g alone, on cached embeddings."""
        return 1 if self.method == "lit" else 3


@dataclass
class Outcome:
    row: dict  # the run's entry in results.json
    seconds: dict[str, float]  # "cache" (its data, h's caches included), "train", "eval"


def execute(run: Run, scoring: Scoring) -> Outcome:
    """Train `run` and score it, both under the run's threads (the scoring too: its numbers must not
    depend on where the run took place)."""
    threads = torch.get_num_threads()
    try:
        if run.cfg.train.threads:
            torch.set_num_threads(run.cfg.train.threads)
        t0 = time.perf_counter()
        result = train(run.cfg)
        trained = time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics, mixing = scoring(result["model"], result["tokenizer"], run.cfg)
        scored = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    row = {"method": run.method, "third": run.third, "seed": run.seed, "metrics": metrics,
           "curve": [[r["step"], r["train/loss"]] for r in result.curve if "train/loss" in r],
           "mixing": mixing.get(0, {}),  # the first h's sweep; the others' (several h's) beside it
           **({"mixing_h": {str(k + 1): m for k, m in mixing.items() if k}} if len(mixing) > 1 else {})}
    return Outcome(row, {"cache": result.data_seconds, "train": trained - result.data_seconds, "eval": scored})


def run_all(runs: list[Run], scoring: Scoring, jobs: int, log: Callable[[str], None]) -> list[Outcome]:
    """Every run's outcome, in the order of `runs`."""
    if jobs <= 1:
        outcomes = []
        for run in runs:
            log(f"{run.label} ({run.cfg.train.steps} steps)")
            outcomes.append(execute(run, scoring))
            log("  " + headline(outcomes[-1]))
        return outcomes
    return _in_workers(runs, scoring, jobs, log)


def headline(outcome: Outcome) -> str:
    return ", ".join(f"{k}={100 * v:.1f}" for k, v in outcome.row["metrics"].items() if k.endswith(("top1", "R@1")))


def worker_threads(runs: list[Run], jobs: int) -> int:
    """Threads each of `jobs` workers runs on: the runs' train.threads, or with 0 (torch's default:
    every core) the cores shared among the workers."""
    return max((r.cfg.train.threads for r in runs), default=0) or max(1, (os.cpu_count() or 1) // jobs)


def check_jobs(runs: list[Run], jobs: int, log: Callable[[str], None]) -> None:
    """A note when `jobs` runs at once would use more threads than the machine has cores."""
    cores = os.cpu_count() or 1
    threads = worker_threads(runs, jobs)
    if jobs > 1 and jobs * threads > cores:
        log(f"note: jobs={jobs} runs at once with train.threads={threads} each need {jobs * threads} threads on "
            f"{cores} cores, and runs that share cores slow each other many times over; set jobs={max(1, cores // threads)}"
            f" or --run train.threads={max(1, cores // jobs)} (another thread count changes results to rounding)")


def _in_workers(runs: list[Run], scoring: Scoring, jobs: int, log: Callable[[str], None]) -> list[Outcome]:
    threads = worker_threads(runs, jobs)
    signals = list(runs[0].cfg.train.stop_signals) if runs else []
    waiting = list(range(len(runs)))
    built: set[str] = set()  # h's whose caches are complete
    building: set[str] = set()  # h's whose caches a running run builds
    running: dict[Future, int] = {}
    outcomes: dict[int, Outcome] = {}
    started: dict[int, float] = {}
    stopped: list[str] = []  # runs that stopped on a stop signal, with their state saved
    forwarded = False
    context = multiprocessing.get_context("spawn")  # never fork a process whose OpenMP threads have run
    with _blas_threads(threads), stop_on_signals(signals), \
            ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker, initargs=(scoring, signals)) as pool:
        while (waiting and not stop_requested()) or running:
            if stop_requested() and not forwarded:
                # A signal to this process alone (a container's PID 1, a scheduler's kill) reaches the
                # runs too; one that reached them already is ignored the second time.
                for child in multiprocessing.active_children():
                    os.kill(child.pid, signal_number(stop_requested()))
                forwarded = True
            for i in [] if stop_requested() else _startable(runs, waiting, built, building, jobs - len(running)):
                waiting.remove(i)
                building |= set(runs[i].cached) - built
                log(f"{runs[i].label} ({runs[i].cfg.train.steps} steps; output: {runs[i].log_file})")
                started[i] = time.perf_counter()
                running[pool.submit(_execute_logged, runs[i])] = i
            done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                i = running.pop(future)
                run = runs[i]
                try:
                    outcomes[i] = future.result()
                except (Preempted, KeyboardInterrupt):
                    stopped.append(run.label)
                    continue
                except BaseException as err:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise RuntimeError(f"demo run {run.label} failed ({type(err).__name__}: {err}); its output is in "
                                       f"{run.log_file}. The runs that finished are kept: the same command goes on "
                                       "from them") from err
                built |= set(run.cached)
                building -= set(run.cached)
                log(f"  done {len(outcomes)}/{len(runs)}: {run.label} in {time.perf_counter() - started[i]:.0f}s; "
                    + headline(outcomes[i]))
        if stopped or len(outcomes) < len(runs):
            raise preempted(f"with {len(outcomes)} of {len(runs)} runs done" +
                            (f" and {len(stopped)} checkpointed where they stopped ({'; '.join(stopped)})" if stopped else ""))
    return [outcomes[i] for i in range(len(runs))]


def _startable(runs: list[Run], waiting: list[int], built: set[str], building: set[str], slots: int) -> list[int]:
    """Up to `slots` of the `waiting` runs to start now: those whose h's caches are built or free to be
    built by them (no two runs build one cache), the ones that build caches first (others wait for
    them), then the longest."""
    ready = []
    claimed = set(building)
    for i in sorted(waiting, key=lambda i: (not set(runs[i].cached) - built, -runs[i].cost, i)):
        todo = set(runs[i].cached) - built
        if len(ready) < slots and not todo & claimed:
            ready.append(i)
            claimed |= todo
    return ready


_SCORING: Scoring | None = None  # a worker's scoring, received once


def _start_worker(scoring: Scoring, signals: list[str]) -> None:
    global _SCORING
    _SCORING = scoring
    record_stop_signals(signals)  # a signal between two runs stops the next one at its first stop point


def _execute_logged(run: Run) -> Outcome:
    with _console_to(run.log_file):
        try:
            return execute(run, _SCORING)
        except BaseException:
            traceback.print_exc()  # the whole story in the run's log; the demo's error names the log
            raise


@contextmanager
def _console_to(path: Path) -> Iterator[None]:
    """This process's stdout and stderr (Python's and C's) into `path` for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a", encoding="utf-8") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextmanager
def _blas_threads(threads: int) -> Iterator[None]:
    """Worker processes start with the runs' thread count for OpenMP and BLAS libraries too (read
    once, when each loads; torch's own threads are set per run)."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    before = {n: os.environ.get(n) for n in names}
    os.environ.update({n: str(threads) for n in names})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
