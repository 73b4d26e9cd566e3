"""The demo's calibration sweep: what the from-scratch CLIP learns under candidate settings.

    python benchmarks/calibrate_demo.py --out docs/results/calibration.json        # ~15 min on 2 cores
    python benchmarks/calibrate_demo.py --rows base cnn --seeds 0 1

Only CLIP is trained here: the demo's world, towers and budget are chosen from what a tower trained
from scratch learns (zero-shot object and scene top-1 against chance, retrieval), never from how 3T
compares with LiT. Each row is the demo's base preset plus overrides; every run is timed, since the
full demo (21 runs) must fit 20 minutes on 2 cores.
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

from threetowers import build_tasks, load_config, run_tasks, train  # noqa: E402
from threetowers.core.atomic import write_json_atomic  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table  # noqa: E402

CNN = ["model.image.kind=timm", "model.image.timm_name=resnet10t"]
TINY_CNN = ["model.image.kind=timm", "model.image.timm_name=test_resnet"]  # timm's 0.4M-parameter ResNet, ~5x cheaper
CS = ["data.world.colour_words=0.25", "data.world.scene_words=0.5"]
ROWS = {
    "base": [],
    "steps600": ["train.steps=600"],
    "batch256": ["train.batch_size=256"],
    "cnn": CNN,
    "colour0.5": ["data.world.colour_words=0.5"],
    "colour0.25": ["data.world.colour_words=0.25"],
    "colour0": ["data.world.colour_words=0"],
    "colour0.25_batch256": ["data.world.colour_words=0.25", "train.batch_size=256"],
    "colour0.25_steps600": ["data.world.colour_words=0.25", "train.steps=600"],
    "colour0.25_cnn": ["data.world.colour_words=0.25"] + CNN,
    "colour0.5_cnn": ["data.world.colour_words=0.5"] + CNN,
    "colour0.25_vit_p4": ["data.world.colour_words=0.25", "model.image.patch_size=4"],
    "colour0.25_scene0.5": ["data.world.colour_words=0.25", "data.world.scene_words=0.5"],
    "colour0.25_scene0.5_cnn": ["data.world.colour_words=0.25", "data.world.scene_words=0.5"] + CNN,
    "colour0_scene0.25_cnn": ["data.world.colour_words=0", "data.world.scene_words=0.25"] + CNN,
    "colour0.25_scene0.5_cnn_lr2e-3": ["data.world.colour_words=0.25", "data.world.scene_words=0.5",
                                       "optim.lr=0.002"] + CNN,
    "colour0.25_scene0.5_cnn_steps450": ["data.world.colour_words=0.25", "data.world.scene_words=0.5",
                                         "train.steps=450"] + CNN,
    "fashion_colour0.25_scene0.5_cnn": ["data.world.sprites=fashion_mnist", "data.world.colour_words=0.25",
                                        "data.world.scene_words=0.5"] + CNN,
    "fashion_cnn": ["data.world.sprites=fashion_mnist"] + CNN,
    "cs_tiny": CS + TINY_CNN,
    "cs_cnn_obj1": CS + CNN + ["data.world.max_objects=1"],
    "cs_tiny_steps900": CS + TINY_CNN + ["train.steps=900"],
    "cs_tiny_obj1_steps900": CS + TINY_CNN + ["data.world.max_objects=1", "train.steps=900"],
    "cs_tiny_scale1.3_steps900": CS + TINY_CNN + ["data.world.object_scale=1.3", "train.steps=900"],
    "cs_vit_obj1": CS + ["data.world.max_objects=1"],
    "cs_tiny_steps900_lr2e-3": CS + TINY_CNN + ["train.steps=900", "optim.lr=0.002"],
    "cs_tiny_steps900_lr4e-3": CS + TINY_CNN + ["train.steps=900", "optim.lr=0.004"],
    "cs_tiny_steps1200": CS + TINY_CNN + ["train.steps=1200"],
    "cs_tiny_batch256_steps600": CS + TINY_CNN + ["train.batch_size=256", "train.steps=600"],
    "cs_tiny_steps600_lr4e-3": CS + TINY_CNN + ["train.steps=600", "optim.lr=0.004"],
    "cs_tiny_steps900_lr6e-3": CS + TINY_CNN + ["train.steps=900", "optim.lr=0.006"],
    "c0.25_s0.25_tiny_steps900_lr4e-3": ["data.world.colour_words=0.25", "data.world.scene_words=0.25",
                                         "train.steps=900", "optim.lr=0.004"] + TINY_CNN,
    "c0.25_s0.35_tiny_steps900_lr4e-3": ["data.world.colour_words=0.25", "data.world.scene_words=0.35",
                                         "train.steps=900", "optim.lr=0.004"] + TINY_CNN,
    "c0.25_s0.35_tiny_steps900_lr2e-3": ["data.world.colour_words=0.25", "data.world.scene_words=0.35",
                                         "train.steps=900", "optim.lr=0.002"] + TINY_CNN,
    "cs_tiny_steps900_lr2e-3_pairs24k": CS + TINY_CNN + ["train.steps=900", "optim.lr=0.002",
                                                          "data.world.num_pairs=24000"],
    "cs_tiny_steps900_lr2e-3_pairs48k": CS + TINY_CNN + ["train.steps=900", "optim.lr=0.002",
                                                          "data.world.num_pairs=48000"],
    "c0.25_s0.4_tiny_steps900_lr3e-3": ["data.world.colour_words=0.25", "data.world.scene_words=0.4",
                                        "train.steps=900", "optim.lr=0.003"] + TINY_CNN,
    "colour0_scene0.5_tiny_steps900": ["data.world.colour_words=0", "data.world.scene_words=0.5", "train.steps=900"]
                                      + TINY_CNN,
}
METRICS = ("zeroshot_object/top1", "zeroshot_scene/top1", "retrieval/i2t_R@1", "retrieval/t2i_R@1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--preset", default="demo/base")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    report = {"preset": args.preset, "rows": {}}
    with tempfile.TemporaryDirectory(prefix="calibrate_") as tmp:
        for name in args.rows:
            runs = []
            for seed in args.seeds:
                cfg = load_config(args.preset, [*ROWS[name], "model.method=clip", f"train.seed={seed}",
                                                f"train.output_dir={tmp}/{name}-{seed}"])
                t0 = time.perf_counter()
                result = train(cfg)
                seconds = time.perf_counter() - t0
                tasks = build_tasks(cfg, ["zeroshot_object", "zeroshot_scene", "retrieval"])
                scores = run_tasks(result.model, result.tokenizer, tasks, cfg.eval.batch_size)
                chance = {"zeroshot_object/top1": 1 / len(tasks["zeroshot_object"].class_names),
                          "zeroshot_scene/top1": 1 / len(tasks["zeroshot_scene"].class_names)}
                runs.append({"seed": seed, "seconds": seconds, **{m: scores[m] for m in METRICS},
                             **{f"{m}/x_chance": scores[m] / c for m, c in chance.items()}})
                print(f"[{name} seed {seed}] {seconds:.0f}s " + ", ".join(f"{m}={100 * scores[m]:.1f}" for m in METRICS),
                      flush=True)
            report["rows"][name] = {"overrides": ROWS[name], "runs": runs}
    report["machine"] = machine(__import__("torch").device("cpu"))
    rows = []
    for name, row in report["rows"].items():
        def mean(key: str) -> float:
            return statistics.mean(r[key] for r in row["runs"])
        rows.append([name, f"{100 * mean('zeroshot_object/top1'):.1f} ({mean('zeroshot_object/top1/x_chance'):.1f}x)",
                     f"{100 * mean('zeroshot_scene/top1'):.1f} ({mean('zeroshot_scene/top1/x_chance'):.1f}x)",
                     f"{100 * mean('retrieval/i2t_R@1'):.1f}", f"{100 * mean('retrieval/t2i_R@1'):.1f}",
                     f"{mean('seconds'):.0f}"])
    print_table(["row", "ZS object top-1 (x chance)", "ZS scene top-1 (x chance)", "I→T R@1", "T→I R@1", "s/run"],
                rows, f"CLIP on {args.preset}, seeds {args.seeds}")
    if args.out:
        write_json_atomic(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
