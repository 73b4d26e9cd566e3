"""What a second third tower costs: the 3T training step with K = 2 cached h's against K = 1, and the cache.

    python benchmarks/bench_thirds.py                  # the demo's towers (demo/base), batch 128, CPU
    python benchmarks/bench_thirds.py --quick          # 3 rounds of 3 steps (~1 min on 2 cores)
    python benchmarks/bench_thirds.py --device cuda --out thirds.json

Both sides are 3T with the demo's towers (`demo/base`: f a timm test_resnet at 48 px, the demo's text
transformer), the demo's batch, its precision (bf16 autocast, the loss in fp32) and AdamW
(`build_optimizer`), on one batch already in memory. The h's are cached, as the demo trains them: a
step reads h's embeddings (float16 in the cache, float32 in the batch) and never runs h, so a second h
adds two adaptor heads, two loss terms and its columns of the batch. h's width is that of the demo's
pretrained h's (a test_resnet classifier: f's own width) unless --dims says otherwise (e.g. 1280:
EfficientNet-Lite0). A step is forward, backward, optimizer step, zero_grad (as bench_step.py; no
clipping, data loading or logging). The contenders run interleaved (K=1 K=2 K=1 ...), medians over the
steps that no other process disturbed (common.interleave).

The cache: each h stores float16 [rows, dim] (`third/store.py`), so h_k costs rows x dim_k x 2 bytes,
whatever the other h's; printed for the demo's training set (data.world.num_pairs).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MIB, interleave, machine, print_table, summary  # noqa: E402

from threetowers import create_model  # noqa: E402
from threetowers.config import load_config  # noqa: E402
from threetowers.core.atomic import write_json_atomic  # noqa: E402
from threetowers.towers.build import build_image_tower  # noqa: E402
from threetowers.training.optim import build_optimizer  # noqa: E402


def config(k: int, overrides: list[str]):
    """3T with `k` h's on the demo's towers; the h's are described, not built (they are cached)."""
    sections = ", ".join(f"{{source: checkpoint, path: h{i}}}" for i in range(k))
    return load_config("demo/base", ["model.method=3t", f"model.thirds=[{sections}]", *overrides])


def make_batch(cfg, dims: list[int], device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """What the data gives a step: uint8 images as stored, token ids, and the h's cached embeddings side
    by side (float16 in the cache, read back as float32)."""
    g = torch.Generator().manual_seed(seed)
    n, size, length = cfg.train.batch_size, cfg.data.world.image_size, cfg.model.text.context_length
    images = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)
    tokens = torch.randint(1, cfg.model.text.vocab_size - 1, (n, length), generator=g)
    third = torch.randn(n, sum(dims), generator=g).to(torch.float16).float()
    return {"image": images.to(device), "tokens": tokens.to(device), "third": third.to(device)}


def contender(k: int, dims: list[int], overrides: list[str], device: torch.device):
    cfg = config(k, overrides)
    torch.manual_seed(0)
    model = create_model(cfg, third_info=[{"name": f"h{i}", "dim": d, "fingerprint": ""} for i, d in enumerate(dims)])
    model = model.to(device).train()
    optimizer = build_optimizer(model, cfg.optim, device)
    batch = make_batch(cfg, dims, device)
    bf16 = cfg.train.precision == "bf16"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.after_update()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return cfg, step, trainable


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="steps per contender per round")
    p.add_argument("--quick", action="store_true", help="3 rounds of 3 steps")
    p.add_argument("--dims", type=int, nargs=2, default=None, metavar=("D1", "D2"),
                   help="the two h's embedding sizes (default: the demo's pretrained h's, f's width)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the demo's train.threads)")
    p.add_argument("--out", default="", help="write the numbers as JSON here")
    p.add_argument("overrides", nargs="*", help="key=value run settings over demo/base (e.g. train.batch_size=256)")
    args = p.parse_args(argv)
    rounds, steps = (3, 3) if args.quick else (args.rounds, args.steps)
    device = torch.device(args.device)
    base = config(1, args.overrides)
    torch.set_num_threads(args.threads or base.train.threads or torch.get_num_threads())
    dims = list(args.dims) if args.dims else [build_image_tower(base.model.image).dim] * 2

    one_cfg, one, one_params = contender(1, dims[:1], args.overrides, device)
    _, two, two_params = contender(2, dims, args.overrides, device)
    for fn in (one, two):  # warm-up: allocator, autocast caches, oneDNN kernels
        for _ in range(2):
            fn()
    print(f"3T step, K=1 vs K=2 cached h's (dims {dims}), batch {one_cfg.train.batch_size}, "
          f"{one_cfg.train.precision}, {device}, {torch.get_num_threads()} threads; {rounds} rounds x {steps} steps")
    timed = interleave({"K=1": one, "K=2": two}, device, rounds, steps, max_rounds=3 * rounds)
    found = {name: summary(record, one_cfg.train.batch_size) for name, record in timed.items()}
    ratio = found["K=2"]["median_s"] / found["K=1"]["median_s"]
    rows = one_cfg.data.world.num_pairs
    cache = [rows * d * 2 for d in dims]  # float16 [rows, dim] per h (keys.json aside)
    print_table(["contender", "median ms", "min ms", "pairs/s", "trainable params", "steps (disturbed)"], [
        [name, f"{1e3 * r['median_s']:.1f}", f"{1e3 * r['min_s']:.1f}", f"{r['per_s']:.0f}", f"{params:,}",
         f"{r['n']} ({r['n_disturbed']})"] for (name, r), params in zip(found.items(), (one_params, two_params))])
    print(f"\nK=2 / K=1 step time: {ratio:.3f}x (target <= 1.05x)")
    print("cache per h (float16, " + f"{rows} training pairs): " +
          ", ".join(f"h{i + 1} {d}-d {c / MIB:.1f} MiB" for i, (d, c) in enumerate(zip(dims, cache))))
    report = {"ratio_k2_over_k1": ratio, "dims": dims, "batch": one_cfg.train.batch_size,
              "precision": one_cfg.train.precision, "trainable": {"K=1": one_params, "K=2": two_params},
              "cache_bytes_per_h": cache, "rows": rows,
              "steps": {n: {k: v for k, v in r.items() if not k.startswith("all_")} for n, r in found.items()},
              "machine": machine(device)}
    if args.out:
        write_json_atomic(args.out, report)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
