"""The `threetowers` command line: thin wrappers that parse arguments and call the library.

Each subcommand is one `add_<name>(subparsers)` function that registers its parser and sets
`func(args) -> exit status`; `main` dispatches and turns user errors into one-line messages:
config errors exit with status 2, other user errors and stopped runs with 1. Set
THREETOWERS_DEBUG=1 for full tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from .config import ConfigError, load_config

DESCRIPTION = """\
threetowers: contrastive vision-language training with pretrained image models.
CLIP, LiT and Three Towers (3T) from one code path; runs are configs (YAML presets + key=value).
"""

EPILOG = """\
examples:
  threetowers train tiny                          # a seconds-long smoke run
  threetowers pretrain pretrain                   # train a classifier to serve as h
  threetowers train 3t                            # Three Towers with that h
  threetowers train clip --help                   # options of one subcommand
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
  torchrun --nproc_per_node=2 -m threetowers train 3t     # 2 processes (gloo on CPU, NCCL on GPU)
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \\
      -m threetowers train 3t                             # 2 machines (run on each; shared output_dir)

A run writes <output_dir>/config.yaml, metrics.jsonl, tensorboard/, checkpoints/step_NNNNNNN/
and, at the end, model/ (load it with threetowers.models.model.load_model). By default a run
resumes from the newest valid checkpoint in its output_dir (--resume auto).
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
    from .train.distributed import world_size_from_env

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
    from .train.loop import train

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
    from .train.pretrain import pretrain

    result = pretrain(config_from_args(args))
    _print_result(result)
    return 0


def _print_result(result) -> None:
    from .train.distributed import world_size_from_env

    if int(os.environ.get("RANK", "0")) != 0 and world_size_from_env() > 1:
        return
    shown = {k: v for k, v in result.metrics.items() if k.startswith(("eval/", "train/loss", "train/acc"))
             and isinstance(v, (int, float))}
    print(f"model: {result.model_dir} (step {result.step})")
    for key, value in shown.items():
        print(f"  {key}: {value:.4f}")


# Subcommands in the order `--help` lists them; a new one is an `add_<name>` function added here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_train, add_pretrain]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="threetowers", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"threetowers {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options too (`train clip --resume never optim.lr=1e-3`), which a
    # nargs="*" positional alone does not allow; collect the leftovers that look like key=value.
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if "=" not in e or e.startswith("-")]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = os.environ.get("THREETOWERS_DEBUG", "") not in ("", "0")
    from .train.checkpoint import CheckpointError
    from .train.loop import TrainingStopped

    try:
        return args.func(args)
    except ConfigError as err:
        if debug:
            raise
        print(f"threetowers: config error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, TrainingStopped, CheckpointError) as err:
        if debug:
            raise
        print(f"threetowers: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("threetowers: interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
