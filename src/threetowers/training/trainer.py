"""The trainer: one step-based loop for any `Job` whose model's `forward(batch)` returns a dict with "loss".

The jobs are `training/contrastive.py` (CLIP, LiT and 3T: the same `ThreeTowers` model, configured)
and `training/pretrain.py` (a classifier that later serves as h); both run through `run`, which reads
top to bottom in phases: resume -> output directory -> the loop (micro-batches, update, logs, evals,
checkpoints) -> final model. `resume.py` owns whether a checkpoint fits and each rank's RNG on
resume; `nonfinite.py` owns the skip of non-finite steps (decided on the device) and its limits.
The step's metrics stay on the device; the host reads them only at log lines, evaluations and
checkpoints, so that a GPU never waits for the host in a step.

Gradient accumulation: each step's batch (this rank's share of `train.batch_size`) is split into
`train.grad_accum` micro-batches, and each micro-batch is a contrastive batch of its own: its
negatives are the other rows of that micro-batch on all ranks (batch_size / grad_accum rows), not
the whole step's batch. Gradients are summed over the micro-batches before the one update. This is
the usual trade (open_clip's default): accumulation saves memory but does not add negatives.

Exact resume: the data are a pure function of (seed, step, rank), so a checkpoint stores the step
and the loader does the rest; weights, optimizer, schedule, the EMA of the weights (`ema.py`, with
train.ema_decay > 0) and every rank's RNG states are restored bit for bit. On CPU a killed and
resumed run ends with the same weights (and EMA) as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import to_dict, to_yaml
from ..core.atomic import write_text_atomic
from ..core.distributed import (
    DistInfo, all_mean, barrier, gather_objects, on_main, unwrap, wrap_model,
)
from ..schema import Config
from ..towers.build import set_grad_checkpointing
from .checkpoint import (
    TRAIN_STATE, atomic_directory, check_writable, find_resume, list_checkpoints,
    load_train_state, rng_state, save_checkpoint, set_aside, set_rng_state,
)
from .ema import WeightsEMA
from .nonfinite import NonFiniteSteps, TrainingStopped
from .resume import check_resumable, report_on_main, restore_rng, seed_everything
from .flops import train_flops_per_pair, utilisation
from .logging import RunLogger, read_metrics
from .optim import build_optimizer, build_scheduler

Evaluate = Callable[[nn.Module, int], dict]


class EvaluationFailed(RuntimeError):
    """Training finished and the model was saved, but an evaluation raised."""


class TrainData(Protocol):
    """What the loop reads: one batch per step from any step on, and the bad samples counted so far."""

    def batches(self, start_step: int) -> Iterator[dict]: ...

    def bad_samples(self) -> dict[str, int]: ...


@dataclass
class Job:
    """What the loop trains, and how its weights are written to and read from a directory."""

    name: str
    model: nn.Module  # forward(batch) -> {"loss": scalar, other scalars to log, ...}
    data: TrainData
    save_model: Callable[[nn.Module, Path], None]
    load_weights: Callable[[nn.Module, Path], None]


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
    """Threads, seeds and numerics of this process for the run; threads and TF32 are restored after.

    CPU kernels are deterministic for a fixed thread count, which is what exact resume on CPU
    rests on (resume with the same train.threads). On CUDA, TF32 matmuls and non-deterministic
    kernels make a resumed run close to, not bit-identical with, an uninterrupted one.
    """
    threads = torch.get_num_threads()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        seed_everything(cfg.train.seed + info.rank)
        if info.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


# ----------------------------------------------------------------------------- one step


def split_batch(batch: dict, parts: int) -> list[dict]:
    """`parts` equal micro-batches along the first dimension (tensors and lists alike)."""
    if parts == 1:
        return [batch]
    rows = _rows(batch)
    size = rows // parts
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(parts)]


def _rows(batch: dict) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError(f"a training batch needs at least one tensor; got keys {sorted(batch)}")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def forward_backward(model: nn.Module, batch: dict, grad_accum: int, device: torch.device,
                     precision: str) -> dict[str, torch.Tensor]:
    """Forward and backward over the step's micro-batches; gradients accumulate in `.grad`.

    Returns the mean over micro-batches of every scalar the model reported (detached). Under DDP the
    gradients are all-reduced once, after the last micro-batch.
    """
    sums: dict[str, torch.Tensor] = {}
    micro = split_batch(batch, grad_accum)
    ddp = getattr(model, "_orig_mod", model)  # under torch.compile, the DDP module it wraps
    for i, part in enumerate(micro):
        part = _to_device(part, device)
        last = i == len(micro) - 1
        with ddp.no_sync() if isinstance(ddp, DistributedDataParallel) and not last else nullcontext():
            with autocast(device, precision):
                out = model(part)
            (out["loss"] / len(micro)).backward()
        for key, value in out.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                sums[key] = sums.get(key, 0.0) + value.detach().float().reshape(())
    return {k: v / len(micro) for k, v in sums.items()}


# ----------------------------------------------------------------------------- the loop


class _Window:
    """Running sums between two log lines, kept on the device: the host reads them once per log line."""

    def __init__(self):
        self.keys: list[str] = []
        self.sums: torch.Tensor | None = None  # the values of the applied steps, then their count
        self.steps = 0
        self.data_s = self.step_s = 0.0

    def add(self, keys: list[str], values: torch.Tensor, skipped: torch.Tensor, data_s: float, step_s: float) -> None:
        # A skipped step adds its timings but not its (non-finite) values.
        row = torch.cat([torch.where(skipped > 0, 0.0, values.float()), (1 - skipped).reshape(1)])
        self.keys = keys
        self.sums = row if self.sums is None else self.sums + row
        self.steps += 1
        self.data_s += data_s
        self.step_s += step_s

    def means(self) -> dict[str, float]:
        if self.sums is None:
            return {}
        *sums, counted = self.sums.tolist()
        return {k: v / counted for k, v in zip(self.keys, sums)} if counted else {}


def run(cfg: Config, job: Job, info: DistInfo, evaluate: Evaluate | None = None) -> TrainResult:
    """Train `job.model` on `job.data` for `cfg.train.steps` steps, resuming as `cfg.train.resume` says."""
    tc, out = cfg.train, Path(cfg.train.output_dir)
    report = report_on_main(info)
    model = job.model.to(info.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg.optim, info.device)
    scheduler = build_scheduler(optimizer, cfg.optim, tc.steps)
    ema = WeightsEMA(model, tc.ema_decay)  # does nothing with train.ema_decay=0

    # --- resume: rank 0 picks the checkpoint, every rank loads it (output_dir is shared storage)
    resume_from = on_main(info, lambda: _str_or_none(find_resume(out, tc.resume, report)))
    start, skipped, bad_before = 0, 0, {}
    if resume_from is not None:
        state = load_train_state(resume_from)
        check_resumable(state, cfg, info, report)
        job.load_weights(model, Path(resume_from))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, skipped = int(state["step"]), int(state.get("nonfinite_skipped", 0))
        restore_rng(state["rng"], info.rank, info.device, cfg.train.seed, start, report)
        ema.restore(Path(resume_from), start, report)
        # The bad samples counted before the checkpoint (totals over ranks), so that counts go on from there.
        bad_before = {str(k): int(v) for k, v in state.get("bad_samples", {}).items()} if info.is_main else {}
        report(f"resuming from {resume_from} at step {start}")

    n_train = sum(p.numel() for p in trainable)
    n_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)

    def prepare() -> None:
        for step, path in list_checkpoints(out):
            if step > start:  # a different timeline (resume=never, or an older checkpoint chosen)
                set_aside(path, "superseded", report)
        # Weights + two AdamW moments (+ the EMA) per checkpoint kept, one more being written, and the final model.
        per_ckpt = 3 * sum(p.numel() * p.element_size() for p in trainable) + ema.nbytes
        check_writable(out, need_bytes=per_ckpt * (tc.keep_checkpoints + 1) + per_ckpt // 3)
        write_text_atomic(out / "config.yaml", to_yaml(cfg))
        report(f"{job.name}: {cfg.model.method if job.name == 'train' else 'classifier'}, {tc.steps} steps, "
               f"batch {tc.batch_size} on {info.world_size} process(es), {info.device.type}, {tc.precision}; "
               f"{n_train / 1e6:.2f}M trainable, {n_frozen / 1e6:.2f}M frozen parameters -> {out}")
        if ema.on:
            report(ema.describe())

    on_main(info, prepare)
    if tc.grad_checkpointing:
        report(f"activation checkpointing in {set_grad_checkpointing(model)} blocks or timm towers")
    ddp = wrap_model(model, info)
    ddp.train()
    # torch.compile traces the model on its first call (minutes on a large model) and then runs fused
    # kernels; it wraps the DDP module, whose buckets it splits at graph breaks (DDPOptimizer).
    step_model = torch.compile(ddp) if tc.compile else ddp
    logger = RunLogger(out, enabled=info.is_main, total_steps=tc.steps, start_step=start, progress=tc.progress,
                       tensorboard=tc.tensorboard, desc=job.name)
    per_rank = tc.batch_size // info.world_size
    window, last_logged, last_eval = _Window(), {}, {}
    last_ckpt = resume_from

    def bad_counts() -> dict[str, int]:
        return _sum_counts([bad_before] + gather_objects(_bad_samples(job.data), info))

    def checkpoint(step: int) -> str:
        rngs = gather_objects(rng_state(info.device), info)  # every rank's RNG, restored per rank on resume
        bad = bad_counts()
        check_finite(step)

        def write(tmp: Path) -> None:
            job.save_model(model, tmp)
            ema.save(tmp)
            state = {"step": step, "world_size": info.world_size, "job": job.name,
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs,
                     "nonfinite_skipped": skipped, "bad_samples": bad, "config": to_dict(cfg)}
            torch.save(state, tmp / TRAIN_STATE)
            (tmp / "config.yaml").write_text(to_yaml(cfg))

        return on_main(info, lambda: str(save_checkpoint(out, step, write, tc.keep_checkpoints)))

    def check_finite(step: int) -> None:
        # Nothing non-finite is ever written. Checked here rather than after every update (hundreds of
        # small kernels and a host sync per step); a bad update shows in the next step's loss anyway.
        if not _all_finite(trainable):
            raise TrainingStopped(
                f"the weights are non-finite at step {step} (an update overflowed; lr {scheduler.get_last_lr()[0]:.3g}); "
                f"stopped before writing anything from them. The last good checkpoint is "
                f"{last_ckpt or 'none (none was written yet)'}; resume from it with a lower optim.lr")

    after_update = getattr(model, "after_update", lambda: None)  # e.g. keeps the temperatures in range

    def update() -> None:
        optimizer.step()
        after_update()

    def evaluate_model(step: int) -> dict[str, Any]:  # rank 0; the EMA when on (the model that model/ will hold)
        with ema.swapped_in():
            return _evaluate(evaluate, unwrap(ddp), step)

    nonfinite = NonFiniteSteps(optimizer, tc, skipped, info.device)
    batches: Iterator[dict] = iter(job.data.batches(start))
    flops_per_pair: float | None = None
    eval_error: Exception | None = None
    try:
        for step in range(start, tc.steps):
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(f"the training data ended before step {step + 1}; batches(start_step) must yield "
                                   "one batch per step, without end") from None
            t_data = time.perf_counter() - t0
            if _rows(batch) != per_rank:
                raise ValueError(f"the data gave {_rows(batch)} rows at step {step + 1}; expected train.batch_size / "
                                 f"world size = {per_rank}")
            if flops_per_pair is None:  # counted once, on 8 rows of the first batch
                flops_per_pair = train_flops_per_pair(model, batch, info.device)
            stats = forward_backward(step_model, batch, tc.grad_accum, info.device, tc.precision)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.optim.grad_clip or math.inf)
            keys = [f"train/{k}" for k in sorted(stats)] + ["train/grad_norm"]
            values = all_mean(torch.stack([stats[k] for k in sorted(stats)] + [grad_norm.float().reshape(())]), info)
            lr = scheduler.get_last_lr()[0]
            done = step + 1
            skipped_now = nonfinite.apply(keys, values, done, update)  # decided on the device
            # Not inside update(): fused AdamW runs update() on a skipped step too (found_inf), so the EMA
            # takes the device flag and leaves itself unchanged on such a step.
            ema.update(skipped_now)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            t_step = time.perf_counter() - t0
            window.add(keys, values, skipped_now, t_data, t_step)
            logger.step(done, tc.batch_size / max(t_step, 1e-9))

            log_now = done % tc.log_every == 0 or done == tc.steps
            eval_now = evaluate is not None and ((cfg.eval.every and done % cfg.eval.every == 0) or done == tc.steps)
            checkpoint_now = done % tc.checkpoint_every == 0 or done == tc.steps
            if log_now or eval_now or checkpoint_now:  # the host reads the step counts only here
                skipped = nonfinite.check(done, last_ckpt, logger.write)
            if log_now:
                bad = bad_counts()
                last_logged = {
                    **window.means(), "train/lr": lr, "train/samples_per_s": tc.batch_size * window.steps / window.step_s,
                    "time/data_s": window.data_s / window.steps, "time/step_s": window.step_s / window.steps,
                    "time/data_fraction": window.data_s / window.step_s, "train/nonfinite_skipped": skipped,
                    "perf/flops_per_pair": flops_per_pair,
                    **utilisation(flops_per_pair, per_rank * window.steps / window.step_s, tc.peak_flops),
                    **{f"data/bad/{k}": v for k, v in bad.items()},
                }
                logger.log(done, last_logged)
                window = _Window()
            if eval_now:
                try:
                    last_eval = on_main(info, lambda: evaluate_model(done))
                    logger.log(done, last_eval)
                except Exception as err:  # noqa: BLE001  (raised after the model is saved, below)
                    eval_error = err
                    logger.write(f"evaluation at step {done} failed ({type(err).__name__}: {err}); training goes on "
                                 "and the model is saved, then the run reports the failure")
            if checkpoint_now:
                last_ckpt = checkpoint(done)

        if start >= tc.steps and evaluate is not None:
            last_eval = on_main(info, lambda: evaluate_model(start))
        model_dir = out / "model"
        ema.copy_to_model()  # the final model is the EMA when on; the raw weights stay in the last checkpoint

        check_finite(max(start, tc.steps))

        def write_final() -> None:
            with atomic_directory(model_dir, {"step": max(start, tc.steps)}) as tmp:
                job.save_model(model, tmp)
                ema.mark(tmp)
            logger.write(f"{job.name} done: step {max(start, tc.steps)}, model in {model_dir}")

        on_main(info, write_final)
        barrier(info)  # every rank done before any rank tears the process group down
        if eval_error is not None:
            raise EvaluationFailed(f"the model was trained and saved in {model_dir}, but its evaluation failed: "
                                   f"{type(eval_error).__name__}: {eval_error}. Evaluate it again with "
                                   f"`threetowers eval {model_dir}`") from eval_error
    finally:
        logger.close()
    model.eval()
    curve = read_metrics(out) if info.is_main else []
    return TrainResult(out, model_dir, max(start, tc.steps), {**last_logged, **last_eval}, curve, model)


def _all_finite(params: list[torch.Tensor]) -> bool:
    with torch.no_grad():
        return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def _str_or_none(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _bad_samples(data: Any) -> dict[str, int]:
    fn = getattr(data, "bad_samples", None)
    return dict(fn()) if fn is not None else {}


def _sum_counts(dicts: list[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return total


def _evaluate(evaluate: Evaluate, model: nn.Module, step: int) -> dict[str, Any]:
    """Run the hook in eval mode, without gradients, without disturbing the training RNG streams."""
    saved = rng_state()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            results = evaluate(model, step) or {}
    finally:
        model.train(was_training)
        set_rng_state(saved)
    out = {}
    for key, value in results.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        out[key if key.startswith("eval/") else f"eval/{key}"] = value
    return out


__all__ = ["run", "runtime", "Job", "TrainData", "TrainResult", "TrainingStopped", "EvaluationFailed", "forward_backward"]
