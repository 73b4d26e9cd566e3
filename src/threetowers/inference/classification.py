"""`threetowers classify`: zero-shot classification of one's own images over one's own labels.

Nothing here is a second zero-shot classifier: the class embeddings are the evaluation's
(`eval/zeroshot.class_embeddings` over the label's prompt templates, `DEFAULT_TEMPLATES` unless
given, the very templates of `threetowers eval zeroshot:FOLDER`), and the images are read and
embedded as `threetowers embed` reads them (`inference/parts.py`, the model's image tower in fp32).
So on a folder `root/<class>/...` labelled by its class names, the share of images whose top label
is their folder's class is `threetowers eval`'s `zeroshot:root/top1` (tested); a score is the
cosine similarity of the image's and the label's embeddings.
"""

from __future__ import annotations

import csv
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.atomic import atomic_path
from ..core.distributed import pick_device
from ..core.formats import saved_dir
from ..eval.tasks import load_saved
from ..eval.zeroshot import DEFAULT_TEMPLATES, class_embeddings
from .embedding import PartEmbeddings, check_options
from .parts import open_input
from .tower import TowerEmbedder, check_model_dir


@dataclass
class Classified:
    """Every row of the input, in order, with its score for every label."""

    keys: list[str]
    labels: list[str]
    scores: np.ndarray  # float32 [rows, labels]: cosine similarities; a bad row is zeros
    bad: dict[str, str]  # key -> why its image could not be used

    def top(self, k: int) -> list[list[tuple[str, float]]]:
        """Each row's k best labels with their scores, best first (empty for a bad row)."""
        k = min(k, len(self.labels))
        order = np.argsort(-self.scores, axis=1, kind="stable")[:, :k]
        return [[] if key in self.bad else [(self.labels[j], float(self.scores[i, j])) for j in order[i]]
                for i, key in enumerate(self.keys)]


def parse_labels(labels: str | None = None, labels_file: str | Path | None = None) -> list[str]:
    """Labels from "a cat,a dog" or from a file with one a line (blank lines skipped), checked."""
    if labels_file is None:
        return check_labels((labels or "").split(","), "--labels")
    path = Path(labels_file)
    if not path.is_file():
        raise FileNotFoundError(f"--labels-file {labels_file}: no such file (give one label a line)")
    return check_labels(path.read_text(encoding="utf-8-sig").splitlines(), f"--labels-file {labels_file}")


def check_labels(given: list[str], where: str = "labels") -> list[str]:
    """The labels stripped of spaces; refuses an empty list and duplicates, naming them."""
    names = [name.strip() for name in given if name.strip()]
    if not names:
        raise ValueError(f"{where} names no labels; give at least one, e.g. --labels \"a cat,a dog\"")
    repeated = [name for name, n in Counter(names).items() if n > 1]
    if repeated:
        raise ValueError(f"{where} names {', '.join(map(repr, repeated))} more than once; give each label once")
    return names


def read_templates(path: str | Path | None) -> list[str]:
    """Prompt templates from a file, one a line, each with "{}" (or CLIP_benchmark's "{c}") where the label
    goes; without a file, the evaluation's."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    if not Path(path).is_file():
        raise FileNotFoundError(f"--templates {path}: no such file (give one prompt template a line, "
                                "e.g. 'a photo of a {}.')")
    templates = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = line.strip().replace("{c}", "{}")  # CLIP_benchmark's template files write {c}
        if not line:
            continue
        if "{}" not in line:
            raise ValueError(f"--templates {path}: line {number} ({line!r}) has no '{{}}' where the label goes, "
                             "e.g. 'a photo of a {}.'")
        templates.append(line)
    if not templates:
        raise ValueError(f"--templates {path} holds no templates; give one a line, e.g. 'a photo of a {{}}.'")
    return templates


def classify(model_dir: str | Path, images: str | Path, labels: list[str], templates: list[str] | None = None, *,
             image_column: str = "image", batch_size: int = 256, num_workers: int = 0, device: str = "auto",
             progress: bool = False) -> Classified:
    """Score every image of `images` (a folder, a CSV/TSV's image column, or shards) against every
    label; the Python twin of `threetowers classify`. Everything is checked before the model loads."""
    directory, _ = check_model_dir(model_dir)
    labels = check_labels(list(labels))
    templates = list(DEFAULT_TEMPLATES) if templates is None else templates
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates {templates!r}: give at least one, each with '{{}}' where the label goes")
    check_options(device, batch_size, "float32")
    if not (directory / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{directory} has no tokenizer.json; the labels cannot be encoded without it")
    with tempfile.TemporaryDirectory(prefix="threetowers-classify-") as index_dir:  # shards' indexes
        _, parts = open_input(str(images), Path(index_dir), image_column=image_column)
        _, model, tokenizer = load_saved(directory, mixing=False)  # as `threetowers eval` loads it
        embedder = TowerEmbedder(directory, "image", "float32", False, pick_device(device), model)
        classes = class_embeddings(model.encode_text, lambda texts: tokenizer(texts).to(embedder.device), labels,
                                   templates, batch_size, progress).cpu()
        keys, scores, bad = [], [], {}
        for part in parts:
            _, rows, part_keys, _ = part.identify(lambda message: None)
            emb, part_bad = PartEmbeddings.compute(embedder, rows, part.batches(embedder, batch_size, num_workers),
                                                   part.where, "float32")
            part_scores = torch.from_numpy(emb) @ classes.T
            keys += part_keys
            scores.append(part_scores.numpy())
            bad.update({part_keys[row]: reason for row, reason in part_bad.items()})
    return Classified(keys, labels, np.concatenate(scores), bad)


def write_csv(result: Classified, path: str | Path, top_k: int) -> Path:
    """image, label_1, score_1, ..., label_k, score_k, bad (the reason, for an image that could not be used)."""
    k = min(top_k, len(result.labels))
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "score")] + ["bad"])
        for key, best in zip(result.keys, result.top(k)):
            cells = [cell for label, score in best for cell in (label, f"{score:.6f}")] or [""] * (2 * k)
            writer.writerow([key, *cells, result.bad.get(key, "")])
    return Path(path)


def default_csv(model_dir: str | Path) -> Path:
    """MODEL_DIR/../classify.csv: beside the run's model/, not inside it."""
    return saved_dir(model_dir).resolve().parent / "classify.csv"


def table(result: Classified, top_k: int, limit: int = 20) -> str:
    """The first `limit` rows as text: image, then its top labels with scores."""
    rows = list(zip(result.keys, result.top(top_k)))[:limit]
    width = max(len(key) for key, _ in rows)
    lines = [f"{key:<{width}}  " + ("  ".join(f"{label} {score:.3f}" for label, score in best)
                                    or f"(not classified: {result.bad[key]})") for key, best in rows]
    if len(result.keys) > limit:
        lines.append(f"... and {len(result.keys) - limit} more")
    return "\n".join(lines)
