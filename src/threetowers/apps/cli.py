"""The `threetowers` command line: thin wrappers that parse arguments and call the library.

Each subcommand is one `add_<name>(subparsers)` function that registers its parser and sets
`func(args) -> exit status`; `main` dispatches and turns user errors into one-line messages:
config errors exit with status 2, other user errors and stopped runs with 1; a run stopped cleanly
by a stop signal (train.stop_signals: its state saved, run it again to go on) with 75
(core/preemption.py); Ctrl-C outside such a stop with 130. Set THREETOWERS_DEBUG=1 for full tracebacks.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

from .. import (
    ConfigError, EvaluationFailed, TrainingStopped, __version__, check_parity, evaluate, export_open_clip, list_sources,
    load_config, pretrain, train,
)
from ..core.atomic import write_json_atomic
from ..core.distributed import barrier, init_distributed, shutdown, world_size_from_env
from ..core.preemption import EXIT_PREEMPTED, Preempted, stop_on_signals
from ..data.loader import build_train_data, cache_root, cache_summary
from ..eval.benchmark import write_wds_classification
from ..eval.tasks import benchmark_saved
from ..interop.open_clip_export import require_open_clip
from ..model.factory import build_thirds
from ..training.checkpoint import CheckpointError
from ..world import World
from .demo import load_demo_config, run_demo
from .cli_prepare import add_prepare
from .cli_use import add_classify, add_embed

DESCRIPTION = """\
threetowers: contrastive vision-language training with pretrained image models.
CLIP, LiT and Three Towers (3T) from one code path; runs are configs (YAML presets + key=value).
"""

EPILOG = """\
examples:
  threetowers demo                                # the main job: CLIP vs LiT vs 3T, with a report
  threetowers train tiny                          # a seconds-long smoke run
  threetowers pretrain pretrain                   # train a classifier to serve as h
  threetowers train 3t                            # Three Towers with that h
  threetowers eval runs/3t/model                  # zero-shot, retrieval, few-shot, mixing
  threetowers export runs/3t/model exported       # an open_clip model directory (local-dir:exported)
  threetowers embed runs/3t/model photos/ --out emb   # embeddings of your images (or --texts captions.txt)
  threetowers classify runs/3t/model photos/ --labels "a cat,a dog"   # zero-shot over your own labels
  threetowers world show world.png                # look at the embedded benchmark
  threetowers prepare clipart data/clipart --emoji-google G.tgz --emoji-twitter T.tgz   # real captioned drawings
  threetowers train --help                        # options of one subcommand
  torchrun --nproc_per_node=4 -m threetowers train 3t   # 4 processes with DDP

presets: clip, lit, 3t, tiny, pretrain (or a path to your own YAML file; it may list
`defaults: [clip]` to start from a preset). Every config field can be overridden as
key.sub=value, e.g. optim.lr=5e-4 train.batch_size=256 model.third.source=efficientnet_lite0.
"""

TRAIN_EPILOG = """\
examples:
  threetowers train clip                                  # CLIP from scratch
  threetowers train lit model.third.path=runs/pretrain/model
  threetowers train 3t train.steps=2000 optim.lr=5e-4 train.output_dir=runs/3t_long
  threetowers train my_run.yaml --resume never            # start over (old checkpoints are set aside)
  threetowers train 3t --resume runs/3t/checkpoints/step_0000200
  threetowers train 3t model.arch=ViT-B-16 train.output_dir=runs/3t_b16    # open_clip's ViT-B-16 shape
  threetowers train 3t model.init_from=local-dir:exported/clip optim.lr=1e-5   # start f, g from an open_clip model
  threetowers train 3t model.init_from=local-dir:exported/clip optim.lr=1e-5 optim.fresh_lr_scale=10  # new heads 10x
  threetowers train 3t 'model.thirds=[{source: checkpoint, path: runs/pretrain/model}, {source: efficientnet_lite0}]'
  threetowers train clip train.ema_decay=0.999 train.checkpoint_minutes=30     # an EMA; a checkpoint every 30 min
  torchrun --nproc_per_node=2 -m threetowers train 3t     # 2 processes (gloo on CPU, NCCL on GPU)
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
      -m threetowers train 3t                             # 2 machines (run on each; shared output_dir)

