"""What a run reports: a progress bar, a metrics line every N steps, TensorBoard and a JSONL log.

Only rank 0 logs; other ranks get a logger whose methods do nothing. On resume the JSONL log
and TensorBoard drop what a killed run had logged past the checkpoint, so each step appears once.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from ..core.atomic import write_text_atomic

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class RunLogger:
    def __init__(self, output_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int,
                 progress: bool = True, tensorboard: bool = True, desc: str = "train"):
        self.enabled = enabled
        self.bar = None
        self._loss = "-"  # the last logged loss, shown beside the progress bar
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        out = Path(output_dir)
        path = out / METRICS_FILE
        _truncate_after(path, start_step)
        self.jsonl = open(path, "a", encoding="utf-8")
        if tensorboard:
            # purge_step hides events a killed run wrote past the checkpoint we resume from
            # (or, starting over, everything an earlier run in this directory wrote).
            self.writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not progress, smoothing=0.1)

    def step(self, step: int, samples_per_s: float) -> None:
        """Advance the bar by one step (step = steps done so far). The loss beside it is the last
        logged one: reading it every step would cost a host sync per step on a GPU."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=self._loss, samples_s=f"{samples_per_s:.0f}", refresh=False)

    def log(self, step: int, metrics: dict[str, float], line: bool = True) -> None:
        """One record: JSONL line, TensorBoard scalars and (optionally) a human-readable line."""
        if not self.enabled:
            return
        if isinstance(metrics.get("train/loss"), float):
            self._loss = f"{metrics['train/loss']:.4f}"
        record = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record, default=str) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if line:
            self.write(format_line(step, metrics))

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
        self.bar = self.writer = self.jsonl = None


def format_line(step: int, metrics: dict[str, float]) -> str:
    """`step 100 | loss 2.3012 | image~text 2.3012 | scale 10.3 | lr 1.0e-03 | 812 samples/s | data 4%`."""
    parts = [f"step {step}"]
    for key, value in sorted(metrics.items(), key=lambda kv: not kv[0].startswith("train/loss")):
        if not isinstance(value, (int, float)):
            continue
        short = key.split("/", 1)[-1]
        if key == "train/loss":
            parts.append(f"loss {value:.4f}")
        elif key.startswith("train/loss/"):
            parts.append(f"{short.split('/', 1)[-1]} {value:.4f}")
        elif key.startswith("train/scale/"):
            parts.append(f"t[{short.split('/', 1)[-1]}] {value:.2f}")
        elif key == "train/lr":
            parts.append(f"lr {value:.2e}")
        elif key == "train/samples_per_s":
            parts.append(f"{value:.0f} samples/s")
        elif key == "time/data_fraction":
            parts.append(f"data {100 * value:.0f}%")
        elif key.startswith(("eval/", "train/acc")):
            parts.append(f"{key} {value:.4f}")
        elif key.startswith("data/bad") and value:
            parts.append(f"{key} {value:.0f}")
        elif key == "train/nonfinite_skipped" and value:
            parts.append(f"skipped {value:.0f}")
    return " | ".join(parts)


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The records of a run's JSONL log (a torn last line from a kill is ignored)."""
    path = Path(output_dir) / METRICS_FILE
    records = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the line parseable
    return value


def _truncate_after(path: Path, step: int) -> None:
    """Drop records with step > `step` (left by a run that was killed after its last checkpoint)."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    kept = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue  # a torn last line from a kill mid-write
    write_text_atomic(path, "".join(kept))
