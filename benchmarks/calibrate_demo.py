"""The demo's calibration sweep: what the from-scratch CLIP learns under candidate settings.

    python benchmarks/calibrate_demo.py --out docs/results/calibration.json        # ~15 min on 2 cores
    python benchmarks/calibrate_demo.py --rows base cnn --seeds 0 1
    python benchmarks/calibrate_demo.py --preset demo/base --rows base --seeds 0 1 2   # the chosen preset

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
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from threetowers import load_config  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save_report, train_and_score  # noqa: E402

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--preset", default=str(Path(__file__).with_name("calibration_base.yaml")),
                   help="the base every row overrides (default: the demo's base as it was during the sweep)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    report = {"preset": args.preset, "rows": {}}
    with tempfile.TemporaryDirectory(prefix="calibrate_") as tmp:
        for name in args.rows:
            runs = [train_and_score(load_config(args.preset, [*ROWS[name], "model.method=clip", f"train.seed={seed}",
                                                              f"train.output_dir={tmp}/{name}-{seed}"]), name)
                    for seed in args.seeds]
            report["rows"][name] = {"overrides": ROWS[name], "runs": runs}
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
    save_report(report, args.out)


if __name__ == "__main__":
    main()
