"""Synthetic training data for the trainer's tests, and a `threetowers` entry point that uses it.

`SyntheticData` follows the loader protocol (`batches(start_step)`, `bad_samples()`, `tokenizer`)
with learnable pairs: each row has a class; its image is the class's pattern plus noise and its
caption names the class among random words. Batches are a pure function of (seed, step, rank),
and the global batch is the same whatever the world size (rank r gets rows r*b .. (r+1)*b).

Run as a script (`python train_helpers.py train tiny ...`, or under torchrun) it is the
`threetowers` command with this data in place of the real loader, so the tests exercise the real
CLI, trainer and checkpoints in seconds. Environment knobs for the tests: TT_STEP_DELAY (seconds
of sleep per batch, to give a killer time), TT_NAN_STEPS (comma-separated 0-based steps whose
images are NaN). With TT_REAL_DATA=1 the real loader (world, shards) stays, and the knobs of
`install_test_knobs` (step delay, a SIGKILL at a step, slow checkpoint and cache writes) apply.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY  # noqa: E402  (the tiny model sizes shared by all tests)

VOCAB = 64
EOT = 1

# A tiny model (conftest.TINY) and a run that takes milliseconds per step.
FAST = TINY + ["train.batch_size=16", "train.log_every=1", "train.progress=false", "train.device=cpu",
               "train.threads=1", "optim.warmup_steps=2", "data.world.image_size=24"]


class FakeTokenizer:
    vocab_size = VOCAB

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({"fake": True, "vocab_size": VOCAB}))


class SyntheticData:
    def __init__(self, cfg, rank: int = 0, world_size: int = 1, third=None, *, classes: int = 8,
                 fixed: bool = False, labelled: bool = False, nan_steps=(), delay: float = 0.0):
        self.cfg, self.rank, self.world_size, self.third = cfg, rank, world_size, third
        self.classes, self.fixed, self.labelled = classes, fixed, labelled
        self.nan_steps = set(nan_steps) or {int(s) for s in os.environ.get("TT_NAN_STEPS", "").split(",") if s}
        self.delay = delay or float(os.environ.get("TT_STEP_DELAY", "0"))
        self.tokenizer = None if labelled else FakeTokenizer()
        size = cfg.model.image.image_size
        g = torch.Generator().manual_seed(1234)
        self.patterns = torch.rand(classes, 3, size, size, generator=g)

    def global_batch(self, step: int) -> dict:
        cfg = self.cfg
        g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + (0 if self.fixed else step))
        n, length = cfg.train.batch_size, cfg.model.text.context_length
        labels = torch.randint(0, self.classes, (n,), generator=g)
        images = 0.7 * self.patterns[labels] + 0.3 * torch.rand(n, 3, *self.patterns.shape[-2:], generator=g)
        if step in self.nan_steps:
            images[:] = float("nan")
        if self.labelled:
            return {"image": images, "label": labels}
        tokens = torch.zeros(n, length, dtype=torch.long)
        tokens[:, 0] = 2 + labels  # the class word
        tokens[:, 1:4] = torch.randint(2 + self.classes, VOCAB, (n, 3), generator=g)  # filler words
        tokens[:, 4] = EOT
        batch = {"image": images, "tokens": tokens, "keys": [f"s{step}-{i}" for i in range(n)]}
        if self.third and cfg.data.third_embeddings == "cache":  # the h's: one, or a list (model.thirds order)
            with torch.no_grad():  # what the embedding caches would hold: each h's, side by side
                batch["third"] = torch.cat([h(images) for h in (self.third if isinstance(self.third, list) else [self.third])], 1)
        return batch

    def batches(self, start_step: int):
        per_rank = self.cfg.train.batch_size // self.world_size
        rows = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        for step in itertools.count(start_step):
            if self.delay:
                time.sleep(self.delay)
            yield {k: v[rows] for k, v in self.global_batch(step).items()}

    def bad_samples(self) -> dict[str, int]:
        return {"corrupt_image": 1}


def sigkill_after_first_checkpoint(process: subprocess.Popen, output_dir: Path, timeout: float = 120) -> None:
    """Wait until a run has written its first whole checkpoint, then SIGKILL it (as a pre-empted job)."""
    deadline = time.time() + timeout
    while not list((output_dir / "checkpoints").glob("step_*/manifest.json")):
        assert process.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


class Hooked:
    """Any training data, as the loop reads it, with a test's knobs: `delay` seconds of sleep before each
    batch, and TT_SIGKILL_AT_STEP=S (with TT_SIGKILL_RANK=R, default 0, and TT_SIGKILL_MARKER=FILE):
    rank R kills itself with SIGKILL when the loop asks for step S's batch (0-based), once: FILE marks
    that it happened, so that the group torchrun restarts goes past that step."""

    def __init__(self, data, delay: float = 0.0):
        self.data, self.delay = data, delay

    def __getattr__(self, name):
        return getattr(self.data, name)

    def batches(self, start_step: int):
        kill_at = int(os.environ.get("TT_SIGKILL_AT_STEP", "-1"))
        marker = Path(os.environ.get("TT_SIGKILL_MARKER", "sigkill.marker"))
        rank = int(os.environ.get("RANK", "0"))
        for step, batch in enumerate(self.data.batches(start_step), start_step):
            if step == kill_at and rank == int(os.environ.get("TT_SIGKILL_RANK", "0")) and not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGKILL)
            if self.delay:
                time.sleep(self.delay)
            yield batch


def install_test_knobs(real_data: bool) -> None:
    """The knobs every driven run has (see `Hooked`), plus TT_SLOW_CHECKPOINT=S (S seconds per file of a
    checkpoint's manifest: a window to signal a run while it writes one) and TT_SLOW_SHARD=S (S seconds
    before each shard of h's embeddings: a window to signal a run while it builds its cache)."""
    import threetowers.training.checkpoint as checkpoint
    import threetowers.training.contrastive as job
    from threetowers.third.store import ShardEmbeddings

    build_data = job.build_train_data
    delay = float(os.environ.get("TT_STEP_DELAY", "0")) if real_data else 0.0  # SyntheticData sleeps by itself
    job.build_train_data = lambda *args, **kwargs: Hooked(build_data(*args, **kwargs), delay)
    slow_file = float(os.environ.get("TT_SLOW_CHECKPOINT", "0"))
    if slow_file:
        hash_file = checkpoint.sha256_file
        checkpoint.sha256_file = lambda path: time.sleep(slow_file) or hash_file(path)
    slow_shard = float(os.environ.get("TT_SLOW_SHARD", "0"))
    if slow_shard:
        build_shard = ShardEmbeddings.build.__func__
        ShardEmbeddings.build = classmethod(lambda cls, *a, **k: time.sleep(slow_shard) or build_shard(cls, *a, **k))


def install() -> None:
    """Make the contrastive job build SyntheticData instead of the real loader (in this process)."""
    import threetowers.training.contrastive as job

    job.build_train_data = lambda cfg, rank=0, world_size=1, third=None: SyntheticData(cfg, rank, world_size, third)
    # Synthetic captions have no real tokenizer, so the trainer's world evaluation is off here.
    job.trainer_hook = lambda cfg, tokenizer=None, third=None: None


if __name__ == "__main__":
    if not os.environ.get("TT_REAL_DATA"):
        install()
    install_test_knobs(real_data=bool(os.environ.get("TT_REAL_DATA")))
    from threetowers.apps.cli import main

    sys.exit(main())
