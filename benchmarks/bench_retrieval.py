"""Retrieval Recall@k at scale: chunked exact ranks vs the full score matrix, time and memory.

    python benchmarks/bench_retrieval.py                       # 10,000 images x 50,000 captions, d=256
    python benchmarks/bench_retrieval.py --out bench_retrieval.json

Memory is the growth of the process's resident set (RSS) during one call: the kernel's peak RSS
mark (VmHWM) is reset through /proc/self/clear_refs before each call and compared with the RSS
just before it, so it counts everything the call touches (score buffers, temporaries, allocator
slack), not only what torch reports. Time is wall clock (median of --repeats) plus process CPU
time; on a shared machine wall time grows with other load, so the CPU pressure is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from threetowers.eval import retrieval_recall

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import reset_rss_peak, status_kb  # noqa: E402  (shared /proc helpers)

MB = 2**20


def measure(fn, repeats: int) -> dict:
    """Median wall / CPU seconds and the largest RSS growth (MiB) over `repeats` calls of fn()."""
    walls, cpus, peaks, exact_peak = [], [], [], True
    result = None
    for _ in range(repeats):
        exact_peak &= reset_rss_peak()
        rss_before = status_kb("VmRSS")
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        if exact_peak:
            peaks.append((status_kb("VmHWM") - rss_before) / 1024)
        else:  # lifetime peak only: growth shows up only when this call sets a new record
            peaks.append(max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before) / 1024)
    return {
        "wall_s": statistics.median(walls),
        "wall_s_all": walls,
        "cpu_s": statistics.median(cpus),
        "peak_rss_growth_mib": max(peaks),
        "peak_method": "VmHWM reset via clear_refs" if exact_peak else "ru_maxrss delta (lower bound)",
        "result": result,
    }


def make_embeddings(n_images: int, per_image: int, dim: int, seed: int = 0):
    """Unit image vectors and noisy unit caption vectors around them (so recall is not trivial)."""
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_images, dim, generator=gen), dim=1)
    owner = torch.arange(n_images).repeat_interleave(per_image)
    texts = F.normalize(images[owner] + 0.2 * torch.randn(len(owner), dim, generator=gen), dim=1)
    return images, texts, owner


def cpu_pressure() -> str:
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--per-image", type=int, default=5)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--small-images", type=int, default=2_000, help="size of the chunked-vs-full comparison")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    rows = []

    def run(label: str, n_images: int, chunk: int | None) -> dict:
        images, texts, owner = make_embeddings(n_images, args.per_image, args.dim)
        chunk_size = chunk if chunk is not None else max(len(images), len(texts))  # one chunk = full matrix
        m = measure(lambda: retrieval_recall(images, texts, owner, chunk_size=chunk_size), args.repeats)
        n_pairs = len(images) * len(texts)
        row = {
            "variant": label,
            "images": len(images),
            "captions": len(texts),
            "dim": args.dim,
            "chunk_size": chunk_size,
            # the kernel's one buffer in the larger direction: a float32 [chunk, gallery] score block
            "kernel_buffer_mib": min(chunk_size, len(images)) * len(texts) * 4 / MB,
            "full_matrix_fp32_mib": n_pairs * 4 / MB,
            **m,
        }
        rows.append(row)
        return row

    big = run("chunked", args.images, args.chunk)
    small_chunked = run("chunked", args.small_images, args.chunk)
    small_full = run("full matrix", args.small_images, None)
    if small_chunked["result"] != small_full["result"]:
        raise SystemExit(f"chunked and full results differ: {small_chunked['result']} vs {small_full['result']}")

    header = (
        f"{'variant':<12} {'images':>7} {'captions':>8} {'chunk':>6} {'wall s (med)':>12} {'cpu s':>7} "
        f"{'peak RSS +MiB':>13} {'fp32 NxM MiB':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['variant']:<12} {r['images']:>7} {r['captions']:>8} {r['chunk_size']:>6} {r['wall_s']:>12.2f} "
            f"{r['cpu_s']:>7.2f} {r['peak_rss_growth_mib']:>13.0f} {r['full_matrix_fp32_mib']:>12.0f}"
        )
    full_big_mib = big["full_matrix_fp32_mib"]
    print(
        f"\n{args.images} x {args.images * args.per_image}: peak growth {big['peak_rss_growth_mib']:.0f} MiB vs "
        f"{full_big_mib:.0f} MiB that the full fp32 score matrix would need (kernel buffer "
        f"{big['kernel_buffer_mib']:.0f} MiB); ratio {big['peak_rss_growth_mib'] / full_big_mib:.3f}"
    )
    print(f"recall at scale: {big['result']}")
    print(f"threads {args.threads}, cpus {os.cpu_count()}, torch {torch.__version__}, cpu pressure: {cpu_pressure()}")
    print(f"peak method: {big['peak_method']}; wall times: {[round(t, 2) for t in big['wall_s_all']]}")

    if args.out is not None:
        report = {
            "rows": rows,
            "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                        "torch": torch.__version__, "cpu_pressure": cpu_pressure()},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=args.out.parent, delete=False, suffix=".tmp") as f:
            json.dump(report, f, indent=2)
        os.replace(f.name, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
