"""Training-step throughput and peak memory: this project against open_clip, and CLIP vs LiT vs 3T.

    python benchmarks/bench_step.py                         # CPU preset, ~3 min on 2 cores
    python benchmarks/bench_step.py --quick                 # batch 64, 3 rounds (~30 s)
    python benchmarks/bench_step.py --preset gpu --out gpu_step.json   # ViT-B/16-like, bf16, CUDA
    python benchmarks/bench_step.py --preset gpu --compile  # both sides under torch.compile

A step is what a trainer does per batch: forward under autocast (bf16) or in fp32, the contrastive
loss in fp32, backward, AdamW step, zero_grad(set_to_none=True). Both libraries get the same
batch (already on the device), the same precision and the same optimizer (this project's
`build_optimizer`: AdamW, weight decay on matrices only; the fused kernel on CUDA). Gradient
clipping, data loading and logging are left out on both sides.

Contenders (all interleaved, A B C ... A B C ..., medians over the timed steps):
  ours/clip, open_clip/clip       identical shapes; for each precision of the preset
  ours/clip gap                   mean pooling over patches (model.image.pool=gap) instead of the class token
  ours/3t cached, ours/lit cached h's embeddings precomputed (batch["third"], float16 as the cache stores them)
  ours/3t online, ours/lit online h (a frozen ViT of f's shape) runs every step
  open_clip/lit locked            `lock_image_tower()`: the frozen tower runs every step
  before/clip                     with --baseline-src: another checkout's towers and loss (before/after a change)

Matching the architectures: our default ViT (class token, LayerNorm before the blocks, no bias in
the patch embedding; docs/towers.md) is open_clip's default ViT (`pool_type=tok`, `ln_pre`, a
bias-free conv), so both are built with their own defaults. What remains different is printed with
the parameter counts. `--baseline-src` needs a checkout whose towers have the same parameters. Captions have
random lengths (4 to the context length), the end-of-text token being the largest id.

On a machine shared with other work, steps during which other processes held the CPU are marked
and dropped, and rounds go on until enough clean steps are in (see common.interleave).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleave, machine, print_table, resident_bytes, step_peak_mib, summary, MIB  # noqa: E402

from threetowers.config import load_config  # noqa: E402
from threetowers.core.atomic import write_json_atomic  # noqa: E402
from threetowers import ThreeTowers, create_model  # noqa: E402
from threetowers.training.flops import train_flops_per_pair  # noqa: E402
from threetowers.third import FrozenImageModel, Preprocessing, ThirdTower  # noqa: E402
from threetowers.towers.vit import VisionTransformer  # noqa: E402
from threetowers.training.optim import build_optimizer  # noqa: E402


@dataclass(frozen=True)
class Shapes:
    image_size: int
    patch_size: int
    vit_width: int
    vit_depth: int
    vit_heads: int
    text_width: int
    text_depth: int
    text_heads: int
    context_length: int
    vocab_size: int
    embed_dim: int
    mlp_ratio: float
    batch: int


PRESETS = {
    "cpu": dict(
        shapes=Shapes(32, 4, 192, 6, 3, 256, 4, 4, 32, 4096, 128, 4.0, 256),
        quick_batch=64, device="cpu", precisions=("fp32", "bf16"), threads=2, rounds=7, steps=1, quick_rounds=3,
    ),
    "gpu": dict(
        shapes=Shapes(224, 16, 768, 12, 12, 512, 12, 8, 77, 49408, 512, 4.0, 256),
        quick_batch=256, device="cuda", precisions=("bf16",), threads=0, rounds=5, steps=5, quick_rounds=3,
    ),
}


# ----------------------------------------------------------------------------- inputs


def make_batch(s: Shapes, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images in [0, 1]; tokens left-aligned with random lengths, eot = the largest id (open_clip's
    argmax pooling and our last-valid-token pooling then pick the same position), padding 0."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(s.batch, 3, s.image_size, s.image_size, generator=g)
    lengths = torch.randint(4, s.context_length + 1, (s.batch,), generator=g)
    tokens = torch.randint(1, s.vocab_size - 1, (s.batch, s.context_length), generator=g)
    pos = torch.arange(s.context_length)
    tokens[pos >= lengths[:, None]] = 0
    tokens[torch.arange(s.batch), lengths - 1] = s.vocab_size - 1
    third = torch.randn(s.batch, s.vit_width, generator=g).to(torch.float16)
    return {"image": images.to(device), "tokens": tokens.to(device), "third": third.to(device)}


# ----------------------------------------------------------------------------- models


def our_config(s: Shapes, method: str, pool: str = "cls"):
    o = [
        f"model.method={method}", f"model.embed_dim={s.embed_dim}", f"model.image.pool={pool}",
        f"model.image.image_size={s.image_size}", f"model.image.patch_size={s.patch_size}",
        f"model.image.width={s.vit_width}", f"model.image.depth={s.vit_depth}", f"model.image.heads={s.vit_heads}",
        f"model.image.mlp_ratio={s.mlp_ratio}", f"model.text.vocab_size={s.vocab_size}",
        f"model.text.context_length={s.context_length}", f"model.text.width={s.text_width}",
        f"model.text.depth={s.text_depth}", f"model.text.heads={s.text_heads}", f"model.text.mlp_ratio={s.mlp_ratio}",
    ]
    if method != "clip":
        o.append("model.third.source=checkpoint")  # h is passed in built (online) or described (cached)
    return load_config(None, o)


def frozen_vit(s: Shapes) -> ThirdTower:
    """A realistic h: a ViT with f's shape, frozen (random weights cost the same as trained ones)."""
    vit = VisionTransformer(s.image_size, s.patch_size, s.vit_width, s.vit_depth, s.vit_heads, s.mlp_ratio, "cls")
    return ThirdTower(FrozenImageModel(vit, s.vit_width, Preprocessing(s.image_size), "bench-h"))


