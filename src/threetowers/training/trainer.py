"""The trainer: one step-based loop for any `Job` whose model's `forward(batch)` returns a dict with "loss".

The jobs are `training/contrastive.py` (CLIP, LiT and 3T: the same `ThreeTowers` model, configured)
and `training/pretrain.py` (a classifier that later serves as h); both run through `run`, which reads
top to bottom in phases: set-up -> resume -> prepare -> per step: the step, the stop decision
(non-finite, signal, time, end), log, evaluate, checkpoint, stop -> the final model. The phases are
`loop.Loop`'s methods; `step.py` holds the step's forward and backward (micro-batches, autocast);
`resume.py` owns whether a checkpoint fits and each rank's RNG on resume; `nonfinite.py` the skip of
non-finite steps (decided on the device) and its limits; `stopping.py` the ranks' agreement on a stop
signal and on rank 0's clock. The step's metrics stay on the device; the host reads them only at log
lines, evaluations and checkpoints, so that a GPU never waits for the host in a step.

Exact resume: the data are a pure function of (seed, step, rank), so a checkpoint stores the step
and the loader does the rest; weights, optimizer, schedule, the EMA of the weights (`ema.py`, with
train.ema_decay > 0) and every rank's RNG states are restored bit for bit. On CPU a killed and
resumed run ends with the same weights (and EMA) as an uninterrupted one.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..core.distributed import DistInfo
from ..core.preemption import STOP_FILE, stop_on_signals
from ..schema import Config
from .logging import read_metrics
from .job import Job, TrainData
from .loop import EvaluationFailed, Evaluate, Loop
from .nonfinite import TrainingStopped
from .optim import build_optimizer, build_scheduler
from .resume import seed_everything
from .step import forward_backward, split_batch


@dataclass
class TrainResult:
    """What a run returns. Also readable as a mapping: result["model"], result["eval/heldout_top1"]
    or result["heldout_top1"] (fields first, then metrics, then `eval/<key>`)."""

    output_dir: Path
    model_dir: Path  # the final model (load_model / load_classifier)
    step: int
    metrics: dict[str, Any]  # the last logged training metrics and the last evaluation
    curve: list[dict] = field(default_factory=list, repr=False)  # every logged record of the run (metrics.jsonl)
    model: nn.Module | None = field(default=None, repr=False)  # the final model (as in model_dir), on its device, eval mode
    tokenizer: Any = field(default=None, repr=False)
    data_seconds: float = 0.0  # time spent building the data (world, tokenizer, h's embedding cache)

    def __getitem__(self, key: str) -> Any:
        if key in self.__dataclass_fields__:
            return getattr(self, key)
        for name in (key, f"eval/{key}"):
            if name in self.metrics:
                return self.metrics[name]
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


# ----------------------------------------------------------------------------- setup


@contextmanager
def runtime(cfg: Config, info: DistInfo) -> Iterator[None]:
    """Threads, seeds, numerics and stop signals of this process for the run (its data preparation and
    its training); threads, TF32 and the signals' handlers are restored after.

    CPU kernels are deterministic for a fixed thread count, which is what exact resume on CPU
    rests on (resume with the same train.threads). On CUDA, TF32 matmuls and non-deterministic
    kernels make a resumed run close to, not bit-identical with, an uninterrupted one.

    `train.stop_signals` stop the run at its next stop point, with its state saved (core/preemption.py).
    """
    threads = torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    stop_file = Path(cfg.train.output_dir) / STOP_FILE if info.is_main and cfg.train.output_dir else None
    try:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.train.seed + info.rank)
        if info.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with stop_on_signals(cfg.train.stop_signals, stop_file):
            yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


# ----------------------------------------------------------------------------- the run


def run(cfg: Config, job: Job, info: DistInfo, evaluate: Evaluate | None = None) -> TrainResult:
    """Train `job.model` on `job.data` for `cfg.train.steps` steps, resuming as `cfg.train.resume` says.
    The phases are `Loop`'s methods (loop.py), called here top to bottom."""
    model = job.model.to(info.device)
    optimizer = build_optimizer(model, cfg.optim, info.device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    loop = Loop(cfg, job, info, model, optimizer, scheduler, evaluate)
    loop.resume()  # the checkpoint train.resume picks, or step 0
    try:
        loop.prepare()  # output directory, DDP and compile, logger, batches (a stop signal so far stops here)
        for step in range(loop.start, cfg.train.steps):
            loop.step(step)  # forward, backward, the update (a non-finite one skipped on the device)
            done = step + 1
            now = loop.decide(done)  # the stop decision: non-finite, signal, time, end
            if now.log:
                loop.log(done)
            if now.evaluate:
                loop.evaluate(done)
            if now.checkpoint:
                loop.checkpoint(done)
            if now.stop:
                loop.stop(done)  # raises Preempted on every rank
        model_dir = loop.finish()  # the final model
    finally:
        loop.close()
    model.eval()
    curve = read_metrics(loop.out) if info.is_main else []
    return TrainResult(loop.out, model_dir, max(loop.start, cfg.train.steps), {**loop.last_logged, **loop.last_eval},
                       curve, model)


__all__ = ["run", "runtime", "Job", "TrainData", "TrainResult", "TrainingStopped", "EvaluationFailed",
           "forward_backward", "split_batch"]
