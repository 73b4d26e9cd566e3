"""Loading weights from local files safely: safetensors, or torch state dicts with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn


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
