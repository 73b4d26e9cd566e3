"""AdamW with the usual weight-decay exclusions, and a cosine learning-rate schedule with warmup.

Weight decay pulls weights towards zero; that is meant for matrices (linear and conv kernels),
not for gains and offsets (norms, biases), lookup tables and positions (token / position
embeddings, class tokens) or the loss's temperatures and sigmoid bias. Frozen parameters (h)
never reach the optimizer, so they carry no optimizer state at all.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig
from ..model.losses import TermLoss
from ..model.open_clip_init import fresh_parameters
from ..model.three_towers import ThreeTowers

# Parameter names (the last component) that are embeddings even though they are plain nn.Parameters.
_EMBEDDING_NAMES = ("pos_embed", "cls_token", "token_embed", "position_embedding", "positional_embedding",
                    "class_embedding", "reg_token", "dist_token", "mask_token")
_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                     nn.modules.batchnorm._NormBase, nn.RMSNorm)


def _no_decay_module(module: nn.Module) -> bool:
    # The loss module (temperatures, sigmoid bias) and every norm/embedding, however it is named.
    return isinstance(module, _NO_DECAY_MODULES + (TermLoss,)) or "Norm" in type(module).__name__


def param_groups(model: nn.Module, weight_decay: float, fresh: set[str] = frozenset(),
                 fresh_lr: float | None = None) -> list[dict]:
    """AdamW groups over the trainable parameters: `decay` (matrices) and `no_decay` (the rest), and
    with `fresh_lr` the same two again for the parameters named in `fresh`, at that learning rate.

    Each group carries the parameter names in `names` (for tests and logs; the optimizer ignores them).
    """
    split: dict[tuple[bool, bool], list] = {(f, d): [] for f in (False, True) for d in (True, False)}
    seen = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            excluded = p.ndim < 2 or _no_decay_module(module) or name in _EMBEDDING_NAMES
            split[(fresh_lr is not None and full in fresh, not excluded)].append((full, p))
    groups = [{"params": [p for _, p in found], "names": [n for n, _ in found], "weight_decay": weight_decay if decay else 0.0,
               **({"lr": fresh_lr} if is_fresh else {})} for (is_fresh, decay), found in split.items()]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the fused CUDA kernel on GPU. With `optim.fresh_lr_scale`
    (not 1), what model.init_from does not provide gets groups of its own at lr x that scale: the
    groups are the same on every resume, since the config decides them."""
    scaled = cfg.fresh_lr_scale != 1 and isinstance(model, ThreeTowers)
    groups = param_groups(model, cfg.weight_decay, fresh_parameters(model) if scaled else frozenset(),
                          cfg.lr * cfg.fresh_lr_scale if scaled else None)
    if not groups:
        raise ValueError("the model has no trainable parameters (everything is frozen); nothing to train")
    for g in groups:
        del g["names"]  # keep optimizer state_dicts plain (and loadable with weights_only=True)
    fused = True if device.type == "cuda" else None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate for the update at 0-based `step`.

    Linear warmup to 1 over `warmup_steps` updates (the first update already moves: 1/warmup),
    then a half cosine from 1 towards `min_lr_ratio`, which it would reach at `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose epoch counter is the optimizer step: call `.step()` once per training step."""

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, cfg.warmup_steps, cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
