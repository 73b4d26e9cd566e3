"""Activation checkpointing and torch.compile: memory per pair, speed, model FLOPs and MFU.

    python benchmarks/bench_memory.py                               # CPU preset, ~4 min on 2 cores
    python benchmarks/bench_memory.py --preset gpu --peak-flops 989e12 --out gpu_memory.json   # an H200/H100

For CLIP and 3T (h's embeddings cached) at the shapes of `bench_step.py`'s presets, one training step
(forward, backward, bf16 autocast) at growing batch sizes, with and without
`train.grad_checkpointing` and (`--compile`) `train.compile`:

- peak memory of the step above what was allocated before it, per pair (CPU: the process's RSS
  high-water mark; CUDA: the allocator's peak);
- step time (median of `--steps` timed steps after a warm-up; compile time reported apart);
- model FLOPs per pair, counted by `threetowers.training.flops.train_flops_per_pair` (PyTorch's
  FlopCounterMode over a forward and backward), and the achieved TFLOP/s; with `--peak-flops` the
  MFU = FLOPs per pair × pairs/s / peak.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import PRESETS, build_ours, make_batch  # noqa: E402
from common import machine, print_table, step_peak_mib, sync  # noqa: E402

from threetowers.core.atomic import write_json_atomic  # noqa: E402
from threetowers.towers.build import set_grad_checkpointing  # noqa: E402
from threetowers.training.flops import train_flops_per_pair  # noqa: E402


def measure(model, batch, device, steps: int, compiled: bool) -> dict:
    step_model = torch.compile(model) if compiled else model

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = step_model(batch)["loss"]
        loss.backward()
        for p in model.parameters():
            p.grad = None

    t0 = time.perf_counter()
    step()  # warm-up (and, compiled, the compilation)
    sync(device)
    first = time.perf_counter() - t0
    peak = step_peak_mib(step, device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"first_step_s": first, "step_s": statistics.median(times), "peak_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="default: cpu 32 64 128 256; gpu 256 1024")
    ap.add_argument("--methods", nargs="+", default=["clip", "3t"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also measure under torch.compile")
    ap.add_argument("--peak-flops", type=float, default=0.0, help="the device's peak FLOP/s (bf16 dense) for MFU")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    preset = PRESETS[args.preset]
    device = torch.device(preset["device"])
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    batches = args.batches or ([32, 64, 128, 256] if device.type == "cpu" else [256, 1024])
    settings = [(False, False), (True, False)] + ([(False, True), (True, True)] if args.compile else [])
    rows, records = [], []
    for method in args.methods:
        for b in batches:
            s = replace(preset["shapes"], batch=b)
            batch = make_batch(s, device)
            if method == "clip":
                batch.pop("third")
            for ckpt, compiled in settings:
                torch.manual_seed(0)
                model = build_ours(s, method, "cached" if method != "clip" else None).to(device).train()
                set_grad_checkpointing(model, ckpt)
                flops = train_flops_per_pair(model, batch, device)
                try:
                    r = measure(model, batch, device, args.steps, compiled)
                except torch.OutOfMemoryError:
                    r = {"first_step_s": float("nan"), "step_s": float("nan"), "peak_mib": None, "oom": True}
                pairs_s = b / r["step_s"]
                rec = {"method": method, "batch": b, "checkpointing": ckpt, "compile": compiled,
                       "flops_per_pair": flops, "pairs_per_s": pairs_s, "tflops": flops * pairs_s / 1e12, **r}
                if args.peak_flops:
                    rec["mfu"] = flops * pairs_s / args.peak_flops
                records.append(rec)
                per_pair = f"{r['peak_mib'] / b:.2f}" if r["peak_mib"] is not None else "n/a"
                rows.append([method, b, "yes" if ckpt else "no", "yes" if compiled else "no", per_pair,
                             f"{1000 * r['step_s']:.0f}", f"{pairs_s:,.0f}", f"{flops / 1e9:.2f}",
                             f"{rec['tflops']:.3f}", f"{100 * rec['mfu']:.1f}%" if "mfu" in rec else "–",
                             f"{r['first_step_s']:.1f}"])
                print(rows[-1], flush=True)
    print_table(["method", "batch", "ckpt", "compile", "peak MiB/pair", "step ms", "pairs/s", "GFLOPs/pair",
                 "TFLOP/s", "MFU", "1st step s"], rows, f"preset {args.preset} ({device}), bf16")
    m = machine(device)
    print(f"\n{m.get('gpu') or m['cpu']}, torch {torch.__version__}")
    if args.out:
        write_json_atomic(args.out, {"preset": args.preset, "records": records, "machine": m})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
