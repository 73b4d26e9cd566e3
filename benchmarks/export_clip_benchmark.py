"""An exported model scored by CLIP_benchmark's own command line, against `threetowers eval --benchmark`
on the original model: the same images (the world's zero-shot sets written in CLIP_benchmark's
webdataset layout), fp32 on both sides.

    python benchmarks/export_clip_benchmark.py demo-out/runs/3t_object_seed0/model --work /tmp/export_check \\
        --out docs/results/export_clip_benchmark.json

clip-benchmark 1.6.2's `accuracy()` raises a TypeError under NumPy >= 2.4 (see eval/benchmark.py),
so its command line needs an older NumPy: `pip install --target /tmp/np23 "numpy<2.4"` and run this
script with `PYTHONPATH=/tmp/np23` (the subprocess inherits it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from threetowers import check_parity, export_open_clip  # noqa: E402
from threetowers.eval.benchmark import write_wds_classification  # noqa: E402
from threetowers.eval.tasks import benchmark_saved, load_saved  # noqa: E402
from threetowers.world import World  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save_report  # noqa: E402

PAIRS = {"top1": "acc1", "top5": "acc5", "mean_per_class_recall": "mean_per_class_recall"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a saved CLIP or 3T model directory")
    p.add_argument("--work", type=Path, required=True, help="where the export and the datasets are written")
    p.add_argument("--kinds", nargs="+", default=["object", "scene"])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    cfg, _, _ = load_saved(args.model, mixing=False)
    export = export_open_clip(args.model, args.work / "open_clip")
    report = {"model": str(args.model), "parity": check_parity(args.model, export), "sets": {}}
    world = World(cfg.data.world)
    rows = []
    for kind in args.kinds:
        name, root = f"wds/world_{kind}", args.work / f"world_{kind}"
        write_wds_classification(root, world.zeroshot(kind, cfg.eval.num_images))
        ours = benchmark_saved(args.model, name, root)
        out = args.work / f"clip_benchmark_{kind}.json"
        subprocess.run(["clip_benchmark", "eval", "--model", f"local-dir:{export}", "--pretrained", "",
                        "--model_type", "open_clip", "--dataset", name, "--dataset_root", str(root),
                        "--task", "zeroshot_classification", "--no_amp", "--num_workers", "0",
                        "--output", str(out)], check=True)
        theirs = json.loads(out.read_text())["metrics"]
        report["sets"][kind] = {"threetowers": ours, "clip_benchmark": theirs}
        for metric, their_key in PAIRS.items():
            mine = ours[f"benchmark/{name}/fp32/{metric}"]
            rows.append([name, metric, f"{100 * mine:.2f}", f"{100 * theirs[their_key]:.2f}",
                         f"{100 * (mine - theirs[their_key]):+.2f}"])
    print(f"export parity (max |embedding difference|, fp32): {report['parity']}")
    print_table(["dataset", "metric", "threetowers eval --benchmark", "clip_benchmark eval (export)", "Δ"], rows,
                f"{args.model}, fp32, {cfg.eval.num_images} images per set")
    save_report(report, args.out)


if __name__ == "__main__":
    main()
