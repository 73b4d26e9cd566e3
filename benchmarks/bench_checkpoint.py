"""What a checkpoint costs: its write time and size at the CPU presets, and the arithmetic at ViT-B/16.

    python benchmarks/bench_checkpoint.py --out docs/results/checkpoint_cost.json     # ~1 min on 2 cores

A stop signal (train.stop_signals) ends a run after the step under way and one checkpoint, so the
notice a run needs is one step plus one checkpoint (docs/scale.md, "Pre-emption and restarts"); this
measures the checkpoint. Each preset's model (`clip`, and `3t` with h cached, as `threetowers train`
builds them, h a stand-in: a checkpoint never holds h; without and with the EMA, train.ema_decay=0.999) gets an AdamW state (one update), then
the trainer's own checkpoint phase (`loop.Loop.checkpoint`: every rank's RNG, the weights, optimizer,
schedule, EMA, config, the manifest with every file's sha256, fsync, atomic rename) writes it `--writes`
times into a temporary directory on the filesystem of `--dir`; the median wall time and the bytes are
reported. The ViT-B/16 figures are counted, not written: a CLIP ViT-B/16 (the towers of
benchmarks/bench_loop.py's gpu preset, OpenAI's vocabulary and context) is built and its parameters
counted; bytes = parameters x 4 x (weights + 2 AdamW moments [+ EMA]), and the time at this disk's
measured rate (cluster filesystems differ: measure there with --dir).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, save_report  # noqa: E402

import torch  # noqa: E402

from threetowers import FrozenImageModel, Preprocessing, ThirdTower, create_model  # noqa: E402
from threetowers.config import load_config  # noqa: E402
from threetowers.core.distributed import DistInfo  # noqa: E402
from threetowers.towers.vit import VisionTransformer  # noqa: E402
from threetowers.training.contrastive import load_contrastive, save_contrastive  # noqa: E402
from threetowers.training.loop import Loop  # noqa: E402
from threetowers.training.optim import build_optimizer, build_scheduler  # noqa: E402
from threetowers.training.trainer import Job  # noqa: E402

CPU = torch.device("cpu")
INFO = DistInfo(0, 1, 0, CPU, owns_group=False)
VIT_B16 = ["model.image.image_size=224", "model.image.patch_size=16", "model.image.width=768", "model.image.depth=12",
           "model.image.heads=12", "model.text.width=512", "model.text.depth=12", "model.text.heads=8",
           "model.text.vocab_size=49408", "model.text.context_length=77", "model.embed_dim=512"]


def build(preset: str, overrides: list[str]):
    """The model `threetowers train PRESET` trains (3t: h's embeddings cached, so the model holds only h's
    identity; h's own weights are never in a checkpoint, so a small stand-in h does)."""
    cfg = load_config(preset, ["train.device=cpu", *overrides])
    third_info = None
    if cfg.model.method != "clip":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            trunk = VisionTransformer(image_size=32, patch_size=4, width=192, depth=1, heads=3)
        third_info = ThirdTower(FrozenImageModel(trunk, 192, Preprocessing(32), "stand-in-h")).info()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = create_model(cfg, third=None, third_info=third_info)
    return cfg, model


def checkpoint_cost(preset: str, ema: float, writes: int, root: Path) -> dict:
    out = root / f"{preset}-ema{ema}"
    cfg, model = build(preset, [f"train.output_dir={out}", f"train.ema_decay={ema}", "train.keep_checkpoints=2"])
    optimizer = build_optimizer(model, cfg.optim, CPU)
    for p in model.parameters():  # one update, so that AdamW holds both moments of every parameter
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loop = Loop(cfg, Job("train", model, None, save_contrastive, load_contrastive), INFO, model, optimizer,
                build_scheduler(optimizer, cfg.optim, cfg.train.steps), None)
    seconds = []
    for step in range(1, writes + 1):
        t0 = time.perf_counter()
        loop.checkpoint(step)
        seconds.append(time.perf_counter() - t0)
    files = {p.name: p.stat().st_size for p in Path(loop.last_ckpt).iterdir()}
    params = sum(p.numel() for p in loop.trainable)
    return {"preset": preset, "ema_decay": ema, "trainable_parameters": params, "bytes": sum(files.values()),
            "files": files, "median_s": statistics.median(seconds), "seconds": seconds,
            "mb_per_s": sum(files.values()) / statistics.median(seconds) / 1e6}


def vit_b16(mb_per_s: float) -> dict:
    """CLIP ViT-B/16's checkpoint, by arithmetic on its counted parameters (fp32 weights and moments)."""
    _, model = build("clip", VIT_B16)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = {"trainable_parameters": params}
    for name, copies in (("bytes_weights_adamw", 3), ("bytes_weights_adamw_ema", 4)):
        out[name] = params * 4 * copies
        out[name.replace("bytes", "seconds_at_this_disk")] = out[name] / (mb_per_s * 1e6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=7, help="checkpoints written per case (the median is kept)")
    parser.add_argument("--dir", default=None, help="where to write them (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="the JSON report")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        cases = [checkpoint_cost(preset, ema, args.writes, root) for preset in ("clip", "3t") for ema in (0.0, 0.999)]
        rate = statistics.median(c["mb_per_s"] for c in cases)
    large = vit_b16(rate)
    print_table(["preset", "EMA", "trainable params", "bytes", "median write (s)", "MB/s"],
                [[c["preset"], c["ema_decay"], f"{c['trainable_parameters']:,}", f"{c['bytes']:,}",
                  f"{c['median_s']:.3f}", f"{c['mb_per_s']:.0f}"] for c in cases], "checkpoint cost, CPU presets")
    print(f"\nCLIP ViT-B/16: {large['trainable_parameters']:,} trainable parameters; "
          f"{large['bytes_weights_adamw'] / 1e9:.2f} GB without the EMA, {large['bytes_weights_adamw_ema'] / 1e9:.2f} GB "
          f"with it; at this disk's {rate:.0f} MB/s about {large['seconds_at_this_disk_weights_adamw_ema']:.0f} s")
    save_report({"cases": cases, "vit_b16": large, "writes": args.writes, "command": " ".join(sys.argv)}, args.out)


if __name__ == "__main__":
    main()
