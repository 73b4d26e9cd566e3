"""Start a model from an open_clip model's weights (`model.init_from`), before its first step.

CLIP and 3T take f and g with their projections and the (f, g) term's temperature (and its bias, with
the sigmoid loss), which is what an open_clip CLIP holds; 3T's adaptor heads f_h, g_h and the heads on
h start fresh. LiT takes g's trunk only: its text head maps into h's space, which open_clip has no
counterpart for. The names and shapes must fit exactly (`towers/open_clip_arch.py` maps them); anything
left over in either model is refused by name, before any data work when `check_init` runs first.
"""

from __future__ import annotations

import torch

from ..core.formats import read_state_dict
from ..schema import Config, ConfigError, third_sections
from ..towers.build import TimmTower
from ..towers.open_clip_arch import (OPENAI_MEAN, OPENAI_STD, TOWER_PREFIXES, read_open_clip_config,
                                     state_from_open_clip, weights_file)
from .factory import create_model
from .three_towers import ThreeTowers

# Entries of an open_clip state dict that are not parameters of its towers: the temperature and bias
# (loaded separately) and the sizes OpenAI's original checkpoints carry.
_NOT_TOWERS = ("logit_scale", "logit_bias", "input_resolution", "context_length", "vocab_size")


def read_open_clip_state(cfg: Config) -> dict[str, torch.Tensor]:
    """open_clip's state dict for `model.init_from`, with the names of a plain CLIP (no DDP `module.`
    prefix; CustomTextCLIP's `text.` tower under CLIP's names)."""
    state = read_state_dict(weights_file(cfg.model.init_from))
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    if "text.token_embedding.weight" in state:
        state = {k[len("text."):] if k.startswith("text.") else k: v for k, v in state.items()}
    return state


def init_from_open_clip(model: ThreeTowers, state: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Copy the open_clip model's weights (`model.cfg.model.init_from`, or `state`) into `model`;
    returns our names of what was loaded."""
    state = read_open_clip_state(model.cfg) if state is None else state
    ours = _mapped(model, state)
    with torch.no_grad():
        params = model.state_dict()
        for key, tensor in ours.items():
            params[key].copy_(tensor)
        if model.method != "lit":  # the (f, g) term is the first (or the only, when shared) temperature
            model.loss.log_scale[0] = state["logit_scale"].reshape(())
            if model.loss.bias is not None and "logit_bias" in state:
                model.loss.bias[0] = state["logit_bias"].reshape(())
    return list(ours)


def check_init(cfg: Config) -> None:
    """Refuse, before any data work, an open_clip model whose weights do not fit the configured towers:
    the same mapping against a model built on the meta device (no memory, no time)."""
    third_info = [{"dim": 1, "name": "h"} for _ in third_sections(cfg.model)]  # h's heads start fresh: any size
    with torch.device("meta"):
        model = create_model(cfg, third_info=third_info)
    _mapped(model, read_open_clip_state(cfg))


def taken_prefixes(method: str) -> tuple[str, ...]:
    """Our names of what the method takes from an open_clip model (its temperature aside)."""
    return ("text_tower.",) if method == "lit" else TOWER_PREFIXES


def fresh_parameters(model: ThreeTowers) -> set[str]:
    """The trainable parameters model.init_from does not provide (3T's adaptor heads and heads on h,
    LiT's text head): they start random. The loss's temperatures count as provided (one tensor holds
    every term's, the (f, g) term's from open_clip)."""
    taken = taken_prefixes(model.cfg.model.method) + ("loss.",)
    return {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(taken)}


def _mapped(model: ThreeTowers, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our name -> open_clip's tensor for every parameter the method takes from it; refuses a misfit."""
    m = model.cfg.model
    where = f"model.init_from={m.init_from}" + (f" (model.init_config={m.init_config})" if m.init_config else "")
    prefixes = taken_prefixes(m.method)
    shapes = {k: v.shape for k, v in model.state_dict().items() if k.startswith(prefixes)}
    timm = m.image.kind == "timm" and m.method != "lit"
    ours, used = state_from_open_clip(state, shapes, timm, where)
    # LiT leaves open_clip's image side and text projection unused; anything else unused has no place here.
    unused = [k for k in state if k not in used and k not in _NOT_TOWERS
              and not (m.method == "lit" and k.startswith(("visual.", "text_projection")))]
    if unused:
        raise ConfigError(f"{where} holds parameters the configured towers have no place for: {', '.join(unused[:6])}"
                          + (f" (+{len(unused) - 6} more)" if len(unused) > 6 else ""))
    if m.method != "lit" and "logit_scale" not in state:
        raise ConfigError(f"{where} holds no logit_scale (the temperature of its image-text term)")
    if timm:
        _check_timm_normalisation(model.image_tower, m.init_from, m.init_config)
    return ours


def _check_timm_normalisation(tower: TimmTower, init_from: str, init_config: str) -> None:
    """Our timm tower normalises its input with timm's mean and std; the open_clip model must expect those."""
    _, preprocess, where = read_open_clip_config(init_from, init_config)
    theirs = [list(preprocess.get("mean", OPENAI_MEAN)), list(preprocess.get("std", OPENAI_STD))]
    cfg = tower.model.pretrained_cfg
    ours = [list(cfg.get("mean", (0.5,) * 3)), list(cfg.get("std", (0.5,) * 3))]
    if any(abs(a - b) > 1e-6 for x, y in zip(theirs, ours) for a, b in zip(x, y)):
        raise ConfigError(f"{where}: its images are normalised with mean {theirs[0]}, std {theirs[1]}, but threetowers' "
                          f"timm tower normalises with timm's {ours[0]}, {ours[1]}; they must agree")
