"""The training loop's phases: each a method of `Loop`, which holds the run's state between them.

`trainer.run` calls them top to bottom:

    resume -> prepare -> for each step: step -> decide -> log -> evaluate -> checkpoint -> stop
           -> finish

- `resume`: rank 0 picks the checkpoint (`checkpoint.find_resume`), every rank loads it: weights,
  optimizer, schedule, the EMA, its own RNG streams (`resume.py`), the counts so far.
- `prepare`: the output directory (rank 0), DDP and compile around the model, the logger, the
  batches from the start step. A stop signal received while the data were prepared stops the run
  here, before its first step.
- `step`: one optimizer step. The update is skipped on the device when the step's loss or gradient
  is non-finite (`nonfinite.py`); the metrics stay on the device, in the log window.
- `decide`: what follows the step (`Decision`): a log line, an evaluation, a checkpoint, a stop.
  The stop decision: non-finite steps (their policy is applied there, the only place the host reads
  the skip counts), a stop signal to any rank, rank 0's clock (`train.checkpoint_minutes`), the
  end. The ranks agree on the signal and the clock through the step's own all-reduce (`stopping.py`).
- `log`, `evaluate`, `checkpoint`: each reads the device once and writes on rank 0.
- `stop`: after the checkpoint, every rank raises `Preempted` (exit status 75 from the CLI).
- `finish`: the final model (the EMA when on), after the last step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..config import to_dict, to_yaml
from ..core.atomic import write_text_atomic
from ..core.distributed import DistInfo, all_mean, any_rank, barrier, gather_objects, on_main, unwrap, wrap_model
from ..core.preemption import preempted, stop_requested
from ..schema import Config
from ..towers.build import set_grad_checkpointing
from .checkpoint import (
    TRAIN_STATE, atomic_directory, check_writable, find_resume, list_checkpoints, load_train_state, rng_state,
    save_checkpoint, set_aside, set_rng_state,
)
from .ema import WeightsEMA
from .flops import train_flops_per_pair, utilisation
from .job import Job
from .logging import RunLogger
from .nonfinite import NonFiniteSteps, TrainingStopped
from .resume import check_resumable, report_on_main, restore_rng
from .step import batch_rows, forward_backward
from .stopping import StopFlags

Evaluate = Callable[[nn.Module, int], dict]


class EvaluationFailed(RuntimeError):
    """Training finished and the model was saved, but an evaluation raised."""


@dataclass
class Decision:
    """What follows a step."""

    log: bool = False
    evaluate: bool = False
    checkpoint: bool = False
    stop: bool = False  # after the checkpoint: a stop signal reached some rank


class Window:
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


class Loop:
    """One run of the loop: the model, its optimizer, schedule and EMA, and what the phases share."""

    def __init__(self, cfg: Config, job: Job, info: DistInfo, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler, evaluate: Evaluate | None):
        self.cfg, self.tc, self.job, self.info = cfg, cfg.train, job, info
        self.out = Path(cfg.train.output_dir)
        self.report = report_on_main(info)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.ema = WeightsEMA(model, cfg.train.ema_decay)  # does nothing with train.ema_decay=0
        self.evaluate_hook = evaluate
        self.after_update = getattr(model, "after_update", lambda: None)  # e.g. keeps the temperatures in range
        self.stops = StopFlags(cfg.train.checkpoint_minutes, info)  # a stop signal, and rank 0's clock from here
        # What the phases share, from resume on.
        self.start = 0  # the step the loop starts from (the checkpoint's)
        self.skipped = 0  # steps skipped for a non-finite loss or gradient, as last read by the host
        self.bad_before: dict[str, int] = {}  # bad samples counted before the checkpoint (rank 0: totals)
        self.last_ckpt: str | None = None
        self.last_logged: dict[str, Any] = {}
        self.last_eval: dict[str, Any] = {}
        self.eval_error: Exception | None = None  # raised after the final model is saved
        self.window = Window()
        self.flops_per_pair: float | None = None  # counted once, on 8 rows of the first batch
        self.lr = 0.0

    # ------------------------------------------------------------------------- resume

    def resume(self) -> None:
        """Rank 0 picks the checkpoint, every rank loads it (output_dir is shared storage)."""
        info, tc = self.info, self.tc
        found = on_main(info, lambda: _str_or_none(find_resume(self.out, tc.resume, self.report)))
        if found is None:
            return
        state = load_train_state(found)
        check_resumable(state, self.cfg, info, self.report)
        self.job.load_weights(self.model, Path(found))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.start, self.skipped = int(state["step"]), int(state.get("nonfinite_skipped", 0))
        restore_rng(state["rng"], info.rank, info.device, tc.seed, self.start, self.report)
        self.ema.restore(Path(found), self.start, self.report)
        # The bad samples counted before the checkpoint (totals over ranks), so that counts go on from there.
        self.bad_before = {str(k): int(v) for k, v in state.get("bad_samples", {}).items()} if info.is_main else {}
        self.last_ckpt = found
        self.report(f"resuming from {found} at step {self.start}")

    # ------------------------------------------------------------------------- prepare

    def prepare(self) -> None:
        """The output directory (rank 0), the model's wrappers, the logger and the batches from the start."""
        tc, info = self.tc, self.info
        on_main(info, self._prepare_output)
        if tc.grad_checkpointing:
            self.report(f"activation checkpointing in {set_grad_checkpointing(self.model)} blocks or timm towers")
        self.ddp = wrap_model(self.model, info)
        self.ddp.train()
        # torch.compile traces the model on its first call (minutes on a large model) and then runs fused
        # kernels; it wraps the DDP module, whose buckets it splits at graph breaks (DDPOptimizer).
        self.step_model = torch.compile(self.ddp) if tc.compile else self.ddp
        self.logger = RunLogger(self.out, enabled=info.is_main, total_steps=tc.steps, start_step=self.start,
                                progress=tc.progress, tensorboard=tc.tensorboard, desc=self.job.name)
        self.per_rank = tc.batch_size // info.world_size
        self.nonfinite = NonFiniteSteps(self.optimizer, tc, self.skipped, info.device)
        if any_rank(stop_requested() is not None):  # a signal while the data were prepared (their caches are kept)
            raise preempted(f"before step {self.start + 1}" + (f"; the last checkpoint is {self.last_ckpt}"
                                                                 if self.last_ckpt else ""))
        self.batches: Iterator[dict] = iter(self.job.data.batches(self.start))

    def _prepare_output(self) -> None:
        tc = self.tc
        for step, path in list_checkpoints(self.out):
            if step > self.start:  # a different timeline (resume=never, or an older checkpoint chosen)
                set_aside(path, "superseded", self.report)
        # Weights + two AdamW moments (+ the EMA) per checkpoint kept, one more being written, and the final model.
        per_ckpt = 3 * sum(p.numel() * p.element_size() for p in self.trainable) + self.ema.nbytes
        check_writable(self.out, need_bytes=per_ckpt * (tc.keep_checkpoints + 1) + per_ckpt // 3)
        write_text_atomic(self.out / "config.yaml", to_yaml(self.cfg))
        n_train = sum(p.numel() for p in self.trainable)
        n_frozen = sum(p.numel() for p in self.model.parameters() if not p.requires_grad)
        what = self.cfg.model.method if self.job.name == "train" else "classifier"
        self.report(f"{self.job.name}: {what}, {tc.steps} steps, batch {tc.batch_size} on {self.info.world_size} "
                    f"process(es), {self.info.device.type}, {tc.precision}; {n_train / 1e6:.2f}M trainable, "
                    f"{n_frozen / 1e6:.2f}M frozen parameters -> {self.out}")
        if self.ema.on:
            self.report(self.ema.describe())

    # ------------------------------------------------------------------------- the step

    def step(self, step: int) -> None:
        """Step `step` + 1: the batch, forward and backward, the update (skipped on the device when
        non-finite), the EMA and the schedule. Its metrics go to the log window, on the device."""
        tc, info = self.tc, self.info
        t0 = time.perf_counter()
        batch = self._next_batch(step)
        t_data = time.perf_counter() - t0
        if self.flops_per_pair is None:
            self.flops_per_pair = train_flops_per_pair(self.model, batch, info.device)
        stats = forward_backward(self.step_model, batch, tc.grad_accum, info.device, tc.precision)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.optim.grad_clip or math.inf)
        keys = [f"train/{k}" for k in sorted(stats)] + ["train/grad_norm"]
        # The stop flags ride along with the metrics: the ranks agree on them without a collective of their own.
        reduced = all_mean(torch.stack([stats[k] for k in sorted(stats)] + [grad_norm.float().reshape(())]
                                       + self.stops.local()), info)
        values = reduced[:len(keys)]
        self.stops.reduced(reduced[len(keys):])
        self.lr = self.scheduler.get_last_lr()[0]
        skipped_now = self.nonfinite.apply(keys, values, step + 1, self._update)  # decided on the device
        # Not inside _update(): fused AdamW runs it on a skipped step too (found_inf), so the EMA takes
        # the device flag and leaves itself unchanged on such a step.
        self.ema.update(skipped_now)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        t_step = time.perf_counter() - t0
        self.window.add(keys, values, skipped_now, t_data, t_step)
        self.logger.step(step + 1, tc.batch_size / max(t_step, 1e-9))

    def _next_batch(self, step: int) -> dict:
        try:
            batch = next(self.batches)
        except StopIteration:
            raise RuntimeError(f"the training data ended before step {step + 1}; batches(start_step) must yield "
                               "one batch per step, without end") from None
        if batch_rows(batch) != self.per_rank:
            raise ValueError(f"the data gave {batch_rows(batch)} rows at step {step + 1}; expected "
                             f"train.batch_size / world size = {self.per_rank}")
        return batch

    def _update(self) -> None:
        self.optimizer.step()
        self.after_update()

    # ------------------------------------------------------------------------- the decision

    def decide(self, done: int) -> Decision:
        """What follows step `done`: a log line, an evaluation, a checkpoint, a stop. A stop signal to any
        rank (after the last step the run just ends): log, checkpoint and stop, without evaluating (the
        notice is short). Rank 0's clock: a checkpoint. The non-finite policy is applied here first (it
        may stop the run), since only here does the host read the skip counts."""
        tc, every = self.tc, self.cfg.eval.every
        last = done == tc.steps
        agreed = self.stops.agreed()  # the same on every rank
        stop = agreed.stop and not last
        now = Decision(log=done % tc.log_every == 0 or last or stop,
                       evaluate=self.evaluate_hook is not None and ((every and done % every == 0) or last) and not stop,
                       checkpoint=done % tc.checkpoint_every == 0 or last or stop or agreed.time_up,
                       stop=stop)
        if now.log or now.evaluate or now.checkpoint:
            self.skipped = self.nonfinite.check(done, self.last_ckpt, self.logger.write)
        return now

    # ------------------------------------------------------------------------- log, evaluate, checkpoint

    def log(self, done: int) -> None:
        """The log window's means and the run's counters: one line, one JSONL record, TensorBoard."""
        tc, window, per_pair = self.tc, self.window, self.flops_per_pair
        bad = self._bad_counts()
        self.last_logged = {
            **window.means(), "train/lr": self.lr, "train/samples_per_s": tc.batch_size * window.steps / window.step_s,
            "time/data_s": window.data_s / window.steps, "time/step_s": window.step_s / window.steps,
            "time/data_fraction": window.data_s / window.step_s, "train/nonfinite_skipped": self.skipped,
            "perf/flops_per_pair": per_pair,
            **utilisation(per_pair, self.per_rank * window.steps / window.step_s, tc.peak_flops),
            **{f"data/bad/{k}": v for k, v in bad.items()},
        }
        self.logger.log(done, self.last_logged)
        self.window = Window()

    def evaluate(self, done: int) -> None:
        """The evaluation hook on rank 0. A failure is logged and raised after the final model is saved."""
        try:
            self.last_eval = on_main(self.info, lambda: self._evaluate_model(done))
            self.logger.log(done, self.last_eval)
        except Exception as err:  # noqa: BLE001  (raised after the model is saved, in finish)
            self.eval_error = err
            self.logger.write(f"evaluation at step {done} failed ({type(err).__name__}: {err}); training goes on "
                              "and the model is saved, then the run reports the failure")

    def _evaluate_model(self, step: int) -> dict[str, Any]:  # rank 0; the EMA when on (the model model/ will hold)
        with self.ema.swapped_in():
            return _evaluate(self.evaluate_hook, unwrap(self.ddp), step)

    def checkpoint(self, done: int) -> None:
        """Checkpoint `done`, written atomically by rank 0 with every rank's RNG streams."""
        info, tc = self.info, self.tc
        rngs = gather_objects(rng_state(info.device), info)  # every rank's RNG, restored per rank on resume
        bad = self._bad_counts()
        self._check_finite(done)

        def write(tmp: Path) -> None:
            self.job.save_model(self.model, tmp)
            self.ema.save(tmp)
            state = {"step": done, "world_size": info.world_size, "job": self.job.name,
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rngs,
                     "nonfinite_skipped": self.skipped, "bad_samples": bad, "config": to_dict(self.cfg)}
            torch.save(state, tmp / TRAIN_STATE)
            (tmp / "config.yaml").write_text(to_yaml(self.cfg))

        self.last_ckpt = on_main(info, lambda: str(save_checkpoint(self.out, done, write, tc.keep_checkpoints)))
        self.stops.checkpointed()

    def stop(self, done: int) -> None:
        """After the checkpoint of step `done` every rank raises `Preempted` (the log is flushed: every
        record is, as it is written, and `run` closes the logger)."""
        raise preempted(f"after step {done}, with checkpoint {self.last_ckpt}")

    def _check_finite(self, step: int) -> None:
        # Nothing non-finite is ever written. Checked here rather than after every update (hundreds of
        # small kernels and a host sync per step); a bad update shows in the next step's loss anyway.
        if not _all_finite(self.trainable):
            raise TrainingStopped(
                f"the weights are non-finite at step {step} (an update overflowed; lr "
                f"{self.scheduler.get_last_lr()[0]:.3g}); stopped before writing anything from them. The last good "
                f"checkpoint is {self.last_ckpt or 'none (none was written yet)'}; resume from it with a lower optim.lr")

    def _bad_counts(self) -> dict[str, int]:
        return _sum_counts([self.bad_before] + gather_objects(_bad_samples(self.job.data), self.info))

    # ------------------------------------------------------------------------- the end

    def finish(self) -> Path:
        """After the last step: the final model (the EMA when on) in <output_dir>/model; then an evaluation
        failure, if there was one, is raised."""
        info, tc = self.info, self.tc
        end = max(self.start, tc.steps)
        if self.start >= tc.steps and self.evaluate_hook is not None:
            self.last_eval = on_main(info, lambda: self._evaluate_model(self.start))
        model_dir = self.out / "model"
        self.ema.copy_to_model()  # the final model is the EMA when on; the raw weights stay in the last checkpoint
        self._check_finite(end)

        def write_final() -> None:
            with atomic_directory(model_dir, {"step": end}) as tmp:
                self.job.save_model(self.model, tmp)
                self.ema.mark(tmp)
            self.logger.write(f"{self.job.name} done: step {end}, model in {model_dir}")

        on_main(info, write_final)
        barrier(info)  # every rank done before any rank tears the process group down
        if self.eval_error is not None:
            err = self.eval_error
            raise EvaluationFailed(f"the model was trained and saved in {model_dir}, but its evaluation failed: "
                                   f"{type(err).__name__}: {err}. Evaluate it again with "
                                   f"`threetowers eval {model_dir}`") from err
        return model_dir

    def close(self) -> None:
        logger = getattr(self, "logger", None)
        if logger is not None:
            logger.close()


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
