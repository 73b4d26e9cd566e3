"""Data-parallel scaling on this machine: 2 processes (gloo) against 1 process, same global batch.

    python benchmarks/bench_scaling.py                     # CPU preset shapes, ~6 min on 2 cores
    python benchmarks/bench_scaling.py --steps 12 --out scaling.json

Each layout trains CLIP with `threetowers train` (the real trainer, launched with `torchrun` for 2
processes) on the CPU preset of bench_step.py: ViT width 192, depth 6, patch 4 at 32 px; text width
256, depth 4, context 32; batch 256 (global), bf16 autocast; world data at 32 px. Throughput is the
median of the logged windows after the first (warm-up). Layouts:

  1 process x 1 thread     the per-core baseline
  1 process x 2 threads    what `threetowers train` does on this machine by default
  2 processes x 1 thread   torchrun --nproc_per_node=2: DDP over gloo, 128 pairs per process, the
                           embeddings all-gathered for the loss over the global batch

It also times, in 2 gloo processes, the two collectives a step does: the all-reduce of the
gradients (one fp32 buffer of the model's trainable size) and the all-gather of the embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from threetowers.core.atomic import write_json_atomic

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table  # noqa: E402

CPU_PRESET = [
    "model.embed_dim=128", "model.image.image_size=32", "model.image.patch_size=4",
    "model.image.width=192", "model.image.depth=6", "model.image.heads=3", "model.text.vocab_size=4096",
    "model.text.context_length=32", "model.text.width=256", "model.text.depth=4", "model.text.heads=4",
    "data.world.image_size=32", "data.world.num_pairs=6000", "train.batch_size=256", "train.precision=bf16",
    "train.checkpoint_every=100000", "train.progress=false", "train.tensorboard=false", "eval.tasks=[]",
]


def train_run(out: Path, processes: int, threads: int, steps: int, log_every: int, world_cache: str) -> dict:
    args = ["train", "clip", *CPU_PRESET, f"train.output_dir={out}", f"train.steps={steps}", f"train.log_every={log_every}",
            f"train.threads={threads}", f"data.world.cache_dir={world_cache}"]
    if processes == 1:
        cmd = [sys.executable, "-m", "threetowers", *args]
    else:
        cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={processes}",
               "-m", "threetowers", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "train/samples_per_s" in r][1:]
    return {
        "pairs_per_s": statistics.median(r["train/samples_per_s"] for r in windows),
        "step_s": statistics.median(r["time/step_s"] for r in windows),
        "windows": len(windows),
        "wall_s": time.perf_counter() - t0,
    }


def _collectives(rank: int, world: int, init: str, numel: int, rows: int, dim: int, repeats: int, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    grads, emb = torch.randn(numel), torch.randn(rows, dim)
    gathered = [torch.empty_like(emb) for _ in range(world)]
    times = {"all_reduce_grads_ms": [], "all_gather_embeddings_ms": []}
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(grads)
        times["all_reduce_grads_ms"].append(1e3 * (time.perf_counter() - t0))
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(2):  # image and text embeddings
            dist.all_gather(gathered, emb)
        times["all_gather_embeddings_ms"].append(1e3 * (time.perf_counter() - t0))
    if rank == 0:
        Path(out).write_text(json.dumps({k: statistics.median(v) for k, v in times.items()}))
    dist.destroy_process_group()


def collectives(numel: int, rows: int, dim: int, repeats: int = 15) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/out.json"
        mp.spawn(_collectives, args=(2, f"{tmp}/init", numel, rows, dim, repeats, out), nprocs=2)
        return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--log-every", type=int, default=6)
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = p.parse_args()

    layouts = [(1, 1), (1, 2), (2, 1)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_scaling_") as tmp:
        for processes, threads in layouts:
            name = f"{processes} process{'es' if processes > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"
            print(f"training: {name} ...", flush=True)
            results[name] = train_run(Path(tmp) / f"p{processes}t{threads}", processes, threads, args.steps,
                                      args.log_every, f"{tmp}/world")
    # CLIP at these shapes: 6,965,313 parameters; embeddings [128 per process, 128]
    comm = collectives(numel=6_965_313, rows=128, dim=128)

    base = results["1 process x 2 threads"]["pairs_per_s"]
    rows = [[name, f"{r['pairs_per_s']:.1f}", f"{1e3 * r['step_s']:.0f} ms", f"{r['pairs_per_s'] / base:.2f}"]
            for name, r in results.items()]
    print_table(["layout", "pairs/s", "step", "vs 1 process x 2 threads"], rows,
                f"CLIP, CPU preset, global batch 256, bf16; median of {args.steps // args.log_every - 1} windows "
                f"of {args.log_every} steps")
    print(f"\ngloo collectives, 2 processes (median of 15): gradient all-reduce (6.97M fp32) "
          f"{comm['all_reduce_grads_ms']:.0f} ms; embedding all-gather (2 x [128, 128]) "
          f"{comm['all_gather_embeddings_ms']:.2f} ms")
    info = machine(torch.device("cpu"))
    print(f"{info['cpu']}, {info['cpu_count']} cores, torch {torch.__version__}, load average "
          f"{info['load_average_1m']:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, {"layouts": results, "collectives": comm, "machine": info, "steps": args.steps})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
