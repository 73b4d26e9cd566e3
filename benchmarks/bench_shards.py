"""Training from indexed webdataset shards: decode rate, end-to-end rate, data wait, 3T vs CLIP, cache cost.

    python benchmarks/bench_shards.py                       # 64 px and 224 px, ~6 min on 2 cores
    python benchmarks/bench_shards.py --sizes 64 --steps 30 --out shards.json

JPEG shards in img2dataset's layout (KEY.jpg + KEY.txt + KEY.json) are written from world renders,
upscaled to 1.25x the training size (as img2dataset's `resize_mode=border` leaves them). Per size:

1. Decode rate: pairs/s one process turns into a training batch (index lookup, read, JPEG decode,
   resize and crop, collate): the rate of one DataLoader worker.
2. h's embedding cache: pairs/s of the build (decode + h) and bytes per sample on disk.
3. Training, side by side in one run (`train()`, bf16): CLIP on the same batches held in memory
   (no loader at all), CLIP from the shards, 3T from the shards with h's cached embeddings. Each
   with `--threads` compute threads and `--workers` DataLoader workers. Reported: pairs/s, step
   time, data wait share (`time/data_fraction`), and 3T's step time over CLIP's.

h is a timm resnet18 with random weights at h's input size 128 (the cost of a real pretrained h of that
architecture; timing does not depend on the weights). The towers are the demo's ViT at 64 px and a
ViT-S/32-like tower (width 384, depth 6, 49 patches) at 224 px.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from threetowers import load_config, train  # noqa: E402
from threetowers.core.atomic import write_json_atomic  # noqa: E402
from threetowers.data.loader import build_train_data  # noqa: E402
from threetowers.model.factory import build_thirds  # noqa: E402
from threetowers.towers.build import create_timm  # noqa: E402
from threetowers.world import World  # noqa: E402
from threetowers.schema import WorldConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table  # noqa: E402

TOWERS = {
    64: ["model.image.image_size=64", "model.image.patch_size=8", "model.image.width=192", "model.image.depth=6",
         "model.image.heads=3"],
    224: ["model.image.image_size=224", "model.image.patch_size=32", "model.image.width=384", "model.image.depth=6",
          "model.image.heads=6"],
}


def write_shards(root: Path, size: int, pairs: int, shards: int, cache: str) -> list[str]:
    """World renders as JPEG shards at 1.25 x `size`, with captions and an img2dataset-style .json."""
    world = World(WorldConfig(image_size=64, num_pairs=pairs, cache_dir=cache), progress=False).pairs("train")
    side = int(1.25 * size)
    paths = []
    per = pairs // shards
    for s in range(shards):
        path = root / f"{size}px-{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s * per, (s + 1) * per):
                buf = io.BytesIO()
                Image.fromarray(world.images[i]).resize((side, side), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
                key = f"{s:05d}{i:06d}"
                for name, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.txt", world.captions[i].encode()),
                                   (f"{key}.json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def decode_rate(cfg, batches: int) -> float:
    data = build_train_data(cfg)
    data.dataset[0]  # warm-up: open files
    times = []
    for step in range(1, batches + 1):
        t0 = time.perf_counter()
        data.dataset[step]
        times.append(time.perf_counter() - t0)
    return cfg.train.batch_size / statistics.median(times)


class InMemory:
    """The shard batches of steps 0..n-1, decoded once and replayed: CLIP with no loader at all."""

    def __init__(self, cfg, steps: int):
        source = build_train_data(cfg)
        self.tokenizer = source.tokenizer
        it = source.batches(0)
        self.cached = [next(it) for _ in range(steps)]

    def batches(self, start_step: int):
        for step in range(start_step, 10**9):
            yield self.cached[step % len(self.cached)]

    def bad_samples(self) -> dict:
        return {}


def run(cfg, data=None) -> dict:
    result = train(cfg, data=data, evaluate=(lambda m, s: {}) if data is not None else None)
    windows = [r for r in result.curve if "time/step_s" in r][1:]  # the first window holds start-up
    return {"pairs_per_s": statistics.median(r["train/samples_per_s"] for r in windows),
            "step_ms": 1000 * statistics.median(r["time/step_s"] for r in windows),
            "data_fraction": statistics.median(r["time/data_fraction"] for r in windows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    p.add_argument("--pairs", type=int, default=2048)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=40, help="training steps per run (logged every 10)")
    p.add_argument("--threads", type=int, default=1, help="compute threads of the training process")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (the machine's other cores)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    report = {"args": vars(args) | {"out": str(args.out)}, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
        tmp = Path(tmp)
        weights = tmp / "h.safetensors"
        save_file({k: v.contiguous() for k, v in create_timm("resnet18").state_dict().items()}, str(weights))
        for size in args.sizes:
            print(f"{size} px: writing shards ...", flush=True)
            urls = write_shards(tmp, size, args.pairs, args.shards, str(tmp / "world"))
            common = TOWERS[size] + [
                "data.source=webdataset", f"data.path={'::'.join(urls)}", f"data.cache_dir={tmp}/cache{size}",
                f"train.batch_size={args.batch}", f"train.steps={args.steps}", "train.log_every=10",
                f"train.threads={args.threads}", f"data.num_workers={args.workers}", "train.tensorboard=false",
                "train.progress=false", "eval.tasks=[]", "model.text.vocab_size=1024"]
            h = ["model.third.source=timm", "model.third.name=resnet18", f"model.third.path={weights}",
                 "model.third.input_size=128"]

            def cfg(method: str, tag: str):
                return load_config("clip", [*common, f"model.method={method}", *(h if method != "clip" else []),
                                            f"train.output_dir={tmp}/{size}-{tag}"])

            torch.set_num_threads(args.threads)
            shard_bytes = sum(os.path.getsize(u) for u in urls)
            decode = decode_rate(cfg("clip", "decode"), 10)
            print(f"  decode: {decode:,.0f} pairs/s in one process; building h's cache ...", flush=True)
            c3 = cfg("3t", "cache")
            t0 = time.perf_counter()
            build_train_data(c3, third=build_thirds(c3))
            build_s = time.perf_counter() - t0
            cache_bytes = sum(f.stat().st_size for f in (tmp / f"cache{size}").rglob("shards/*.npy"))
            index_bytes = sum(f.stat().st_size for f in (tmp / f"cache{size}" / "index").iterdir())
            record = {"decode_pairs_per_s_one_worker": decode, "cache_build_pairs_per_s": args.pairs / build_s,
                      "cache_bytes_per_sample": cache_bytes / args.pairs, "index_bytes_per_sample": index_bytes / args.pairs,
                      "cache_build_seconds": build_s, "shard_bytes_per_sample": shard_bytes / args.pairs}
            runs = {}
            for tag, method, data in (("memory", "clip", "memory"), ("shards", "clip", None), ("shards", "3t", None)):
                print(f"  training {method} from {tag} ...", flush=True)
                c = cfg(method, f"{tag}-{method}")
                runs[f"{method} ({tag})"] = run(c, InMemory(c, 8) if data == "memory" else None)
            record["training"] = runs
            record["3t_over_clip_step"] = runs["3t (shards)"]["step_ms"] / runs["clip (shards)"]["step_ms"]
            record["shards_over_memory_pairs_per_s"] = runs["clip (shards)"]["pairs_per_s"] / runs["clip (memory)"]["pairs_per_s"]
            report["sizes"][size] = record
    report["machine"] = machine(torch.device("cpu"))
    for size, r in report["sizes"].items():
        print(f"\n{size} px: decode {r['decode_pairs_per_s_one_worker']:,.0f} pairs/s per worker; h's cache built at "
              f"{r['cache_build_pairs_per_s']:,.0f} pairs/s (index + decode + h), {r['cache_bytes_per_sample']:,.0f} "
              f"B/sample of embeddings, {r['index_bytes_per_sample']:,.0f} B/sample of index "
              f"(shards {r['shard_bytes_per_sample']:,.0f} B/sample)")
        print_table(["run", "pairs/s", "step ms", "data wait"],
                    [[k, f"{v['pairs_per_s']:,.0f}", f"{v['step_ms']:.1f}", f"{100 * v['data_fraction']:.1f}%"]
                     for k, v in r["training"].items()],
                    f"batch {args.batch}, bf16, {args.threads} thread(s), {args.workers} worker(s); medians over windows")
        print(f"3T/CLIP step time from shards: {r['3t_over_clip_step']:.3f}x; "
              f"CLIP from shards / in memory: {r['shards_over_memory_pairs_per_s']:.3f}x")
    m = report["machine"]
    print(f"\n{m['cpu']}, {m['cpu_count']} cores, torch {torch.__version__}, load average {m['load_average_1m']:.2f}")
    if args.out:
        write_json_atomic(args.out, report)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