A run writes <output_dir>/config.yaml, metrics.jsonl, tensorboard/, checkpoints/step_NNNNNNN/
and, at the end, model/ (load it with threetowers.load_model). By default a run
resumes from the newest valid checkpoint in its output_dir (--resume auto).
SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (train.stop_signals) stop a run cleanly: the step under way
ends, a checkpoint is written, exit status 75; the same command goes on from there.
"""

PRETRAIN_EPILOG = """\
examples:
  threetowers pretrain pretrain                                        # world objects -> runs/pretrain
  threetowers pretrain pretrain pretrain.dataset=world_scene train.output_dir=runs/pretrain_scene
  threetowers pretrain pretrain pretrain.dataset=folder:/data/my_images model.image.image_size=64
  threetowers pretrain pretrain model.image.kind=timm model.image.timm_name=resnet18

The classifier (model.image's architecture + a linear head) is saved to <output_dir>/model and
loads as a third tower: model.third.source=checkpoint model.third.path=<output_dir>/model.
Held-out top-1 accuracy is reported at the end.
"""


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """CONFIG (preset name or YAML path), key=value overrides and --resume."""
    parser.add_argument("config", metavar="CONFIG", help="preset name (clip, lit, 3t, tiny, pretrain) or a YAML file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=5e-4")
    parser.add_argument("--resume", metavar="auto|never|PATH",
                        help="resume from the newest valid checkpoint (auto, the default), start over (never), "
                             "or from a checkpoint / run directory (sets train.resume)")


def config_from_args(args: argparse.Namespace):
    """The validated Config of a subcommand's CONFIG + overrides (+ --resume), for this world size."""
    overrides = list(args.overrides)
    if getattr(args, "resume", None):
        overrides.append(f"train.resume={args.resume}")
    return load_config(args.config, overrides, world_size=world_size_from_env())


# ----------------------------------------------------------------------------- subcommands


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train CLIP, LiT or 3T from a config",
                       description="Train a contrastive model (CLIP, LiT or 3T) from a preset or YAML config.",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    result = train(config_from_args(args))
    _print_result(result)
    return 0


def add_pretrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain an image classifier to use as the third tower h",
                       description="Supervised pretraining of an image classifier (the frozen h of LiT and 3T).",
                       epilog=PRETRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args: argparse.Namespace) -> int:
    result = pretrain(config_from_args(args))
    _print_result(result)
    return 0


def _print_result(result) -> None:
    if int(os.environ.get("RANK", "0")) != 0 and world_size_from_env() > 1:
        return
    shown = {k: v for k, v in result.metrics.items() if k.startswith(("eval/", "train/loss", "train/acc"))
             and isinstance(v, (int, float))}
    print(f"model: {result.model_dir} (step {result.step})")
    for key, value in shown.items():
        print(f"  {key}: {value:.4f}")


