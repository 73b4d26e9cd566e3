"""Why the demo runs two runs at once on one thread each: the demo's training step, one process on
all the cores against one process per core, side by side.

    python benchmarks/bench_demo_jobs.py                       # CLIP, LiT and 3T; 2 cores: 1 x 2 threads vs 2 x 1
    python benchmarks/bench_demo_jobs.py --methods clip --rounds 2
    python benchmarks/bench_demo_jobs.py --out docs/results/demo_jobs.json

Each contender is the demo's step (`demo/base`: its towers, batch 128, bf16 autocast, AdamW; 3T and
LiT on cached h embeddings of the demo's pretrained h's width; one batch in memory; forward,
backward, optimizer step) in fresh processes: "alone" is one process with `--cores` threads, "at
once" is `--cores` processes of one thread each started together. Throughput is steps a second
summed over the processes; the ratio is at-once over alone, the demo's gain from `jobs` before its
runs' other work (data, evaluation). Rounds alternate the two, so drift on a shared machine
reaches both; medians over each process's timed steps. Benchmark alone: other load distorts both.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def worker(method: str, threads: int, steps: int) -> None:
    """One process: `steps` timed steps of `method` on `threads` threads; prints their times as JSON."""
    import torch

    from threetowers import create_model
    from threetowers.config import load_config
    from threetowers.training.optim import build_optimizer

    torch.set_num_threads(threads)
    third = [] if method == "clip" else ["model.third.source=checkpoint", "model.third.path=h"]
    cfg = load_config("demo/base", [f"model.method={method}", *third])
    torch.manual_seed(0)
    dim = 64  # the demo's pretrained h's width (a test_resnet classifier's pre-logits)
    model = create_model(cfg, third_info=None if method == "clip" else [{"name": "h", "dim": dim, "fingerprint": ""}])
    model.train()
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    n, size = cfg.train.batch_size, cfg.data.world.image_size
    batch = {"image": torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8),
             "tokens": torch.randint(1, cfg.model.text.vocab_size - 1, (n, cfg.model.text.context_length), generator=g)}
    if method != "clip":
        batch["third"] = torch.randn(n, dim, generator=g)
    times = []
    for i in range(steps + 3):  # 3 warm-up steps
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    print(json.dumps(times))


def launch(method: str, processes: int, threads: int, steps: int) -> list[list[float]]:
    """`processes` workers started together; each one's step times."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", method, str(threads), str(steps)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    out = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"worker for {method} failed with status {proc.returncode}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["clip", "lit", "3t"])
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="timed steps per process per round")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))
        return {}
    from common import machine  # noqa: E402  (after the worker's early exit: it needs none of this)
    import torch

    records = []
    for method in args.methods:
        alone, together = [], []
        for _ in range(args.rounds):
            alone += launch(method, 1, args.cores, args.steps)[0]
            together += [t for times in launch(method, args.cores, 1, args.steps) for t in times]
        one, each = statistics.median(alone), statistics.median(together)
        record = {"method": method, "alone_threads": args.cores, "alone_step_ms": 1000 * one,
                  "at_once_processes": args.cores, "at_once_step_ms": 1000 * each,
                  "alone_steps_per_s": 1 / one, "at_once_steps_per_s": args.cores / each,
                  "ratio": (args.cores / each) / (1 / one)}
        records.append(record)
        print(f"{method}: alone ({args.cores} threads) {1000 * one:.1f} ms/step; {args.cores} at once (1 thread each) "
              f"{1000 * each:.1f} ms/step each; throughput x{record['ratio']:.2f}", flush=True)
    report = {"benchmark": "bench_demo_jobs", "rounds": args.rounds, "steps": args.steps, "records": records,
              "machine": machine(torch.device("cpu"))}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
