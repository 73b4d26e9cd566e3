"""Evaluation tasks are data: names in `eval.tasks` -> sets, and one call that runs them all.

World tasks come from the embedded benchmark's held-out seeds; `zeroshot:FOLDER` and
`retrieval:CSV` bring a user's own labelled folder or captioned CSV through the same code.
The same `run_tasks` serves `threetowers eval`, the trainer's periodic hook and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import OmegaConf

from ..config import WORLD_TASKS, Config, fill_added_fields, load_config, override_layer
from ..core.sets import CaptionedSet, LabelledSet
from ..data.folders import class_folder
from ..data.csv_pairs import load_csv_arrays
from ..data.tokenizer import load_tokenizer
from ..model.factory import load_model, read_model_meta
from ..third.store import EvalFeatures
from ..world import World
from .benchmark import check_dataset_root, run_benchmark
from .fewshot import fewshot_eval
from .suite import encode_images, evaluate
from .zeroshot import DEFAULT_TEMPLATES


@dataclass
class FewShotTask:
    """Ridge probes on frozen image embeddings: one per (shots, seed) train set, all on one test set."""

    train: dict[tuple[int, int], LabelledSet]
    test: LabelledSet


Task = LabelledSet | CaptionedSet | FewShotTask


def build_tasks(cfg: Config, names: list[str] | None = None) -> dict[str, Task]:
    names = list(cfg.eval.tasks if names is None else names)
    e = cfg.eval
    tasks: dict[str, Task] = {}
    world = None
    for name in names:
        if name in WORLD_TASKS:
            if world is None:
                world = World(cfg.data.world, progress=False)
            kind = name.split("_", 1)[-1]
            if name.startswith("zeroshot"):
                tasks[name] = world.zeroshot(kind, e.num_images)
            elif name == "retrieval":
                tasks[name] = world.retrieval(e.retrieval_images, e.captions_per_image)
            else:
                tasks[name] = FewShotTask({(s, seed): world.fewshot_train(kind, s, seed)
                                           for s in e.fewshot_shots for seed in e.fewshot_seeds},
                                          world.fewshot_test(kind, e.num_images))
        elif name.startswith("zeroshot:"):
            tasks[name] = folder_task(name.split(":", 1)[1], cfg.model.image.image_size, e.num_images)
        elif name.startswith("retrieval:"):
            tasks[name] = csv_task(cfg, name.split(":", 1)[1])
        else:
            raise ValueError(f"eval.tasks: unknown task {name!r}; choose from {', '.join(WORLD_TASKS)}, "
                             "zeroshot:FOLDER, retrieval:CSV")
    return tasks


def folder_task(root: str, image_size: int, max_images: int) -> LabelledSet:
    """Zero-shot classification over a folder with one subfolder per class (names = subfolder names)."""
    data = class_folder(root, image_size, max_images, seed=0, what=f"eval task zeroshot:{root}")
    return LabelledSet(data.images, data.labels, [c.replace("_", " ") for c in data.class_names],
                       list(DEFAULT_TEMPLATES))


def csv_task(cfg: Config, path: str) -> CaptionedSet:
    """Retrieval over a captioned CSV; rows sharing an image path are that image's several captions."""
    data_cfg = replace(cfg.data, source="csv", path=path, augment=False)
    images, captions, keys, _, _ = load_csv_arrays(data_cfg, cfg.model.image.image_size, progress=False)
    first: dict[str, int] = {}  # image path (the row's key) -> index of its image
    owner, kept = [], []
    for i, key in enumerate(keys):
        if key not in first:
            first[key] = len(kept)
            kept.append(i)
        owner.append(first[key])
    return CaptionedSet(images[kept], list(captions), np.array(owner, dtype=np.int64))