def add_world(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("world", help="look at the embedded benchmark: write a PNG grid of samples",
                       description="Render samples of the embedded world (data.world.*) into a PNG grid with their "
                                   "captions (noisy captions in red) or labels (show), or write its held-out "
                                   "zero-shot set in CLIP_benchmark's webdataset layout (wds), for "
                                   "`threetowers eval --benchmark wds/NAME` and CLIP_benchmark's own command line.",
                       epilog="examples:\n  threetowers world show world.png\n"
                              "  threetowers world show objects.png --what object -n 24 data.world.image_size=64\n"
                              "  threetowers world show fm.png data.world.sprites=shapes,fashion_mnist\n"
                              "  threetowers world wds data/wds_world_object --what object -n 1000",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["show", "wds"], help="show: write a PNG grid; wds: write a benchmark folder")
    p.add_argument("output", metavar="OUT", help="the PNG (show) or the folder (wds)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.world.seed=3")
    p.add_argument("--what", choices=["pairs", "object", "scene"], default="pairs",
                   help="captioned pairs, or the object-/scene-labelled pretraining sets")
    p.add_argument("-n", type=int, default=16, help="number of samples (default 16)")
    p.set_defaults(func=cmd_world)


def cmd_world(args: argparse.Namespace) -> int:
    cfg = load_config(None, list(args.overrides))
    if args.action == "wds":
        if args.what == "pairs":
            raise ValueError("world wds writes a labelled set: give --what object or --what scene")
        write_wds_classification(args.output, World(cfg.data.world).zeroshot(args.what, args.n))
    else:
        World(cfg.data.world).show(args.output, n=args.n, what=args.what)
    print(f"wrote {args.output}")
    return 0


def add_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="compute the frozen third tower's embeddings of a run's training data once",
                       description="Run h (model.third; each h of model.thirds) once over the training data of "
                                   "CONFIG and store its pre-logits under data.cache_dir, with h's and the data's identity (for "
                                   "webdataset shards: one file per shard, beside each shard's index). `train` does "
                                   "this by itself when needed; this command does it ahead of time. An interrupted "
                                   "build resumes (shards: every finished shard is kept); under torchrun the ranks "
                                   "split the shards, and data.num_workers processes decode on each.",
                       epilog="examples:\n  threetowers cache 3t\n"
                              "  threetowers cache lit model.third.source=efficientnet_lite0 model.third.path= model.third.input_size=96\n"
                              "  torchrun --nproc_per_node=8 -m threetowers cache 3t data.source=webdataset \\\n"
                              "      data.path='/data/shards/{00000..09999}.tar' data.num_workers=6 data.cache_dir=/data/cache",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.set_defaults(func=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if cfg.model.method == "clip":
        raise ConfigError("model.method=clip has no third tower to cache; use a lit or 3t config")
    if cfg.data.third_embeddings != "cache":
        raise ConfigError("data.third_embeddings=online runs h during training; set it to cache to build a cache")
    cfg = leave_run_alone(cfg)
    info = init_distributed(cfg.train.device, cfg.train.dist_timeout_minutes)  # under torchrun, the ranks split the shards
    try:
        thirds = build_thirds(cfg, info.device)  # the h's run on the rank's device
        with stop_on_signals(cfg.train.stop_signals):  # a stop signal stops the build between two shards
            summary = cache_summary(build_train_data(cfg, info.rank, info.world_size, third=thirds), thirds)
        barrier(info)
        if info.is_main:
            print(summary)
    finally:
        shutdown(info)
    return 0


def leave_run_alone(cfg):
    """`cfg` for the cache command when its output directory already holds a tokenizer: that
    tokenizer is the run's, and the cache needs no tokens, so it is read (or, for a Hugging Face
    text tower, left) rather than retrained in its place when the data differ. The cache itself
    still goes where `train` will look for it. With no tokenizer there, the one trained is saved
    for `train` to reuse, as before."""
    saved = Path(cfg.train.output_dir) / "tokenizer.json"
    if not saved.is_file():
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.data.cache_dir = str(cache_root(cfg))
    if cfg.model.text.kind != "hf" and not cfg.data.tokenizer:
        cfg.data.tokenizer = str(saved)
    cfg.train.output_dir = ""  # nothing is written into the run's directory
    return cfg


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained model: zero-shot, retrieval, few-shot, 3T/LiT mixing",
                       description="Evaluate a saved model (a run's model/ or a checkpoints/step_N/ directory) on "
                                   "eval.tasks; print a table and write JSON.",
                       epilog="examples:\n  threetowers eval runs/3t/model\n"
                              "  threetowers eval runs/clip/model --tasks zeroshot_object retrieval eval.num_images=200\n"
                              "  threetowers eval runs/3t/model --tasks zeroshot:/data/my_classes retrieval:/data/val.csv\n"
                              "  threetowers eval runs/3t/model eval.mixing_alphas=[0,0.5,1] --out scores.json\n"
                              "  threetowers eval runs/3t/model --benchmark wds/cifar10 --dataset-root data/wds_cifar10\n\n"
                              "Metrics: top1/top5/mean_per_class_recall (zero-shot), i2t_R@k and t2i_R@k "
                              "(retrieval), Nshot (few-shot ridge probe); see the README for exact definitions.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL_DIR")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="eval.* overrides, e.g. eval.num_images=2000")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks (default: the model's eval.tasks); key=value "
                                                              "overrides may follow them")
    p.add_argument("--out", metavar="JSON", help="where to write the results (default MODEL_DIR/eval.json)")
    p.add_argument("--benchmark", metavar="DATASET",
                   help="a dataset CLIP_benchmark builds instead of eval.tasks, e.g. wds/cifar10 (pip install "
                        "'threetowers[benchmark]'); zero-shot classification or retrieval, as the dataset is")
    p.add_argument("--dataset-root", metavar="DIR", help="the --benchmark dataset's folder (e.g. a wds/ download)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for --benchmark (default fp32; the precision "
                                                     "is part of every result's name)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.benchmark:
        if not args.dataset_root:
            raise ValueError("--benchmark needs --dataset-root DIR (the dataset's folder)")
        results = benchmark_saved(args.model, args.benchmark, args.dataset_root, args.amp, list(args.overrides))
    else:
        # `--tasks A B key=value` takes the overrides too: split them off by their form.
        tasks = [t for t in args.tasks or [] if not is_override(t)]
        overrides = list(args.overrides) + [t for t in args.tasks or [] if is_override(t)]
        results = evaluate(args.model, tasks or None, overrides)
    width = max(len(k) for k in results) if results else 0
    for key, value in results.items():
        print(f"{key:<{width}}  {100 * value:6.2f}")
    out = Path(args.out) if args.out else Path(args.model) / "eval.json"
    write_json_atomic(out, results)
    print(f"wrote {out}")
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a trained CLIP or 3T model as an open_clip model directory",
                       description="Write MODEL_DIR's image and text towers (f and g; h is not needed at inference) "
                                   "with their projections and tokenizer as a directory open_clip loads with "
                                   "create_model_and_transforms('local-dir:OUT_DIR'), and so CLIP_benchmark and the "
                                   "Hugging Face hub loader. Then load it with open_clip and compare its tokens and "
                                   "embeddings with ours (without open_clip installed this is refused before anything "
                                   "is written, unless --no-check).",
                       epilog="examples:\n  threetowers export runs/3t/model exported/3t\n"
                              "  python -c \"import open_clip; m, _, pre = open_clip.create_model_and_transforms("
                              "'local-dir:exported/3t')\"\n"
                              "  clip_benchmark eval --model local-dir:exported/3t --pretrained '' --model_type open_clip "
                              "--dataset wds/cifar10 --dataset_root data/wds_cifar10\n\n"
                              "Refused, with the setting named: LiT models (their image side is h), model.head=mlp, "
                              "model.image.pool=gap, a non-causal or mean-pooled text tower.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL_DIR", help="a run's model/ or a checkpoints/step_N/ directory")
    p.add_argument("out", metavar="OUT_DIR", help="the open_clip directory to write (new, empty or an earlier export)")
    p.add_argument("--no-check", action="store_true", help="skip loading the export with open_clip to compare embeddings")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    if not args.no_check:
        require_open_clip()  # before writing: an unchecked folder is left only when asked for
    out = export_open_clip(args.model, args.out)
    print(f"wrote {out} (open_clip: create_model_and_transforms('local-dir:{out}'))")
    if args.no_check:
        return 0
    diff = check_parity(args.model, out)
    print(f"open_clip tokenizes alike; max |embedding difference| in fp32: image {diff['image']:.1e}, "
          f"text {diff['text']:.1e}")
    if max(diff.values()) > 1e-5:
        raise ValueError(f"the export's embeddings differ from {args.model}'s by more than 1e-5; please report this")
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: CLIP vs LiT vs 3T on the embedded world, with a report",
                       description="Render the world, pretrain object- and scene-aligned third towers (and load "
                                   "EfficientNet-Lite0 when installed), cache their embeddings, train CLIP once and "
                                   "LiT and 3T per third tower over several seeds, evaluate everything, and write "
                                   "results.md, results.json and plots to the output directory. With "
                                   "--preset demo/clipart the same comparison runs on real captioned drawings "
                                   "prepared by `threetowers prepare clipart`, scored by CLIP_benchmark.",
                       epilog="examples:\n  threetowers demo                       # the full run (about 16 min on 2 cores)\n"
                              "  threetowers demo --quick               # a first look (one seed; about 1.5 min)\n"
                              "  threetowers demo jobs=8                # 8 runs at once (8+ cores): the same numbers, sooner\n"
                              "  threetowers demo --preset demo/clipart benchmark=clipart-data   # real drawings (14 min)\n"
                              "  threetowers demo seeds=[0] thirds=[object] methods=[lit,3t] output_dir=demo-object\n"
                              "  threetowers demo methods=[3t] output_dir=demo-per_term --run model.third.heads=per_term\n"
                              "  threetowers demo output_dir=demo-weights --run loss.weights=[0.5,0.25,0.25] --run train.steps=2700\n\n"
                              "The runs train `jobs` at once (2 in demo/full), each in a worker process on its own "
                              "train.threads (1 in demo/base), its console in <output_dir>/runs/<run>.log; a run's "
                              "numbers do not depend on jobs.\n"
                              "Each demo writes into its own output_dir: a folder that holds a demo with other settings "
                              "is refused (its runs would be resumed and its report overwritten); the same demo "
                              "again goes on where it stopped.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="demo settings: the fields of DemoConfig in src/threetowers/apps/demo.py (presets in "
                        "src/threetowers/configs/demo/)")
    p.add_argument("--run", action="append", default=[], metavar="key=value",
                   help="a training-config override for every run (an ablation), e.g. --run loss.kind=sigmoid; "
                        "repeatable; appended to the demo's `overrides` list")
    p.add_argument("--quick", action="store_true", help="a small budget, one seed (demo/quick preset)")
    p.add_argument("--preset", default=None, help="a demo preset name or YAML file (default demo/full)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    preset = args.preset or ("demo/quick" if args.quick else "demo/full")
    run_demo(load_demo_config(preset, list(args.overrides), run_overrides=args.run))
    return 0


def add_sources(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sources", help="list the third-tower sources (model.third.source)",
                       description="List the registered sources of the frozen third tower h: the values "
                                   "model.third.source accepts (besides none). A plugin adds one with "
                                   "threetowers.register_source.",
                       epilog="example:\n  threetowers sources", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=cmd_sources)


def cmd_sources(args: argparse.Namespace) -> int:
    sources = list_sources()
    width = max(map(len, sources))
    for name, summary in sources.items():
        print(f"{name:<{width}}  {summary}")
    return 0


# Subcommands in the order `--help` lists them; a new one is an `add_<name>` function added here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_demo, add_train, add_pretrain, add_eval, add_export, add_embed, add_classify, add_cache, add_world, add_prepare,
    add_sources]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="threetowers", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"threetowers {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")  # key.sub=value (a task such as zeroshot:/a=b is not one)


def is_override(arg: str) -> bool:
    return bool(OVERRIDE.match(arg))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options too (`train clip --resume never optim.lr=1e-3`), which a
    # nargs="*" positional alone does not allow; collect the leftovers that look like key=value.
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if not is_override(e)]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = os.environ.get("THREETOWERS_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except ConfigError as err:
        if debug:
            raise
        print(f"threetowers: config error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, FileExistsError, TrainingStopped, EvaluationFailed, CheckpointError) as err:
        if debug:
            raise
        print(f"threetowers: error: {err}", file=sys.stderr)
        return 1
    except Preempted as err:
        print(f"threetowers: {err}", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("threetowers: interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
