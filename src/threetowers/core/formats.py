"""Every file format the project writes and reads, with one version check.

- Weights: safetensors written atomically; read from safetensors or, without executing pickled
  code, torch state dicts (`weights_only=True`).
- Metadata JSON (`model.json` of a contrastive model or a classifier, a checkpoint's
  `manifest.json`, h's embedding-cache `manifest.json`): each carries `format` and `version`;
  `read_meta` refuses another format (naming what the file is instead), a newer version, and
  invalid JSON, with the path in the message.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_path, write_json_atomic

MODEL_FORMAT = "threetowers-model"  # a contrastive model (CLIP, LiT, 3T): model.safetensors + model.json
CLASSIFIER_FORMAT = "threetowers-classifier"  # a classifier of `threetowers pretrain` (an h source)
CHECKPOINT_FORMAT = "threetowers-checkpoint"  # a training checkpoint's manifest.json
CACHE_FORMAT = "threetowers-feature-cache"  # h's embedding cache's manifest.json (arrays; one per shard)
SHARD_INDEX_FORMAT = "threetowers-shard-index"  # a shard's <name>.index.json beside its .index.npy
EMBEDDINGS_FORMAT = "threetowers-embeddings"  # index.json of `threetowers embed`'s output (parts: CACHE_FORMAT)
# The newest version of each format this code reads and writes.
VERSIONS = {MODEL_FORMAT: 1, CLASSIFIER_FORMAT: 1, CHECKPOINT_FORMAT: 1, CACHE_FORMAT: 1, SHARD_INDEX_FORMAT: 1,
            EMBEDDINGS_FORMAT: 1}
_DESCRIPTIONS = {MODEL_FORMAT: "a contrastive model (CLIP/LiT/3T)", CLASSIFIER_FORMAT: "a classifier of `threetowers pretrain`",
                 CHECKPOINT_FORMAT: "a training checkpoint", CACHE_FORMAT: "an embedding cache of h",
                 SHARD_INDEX_FORMAT: "the index of a webdataset shard",
                 EMBEDDINGS_FORMAT: "the embeddings written by `threetowers embed`"}


class FormatError(ValueError):
    """A file is not of the format expected, is of a newer version, or is damaged."""


def stamp(fmt: str, body: dict) -> dict:
    """`body` with this code's `format` and `version` first."""
    return {"format": fmt, "version": VERSIONS[fmt], **body}


def check_format(meta: object, fmt: str, path: str | Path, hint: str = "") -> dict:
    """`meta` (a parsed JSON file at `path`) if it is `fmt` at a version this code reads; else FormatError."""
    found = meta.get("format", "unknown") if isinstance(meta, dict) else "unknown"
    if found != fmt:
        what = _DESCRIPTIONS.get(found, f"a {found!r} file")
        raise FormatError(f"{path} describes {what}, not {_DESCRIPTIONS[fmt]} ({fmt!r})" + (f"; {hint}" if hint else ""))
    if meta.get("version", 0) > VERSIONS[fmt]:
        raise FormatError(f"{path} has {fmt} version {meta['version']}; this threetowers reads version "
                          f"{VERSIONS[fmt]} (upgrade threetowers)")
    return meta


def read_meta(path: str | Path, fmt: str, hint: str = "") -> dict:
    """Read and check a metadata JSON file of format `fmt`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} is not {_DESCRIPTIONS[fmt]}: {path.name} is missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FormatError(f"{path} is not valid JSON ({err}); the file is damaged") from None
    return check_format(meta, fmt, path, hint)


def write_meta(path: str | Path, fmt: str, body: dict) -> None:
    """Write a metadata JSON file of format `fmt` atomically."""
    write_json_atomic(path, stamp(fmt, body))


def saved_dir(path: str | Path) -> Path:
    """A saved model's directory, also when given its model.json or model.safetensors."""
    path = Path(path)
    return path.parent if path.is_file() and path.name in ("model.json", "model.safetensors") else path


def save_safetensors_atomic(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write tensors (contiguous, on CPU) to a safetensors file atomically."""
    with atomic_path(path) as tmp:
        try:
            save_file(state, str(tmp))
        except SafetensorError as err:  # safetensors reports a full disk or a failed write as its own error type
            raise OSError(f"could not write {path}: {err}") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without executing pickled code (untrusted files are never unpickled)."""
    path = Path(path)
    if path.is_dir():  # typically a preset's model.third.path (a saved model) kept after changing the source
        raise FileNotFoundError(f"weights file {path} is a directory, not a weights file; a saved model directory "
                                "is read by model.third.source=checkpoint (set model.third.path= to use a "
                                "source's own default weights)")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except SafetensorError as err:  # e.g. a pickle renamed to .safetensors, or a truncated file
            raise ValueError(f"{path} is named .safetensors but is not a readable safetensors file ({err}); "
                             "a torch state dict must not carry that suffix") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with code in it, or not a torch file at all
        raise ValueError(f"{path} is not a safetensors file or a plain torch state dict ({err})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def load_weights(module: nn.Module, path: str | Path, what: str = "model", ignore_prefixes: tuple = ()) -> None:
    """Load a local weights file into `module`, strictly; a mismatch lists the first offending keys."""
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)} if ignore_prefixes else state
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}" + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}" + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
        if wrong:
            parts.append(f"shape mismatches (file vs {what}) {wrong[:5]}")
        raise ValueError(f"weights file {path} does not fit the {what}: " + "; ".join(parts))
    module.load_state_dict(state)
