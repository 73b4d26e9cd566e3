"""The whole training loop, as a user runs it: step time and the data wait, this checkout against another.

    python benchmarks/bench_loop.py --baseline-src /tmp/base/src            # CPU, ~4 min on 2 cores
    python benchmarks/bench_loop.py --preset gpu --baseline-src OLD/src --out gpu_loop.json

`bench_step.py` times the model's step alone (batch already on the device, no clipping, no
logging). This one runs `threetowers train` end to end, so it also sees what surrounds the step:
building batches (the world's arrays go through the DataLoader now: workers, pinned memory, uint8
to the device), the gradient clip, the skip decision, metrics, logging. It reads the trainer's own
figures from metrics.jsonl: `time/step_s` (wall time per step, data wait included) and
`time/data_s` (time waiting for the batch), medians over the log windows after the first.

Contenders, run as separate processes in interleaved rounds (A B A B ...): this checkout and, with
`--baseline-src`, another checkout's `src` (e.g. `git worktree add /tmp/base c7dddeb`), for each
method of the preset on the world with h's embeddings cached (built once, before timing). Report
the machine with the figures; on a shared machine, run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, save_report  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parents[1] / "src"
PRESETS = {
    # The demo's towers and batch on 2 CPU threads (bf16 autocast).
    "cpu": ["train.batch_size=128", "train.threads=2", "train.device=cpu", "model.image.kind=timm",
            "model.image.timm_name=test_resnet", "data.world.num_pairs=4096", "data.world.image_size=64",
            "model.image.image_size=64"],
    # A ViT-B/16-like f on one GPU, h an ImageNet EfficientNet cached; data workers as a cluster run would use.
    "gpu": ["train.batch_size=256", "train.device=cuda", "data.num_workers=8", "model.image.image_size=224",
            "model.image.patch_size=16", "model.image.width=768", "model.image.depth=12", "model.image.heads=12",
            "model.text.width=512", "model.text.depth=12", "model.text.heads=8", "model.embed_dim=512",
            "data.world.num_pairs=8192", "data.world.image_size=224"],
}
THIRD = ["model.third.source=efficientnet_lite0", "model.third.path=", "model.third.input_size=96"]


def run(src: Path, method: str, preset: list[str], steps: int, out: Path, cache: Path) -> dict:
    """One `threetowers train` in its own process; the trainer's medians after the first log window."""
    overrides = [*preset, *(THIRD if method != "clip" else []), f"train.steps={steps}", "train.log_every=10",
                 "train.checkpoint_every=100000", "train.progress=false", "train.tensorboard=false", "eval.tasks=[]",
                 f"train.output_dir={out}", f"data.cache_dir={cache}", "--resume", "never"]
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    code = "import sys; from threetowers.apps.cli import main; sys.exit(main())"
    subprocess.run([sys.executable, "-c", code, "train", method, *overrides], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "time/step_s" in r][1:]  # the first window holds the warm-up
    return {"step_s": statistics.median(r["time/step_s"] for r in windows),
            "data_s": statistics.median(r["time/data_s"] for r in windows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--methods", nargs="+", default=["clip", "3t"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-src", type=Path, help="another checkout's src folder (before a change)")
    parser.add_argument("--out", type=Path, help="JSON report (e.g. docs/results/cpu_loop.json)")
    args = parser.parse_args()
    sides = {"this": HERE} | ({"baseline": args.baseline_src.resolve()} if args.baseline_src else {})
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for method in args.methods:
                for side, src in sides.items():
                    key = f"{side}/{method}"
                    # Each side its own h cache: their cache identities differ across versions.
                    figures = run(src, method, PRESETS[args.preset], args.steps, Path(tmp) / key / str(rnd),
                                  Path(tmp) / "cache" / side)
                    results.setdefault(key, []).append(figures)
                    print(f"round {rnd + 1}: {key}: {figures}", flush=True)
    rows, report = [], {"machine": machine(torch.device("cuda" if args.preset == "gpu" else "cpu")),
                        "preset": args.preset, "steps": args.steps, "rounds": args.rounds, "results": {}}
    for key, runs in results.items():
        step = statistics.median(r["step_s"] for r in runs)
        data = statistics.median(r["data_s"] for r in runs)
        base = results.get(key.replace("this/", "baseline/"))
        ratio = statistics.median(r["step_s"] for r in base) / step if base and key.startswith("this/") else None
        report["results"][key] = {"step_s": step, "data_s": data, "runs": runs, "speedup_vs_baseline": ratio}
        rows.append([key, f"{1000 * step:.1f}", f"{1000 * data:.2f}", f"{ratio:.3f}x" if ratio else ""])
    print_table(["contender", "step ms (median)", "data wait ms", "baseline / this"], rows,
                f"training loop, preset {args.preset}, {args.steps} steps x {args.rounds} rounds")
    if args.out:
        save_report(report, args.out)


if __name__ == "__main__":
    main()
