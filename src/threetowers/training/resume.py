"""Resuming a run: whether a checkpoint fits this run (checked before any data work, and again with
everything when the trainer loads it), and each rank's RNG streams restored from it."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import OmegaConf

from ..config import to_dict
from ..core.distributed import DistInfo, on_main
from ..schema import Config, fill_added_fields, loss_weights
from .checkpoint import CheckpointError, find_resume, load_train_state, set_rng_state


def report_on_main(info: DistInfo) -> Callable[[str], None]:
    """print, on rank 0 only."""
    return (lambda msg: print(msg, flush=True)) if info.is_main else (lambda msg: None)


def seed_everything(seed: int) -> None:
    """python, NumPy and torch (CPU and every CUDA device) RNGs of this process."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_resume_early(cfg: Config, info: DistInfo) -> None:
    """Refuse, before any data or cache work, a checkpoint this run would resume but could not: one
    trained with another model config (h's settings included). The text tower's vocabulary size comes
    from the tokenizer, built with the data; `run` checks it, with everything else, when it resumes."""
    def check() -> None:
        found = find_resume(Path(cfg.train.output_dir), cfg.train.resume, report_on_main(info))
        if found is not None:
            written = Path(found) / "config.yaml"  # the config alone: train_state.pt can be gigabytes
            saved = OmegaConf.to_container(OmegaConf.load(written)) if written.is_file() else \
                load_train_state(found).get("config", {})
            _check_model(saved.get("model", {}), to_dict(cfg)["model"], found, ignore=("model.text.vocab_size",))
            _check_groups(saved, cfg)

    on_main(info, check)


def _check_groups(saved: dict, cfg: Config) -> None:
    """The optimizer's parameter groups (and their rates) are the checkpoint's: they follow optim.fresh_lr_scale."""
    was = saved.get("optim", {}).get("fresh_lr_scale", 1.0)  # absent: written before the field, when it was 1
    if was != cfg.optim.fresh_lr_scale:
        raise CheckpointError(f"optim.fresh_lr_scale was {was} when the checkpoint was written, and is "
                              f"{cfg.optim.fresh_lr_scale} now; the optimizer's parameter groups follow it, so resume "
                              f"with optim.fresh_lr_scale={was} (or start over: train.resume=never)")


def _check_model(saved: dict, now: dict, where: Path | str, ignore: tuple[str, ...] = ()) -> None:
    # A field the saved config lacks was added since: it meant what _ADDED_FIELDS says, else its default.
    saved = _with_defaults(fill_added_fields({"model": saved})["model"], to_dict(Config())["model"])
    diff = [d for d in _diff(saved, now, "model.") if d.split(":", 1)[0] not in ignore]
    if diff:
        raise CheckpointError(
            f"{where} was trained with another model config ({'; '.join(diff[:5])}), so this run cannot resume it. "
            "Give this run its own directory (train.output_dir=...), start over there (--resume never / "
            "train.resume=never: its checkpoints are set aside), or use the same model settings")


def check_resumable(state: dict, cfg: Config, info: DistInfo, report: Callable[[str], None]) -> None:
    saved = state.get("config", {})
    now = to_dict(cfg)
    _check_model(saved.get("model", {}), now["model"], "the checkpoint")
    # Compared as meant: fields added since the checkpoint at what their absence meant (else their
    # defaults), and the 3T weights as used (null is the default list; the model is the same here).
    saved = _with_defaults(fill_added_fields(saved), to_dict(Config()))
    for side in (saved, now):
        if side.get("loss", {}).get("weights") is None:
            side.setdefault("loss", {})["weights"] = loss_weights(cfg)
    _check_groups(saved, cfg)
    other = [d for section in now if section != "model" for d in _diff(saved.get(section, {}), now[section], section + ".")
             if not d.startswith("train.resume:")]
    if other:
        report(f"note: settings changed since the checkpoint: {'; '.join(other[:8])}")
    if state.get("world_size", info.world_size) != info.world_size:
        report(f"note: the checkpoint was written by {state['world_size']} process(es), this run has "
               f"{info.world_size}; training continues, but not bit-identically to an uninterrupted run")


def _with_defaults(saved: Any, defaults: Any) -> Any:
    if not (isinstance(saved, dict) and isinstance(defaults, dict)):
        return saved
    return {**defaults, **{k: _with_defaults(v, defaults.get(k)) for k, v in saved.items()}}


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def restore_rng(saved: list[dict], rank: int, device: torch.device, seed: int, step: int,
                report: Callable[[str], None]) -> None:
    """This rank's RNG streams from a checkpoint's per-rank states. A rank the checkpoint did not
    have (the world grew) gets a stream of its own, seeded by (seed, rank, step), never a copy of
    another rank's."""
    if rank < len(saved):
        for note in set_rng_state(saved[rank], device):
            report(f"note: {note}")
        return
    seed_everything(int.from_bytes(hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()[:4], "little"))
    report(f"note: the checkpoint holds RNG states for {len(saved)} rank(s); rank {rank} is seeded anew")