def build_ours(s: Shapes, method: str, third: str | None, pool: str = "cls") -> ThreeTowers:
    cfg = our_config(s, method, pool)
    if third == "online":
        return create_model(cfg, third=frozen_vit(s))
    if third == "cached":
        return create_model(cfg, third_info={"name": "bench-h", "dim": s.vit_width, "fingerprint": ""})
    return create_model(cfg)


def build_open_clip(s: Shapes, locked: bool = False) -> nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(
        layers=s.vit_depth, width=s.vit_width, head_width=s.vit_width // s.vit_heads, mlp_ratio=s.mlp_ratio,
        patch_size=s.patch_size, image_size=s.image_size, pool_type="tok",
    )
    text = CLIPTextCfg(
        context_length=s.context_length, vocab_size=s.vocab_size, width=s.text_width, heads=s.text_heads,
        layers=s.text_depth, mlp_ratio=s.mlp_ratio,
    )
    model = CLIP(s.embed_dim, vision_cfg=vision, text_cfg=text)
    if locked:
        model.lock_image_tower()
    return model


def open_clip_loss() -> Callable:
    from open_clip.loss import ClipLoss

    loss = ClipLoss()

    def forward_loss(model: nn.Module, batch: dict) -> torch.Tensor:
        image, text, scale = model(batch["image"], batch["tokens"])
        with torch.autocast(batch["image"].device.type, enabled=False):  # the loss in fp32, as ours
            return loss(image.float(), text.float(), scale.float())

    return forward_loss


def our_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch)["loss"]  # the term loss runs in fp32 inside (autocast disabled there)