def run_tasks(model: Any, tokenizer: Callable, tasks: dict[str, Task], batch_size: int = 256,
              mixing_alphas: list[float] | None = None, third_features: EvalFeatures | None = None) -> dict[str, float]:
    """All metrics as {task/metric: value}; mixing (3T models only) as {task/mix@a/metric: value}.

    `third_features`: h's features of the sets, shared by every call given the same store (a frozen
    h gives the same features for the same set in every model); default: a store for this call."""
    third_features = third_features or EvalFeatures()
    plain = {n: t for n, t in tasks.items() if not isinstance(t, FewShotTask)}
    results = evaluate(model, tokenizer, plain, batch_size, mixing_alphas, third_features=third_features) if plain else {}
    for name, task in tasks.items():
        if isinstance(task, FewShotTask):
            shots, seeds = sorted({k for k, _ in task.train}), sorted({s for _, s in task.train})
            scores = fewshot_eval(lambda images: encode_images(model, images, batch_size, third_features),  # test set once
                                  lambda k, seed, task=task: (task.train[k, seed], task.test), shots, seeds)
            results.update({f"{name}/{k}shot": scores[f"{k}shot/mean"] for k in shots})
    return results


def trainer_hook(cfg: Config, tokenizer: Callable, third: Any = None) -> Callable[[Any, int], dict] | None:
    """The trainer's periodic evaluation: `eval.tasks` with the run's tokenizer (None without tasks).
    `third`: the h's (one, or a list in model.thirds order), for a model trained on cached embeddings that holds none."""
    names = [n for n in cfg.eval.tasks if cfg.data.source == "world" or n not in WORLD_TASKS]
    if not names:
        return None  # world tasks only make sense for models trained on the world
    state: dict[str, Any] = {}
    third_features = EvalFeatures(third)  # h is frozen: its features of the sets serve every evaluation of the run

    def hook(model: Any, step: int) -> dict:
        if not state:
            state["tasks"] = build_tasks(cfg, names)  # rendered once, on the first call
        return run_tasks(model, tokenizer, state["tasks"], cfg.eval.batch_size, cfg.eval.mixing_alphas, third_features)

    return hook


def evaluate_saved(model_dir: str | Path, tasks: list[str] | None = None,
                   overrides: list[str] | None = None) -> dict[str, float]:
    """Evaluate a saved model (a run's model/ or a checkpoint directory) on `tasks` (default: its
    eval.tasks), with `eval.*` overrides; the Python twin of `threetowers eval`."""
    cfg, model, tokenizer = load_saved(model_dir, overrides)
    return run_tasks(model, tokenizer, build_tasks(cfg, tasks), cfg.eval.batch_size, cfg.eval.mixing_alphas)


def benchmark_saved(model_dir: str | Path, name: str, root: str | Path, amp: bool = False,
                    overrides: list[str] | None = None) -> dict[str, float]:
    """A saved model on a dataset CLIP_benchmark builds (`threetowers eval MODEL --benchmark NAME`)."""
    check_dataset_root(name, root)  # before loading anything
    cfg, model, tokenizer = load_saved(model_dir, overrides, mixing=False)
    return run_benchmark(model, tokenizer, name, root, cfg.model.image.image_size, cfg.eval.batch_size, amp)


def load_saved(model_dir: str | Path, overrides: list[str] | None = None, mixing: bool = True):
    """(config with `eval.*` overrides, model, tokenizer) of a saved model, h loaded where needed."""
    directory = Path(model_dir)
    meta = read_model_meta(directory)
    base = fill_added_fields(meta["config"])
    if overrides:
        base = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(base), override_layer(overrides)))
    cfg = load_config(None, base=base)  # a saved config: its architecture is in its fields
    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.exists():
        raise FileNotFoundError(f"{directory} has no tokenizer.json; the model cannot encode text without it")
    # h is needed for LiT (it is the image side) and for the 3T mixing sweep.
    with_third = cfg.model.method == "lit" or (mixing and cfg.model.method == "3t" and bool(cfg.eval.mixing_alphas))
    model = load_model(directory, with_third=with_third)
    return cfg, model, load_tokenizer(tokenizer_path, cfg.model.text)
