"""Standard benchmarks through LAION's CLIP_benchmark: its datasets, class names, templates and metrics.

`pip install "threetowers[benchmark]"` installs clip-benchmark (an optional dependency, imported
only here). What is ours is the adapter: our model's `encode_image` (images in [0, 1], so the
transform is resize, center crop and `ToTensor`, without normalisation: our towers and h normalise
their own input) and `encode_text` behind CLIP_benchmark's model interface, and our tokenizer.

Known pitfalls of clip-benchmark 1.6.2, and what is done about each:
- `clip_benchmark.datasets.builder` imports `requests` at the top: the extra declares it.
- Its `zeroshot_classification.accuracy` calls `float()` on a one-element array, which NumPy 2.4
  refuses (TypeError). Zero-shot classification therefore uses the library's own classifier
  (`zero_shot_classifier`) and logits (`run_classification`) and computes top-1 / top-5 and
  mean-per-class recall from those logits with `eval/zeroshot.py` (equal to CLIP_benchmark's
  metric functions to 0.00 points on the world's sets, `tests/test_eval_metrics.py`).
- Its command line runs bf16 autocast on the CPU by default, which moves R@1 by up to 0.6 points:
  here `amp` is off unless asked for, and the precision is part of every result's key.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from ..core.sets import CaptionedSet, LabelledSet
from ..core.tar_layouts import write_classification_set, write_retrieval_set
from .zeroshot import zeroshot_accuracy


class MissingBenchmarkError(ImportError, ValueError):
    """clip-benchmark is not installed (a ValueError too, so the command line says it in one line)."""


def _clip_benchmark():
    try:
        from clip_benchmark.datasets import builder
        from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
    except ImportError as err:
        raise MissingBenchmarkError(f"--benchmark needs clip-benchmark ({err.name} is missing): "
                                    "pip install 'threetowers[benchmark]'") from None
    return builder, zeroshot_classification, zeroshot_retrieval


def check_dataset_root(name: str, root: str | Path, split: str = "test") -> None:
    """A `wds/...` dataset root must hold what CLIP_benchmark reads; say which file is missing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--dataset-root {root} is not a folder")
    if name.startswith("wds/"):
        needed = [root / split / "nshards.txt"]
        kind = (root / "dataset_type.txt").read_text().strip() if (root / "dataset_type.txt").is_file() else ""
        if kind != "retrieval":
            needed += [root / "classnames.txt", root / "zeroshot_classification_templates.txt"]
        missing = [str(p) for p in needed if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{name} in {root}: {', '.join(missing)} missing (CLIP_benchmark's webdataset "
                                    "layout: <root>/<split>/nshards.txt and 0.tar ..., classnames.txt, "
                                    "zeroshot_classification_templates.txt)")


def run_benchmark(model: Any, tokenizer: Callable, name: str, root: str | Path, image_size: int,
                  batch_size: int = 64, amp: bool = False, split: str = "test") -> dict[str, float]:
    """Zero-shot classification or retrieval on a dataset CLIP_benchmark builds (`wds/<name>`,
    `cifar10`, ...), as {benchmark/<name>/<precision>/<metric>: value}."""
    builder, classification, retrieval = _clip_benchmark()
    check_dataset_root(name, root, split)
    # On the PIL image, as open_clip's transform does (so an exported model scores the same there).
    transform = v2.Compose([v2.Resize(image_size, v2.InterpolationMode.BILINEAR, antialias=True),
                            v2.CenterCrop(image_size), v2.ToImage(), v2.RGB(), v2.ToDtype(torch.float32, scale=True)])
    task = builder.get_dataset_default_task(name) if not name.startswith("wds/") else (
        "zeroshot_retrieval" if wds_set_kind(root) == "retrieval" else "zeroshot_classification")
    dataset = builder.build_dataset(name, root=str(root), transform=transform, split=split, download=False, task=task)
    device = str(next(model.parameters()).device) if isinstance(model, torch.nn.Module) else "cpu"
    if name.startswith("wds/"):  # batched by webdataset, as CLIP_benchmark's command line does: a
        # retrieval sample's captions stay one list per image (torch's default_collate would transpose them)
        loader = DataLoader(dataset.batched(batch_size), batch_size=None)
    else:
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=builder.get_dataset_collate_fn(name))
    model.eval()
    if task == "zeroshot_retrieval":
        # R@k for k up to the gallery's size (CLIP_benchmark fails on a larger k)
        ks = [k for k in (1, 5, 10) if not name.startswith("wds/") or k <= count_wds(root, split)]
        scores = retrieval.evaluate(model, loader, tokenizer, device, amp=amp, recall_k_list=ks)
    else:
        classes = [c.replace("_", " ") for c in dataset.classes]
        classifier = classification.zero_shot_classifier(model, tokenizer, classes, dataset.templates, device, amp)
        logits, target = classification.run_classification(model, classifier, loader, device, amp)
        # The library's logits are 100 x cosine: rank by them with our metric (see the module docstring).
        scores = zeroshot_accuracy(logits.float() / 100.0, torch.eye(len(classes)), target.numpy(), ks=(1, 5))
    precision = "bf16" if amp else "fp32"
    return {f"benchmark/{name}/{precision}/{k}": float(v) for k, v in scores.items()}


