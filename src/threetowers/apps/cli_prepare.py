"""`threetowers prepare`: datasets built from installed packages (today: `clipart`, real captioned drawings).

A subcommand of `apps/cli.py` (registered there), kept in its own module for its long help.
"""

from __future__ import annotations

import argparse
import os

from ..clipart import prepare_clipart
from ..clipart.sources import OPENCLIPART, TUXPAINT

PREPARE_CLIPART_EPILOG = """\
install the sources first (nothing is installed by this command):
  apt-get install openclipart-png openclipart-svg tuxpaint-stamps-default librsvg2-bin
  npm pack emoji-datasource-google emoji-datasource-twitter     # two .tgz files in the current folder

examples:
  threetowers prepare clipart data/clipart --emoji-google emoji-datasource-google-16.0.0.tgz \\
      --emoji-twitter emoji-datasource-twitter-16.0.0.tgz
  threetowers prepare clipart data/clipart64 --image-size 64 --emoji-google G.tgz --emoji-twitter T.tgz
  threetowers train clip data.source=webdataset data.path='data/clipart/train/{00000..00005}.tar'
  threetowers eval runs/clip/model --benchmark wds/clipart_retrieval --dataset-root data/clipart/wds/clipart_retrieval

OUT_DIR gets train/{00000..N}.tar (img2dataset's layout: KEY.png, KEY.txt, KEY.json; the pattern is
manifest.json's train_shards), wds/emoji_retrieval, wds/clipart_retrieval, wds/emoji_category and
wds/clipart_category (CLIP_benchmark's layout) and, last, manifest.json (options, package versions, counts
and drop reasons, split sizes, a digest). The same command again does nothing while the packages and
options are unchanged; other options are refused unless --force. The cleaning and split rules are in
src/threetowers/clipart/ (one module docstring each).
"""


def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="build a dataset from installed packages (clipart: real captioned drawings)",
                       description="Build a dataset from installed packages.",
                       epilog="example:\n  threetowers prepare clipart data/clipart --emoji-google G.tgz "
                              "--emoji-twitter T.tgz",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    c = kinds.add_parser("clipart", help="human-captioned drawings: openclipart, Tux Paint stamps, emoji",
                         description="Build a real human-captioned image-text benchmark from installed packages: "
                                     "openclipart drawings with their work titles, Tux Paint stamps with their "
                                     "English captions, and Google- and Twitter-style emoji with their Unicode "
                                     "names. Captions and images are cleaned (drops counted by reason); Google "
                                     "emoji and most drawings train (img2dataset shards); Twitter emoji and the "
                                     "held-out drawings (10% of the captions by default) are CLIP_benchmark "
                                     "retrieval and zero-shot classification sets.",
                         epilog=PREPARE_CLIPART_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("out", metavar="OUT_DIR", help="the folder to build in (new, empty or an earlier build)")
    c.add_argument("--image-size", type=int, default=128, metavar="N", help="side of the square images in pixels (default 128)")
    c.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the held-out split and the training order (default 0)")
    c.add_argument("--heldout-fraction", type=float, default=0.1, metavar="F",
                   help="fraction of the drawings' captions held out for testing (default 0.1)")
    c.add_argument("--emoji-google", metavar="PATH", help="npm pack's emoji-datasource-google .tgz, or the extracted "
                                                          "folder holding its package.json")
    c.add_argument("--emoji-twitter", metavar="PATH", help="the same for emoji-datasource-twitter")
    c.add_argument("--openclipart", metavar="DIR", default=str(OPENCLIPART),
                   help=f"the folder holding png/ and svg/ (default {OPENCLIPART})")
    c.add_argument("--tuxpaint", metavar="DIR", default=str(TUXPAINT), help=f"the stamps folder (default {TUXPAINT})")
    c.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                   help="processes for the image work (default min(4, CPUs)); results do not depend on it")
    c.add_argument("--force", action="store_true", help="rebuild OUT_DIR even if it holds a build with other settings")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    prepare_clipart(args.out, image_size=args.image_size, seed=args.seed, heldout_fraction=args.heldout_fraction,
                    emoji_google=args.emoji_google, emoji_twitter=args.emoji_twitter, openclipart=args.openclipart,
                    tuxpaint=args.tuxpaint, workers=args.workers, force=args.force)
    return 0
