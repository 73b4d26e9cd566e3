"""What a CLIP learns in a fixed budget: this project's towers against open_clip's, side by side.

    python benchmarks/bench_quality.py                                  # defaults vs open_clip, 3 seeds
    python benchmarks/bench_quality.py --seeds 0 1 2 --rows ours ours:model.image.pool=gap open_clip
    python benchmarks/bench_quality.py --shape cpu --rows ours open_clip  # the larger CPU-preset towers
    python benchmarks/bench_quality.py --list                           # the named rows

Both contenders train through the same trainer (`threetowers.training.trainer.run`) on the same data in
the same order (the world of `demo/base`, the batch at each step a function of the seed and the
step), with the same optimizer (AdamW with this project's weight-decay groups), schedule, gradient
clipping, precision and fp32 contrastive loss (the scale clamped at 100, as open_clip's trainer
clamps it). Only the towers, their initialisation and the initial temperature differ. Each model is
then scored by the same evaluation code: zero-shot object and scene top-1, image->text and
text->image R@1 on the world's held-out sets; `mean4` is their mean in points.

A row is `ours` (the defaults, plus any `:key=value` overrides after the name, comma-separated) or
`open_clip` (open_clip's `CLIP` with its own defaults; `open_clip:pool=avg,ln_pre=0,t0=10` changes
its pooling, its pre-LayerNorm and its initial temperature). Rows also come by name (`--list`).
Every row runs with each seed; the table gives mean ± sample std over seeds, and the JSON holds
every run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table  # noqa: E402

from threetowers.core.atomic import write_json_atomic  # noqa: E402
from threetowers.data.loader import build_train_data  # noqa: E402
from threetowers.eval.tasks import build_tasks, run_tasks  # noqa: E402
from threetowers.core.distributed import gather_with_grad  # noqa: E402
from threetowers.model.losses import contrastive_loss  # noqa: E402
from threetowers.core.distributed import init_distributed, shutdown  # noqa: E402
from threetowers import resolve_config, train  # noqa: E402
from threetowers.training.trainer import Job, run, runtime  # noqa: E402

# The shapes of issue 12: the demo's towers, and the larger towers of the CPU step benchmark.
SHAPES = {
    "demo": [],  # demo/base as it is: ViT 96/3/3 heads/patch 8 at 48 px, text 96/2/3 heads, embed 128
    "cpu": ["model.image.width=192", "model.image.depth=6", "model.image.patch_size=8",
            "model.text.width=256", "model.text.depth=4", "model.text.heads=4"],
}
METRICS = ("zeroshot_object/top1", "zeroshot_scene/top1", "retrieval/i2t_R@1", "retrieval/t2i_R@1")

# Named rows, so that the published table (docs/towers.md) can be re-run by name.
BEFORE = ("model.image.pool=gap,model.image.pre_norm=false,model.image.patch_bias=true,model.image.init=torch,"
          "model.text.init=torch,loss.init_scale=10")  # the towers' defaults at 694e437
NAMED_ROWS: dict[str, str] = {
    "defaults": "ours",
    "open_clip": "open_clip",
    "before": f"ours:{BEFORE}",
    "open_clip_like_before": "open_clip:pool=avg,ln_pre=0,t0=10",
    "gap pooling": "ours:model.image.pool=gap",
    "no pre_norm": "ours:model.image.pre_norm=false",
    "image init torch": "ours:model.image.init=torch",
    "text init torch": "ours:model.text.init=torch",
    "patch bias": "ours:model.image.patch_bias=true",
    "t0=10": "ours:loss.init_scale=10",
    "fp32": "ours:train.precision=fp32",
    "bf16 attention": "ours:bench.attention=bf16",
    "decay embeddings": "ours:bench.decay_embeddings=1",
    "before+text init": f"ours:{BEFORE},model.text.init=clip",
}


@contextmanager
def bench_options(options: dict[str, str]) -> Iterator[None]:
    """Ablations that are not config fields, applied by patching for one run:
    `bench.attention=bf16` runs attention in bf16 on the CPU (ours upcasts to fp32 there);
    `bench.decay_embeddings=1` applies weight decay to token, position and class embeddings too
    (as open_clip's trainer does for its token and position embeddings)."""
    from threetowers.models import blocks
    from threetowers.training import optim

    saved = blocks.attention, blocks.single_query_attention, optim._EMBEDDING_NAMES, optim._NO_DECAY_MODULES
    unknown = set(options) - {"attention", "decay_embeddings"}
    if unknown:
        raise SystemExit(f"unknown bench.* options {sorted(unknown)}; known: attention=bf16, decay_embeddings=1")
    try:
        if options.get("attention") == "bf16":
            blocks.attention = lambda q, k, v, mask, causal: F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal)
            blocks.single_query_attention = lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if options.get("decay_embeddings") == "1":
            optim._EMBEDDING_NAMES = ()
            optim._NO_DECAY_MODULES = tuple(m for m in optim._NO_DECAY_MODULES if m is not nn.Embedding)
        yield
    finally:
        blocks.attention, blocks.single_query_attention, optim._EMBEDDING_NAMES, optim._NO_DECAY_MODULES = saved