def png_bytes(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def write_wds_classification(root: str | Path, data: LabelledSet, split: str = "test") -> Path:
    """A labelled set in CLIP_benchmark's webdataset layout (PNG + .cls members, `classnames.txt`,
    `zeroshot_classification_templates.txt` with `{c}`), e.g. to score an exported model with
    CLIP_benchmark's own command line on the same images as `threetowers eval --benchmark`."""
    samples = [{"__key__": f"{i:07d}", "png": png_bytes(image), "cls": str(int(label)).encode()}
               for i, (image, label) in enumerate(zip(data.images, data.labels))]
    return write_classification_set(Path(root), {split: samples}, list(data.class_names),
                                    [t.replace("{}", "{c}") for t in data.templates])


def write_wds_retrieval(root: str | Path, data: CaptionedSet) -> Path:
    """A captioned set in CLIP_benchmark's webdataset retrieval layout (PNG + .txt members, an
    image's captions one a line; `dataset_type.txt` = retrieval)."""
    captions: list[list[str]] = [[] for _ in range(len(data.images))]
    for caption, owner in zip(data.captions, data.image_of_text):
        captions[int(owner)].append(" ".join(caption.split()))  # one line each
    return write_retrieval_set(Path(root), [{"__key__": f"{i:07d}", "png": png_bytes(image),
                                             "txt": "\n".join(texts).encode("utf-8")}
                                            for i, (image, texts) in enumerate(zip(data.images, captions))])


def wds_set_kind(root: str | Path) -> str:
    """"retrieval" or "classification": what CLIP_benchmark makes of the `wds/` set at `root`."""
    kind = Path(root) / "dataset_type.txt"
    return "retrieval" if kind.is_file() and kind.read_text().strip().lower() == "retrieval" else "classification"


def _wds_samples(root: Path, split: str):
    nshards = int((root / split / "nshards.txt").read_text())
    return wds.WebDataset([str(root / split / f"{i}.tar") for i in range(nshards)], shardshuffle=False,
                          empty_check=False)


def count_wds(root: str | Path, split: str = "test") -> int:
    """The number of samples of one split of a `wds/` set (its tar headers only, no decoding)."""
    check_dataset_root("wds/set", root, split)
    return sum(1 for _ in _wds_samples(Path(root), split))


def read_wds_classification(root: str | Path, split: str, image_size: int) -> LabelledSet:
    """One split of a `wds/` zero-shot set as arrays (images resized, short side, and centre-cropped
    to `image_size`, as `run_benchmark` feeds them): the twin of `write_wds_classification`, for
    computing on the very images CLIP_benchmark scores (e.g. a linear probe on h's features)."""
    root = Path(root)
    check_dataset_root("wds/set", root, split)
    transform = v2.Compose([v2.Resize(image_size, v2.InterpolationMode.BILINEAR, antialias=True),
                            v2.CenterCrop(image_size)])
    images, labels = [], []
    for sample in _wds_samples(root, split).decode("pil"):
        image = next(sample[k] for k in ("webp", "png", "jpg", "jpeg") if k in sample)
        images.append(np.asarray(transform(image.convert("RGB"))))
        labels.append(int(sample["cls"]))
    names = [line.strip() for line in (root / "classnames.txt").read_text().splitlines() if line.strip()]
    templates = [t.strip().replace("{c}", "{}") for t in
                 (root / "zeroshot_classification_templates.txt").read_text().splitlines() if t.strip()]
    return LabelledSet(np.stack(images), np.asarray(labels, dtype=np.int64), names, templates)
