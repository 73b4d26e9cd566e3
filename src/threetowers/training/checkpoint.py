"""Checkpoints that survive kills and full disks, and the choice of which one to resume from.

A checkpoint is a directory `<output_dir>/checkpoints/step_0000200/` holding the model files (as
the job writes them: model.safetensors + model.json [+ tokenizer.json]), `train_state.pt`
(optimizer, scheduler, every rank's RNG states, step, world size, config), `config.yaml`, the EMA
of the weights in `ema.safetensors` when train.ema_decay > 0 (`ema.py`), and a
`manifest.json` written LAST that records each file's size and sha256. The directory is written
under a temporary name, fsync'd, then renamed into place, so a reader sees a whole checkpoint or
none; a checkpoint whose files do not match its manifest (truncated, corrupt, half-copied) is
reported and skipped, and the previous one is used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError

from ..core.formats import CHECKPOINT_FORMAT, FormatError, check_format, stamp

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.pt"
_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; existing checkpoints are left as they were."""


class OutputDirError(ValueError):
    """train.output_dir cannot hold the run (not writable, or too little free space)."""


def _report(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the output directory


def check_writable(directory: str | Path, need_bytes: int = 0) -> None:
    """Fail early and clearly when `directory` cannot be created, written, or lacks `need_bytes` free."""
    directory = Path(directory)
    probe = directory / f".write-probe-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as fh:
            fh.write(b"threetowers" * 100)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:
        raise OutputDirError(f"train.output_dir={str(directory)!r} is not writable ({_describe(err)}); "
                             "choose another train.output_dir") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass  # the directory itself is the problem, reported above
    free = shutil.disk_usage(directory).free
    if need_bytes and free < need_bytes:
        raise OutputDirError(f"train.output_dir={str(directory)!r} has {_size(free)} free, but the run's "
                             f"checkpoints need about {_size(need_bytes)}; free some space, lower "
                             "train.keep_checkpoints, or choose another train.output_dir")


def _describe(err: Exception, where: Path | None = None) -> str:
    code = getattr(err, "errno", None)
    if code == errno.ENOSPC:
        return "no space left on device"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied: {err.strerror}"
    text = f"{type(err).__name__}: {err}"
    try:
        if where is not None and shutil.disk_usage(where).free < (1 << 20):
            text += "; the disk is full"
    except OSError:
        pass
    return text


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ----------------------------------------------------------------------------- atomic directories


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems/platforms cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(final: str | Path, manifest_extra: dict | None = None) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success write its manifest (last), fsync everything,
    and rename it to `final` (replacing an older `final`). On any error nothing at `final` changes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    old = None
    try:
        tmp.mkdir()
        yield tmp
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            files[str(path.relative_to(tmp))] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        manifest = stamp(CHECKPOINT_FORMAT, {"created": time.time(), **(manifest_extra or {}), "files": files})
        with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            old = final.parent / f".old-{final.name}-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not final.exists():
            os.replace(old, final)  # the swap failed half-way: put the previous version back
        if isinstance(err, (OSError, RuntimeError, SafetensorError)) and not isinstance(err, CheckpointError):
            raise CheckpointError(f"could not write {final} ({_describe(err, final.parent)}); nothing there was changed and "
                                  "earlier checkpoints are intact") from err
        raise


def verify(directory: str | Path) -> str | None:
    """None when every file of the directory matches its manifest, else what is wrong."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{MANIFEST} is missing (the write did not finish)"
    except (OSError, ValueError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    try:
        check_format(manifest, CHECKPOINT_FORMAT, directory / MANIFEST)
    except FormatError as err:
        return str(err)
    if not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} lists no files"
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size} bytes, the manifest says {expected['size']} (truncated?)"
        if sha256_file(path) != expected["sha256"]:
            return f"{name} does not match its sha256 in the manifest (corrupt)"
    return None


# ----------------------------------------------------------------------------- checkpoints of a run


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"{_PREFIX}{step:07d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint directories of a run, newest first (valid or not)."""
    root = Path(output_dir) / CHECKPOINTS
    found = []
    if root.is_dir():
        for path in root.iterdir():
            name = path.name
            if path.is_dir() and name.startswith(_PREFIX) and name[len(_PREFIX):].isdigit():
                found.append((int(name[len(_PREFIX):]), path))
    return sorted(found, reverse=True)


def save_checkpoint(output_dir: str | Path, step: int, write: Callable[[Path], None], keep: int) -> Path:
    """Write checkpoint `step` through `write(tmp_dir)`, atomically; then keep only the newest `keep`."""
    final = checkpoint_dir(output_dir, step)
    with atomic_directory(final, {"step": step}) as tmp:
        write(tmp)
    for old_step, path in list_checkpoints(output_dir)[keep:]:
        if old_step != step:
            shutil.rmtree(path, ignore_errors=True)
    root = Path(output_dir) / CHECKPOINTS
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-write
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def set_aside(path: Path, why: str, report: Callable[[str], None] = _report) -> Path:
    """Move a checkpoint out of the way (never delete what might be wanted), saying why."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.parent / f"{why}-{path.name}-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = path.parent / f"{why}-{path.name}-{stamp}-{n}"
    os.replace(path, target)
    report(f"moved {path} to {target.name} ({why})")
    return target


def problem_with(directory: Path) -> str | None:
    """What makes a checkpoint unusable (files against the manifest, then a readable train state), or None."""
    problem = verify(directory)
    if problem is None and (directory / TRAIN_STATE).is_file():
        try:
            load_train_state(directory)
        except CheckpointError as err:
            problem = str(err)
    return problem


def newest_valid(output_dir: str | Path, report: Callable[[str], None] = _report,
                 set_aside_corrupt: bool = True) -> Path | None:
    """The newest usable checkpoint; broken ones are reported (and set aside). None when there are no
    checkpoints; `CheckpointError` when there are some but none is usable (a silent restart at step 0
    would overwrite the run's log and its checkpoints' history)."""
    found = list_checkpoints(output_dir)
    for i, (_, path) in enumerate(found):
        problem = problem_with(path)
        if problem is None:
            return path
        older = i + 1 < len(found)
        report(f"checkpoint {path} is unusable: {problem}" + ("; falling back to the previous one" if older else ""))
        if set_aside_corrupt:
            set_aside(path, "corrupt", report)
    if found:
        raise CheckpointError(
            f"no usable checkpoint is left in {Path(output_dir) / CHECKPOINTS} ({len(found)} unusable"
            + (", set aside as corrupt-*" if set_aside_corrupt else "") + "); nothing was trained or deleted. "
            "Start over with train.resume=never (the run's log is then replaced) or another train.output_dir")
    return None


def find_resume(output_dir: str | Path, resume: str, report: Callable[[str], None] = _report) -> Path | None:
    """`train.resume`: auto (newest valid checkpoint of output_dir, or None), never, or a path
    (a checkpoint directory, or a run directory whose newest valid checkpoint is used)."""
    if resume == "never":
        return None
    if resume == "auto":
        return newest_valid(output_dir, report)
    path = Path(resume)
    if (path / MANIFEST).exists() or (path / TRAIN_STATE).exists():
        problem = problem_with(path)
        if problem:
            raise CheckpointError(f"train.resume={resume}: this checkpoint is unusable: {problem}")
        return path
    if (path / CHECKPOINTS).is_dir():
        try:
            found = newest_valid(path, report, set_aside_corrupt=False)
        except CheckpointError:
            found = None
        if found is None:
            raise CheckpointError(f"train.resume={resume}: no valid checkpoint in {path / CHECKPOINTS}")
        return found
    raise CheckpointError(f"train.resume={resume!r} is neither auto, never, a checkpoint directory "
                          f"(with {MANIFEST}) nor a run directory (with {CHECKPOINTS}/)")


def load_train_state(directory: str | Path) -> dict:
    """train_state.pt, read without unpickling code (weights_only=True)."""
    path = Path(directory) / TRAIN_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch raises several kinds for a bad file)
        # Some (EOFError, a bare UnpicklingError) carry no message: the type is the reason then.
        raise CheckpointError(f"could not read {path}: {type(err).__name__}" + (f": {err}" if str(err) else "")) from None


# ----------------------------------------------------------------------------- RNG states


def rng_state(device: torch.device | None = None) -> dict:
    """This process's torch / CUDA (of its device) / numpy / python RNG states, as tensors and plain
    lists (so that train_state.pt loads with weights_only=True). `device`: the process's device
    (default: the current CUDA device when there is one)."""
    device = _rng_device(device)
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": [version, list(internal), gauss_next],
    }


def _rng_device(device: torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def set_rng_state(state: dict, device: torch.device | None = None) -> list[str]:
    """Restore what `rng_state` saved; returns notes on what could not be restored (for the log)."""
    device = _rng_device(device)
    notes = []
    cuda = state.get("cuda") or []
    if device.type == "cuda":
        # One entry: this process's device. Older checkpoints held every visible device's state.
        index = 0 if len(cuda) == 1 else device.index
        if index is not None and index < len(cuda):
            torch.cuda.set_rng_state(cuda[index], device)
        else:
            notes.append("the checkpoint holds no CUDA RNG state for this process's device (it was written on the CPU "
                         "or with fewer devices); CUDA random streams start anew, so the run is not bit-identical to "
                         "an uninterrupted one")
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    return notes