# ----------------------------------------------------------------------------- open_clip as a job


class OpenClipJobModel(nn.Module):
    """open_clip's CLIP behind our trainer's interface: forward(batch) -> {"loss"}, encode_image/text."""

    def __init__(self, clip: nn.Module, image_size: int, max_scale: float = 100.0):
        super().__init__()
        self.clip, self.image_size, self.max_scale = clip, image_size, max_scale
        # Our world images are in [0, 1] and our ViT normalises with mean = std = 0.5: the same pixels here.
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5), persistent=False)
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.5), persistent=False)

    def _image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image((images - self.mean) / self.std)

    def forward(self, batch: dict) -> dict:
        image = F.normalize(self._image(batch["image"]).float(), dim=-1)
        text = F.normalize(self.clip.encode_text(batch["tokens"]).float(), dim=-1)
        scale = self.clip.logit_scale.float().exp().clamp(max=self.max_scale)
        # Every rank's rows as negatives under torchrun, as our TermLoss does (the loss gathers only when told).
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        loss = contrastive_loss(image, text, scale, a_all=gather_with_grad(image, world),
                                b_all=gather_with_grad(text, world), rank=rank)
        return {"loss": loss, "scale": scale.detach()}

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._image(images).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)


def build_open_clip(cfg, tokenizer, options: dict[str, str]) -> nn.Module:
    """open_clip's CLIP at our config's shapes; its own defaults unless `options` says otherwise."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    i, t = cfg.model.image, cfg.model.text
    vision = CLIPVisionCfg(
        layers=i.depth, width=i.width, head_width=i.width // i.heads, mlp_ratio=i.mlp_ratio,
        patch_size=i.patch_size, image_size=i.image_size,
        pool_type={"tok": "tok", "cls": "tok", "avg": "avg", "gap": "avg"}[options.get("pool", "tok")],
        no_ln_pre=options.get("ln_pre", "1") == "0",
    )
    # Our tokenizer's end-of-text id is not the largest id: pool at it by id ('eos'), which is
    # open_clip's argmax pooling for its own tokenizer.
    text = CLIPTextCfg(
        context_length=t.context_length, vocab_size=tokenizer.vocab_size, width=t.width, heads=t.heads,
        layers=t.depth, mlp_ratio=t.mlp_ratio, pool_type="eos", eos_id=tokenizer.eot_id, pad_id=tokenizer.pad_id,
    )
    init_scale = float(options.get("t0", 1 / 0.07))
    return CLIP(cfg.model.embed_dim, vision_cfg=vision, text_cfg=text, init_logit_scale=math.log(init_scale))


def _save_state(model: nn.Module, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
              str(directory / "model.safetensors"))


def train_open_clip(cfg, options: dict[str, str]) -> nn.Module:
    info = init_distributed(cfg.train.device, cfg.train.dist_timeout_minutes)
    try:
        with runtime(cfg, info):
            data = build_train_data(cfg, info.rank, info.world_size)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed)
                model = OpenClipJobModel(build_open_clip(cfg, data.tokenizer, options), cfg.model.image.image_size,
                                         cfg.loss.max_scale)
            job = Job("train", model, data, _save_state, lambda m, d: None)
            result = run(cfg, job, info, None)
        return result.model, data.tokenizer
    finally:
        shutdown(info)


# ----------------------------------------------------------------------------- one row


def parse_row(row: str) -> tuple[str, list[str]]:
    row = NAMED_ROWS.get(row, row)
    kind, _, rest = row.partition(":")
    if kind not in ("ours", "open_clip"):
        raise SystemExit(f"row {row!r}: expected ours[:key=value,...] or open_clip[:key=value,...] or a name "
                         f"from --list")
    return kind, [o for o in rest.split(",") if o]


def run_row(row: str, seed: int, shape: str, steps: int, workdir: Path, tasks: dict) -> dict:
    kind, opts = parse_row(row)
    base = ["model.method=clip", f"train.seed={seed}", f"train.steps={steps}", "train.resume=never",
            f"train.output_dir={workdir / 'run'}", "train.tensorboard=false", *SHAPES[shape]]
    t0 = time.perf_counter()
    if kind == "ours":
        bench = {o.split("=", 1)[0][len("bench."):]: o.split("=", 1)[1] for o in opts if o.startswith("bench.")}
        cfg = resolve_config("demo/base", base + [o for o in opts if not o.startswith("bench.")])
        with bench_options(bench):
            result = train(cfg, evaluate=lambda m, s: {})
        model, tokenizer = result.model, result.tokenizer
    else:
        cfg = resolve_config("demo/base", base)
        model, tokenizer = train_open_clip(cfg, dict(o.split("=", 1) for o in opts))
    train_s = time.perf_counter() - t0
    scores = run_tasks(model, tokenizer, tasks, cfg.eval.batch_size)
    values = {m: 100 * scores[m] for m in METRICS}
    return {"row": row, "seed": seed, "shape": shape, "steps": steps, "train_s": round(train_s, 1),
            **{m: round(v, 2) for m, v in values.items()}, "mean4": round(statistics.fmean(values.values()), 2)}


def summarise(runs: list[dict], rows: list[str]) -> list[dict]:
    out = []
    for row in rows:
        mine = [r for r in runs if r["row"] == row]
        if not mine:
            continue
        entry = {"row": row, "n": len(mine)}
        for key in (*METRICS, "mean4"):
            vals = [r[key] for r in mine]
            entry[key] = (round(statistics.fmean(vals), 2), round(statistics.stdev(vals), 2) if len(vals) > 1 else None)
        entry["train_s"] = round(statistics.median(r["train_s"] for r in mine), 1)
        out.append(entry)
    return out


def markdown(result: dict) -> str:
    """One saved run's summary as a Markdown table (mean ± sample std over seeds, in points)."""
    def cell(v):
        return f"{v[0]:.1f}" + (f" ± {v[1]:.1f}" if v[1] is not None else "")

    first = result["summary"][0]["row"]
    by_seed = {(r["row"], r["seed"]): r["mean4"] for r in result["runs"]}
    lines = [f"shape `{result['shape']}`, {result['steps']} steps, seeds {result['seeds']}; Δ: this row's mean4 "
             f"minus `{first}`'s, paired by seed (mean ± std)", "",
             "| row | n | ZS object | ZS scene | I→T R@1 | T→I R@1 | **mean4** | Δ mean4 | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        spec = NAMED_ROWS.get(s["row"], s["row"])
        label = s["row"] if spec == s["row"] else f"{s['row']} (`{spec}`)"
        diffs = [by_seed[s["row"], seed] - by_seed[first, seed] for seed in result["seeds"]
                 if (s["row"], seed) in by_seed and (first, seed) in by_seed]
        delta = "" if s["row"] == first or not diffs else cell(
            (statistics.fmean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else None))
        lines.append(f"| {label} | {s['n']} | " + " | ".join(cell(s[m]) for m in METRICS)
                     + f" | **{cell(s['mean4'])}** | {delta} | {s['train_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=["ours", "open_clip"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--shape", choices=sorted(SHAPES), default="demo")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--out", type=Path, default=None, help="JSON with every run and the summary")
    p.add_argument("--list", action="store_true", help="print the named rows and exit")
    p.add_argument("--markdown", nargs="+", type=Path, metavar="JSON",
                   help="print the summaries of saved --out files as Markdown tables and exit")
    args = p.parse_args(argv)
    if args.markdown:
        for path in args.markdown:
            print(markdown(json.loads(path.read_text())))
        return {}
    if args.list:
        for name, row in NAMED_ROWS.items():
            print(f"{name:28s} {row}")
        return {}
    for row in args.rows:
        parse_row(row)  # refuse a bad row before any training
    torch.set_num_threads(2)
    eval_cfg = resolve_config("demo/base", ["model.method=clip"])
    tasks = build_tasks(eval_cfg, ["zeroshot_object", "zeroshot_scene", "retrieval"])
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        for seed in args.seeds:  # seeds outermost: a partial run still compares every row
            for row in args.rows:
                rec = run_row(row, seed, args.shape, args.steps, Path(tmp), tasks)
                runs.append(rec)
                print(f"{row} seed {seed}: mean4 {rec['mean4']:.1f} ("
                      + " / ".join(f"{rec[m]:.1f}" for m in METRICS) + f") in {rec['train_s']:.0f} s", flush=True)
                result = {"shape": args.shape, "steps": args.steps, "seeds": args.seeds, "runs": runs,
                          "summary": summarise(runs, args.rows), "machine": machine(torch.device("cpu"))}
                if args.out:
                    write_json_atomic(args.out, result)

    def cell(v):
        mean, std = v
        return f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "")

    print_table(["row", "n", "ZS obj", "ZS scene", "I->T R@1", "T->I R@1", "mean4", "train s"],
                [[s["row"], s["n"], *[cell(s[m]) for m in (*METRICS, "mean4")], s["train_s"]]
                 for s in result["summary"]], title=f"shape {args.shape}, {args.steps} steps, seeds {args.seeds}")
    return result


if __name__ == "__main__":
    main()
