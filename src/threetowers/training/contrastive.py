"""The contrastive job: CLIP, LiT and 3T (one `ThreeTowers` model, configured) through the trainer.

`train` checks that the output directory can be resumed, builds each h once on the rank's device
(`model/factory.build_thirds`), the data (with one embedding cache per h), the model and the periodic
evaluation, then hands a `Job` to `trainer.run`. A model trained on cached embeddings holds only the
h's identities while it trains (no copy of h on the accelerator); they are attached again to the model returned.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import check_eval_paths, resolve_config
from ..core.distributed import init_distributed, on_main, shutdown
from ..data.clip_bpe import open_clip_tokenizer
from ..data.loader import build_train_data, caches_third
from ..eval.tasks import trainer_hook
from ..model.factory import build_thirds, create_model, load_model_weights, save_model
from ..model.open_clip_init import check_init, init_from_open_clip
from ..schema import Config, third_sections
from ..third.tower import per_third
from .checkpoint import CheckpointError, check_writable, find_resume
from .resume import check_resume_early
from .trainer import Evaluate, Job, TrainData, TrainResult, run, runtime


def save_contrastive(model: nn.Module, directory: Path, tokenizer=None) -> None:
    """The public model format (model.safetensors + model.json) plus the tokenizer it was trained with."""
    save_model(model, directory)
    if tokenizer is not None:
        tokenizer.save(directory / "tokenizer.json")


def load_contrastive(model: nn.Module, directory: Path) -> None:
    """Weights of a saved ThreeTowers model into `model` (h is not stored; it must be the same h)."""
    try:
        load_model_weights(model, directory)
    except ValueError as err:
        raise CheckpointError(str(err)) from err


def check_init_early(cfg: Config) -> None:
    """model.init_from's tokenizer and weights fit the configured towers (its files read, no model built)."""
    open_clip_tokenizer(cfg.model)
    check_init(cfg)


def train(cfg_or_preset: Config | str | Path, overrides: list[str] | dict | None = None,
          evaluate: Evaluate | None = None, *, third: nn.Module | list[nn.Module] | None = None,
          data: TrainData | None = None) -> TrainResult:
    """Train CLIP, LiT or 3T as configured; the Python twin of `threetowers train`.

    `evaluate(model, step) -> {name: value}` runs on rank 0 every `eval.every` steps and at the end,
    on the unwrapped model in eval mode under no_grad; its results are logged as `eval/<name>`. The
    run's tokenizer is at `<output_dir>/tokenizer.json` before the first call. When the data is
    built from the config, the default is the suite over `eval.tasks`
    (threetowers.eval.tasks.trainer_hook); with your own `data`, pass `evaluate` yourself. `third`
    (a built h, or a list of them in model.thirds order) and `data` (anything with `batches(start_step)`,
    `bad_samples()` and `tokenizer`) replace the ones the config would build, for notebooks and tests.
    Under torchrun, call it on every rank.
    """
    cfg = resolve_config(cfg_or_preset, overrides)
    info = init_distributed(cfg.train.device, cfg.train.dist_timeout_minutes)
    try:
        with runtime(cfg, info):
            on_main(info, lambda: check_writable(cfg.train.output_dir))
            check_eval_paths(cfg.eval)
            check_resume_early(cfg, info)  # before any data or cache work: minutes, at scale
            # model.init_from starts a new run (a resumed one takes its checkpoint): checked before any data work.
            init = bool(cfg.model.init_from) and on_main(info, lambda: find_resume(
                Path(cfg.train.output_dir), cfg.train.resume, lambda msg: None) is None)
            if init:
                on_main(info, lambda: check_init_early(cfg))
            # The h's on the rank's device: their caches are built there (and online h's run there).
            thirds = [t.to(info.device) for t in per_third(third, len(third_sections(cfg.model)), "third")] \
                if third is not None else build_thirds(cfg, info.device)
            t0 = time.perf_counter()
            cached = False
            if data is None:
                data = build_train_data(cfg, info.rank, info.world_size, third=thirds)
                cached = caches_third(cfg, thirds)
                if cached:  # no step runs an h: keep them off the accelerator (evaluation borrows them)
                    thirds = [t.cpu() for t in thirds]
                evaluate = evaluate or trainer_hook(cfg, data.tokenizer, thirds)
            data_seconds = time.perf_counter() - t0
            tokenizer: Any = getattr(data, "tokenizer", None)
            if tokenizer is not None:
                cfg.model.text.vocab_size = tokenizer.vocab_size
                on_main(info, lambda: tokenizer.save(Path(cfg.train.output_dir) / "tokenizer.json"))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every run
                model = create_model(cfg, third=None if cached else thirds,
                                     third_info=[t.info() for t in thirds] if cached else None)
            if init:
                loaded = init_from_open_clip(model)
                what = "g's trunk" if cfg.model.method == "lit" else "f, g, their projections and the (f, g) temperature"
                if info.is_main:
                    print(f"model.init_from: {what} ({len(loaded)} tensors) from {cfg.model.init_from}", flush=True)
            model.loss.distribute(info.rank, info.world_size)  # the loss gathers over the ranks
            job = Job("train", model, data, partial(save_contrastive, tokenizer=tokenizer), load_contrastive)
            result = run(cfg, job, info, evaluate)
        if cached:  # the model handed back is whole: the h's on its device, as a model built with them would be
            result.model.attach_thirds([t.to(info.device) for t in thirds])
        result.tokenizer, result.data_seconds = tokenizer, data_seconds
        return result
    finally:
        shutdown(info)
