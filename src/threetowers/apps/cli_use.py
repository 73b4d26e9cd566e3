"""`threetowers embed` and `threetowers classify`: use a trained model on one's own data.

Subcommands of `apps/cli.py` (registered there), kept in their own module for their long help; the
work is the library's (`threetowers.inference`).
"""

from __future__ import annotations

import argparse
import os
from collections import Counter

from .. import classify, embed
from ..inference import parse_labels, read_templates, write_csv
from ..inference.classification import default_csv, table
from ..inference.tower import check_model_dir

EMBED_EPILOG = """\
examples:
  threetowers embed runs/3t/model data/photos --out emb/photos                 # a folder of images (recursively)
  threetowers embed runs/3t/model data/val.csv --image-column filepath --out emb/val
  threetowers embed runs/3t/model 'data/shards/{00000..00099}.tar' --out emb/shards --num-workers 6
  threetowers embed runs/3t/model captions.txt --texts --out emb/captions      # one caption a line
  threetowers embed runs/3t/model data/photos --tower third --out emb/photos_h  # h through its head (3T, LiT)
  torchrun --nproc_per_node=8 -m threetowers embed runs/3t/model 'data/shards/{00000..09999}.tar' \\
      --out emb/all --device cuda --amp                                        # 8 GPUs split the shards
  python -c "import threetowers as tt; keys, emb = tt.load_embeddings('emb/photos'); print(emb.shape)"

OUT gets one pair of files a part (a shard, or --part-size rows of a folder, CSV or text file, in sorted
order): PART.npy (L2-normalised embeddings, rows in input order; np.load reads it) and PART.json,
written last (the tower's identity, the part's input, keys, and the rows that could not be used: their
rows are zeros), then index.json listing the parts in order. The same command again skips finished
parts; a killed run redoes only the part it was in; a part made by another model, tower or dtype, or
from an input changed since, is built again with a message naming it.
"""

CLASSIFY_EPILOG = """\
examples:
  threetowers classify runs/3t/model data/photos --labels "a cat,a dog,a bird"
  threetowers classify runs/3t/model data/photos --labels-file labels.txt --templates templates.txt --top-k 3
  threetowers classify runs/3t/model data/val.csv --labels "red,green,blue" --out preds.csv

The labels are embedded as `threetowers eval` embeds a zero-shot task's classes: each label in every
template ("a photo of a {}.", "a picture of a {}.", "an image of the {}." unless --templates), the
mean of those embeddings. So a folder root/<class>/... classified with its class names scores what
`threetowers eval MODEL --tasks zeroshot:root` reports as top1. Scores are cosine similarities.
"""


def add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="store a trained tower's embeddings of your images or captions",
                       description="Embed a folder of images, a CSV/TSV's image column, webdataset shards, or (with "
                                   "--texts) a text file of captions with a saved model's tower, into OUT, part by "
                                   "part (resumable; under torchrun the ranks split the parts).",
                       epilog=EMBED_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL_DIR", help="a run's model/ or a checkpoints/step_N/ directory")
    p.add_argument("input", metavar="INPUT", help="a folder of images, a .csv/.tsv file, .tar shards (a path or a "
                                                  "brace pattern), or a text file with --texts")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write the embeddings to")
    p.add_argument("--texts", action="store_true",
                   help="INPUT is a text file of captions, one a line (key: the line number)")
    p.add_argument("--tower", metavar="image|text|third|third.K",
                   help="image (default; f, or h for LiT), text (default with --texts), or third: h through its head "
                        "(3T's h pair, LiT's image side); third.K: the K-th h of a model with several (model.thirds)")
    p.add_argument("--image-column", default="image", metavar="NAME", help="the CSV's image column (default image)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="stored dtype (default float16)")
    p.add_argument("--part-size", type=int, default=4096, metavar="N",
                   help="rows a part for folders, CSVs and texts (default 4096; shards: one part a shard)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="inputs a forward pass (default 256)")
    p.add_argument("--num-workers", type=int, default=0, metavar="N", help="processes decoding images (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto (a GPU if any)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (default fp32)")
    p.set_defaults(func=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> int:
    result = embed(args.model, args.input, args.out, tower=args.tower, texts=args.texts, image_column=args.image_column,
                   dtype=args.dtype, part_size=args.part_size, batch_size=args.batch_size, num_workers=args.num_workers,
                   device=args.device, amp=args.amp)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns the same result
        print(result.summary())
    return 0


def add_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="zero-shot classify your images over your own labels",
                       description="Score every image of IMAGES (a folder, a CSV/TSV's image column, or shards) "
                                   "against your labels with a saved model; print the top labels and write a CSV.",
                       epilog=CLASSIFY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL_DIR", help="a run's model/ or a checkpoints/step_N/ directory")
    p.add_argument("images", metavar="IMAGES", help="a folder of images, a .csv/.tsv file, or .tar shards")
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--labels", metavar="A,B,...", help='the labels, comma-separated: "a cat,a dog"')
    given.add_argument("--labels-file", metavar="FILE", help="a file with one label a line")
    p.add_argument("--templates", metavar="FILE", help='prompt templates, one a line, each with "{}" for the label '
                                                       "(default: those of `threetowers eval`)")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="labels shown and written per image (default 5)")
    p.add_argument("--out", metavar="CSV", help="the CSV to write (default MODEL_DIR/../classify.csv)")
    p.add_argument("--image-column", default="image", metavar="NAME", help="the CSV's image column (default image)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="inputs a forward pass (default 256)")
    p.add_argument("--num-workers", type=int, default=0, metavar="N", help="processes decoding images (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default auto (a GPU if any)")
    p.set_defaults(func=cmd_classify)


def cmd_classify(args: argparse.Namespace) -> int:
    # Every input is checked before the model loads.
    check_model_dir(args.model)
    labels = parse_labels(args.labels, args.labels_file)
    templates = read_templates(args.templates)
    if args.top_k < 1:
        raise ValueError(f"--top-k {args.top_k}: must be at least 1")
    result = classify(args.model, args.images, labels, templates, image_column=args.image_column,
                      batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, progress=True)
    print(table(result, args.top_k))
    out = write_csv(result, args.out or default_csv(args.model), args.top_k)
    top1 = Counter(best[0][0] for best in result.top(1) if best)
    counts = ", ".join(f"{label} {n}" for label, n in top1.most_common())
    print(f"{sum(top1.values())} images classified (top-1: {counts})")
    if result.bad:
        n = len(result.bad)
        print(f"{n} {'image' if n == 1 else 'images'} could not be read (listed in the CSV's bad column), e.g. "
              + ", ".join(f"{key} ({why})" for key, why in list(result.bad.items())[:3]))
    print(f"wrote {out}")
    return 0
