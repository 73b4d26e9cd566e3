"""Evaluation at growing N: retrieval and zero-shot, chunked exact ranks vs the full score matrix.

    python benchmarks/bench_eval.py                                  # N = 1k..20k images, ~5 min on 2 cores
    python benchmarks/bench_eval.py --sizes 10000 --out eval.json    # the headline: 10,000 x 50,000

Retrieval: N images, 5 captions each (5N texts), d = 256, both directions, Recall@1/5/10.
Zero-shot: N images against 1,000 classes (an ImageNet-sized label set), top-1/top-5 and mean
per-class recall. Both run through the library's kernels (`retrieval_recall`, `zeroshot_accuracy`)
with `chunk_size=1024` ("chunked") and with one chunk covering everything ("full": the whole fp32
score matrix at once), the latter only while that matrix fits `--full-max-mib`. Chunked and full
results must be equal; the script stops if they are not.

Memory is the growth of the process's resident set during one call: the kernel's peak RSS mark
(VmHWM) is reset through /proc/self/clear_refs before each call and compared with the RSS just
before it, so it counts everything the call touches (score buffers, temporaries, allocator
slack), not only what torch reports. Time is the median wall clock of --repeats calls.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from threetowers.eval import retrieval_recall, zeroshot_accuracy
from threetowers.core.atomic import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, reset_rss_peak, status_kb  # noqa: E402  (shared /proc helpers)

MIB = 2**20


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


def retrieval_inputs(n_images: int, per_image: int, dim: int, seed: int = 0):
    """Unit image vectors and noisy unit caption vectors around them (so recall is not trivial)."""
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_images, dim, generator=gen), dim=1)
    owner = torch.arange(n_images).repeat_interleave(per_image)
    texts = F.normalize(images[owner] + 0.2 * torch.randn(len(owner), dim, generator=gen), dim=1)
    return images, texts, owner


def zeroshot_inputs(n_images: int, n_classes: int, dim: int, seed: int = 0):
    """Unit class vectors and noisy unit image vectors of random classes."""
    gen = torch.Generator().manual_seed(seed)
    classes = F.normalize(torch.randn(n_classes, dim, generator=gen), dim=1)
    labels = torch.randint(0, n_classes, (n_images,), generator=gen)
    images = F.normalize(classes[labels] + 0.9 * torch.randn(n_images, dim, generator=gen), dim=1)
    return images, classes, labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,2000,5000,10000,20000", help="numbers of images N (comma-separated)")
    p.add_argument("--per-image", type=int, default=5, help="captions per image in retrieval")
    p.add_argument("--classes", type=int, default=1000, help="classes in zero-shot")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--full-max-mib", type=float, default=2048, help="largest full score matrix to try")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]

    records = []
    for task in ("retrieval", "zeroshot"):
        for n in sizes:
            if task == "retrieval":
                images, texts, owner = retrieval_inputs(n, args.per_image, args.dim)
                others = len(texts)

                def run(chunk: int):
                    return retrieval_recall(images, texts, owner, chunk_size=chunk)
            else:
                images, classes, labels = zeroshot_inputs(n, args.classes, args.dim)
                others = args.classes

                def run(chunk: int):
                    return zeroshot_accuracy(images, classes, labels, chunk_size=chunk)
            full_mib = n * others * 4 / MIB
            results = {}
            for variant, chunk in (("chunked", args.chunk), ("full", max(n, others))):
                if variant == "full" and full_mib > args.full_max_mib:
                    continue
                print(f"{task} N={n} {variant} ...", flush=True)
                m = measure(lambda: run(chunk), args.repeats)
                results[variant] = m["result"]
                records.append({"task": task, "images": n, "others": others, "dim": args.dim, "variant": variant,
                                "chunk_size": chunk, "full_matrix_mib": full_mib, **m})
            if len(results) == 2 and results["chunked"] != results["full"]:
                raise SystemExit(f"{task} N={n}: chunked and full results differ: {results}")

    rows = [[r["task"], r["images"], r["others"], r["variant"], f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}",
             f"{r['peak_rss_growth_mib']:.0f}", f"{r['full_matrix_mib']:.0f}"] for r in records]
    print_table(["task", "images N", "texts / classes", "variant", "wall s (median)", "cpu s", "peak RSS +MiB",
                 "full fp32 matrix MiB"], rows, f"d={args.dim}, chunk {args.chunk}, {args.threads} threads")
    info = machine(torch.device("cpu"))
    print(f"\n{info['cpu']}, {info['cpu_count']} cores, torch {torch.__version__}, load average "
          f"{info['load_average_1m']:.2f}; peak method: {records[0]['peak_method']}")
    if args.out is not None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, {"rows": records, "machine": info, "args": vars(args) | {"out": str(args.out)}})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
