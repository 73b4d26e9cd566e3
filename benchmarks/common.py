"""Helpers shared by the benchmark scripts: interleaved timing, peak memory, machine facts, output.

Timing interleaves the contenders (A B C A B C ...) so that slow drifts of a shared machine (other
processes, thermal limits, turbo) fall on all of them alike, and reports medians, which one
disturbed round does not move.

Peak memory of a step is measured the same way on both devices: the transient peak of one step
(what the step allocates above what was allocated just before it: activations, gradients, the
optimizer's temporaries) plus the resident state the step needs between steps (parameters and
optimizer state, counted from the tensors). On CUDA the transient part comes from the caching
allocator's exact counters; on CPU from the kernel's high-water mark of the resident set (VmHWM,
reset through /proc/self/clear_refs), after glibc has been asked to return freed memory to the
system (malloc_trim) so that reused free memory does not hide growth.
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import time
from typing import Callable

import torch

from threetowers.apps.demo import cpu_model

MIB = 2**20


# ----------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _busy_ticks() -> tuple[int, int] | None:
    """(CPU ticks all processes spent busy, ticks this process spent), from /proc; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, int(own[11]) + int(own[12])  # user..steal; utime + stime


def other_load(before: tuple[int, int] | None, after: tuple[int, int] | None, seconds: float) -> float | None:
    """Cores' worth of CPU that *other* processes (and the hypervisor's steal) used over `seconds`."""
    if before is None or after is None or seconds <= 0:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / hz / seconds)


def interleave(
    fns: dict[str, Callable[[], None]], device: torch.device, rounds: int, steps: int, progress: bool = True,
    max_rounds: int | None = None, busy_limit: float = 0.25,
) -> dict[str, dict[str, list[float]]]:
    """Time every fn, interleaved: each round runs every fn `steps` times, in an order that rotates
    every round so that no contender always runs right after the same other one.

    On a machine shared with other work a step can take several times longer because another
    process held a core. Each timed call therefore also records how many cores' worth of CPU other
    processes used meanwhile (from /proc); a call during which they used more than `busy_limit`
    cores is marked disturbed, and rounds continue (up to `max_rounds`) until every fn has
    `rounds * steps` undisturbed calls. Returns, per fn: `wall` and `cpu` (process CPU seconds)
    of every call, and `disturbed` flags.
    """
    names = list(fns)
    out = {n: {"wall": [], "cpu": [], "other_load": [], "disturbed": []} for n in names}
    want = rounds * steps
    max_rounds = max(rounds, max_rounds or rounds)
    for r in range(max_rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            for _ in range(steps):
                sync(device)
                b0 = _busy_ticks()
                t0, c0 = time.perf_counter(), time.process_time()
                fns[name]()
                sync(device)
                wall = time.perf_counter() - t0
                load = other_load(b0, _busy_ticks(), wall)
                rec = out[name]
                rec["wall"].append(wall)
                rec["cpu"].append(time.process_time() - c0)
                rec["other_load"].append(load)
                rec["disturbed"].append(load is not None and load > busy_limit)
        clean = {n: out[n]["disturbed"].count(False) for n in names}
        if progress:
            print(f"  round {r + 1}: " + ", ".join(
                f"{n} {1e3 * out[n]['wall'][-1]:.0f} ms{'*' if out[n]['disturbed'][-1] else ''}" for n in names),
                flush=True)
        if r + 1 >= rounds and min(clean.values()) >= want:
            break
    return out


def summary(record: dict[str, list], rows_per_call: int) -> dict:
    """Medians over the undisturbed calls (over all calls when there are none), and what was dropped."""
    clean = [i for i, d in enumerate(record["disturbed"]) if not d]
    keep = clean or list(range(len(record["wall"])))
    wall = [record["wall"][i] for i in keep]
    cpu = [record["cpu"][i] for i in keep]
    med = statistics.median(wall)
    return {
        "median_s": med,
        "min_s": min(wall),
        "cpu_median_s": statistics.median(cpu),
        "per_s": rows_per_call / med,
        "n": len(wall),
        "n_disturbed": len(record["wall"]) - len(clean),
        "all_disturbed": not clean,  # then the medians include disturbed steps: treat them with care
        "all_wall_s": record["wall"],
        "all_other_load": record["other_load"],
    }


# ----------------------------------------------------------------------------- memory


def status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_malloc() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def resident_bytes(params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> int:
    """Parameters plus optimizer state: what stays allocated between two steps (grads are set to None)."""
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return tensor_bytes(params) + tensor_bytes(state)


def step_peak_mib(fn: Callable[[], None], device: torch.device) -> float | None:
    """Transient peak (MiB) of one call of fn above what was allocated before it; None if unmeasurable."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    _trim_malloc()
    if not reset_rss_peak():
        return None
    before = status_kb("VmRSS")
    fn()
    peak = status_kb("VmHWM")
    if before is None or peak is None:
        return None
    return (peak - before) / 1024


# ----------------------------------------------------------------------------- machine and output


def machine(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, tf32=torch.backends.cuda.matmul.allow_tf32)
    return info


def print_table(headers: list[str], rows: list[list], title: str = "") -> None:
    """A plain fixed-width table (no extra dependency)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(f"\n{title}")
    line = "  ".join("-" * w for w in widths)
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print(line)


WORLD_METRICS = ("zeroshot_object/top1", "zeroshot_scene/top1", "retrieval/i2t_R@1", "retrieval/t2i_R@1")


def train_and_score(cfg, label: str) -> dict:
    """Train `cfg`, score the model on the world's zero-shot sets and retrieval, print one line:
    {"seed", "seconds" (the whole train call), metric: value, ...}."""
    from threetowers import build_tasks, run_tasks, train

    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    tasks = build_tasks(cfg, ["zeroshot_object", "zeroshot_scene", "retrieval"])
    scores = run_tasks(result.model, result.tokenizer, tasks, cfg.eval.batch_size)
    chance = {m: 1 / len(tasks[m.split("/")[0]].class_names) for m in WORLD_METRICS[:2]}
    print(f"[{label} seed {cfg.train.seed}] {seconds:.0f}s " +
          ", ".join(f"{m}={100 * scores[m]:.1f}" for m in WORLD_METRICS), flush=True)
    return {"seed": cfg.train.seed, "seconds": seconds, **{m: scores[m] for m in WORLD_METRICS},
            **{f"{m}/x_chance": scores[m] / c for m, c in chance.items()}}


def save_report(report: dict, out) -> None:
    """Add the machine and write the report as JSON (atomically) when `out` is given."""
    from threetowers.core.atomic import write_json_atomic

    report["machine"] = machine(torch.device("cpu"))
    if out:
        write_json_atomic(out, report)
        print(f"wrote {out}")
