"""An exponential moving average (EMA) of the trained weights: `train.ema_decay` (0 = off).

What it holds: an fp32 copy of the trainable parameters only (never h: it is frozen, may be large,
and its average would be itself). After every applied optimizer step,

    ema <- d * ema + (1 - d) * weights,   d = min(train.ema_decay, (1 + n) / (10 + n)),

with n the updates so far (TensorFlow's ExponentialMovingAverage `num_updates` warm-up): the first
updates follow the weights closely (d = 0.1, 0.18, 0.25, ...), so a short run's average is not
dominated by the random initial weights. A step skipped for a non-finite loss or gradient neither
moves the EMA nor counts in n. Buffers (e.g. a timm tower's BatchNorm statistics) are not averaged:
the EMA model uses the live ones, i.e. they are copied.

Which model is the result: with the EMA on, the final `model/` holds the EMA weights, and it is what
periodic and final evaluations score (and so what `threetowers eval` and export read); the raw
weights stay in the last checkpoint, and model.json records "ema_decay". Why: a run that keeps an
EMA keeps it to evaluate and deploy it (timm's train.py with --model-ema likewise lets its EMA's
evaluation replace the raw model's), and scoring one model keeps the log's `eval/` curve one model's.

Checkpoints hold it in `ema.safetensors` (the tensors, and n in its metadata) beside the weights,
under the checkpoint's manifest and atomic rename; a resumed run restores it bit for bit. Every
rank keeps an identical EMA (DDP keeps the weights identical on every rank); rank 0 writes it.
With `train.ema_decay=0` every method here does nothing, so the trainer calls them unconditionally.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..core.atomic import write_json_atomic
from .checkpoint import CheckpointError

EMA_FILE = "ema.safetensors"


class WeightsEMA:
    """The EMA of `model`'s trainable parameters (see the module's docstring); one per run, owned by `run`."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.on = self.decay > 0
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad] if self.on else []
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        with torch.no_grad():
            self.average = [p.detach().to(torch.float32, copy=True) for p in self.params]
        device = self.params[0].device if self.params else torch.device("cpu")
        self.updates = torch.zeros((), dtype=torch.float64, device=device)  # n, on the device (see update)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.average)

    def describe(self) -> str:
        return (f"EMA of the weights, decay {self.decay:g} (averages ~{1 / (1 - self.decay):.0f} steps; "
                "the final model/ holds it)")

    @torch.no_grad()
    def update(self, skipped: torch.Tensor) -> None:
        """Move the EMA towards the weights just updated; `skipped` (1.0: the step was not applied) is
        the non-finite policy's device flag, so that nothing here makes the host wait for the device.

        Why not `torch._foreach_lerp_` (which torch.optim.swa_utils' EMA uses): its weight is a host
        number, and both the skip and the warm-up count live on the device. sub/mul/add over the whole
        list take a device scalar and stay three fused multi-tensor kernels, at the cost of one
        temporary the size of the trainable weights. A skipped step gets weight 0: ema + 0 * (w - ema)
        is ema exactly (its weights are untouched, so finite)."""
        if not self.on:
            return
        applied = 1 - skipped.to(torch.float64)
        n = self.updates
        weight = ((1 - torch.clamp((1 + n) / (10 + n), max=self.decay)) * applied).to(torch.float32)
        current = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        delta = torch._foreach_sub(current, self.average)
        torch._foreach_mul_(delta, weight)
        torch._foreach_add_(self.average, delta)
        self.updates += applied

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """The EMA into the model's parameters, for good (the end of training)."""
        if self.on:
            torch._foreach_copy_(self.params, self.average)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The EMA in the model's parameters inside the block (an evaluation), the raw weights back after,
        bit for bit. Copies rather than a second model: a copy of the module would copy h."""
        if not self.on:
            yield
            return
        with torch.no_grad():
            raw = [p.detach().clone() for p in self.params]
            self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, raw)

    def save(self, directory: Path) -> None:
        """`ema.safetensors` in a checkpoint being written (the checkpoint's atomic directory)."""
        if self.on:
            tensors = {name: t.detach().cpu().contiguous() for name, t in zip(self.names, self.average)}
            save_file(tensors, str(directory / EMA_FILE), metadata={"updates": str(int(self.updates.item()))})

    def restore(self, directory: Path, step: int, report: Callable[[str], None]) -> None:
        """The EMA of the checkpoint being resumed (after its weights were loaded into the model).

        A checkpoint written without an EMA (train.ema_decay was 0) starts the EMA from its weights,
        with the warm-up, rather than refusing: adding an EMA to a run under way is a fair request."""
        path = Path(directory) / EMA_FILE
        if not self.on:
            if path.is_file():
                report("note: the checkpoint holds an EMA of the weights, but train.ema_decay=0: it is not "
                       "continued, and the final model will be the raw weights")
            return
        if not path.is_file():
            with torch.no_grad():
                torch._foreach_copy_(self.average, [p.detach().float() for p in self.params])
            self.updates.zero_()
            report(f"note: the checkpoint holds no EMA of the weights (it was trained with train.ema_decay=0); "
                   f"the EMA starts from its weights at step {step}")
            return
        with safe_open(str(path), framework="pt") as fh:
            names = set(fh.keys())
            if names != set(self.names):
                raise CheckpointError(f"{path} does not fit this model: missing {sorted(set(self.names) - names)[:5]}, "
                                      f"unexpected {sorted(names - set(self.names))[:5]}")
            with torch.no_grad():
                for name, average in zip(self.names, self.average):
                    average.copy_(fh.get_tensor(name))
            self.updates.fill_(int(fh.metadata()["updates"]))

    def mark(self, model_dir: Path) -> None:
        """Record the decay in the saved model's model.json (written by the job, in its own format), so a
        reader knows the weights are an EMA. A job that writes no model.json is left as it is."""
        meta_path = Path(model_dir) / "model.json"
        if self.on and meta_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            write_json_atomic(meta_path, {**meta, "ema_decay": self.decay})