def load_baseline(src: str) -> dict:
    """Towers and loss of another checkout's `src` (e.g. `git archive <commit> src | tar -x -C /tmp/before`),
    loaded under private module names so that both versions run side by side in this process."""
    import importlib.util
    import types

    models = Path(src) / "threetowers" / "models"
    if not (models / "blocks.py").is_file():
        raise SystemExit(f"--baseline-src {src}: no threetowers/models/blocks.py there")
    pkg = types.ModuleType("_baseline_models")
    pkg.__path__ = [str(models)]
    sys.modules[pkg.__name__] = pkg
    loaded = {}
    for name, path in (("blocks", models / "blocks.py"), ("vit", models / "vit.py"), ("text", models / "text.py"),
                       ("losses", models.parent / "losses.py")):
        spec = importlib.util.spec_from_file_location(f"_baseline_models.{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        loaded[name] = module
    return loaded


def build_baseline(s: Shapes, base: dict) -> ThreeTowers:
    """Our CLIP with the baseline's towers and term loss swapped in (same weights, same heads)."""
    model = build_ours(s, "clip", None)
    vit = base["vit"].VisionTransformer(s.image_size, s.patch_size, s.vit_width, s.vit_depth, s.vit_heads,
                                        s.mlp_ratio, "cls")
    text = base["text"].TextTransformer(s.vocab_size, s.context_length, s.text_width, s.text_depth, s.text_heads,
                                        s.mlp_ratio)
    loss = base["losses"].TermLoss(base["losses"].method_terms("clip"))
    for new, old in ((vit, model.image_tower), (text, model.text_tower), (loss, model.loss)):
        new.load_state_dict(old.state_dict())
    model.image_tower, model.text_tower, model.loss = vit, text, loss
    return model


@dataclass
class Contender:
    name: str
    precision: str
    step: Callable[[], None]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    params: int
    trainable: int


def contender(name: str, model: nn.Module, forward_loss: Callable, batch: dict, precision: str,
              device: torch.device, cfg_optim, compile_: bool) -> Contender:
    """`batch` is what this contender's step sees (without "third", h runs online)."""
    model = model.to(device).train()
    optimizer = build_optimizer(model, cfg_optim, device)  # the same AdamW settings for every contender
    run_model = torch.compile(model) if compile_ else model

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward_loss(run_model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Contender(name, precision, step, model, optimizer, params, trainable)


def build_contenders(s: Shapes, precisions: tuple[str, ...], device: torch.device, compile_: bool,
                     item2_precision: str, only: set[str] | None, baseline: dict | None = None) -> list[Contender]:
    cfg_optim = our_config(s, "clip").optim
    batch = make_batch(s, device)
    oc_loss = open_clip_loss()
    out = []

    online = {k: v for k, v in batch.items() if k != "third"}

    def add(name: str, precision: str, build: Callable[[], nn.Module], forward_loss: Callable) -> None:
        full = f"{name} {precision}"
        if only and not any(o in full for o in only):
            return
        torch.manual_seed(0)
        inputs = batch if "cached" in name else online
        out.append(contender(full, build(), forward_loss, inputs, precision, device, cfg_optim, compile_))

    for p in precisions:
        add("ours/clip", p, lambda: build_ours(s, "clip", None), our_loss)
        add("open_clip/clip", p, lambda: build_open_clip(s), oc_loss)
        if baseline:
            add("before/clip", p, lambda: build_baseline(s, baseline), our_loss)
    p = item2_precision
    add("ours/clip gap", p, lambda: build_ours(s, "clip", None, pool="gap"), our_loss)
    add("ours/3t cached", p, lambda: build_ours(s, "3t", "cached"), our_loss)
    add("ours/lit cached", p, lambda: build_ours(s, "lit", "cached"), our_loss)
    add("ours/3t online", p, lambda: build_ours(s, "3t", "online"), our_loss)
    add("ours/lit online", p, lambda: build_ours(s, "lit", "online"), our_loss)
    add("open_clip/lit locked", p, lambda: build_open_clip(s, locked=True), oc_loss)
    return out


# ----------------------------------------------------------------------------- main


def ratios(results: dict, precisions: tuple[str, ...], p2: str) -> dict:
    """Throughput ratios (>1 = the first is faster) and step-time ratios where the target is stated so."""
    def t(name):
        r = results.get(name)
        return r["median_s"] if r else None

    def speedup(slow: str, fast: str) -> float | None:
        return t(slow) / t(fast) if t(slow) and t(fast) else None

    out = {}
    for p in precisions:
        out[f"clip {p}: speed-up over --baseline-src"] = speedup(f"before/clip {p}", f"ours/clip {p}")
        out[f"clip {p}: ours/open_clip throughput (target >= 1.0, aim 1.2)"] = speedup(f"open_clip/clip {p}",
                                                                                       f"ours/clip {p}")
    out[f"clip {p2}: ours with gap pooling/open_clip throughput"] = speedup(f"open_clip/clip {p2}",
                                                                           f"ours/clip gap {p2}")
    out = {k: v for k, v in out.items() if v is not None}
    clip = t(f"ours/clip {p2}")
    if clip:
        if t(f"ours/3t cached {p2}"):
            out[f"{p2}: 3t cached / clip step time (target <= 1.10)"] = t(f"ours/3t cached {p2}") / clip
        if t(f"ours/lit cached {p2}"):
            out[f"{p2}: lit cached speed-up over clip (target >= 2.5)"] = clip / t(f"ours/lit cached {p2}")
        if t(f"ours/3t online {p2}"):
            out[f"{p2}: 3t online / clip step time"] = t(f"ours/3t online {p2}") / clip
        if t(f"ours/lit online {p2}"):
            out[f"{p2}: lit online speed-up over clip"] = clip / t(f"ours/lit online {p2}")
    locked = t(f"open_clip/lit locked {p2}")
    if locked:
        for name in ("lit cached", "lit online", "3t cached"):
            if t(f"ours/{name} {p2}"):
                out[f"{p2}: ours/{name} over open_clip/lit locked (throughput)"] = locked / t(f"ours/{name} {p2}")
    return out


def param_notes(s: Shapes) -> list[str]:
    ours, oc = build_ours(s, "clip", None), build_open_clip(s)
    n_ours, n_oc = (sum(p.numel() for p in m.parameters()) for m in (ours, oc))
    lit_ours = build_ours(s, "lit", "cached")
    lit_oc = build_open_clip(s, locked=True)
    t_ours, t_oc = (sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (lit_ours, lit_oc))
    return [
        f"CLIP parameters: ours {n_ours:,}, open_clip {n_oc:,} (difference {n_ours - n_oc:+,})",
        f"LiT trainable parameters: ours {t_ours:,}, open_clip {t_oc:,} (difference {t_ours - t_oc:+,}: our g_h "
        f"maps text width {s.text_width} to h's dim {s.vit_width}, open_clip's text projection to embed_dim "
        f"{s.embed_dim}; open_clip's image projection is frozen with the tower)",
        "Same otherwise: pre-norm blocks (LayerNorm, fused qkv with bias, GELU MLP with biases), class-token "
        "pooling with a final LayerNorm, a LayerNorm before the ViT blocks, causal text attention, "
        "end-of-text pooling, bias-free projections, one learned temperature per term.",
    ]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--peak-flops", type=float, default=0.0,
                    help="the device's dense peak FLOP/s in the precision measured (e.g. 989e12: H100/H200 bf16) for MFU")
    ap.add_argument("--quick", action="store_true", help="smaller batch on CPU and fewer rounds")
    ap.add_argument("--batch", type=int, default=0, help="override the preset's batch size")
    ap.add_argument("--precisions", default="", help="comma-separated, e.g. fp32,bf16 (default: the preset's)")
    ap.add_argument("--item2-precision", default="", help="precision of the LiT/3T comparison (default: bf16)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds of undisturbed steps wanted (default: the preset's)")
    ap.add_argument("--max-rounds", type=int, default=0, help="stop after this many rounds (default: 2x --rounds)")
    ap.add_argument("--busy-limit", type=float, default=0.25,
                    help="drop a step during which other processes used more than this many cores")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per contender per round")
    ap.add_argument("--threads", type=int, default=-1, help="torch threads (default: the preset's; 0 = torch's)")
    ap.add_argument("--only", default="", help="comma-separated substrings of contender names to run")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model")
    ap.add_argument("--device", default="", help="override the preset's device (e.g. try the gpu shapes on cpu)")
    ap.add_argument("--baseline-src", default="",
                    help="another checkout's src/ (e.g. a git worktree of an older commit): adds 'before/clip' "
                         "contenders running its towers and loss, to measure a change interleaved")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)

    preset = PRESETS[args.preset]
    device = torch.device(args.device or preset["device"])
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--preset {args.preset} runs on {device}, but torch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    threads = preset["threads"] if args.threads < 0 else args.threads
    if threads:
        torch.set_num_threads(threads)
    s: Shapes = preset["shapes"]
    if args.quick:
        s = replace(s, batch=preset["quick_batch"])
    if args.batch:
        s = replace(s, batch=args.batch)
    precisions = tuple(args.precisions.split(",")) if args.precisions else preset["precisions"]
    p2 = args.item2_precision or "bf16"
    rounds = args.rounds or (preset["quick_rounds"] if args.quick else preset["rounds"])
    steps = args.steps or preset["steps"]
    only = set(args.only.split(",")) if args.only else None

    notes = param_notes(s)
    print(f"preset {args.preset}: {asdict(s)}; {device}, threads {torch.get_num_threads()}, "
          f"{rounds} rounds x {steps} step(s), compile={args.compile}")
    for n in notes:
        print("  " + n)
    baseline = load_baseline(args.baseline_src) if args.baseline_src else None
    contenders = build_contenders(s, precisions, device, args.compile, p2, only, baseline)
    if not contenders:
        raise SystemExit(f"--only {args.only!r} matches no contender")

    results = {}
    print("warm-up and peak memory, one contender at a time")
    for c in contenders:
        for _ in range(2 if args.compile else 1):  # lazy inits, optimizer state, compilation (and a recompile)
            c.step()
        peak = step_peak_mib(c.step, device)
        state = resident_bytes(list(c.model.parameters()), c.optimizer) / MIB
        results[c.name] = {"precision": c.precision, "params": c.params, "trainable": c.trainable,
                           "state_mib": state, "step_peak_mib": peak,
                           "peak_mib": None if peak is None else state + peak}
        print(f"  {c.name}: peak {results[c.name]['peak_mib'] or float('nan'):.0f} MiB", flush=True)

    print(f"timing: interleaved rounds until {rounds * steps} undisturbed steps each (* = another process "
          f"used > {args.busy_limit} cores meanwhile; dropped)")
    times = interleave({c.name: c.step for c in contenders}, device, rounds, steps,
                       max_rounds=args.max_rounds or 2 * rounds, busy_limit=args.busy_limit)
    for c in contenders:
        results[c.name].update(summary(times[c.name], s.batch))
        results[c.name]["pairs_per_s"] = results[c.name].pop("per_s")

    # Model FLOPs per pair of each architecture (training/flops.py), the same for open_clip at identical
    # shapes: what MFU is computed from, against --peak-flops.
    flops = model_flops(s, device)
    for name, r in results.items():
        kind = "3t" if "/3t" in name else "lit" if "/lit" in name else "clip"
        r["flops_per_pair"] = flops[kind + (" online" if "online" in name else "")]
        if args.peak_flops:
            r["mfu"] = r["flops_per_pair"] * r["pairs_per_s"] / args.peak_flops
    ref = {p: results.get(f"ours/clip {p}", {}).get("median_s") for p in precisions + (p2,)}
    rows = []
    for name, r in results.items():
        base = ref.get(r["precision"])
        rows.append([
            name, f"{1e3 * r['median_s']:.0f}", f"{1e3 * r['min_s']:.0f}", f"{r['pairs_per_s']:.1f}",
            f"{base / r['median_s']:.2f}" if base else "", f"{r['peak_mib']:.0f}" if r["peak_mib"] else "n/a",
            f"{r['trainable'] / 1e6:.2f}M / {r['params'] / 1e6:.2f}M",
            f"{r['n']} ({r['n_disturbed']})" + (" !" if r["all_disturbed"] else ""),
            f"{r['flops_per_pair'] / 1e9:.1f}", f"{100 * r['mfu']:.1f}%" if "mfu" in r else "–",
        ])
    print_table(["contender", "step ms (median)", "min", "pairs/s", "speed vs ours/clip", "peak MiB",
                 "trainable / all", "steps (disturbed)", "GFLOPs/pair", "MFU"],
                rows, title=f"batch {s.batch}, {device}, medians over interleaved undisturbed steps")
    if any(r["all_disturbed"] for r in results.values()):
        print("  ! every step of this contender was disturbed by other processes; its median includes them")
    rat = ratios(results, precisions, p2)
    print()
    for k, v in rat.items():
        print(f"  {k}: {v:.2f}")
    report = {
        "benchmark": "bench_step", "preset": args.preset, "quick": args.quick, "compile": args.compile,
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "shapes": asdict(s), "rounds": rounds, "steps_per_round": steps,
        "machine": {**machine(device), "open_clip": _open_clip_version()},
        "optimizer": type(contenders[0].optimizer).__name__ + " " + str(
            {k: v for k, v in contenders[0].optimizer.defaults.items() if k in ("foreach", "fused", "betas", "eps")}),
        "notes": notes, "results": results, "ratios": rat,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.out, report)
        print(f"wrote {args.out}")
    return report


def model_flops(s: Shapes, device: torch.device) -> dict[str, float]:
    """Training FLOPs per pair of each architecture, counted on our models (h online: its forward too)."""
    batch = make_batch(s, device)
    out = {}
    for kind, method, third in (("clip", "clip", None), ("3t", "3t", "cached"), ("lit", "lit", "cached"),
                                ("3t online", "3t", "online"), ("lit online", "lit", "online")):
        rows = {k: v for k, v in batch.items() if third == "cached" or k != "third"}
        out[kind] = train_flops_per_pair(build_ours(s, method, third).to(device), rows, device)
    return out


def _open_clip_version() -> str:
    import open_clip

    return open_clip.__version__


if __name__ == "__main__":
    main()
