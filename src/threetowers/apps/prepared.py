"""The demo's second ground: a benchmark prepared on disk (`threetowers prepare clipart OUT_DIR`).

The world is drawn by this project; a prepared benchmark is real human-made images with
human-written captions. Its runs take the path users take: training pairs from indexed webdataset
shards in img2dataset layout (h's embeddings cached per shard), and every score from CLIP_benchmark
on the `wds/` sets beside them (`eval.benchmark.run_benchmark`). This module says what the demo
needs from such a folder: the runs' data settings, the evaluation, chance levels, the metrics the
claims average over, and each h's ceilings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import ConfigError
from ..schema import Config
from ..eval.benchmark import count_wds, read_wds_classification, run_benchmark, wds_set_kind
from ..eval.fewshot import linear_probe
from ..third.store import EvalFeatures
from .claims import Metrics

# CLIP_benchmark's retrieval metric names -> ours (its "text retrieval" ranks captions for an image).
RETRIEVAL_NAMES = {"text_retrieval_recall@1": "i2t_R@1", "image_retrieval_recall@1": "t2i_R@1",
                   "text_retrieval_recall@5": "i2t_R@5", "image_retrieval_recall@5": "t2i_R@5"}
CLASSIFICATION_NAMES = {"top1": "top1", "top5": "top5", "mean_per_class_recall": "mean_per_class_recall"}

CEILING_NOTE = ("Protocol: multinomial logistic regression on h's standardised pre-logits, trained on every image of "
                "the zero-shot set's `train/` split and tested on its `test/` split, the images every model is scored on "
                "(emoji: Google-style training images, Twitter-style test images; clipart: the training split's "
                "images of the classes and the held-out split's). LiT and 3T: their zero-shot top-1 (mean over "
                "seeds) with that h; – where the set is not reported (below the calibration bar, CLIP < 5x chance).")


@dataclass
class PreparedBenchmark:
    root: Path
    manifest: dict
    sets: dict[str, str]  # the reported sets: name -> "retrieval" | "classification"
    available: dict[str, str]  # every set in wds/ (h's ceilings are measured on all zero-shot ones)
    # Zero-shot sets read as arrays, one object per (set, split, size) for every h (EvalFeatures
    # keys a set by its array's identity, so each h's features of it are computed once).
    _read: dict = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, root: str | Path, names: list[str] | None = None) -> "PreparedBenchmark":
        """The benchmark at `root`, with the `wds/` sets `names` (default: all of them), checked
        before any work."""
        root = Path(root)
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise ConfigError(f"benchmark={root}: no manifest.json there; build the benchmark first with "
                              f"`threetowers prepare clipart {root}` (see its --help for the packages it needs)")
        manifest = json.loads(manifest_path.read_text())
        found = sorted(p.name for p in (root / "wds").iterdir() if p.is_dir()) if (root / "wds").is_dir() else []
        unknown = [n for n in names or [] if n not in found]
        if unknown or not found:
            raise ConfigError(f"benchmark_tasks: {unknown or 'none'} not among the sets in {root / 'wds'} "
                              f"({', '.join(found) or 'none'})")
        available = {n: wds_set_kind(root / "wds" / n) for n in found}
        return cls(root, manifest, {n: available[n] for n in (names or found)}, available)

    def run_overrides(self) -> list[str]:
        """What every run of the demo trains on: the benchmark's training shards, indexed."""
        return ["data.source=webdataset", f"data.path={self.root / self.manifest['train_shards']}",
                "data.shard_access=indexed"]

    def evaluate(self, model: Any, tokenizer: Callable, image_size: int, batch_size: int) -> dict[str, float]:
        """Every set through CLIP_benchmark (fp32), as {set/metric: value}: top1, ... for zero-shot
        sets, i2t_R@k and t2i_R@k for retrieval sets."""
        found = {}
        for name, kind in self.sets.items():
            scores = run_benchmark(model, tokenizer, f"wds/{name}", self.root / "wds" / name, image_size, batch_size)
            names = RETRIEVAL_NAMES if kind == "retrieval" else CLASSIFICATION_NAMES
            for key, value in scores.items():
                metric = key.rsplit("/", 1)[1]
                if metric in names:
                    found[f"{name}/{names[metric]}"] = value
        return found

    def metrics(self) -> Metrics:
        """The retrieval and classification metrics the claims average over: every reported set's."""
        return Metrics(retrieval=tuple(f"{n}/{d}_R@1" for n, k in self.sets.items() if k == "retrieval"
                                       for d in ("i2t", "t2i")),
                       classification=tuple(f"{n}/top1" for n, k in self.sets.items() if k == "classification"))

    def chance(self) -> dict[str, float]:
        """Each headline metric's value for a model that guesses: 1 / classes, 1 / test images."""
        chance = {}
        for name, kind in self.sets.items():
            root = self.root / "wds" / name
            if kind == "retrieval":
                n = count_wds(root)
                chance.update({f"{name}/{d}_R@1": 1 / n for d in ("i2t", "t2i")})
            else:
                classes = [c for c in (root / "classnames.txt").read_text().splitlines() if c.strip()]
                chance[f"{name}/top1"] = 1 / len(classes)
        return chance

    def ceilings(self, third, store: EvalFeatures, image_size: int, batch_size: int) -> dict[str, float]:
        """h's linear-probe accuracy on each zero-shot set, reported or not (`CEILING_NOTE` states
        the protocol): what h's features hold of the categories even where the models are not scored."""
        found = {}
        for name, kind in self.available.items():
            if kind != "classification":
                continue
            train, test = (self._labelled(name, split, image_size) for split in ("train", "test"))
            found[name] = linear_probe(store.features(third, train.images, batch_size), train.labels,
                                       store.features(third, test.images, batch_size), test.labels)
        return found

    def _labelled(self, name: str, split: str, image_size: int):
        key = (name, split, image_size)
        if key not in self._read:
            self._read[key] = read_wds_classification(self.root / "wds" / name, split, image_size)
        return self._read[key]


class BenchmarkScoring:
    """A model's scores on a prepared benchmark's sets, through CLIP_benchmark (reopened in a worker process)."""

    def __init__(self, bench: PreparedBenchmark):
        self.bench = bench

    def __getstate__(self) -> dict:
        return {"root": self.bench.root, "names": list(self.bench.sets)}

    def __setstate__(self, state: dict) -> None:
        self.bench = PreparedBenchmark.open(state["root"], state["names"])

    def __call__(self, model, tokenizer, cfg: Config) -> tuple[dict, dict]:
        return self.bench.evaluate(model, tokenizer, cfg.model.image.image_size, cfg.eval.batch_size), {}
