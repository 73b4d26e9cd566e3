"""Data against the trainer: world rendering rate, loader rate, and the data-wait share of training.

    python benchmarks/bench_data.py                   # the demo's setup (48 px, batch 128), ~2 min on 2 cores
    python benchmarks/bench_data.py --steps 60 --out data.json

Three measurements, all on the demo's base preset (`demo/base`: 12,000 world pairs at 48 px,
batch 128, bf16, 2 threads):

1. Rendering: images/s of the world renderer on one core (a fresh seed, nothing cached).
2. Loader: pairs/s that `ArrayTrainData` delivers alone (gather rows, uint8 -> float, tokens, and
   for LiT/3T h's cached embeddings), against the pairs/s each method's training step consumes.
3. Data wait in real training runs (`train()`, the trainer the demo uses): the share of step time
   spent waiting for the next batch (`time/data_fraction` in metrics.jsonl).
4. The batch's row indices (`global_indices`) at 12,000 and at 1,000,000 rows: the cost that grows
   with the dataset.

h is a resnet10t classifier with random weights, the same architecture and cost as the demo's
pretrained third towers (timing does not depend on the weights).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from threetowers.config import load_config  # noqa: E402
from threetowers.data.loader import build_train_data  # noqa: E402
from threetowers.data.order import global_indices  # noqa: E402
from threetowers.world.world import World  # noqa: E402
from threetowers.third.classifier import Classifier, save_classifier  # noqa: E402
from threetowers.core.atomic import write_json_atomic  # noqa: E402
from threetowers.third import load_third_tower  # noqa: E402
from threetowers import train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table  # noqa: E402

METHODS = ("clip", "lit", "3t")


def render_rate(n: int, cache_dir: str) -> float:
    """Images/s of rendering n world pairs of a seed nobody rendered before (in memory: n < 4096)."""
    cfg = load_config("demo/base", ["data.world.seed=987", f"data.world.cache_dir={cache_dir}"]).data.world
    world = World(cfg, progress=False)
    t0 = time.perf_counter()
    world.pairs("val", n)
    return n / (time.perf_counter() - t0)


def loader_rate(cfg, third, batches: int) -> float:
    """Pairs/s of `ArrayTrainData.batch` alone (median over `batches` calls, after one warm-up call)."""
    data = build_train_data(cfg, third=third)
    data.batch(0)
    times = []
    for step in range(1, batches + 1):
        t0 = time.perf_counter()
        data.batch(step)
        times.append(time.perf_counter() - t0)
    return cfg.train.batch_size / statistics.median(times)


def index_ms(rows: int, batch: int, steps: int = 200) -> float:
    """Median ms of computing one step's row indices for a dataset of `rows` rows."""
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        global_indices(0, step, batch, rows)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def training_rates(cfg) -> dict:
    """Train for cfg.train.steps and read the logged windows (the first, with warm-up, is left out)."""
    result = train(cfg)
    windows = [r for r in result.curve if "time/data_fraction" in r][1:]
    return {
        "pairs_per_s": statistics.median(r["train/samples_per_s"] for r in windows),
        "data_fraction": statistics.median(r["time/data_fraction"] for r in windows),
        "data_ms": 1e3 * statistics.median(r["time/data_s"] for r in windows),
        "step_ms": 1e3 * statistics.median(r["time/step_s"] for r in windows),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80, help="training steps per run (logged every 20)")
    p.add_argument("--render", type=int, default=3000, help="world pairs rendered for the rendering rate")
    p.add_argument("--loader-batches", type=int, default=50)
    p.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        # h: the demo's third-tower architecture, random weights, saved as a checkpoint source
        pre = load_config("demo/pretrain", [])
        save_classifier(Classifier(pre.model.image, 28), Path(tmp) / "h", [f"class {i}" for i in range(28)])
        common = [f"data.cache_dir={tmp}/cache", f"train.steps={args.steps}", "train.log_every=20",
                  "train.tensorboard=false"]
        h = ["model.third.source=checkpoint", f"model.third.path={tmp}/h"]

        def cfg(method: str, *extra: str):
            return load_config("demo/base", [*common, *(h if method != "clip" else []), f"model.method={method}",
                                             f"train.output_dir={tmp}/runs/{method}-{len(extra)}-{time.time_ns()}", *extra])

        torch.set_num_threads(2)
        print("rendering ...", flush=True)
        render = render_rate(args.render, f"{tmp}/world")
        third = load_third_tower(cfg("lit").model.third)
        rows, report = [], {"render_images_per_s": render, "methods": {}}
        for method in METHODS:
            print(f"{method}: loader, then training ...", flush=True)
            c = cfg(method)
            loader = loader_rate(c, third if method != "clip" else None, args.loader_batches)
            trainer = training_rates(c)
            report["methods"][method] = {"loader_pairs_per_s": loader, "training": trainer}
            rows.append([method, f"{loader:,.0f}", f"{trainer['pairs_per_s']:,.0f}",
                         f"{loader / trainer['pairs_per_s']:.0f}x", f"{trainer['step_ms']:.1f}",
                         f"{trainer['data_ms']:.2f}", f"{100 * trainer['data_fraction']:.1f}%"])
        report["index_ms"] = {rows_: index_ms(rows_, 128) for rows_ in (12_000, 1_000_000)}

    print(f"\nworld rendering: {render:,.0f} images/s on one core ({args.render} pairs, 48 px, a fresh seed)")
    print_table(["method", "loader pairs/s", "trainer pairs/s", "loader / trainer", "step ms", "data wait ms",
                 "data wait share"], rows,
                "Demo preset (batch 128, 48 px, bf16, 2 threads); medians over the logged windows")
    print("row indices per step: " + ", ".join(f"{n:,} rows {ms:.3f} ms" for n, ms in report["index_ms"].items()))
    report["machine"] = machine(torch.device("cpu"))
    report["steps"] = args.steps
    print(f"\n{report['machine']['cpu']}, {report['machine']['cpu_count']} cores, torch {torch.__version__}, "
          f"load average {report['machine']['load_average_1m']:.2f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
