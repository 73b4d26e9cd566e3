"""The one place a model is built, saved and loaded: towers, h (built once) and the model files.

`create_model(cfg)` builds f and g from the config and h from its source (or takes a built h, or
only h's identity); `save_model` / `load_model` write and read the public model format
(model.safetensors + model.json, `core/formats.py`). h is never stored: it is identified by its
fingerprint and rebuilt from its source when needed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import from_dict, to_dict
from ..core.formats import MODEL_FORMAT, read_meta, save_safetensors_atomic, saved_dir, write_meta
from ..schema import Config
from ..third.tower import ThirdTower, check_same_third, load_third_tower
from ..towers.build import build_image_tower, build_text_tower
from .three_towers import ThreeTowers, needed_embeddings


def build_third(cfg: Config, device: torch.device | str = "cpu") -> ThirdTower | None:
    """h of the config's method (None for CLIP), built from its source on `device`."""
    return None if cfg.model.method == "clip" else load_third_tower(cfg.model.third, device)


def create_model(cfg: Config, third: ThirdTower | None = None, third_info: dict | None = None,
                 with_third: bool = True) -> ThreeTowers:
    """A new model for `cfg`: f and g freshly initialised; h as given, else built from its source
    (unless `with_third=False` or `third_info` is given: then the model knows only h's identity)."""
    image = build_image_tower(cfg.model.image) if needed_embeddings(cfg) & {"image", "image_h"} else None
    text = build_text_tower(cfg.model.text)
    if third is None and third_info is None and with_third:
        third = build_third(cfg)  # after f and g: their initial weights do not depend on how h is built
    return ThreeTowers(cfg, image, text, third=third, third_info=third_info)


def save_model(model: ThreeTowers, directory: str | Path, extra: dict | None = None) -> Path:
    """model.safetensors + model.json (config, h's identity) in `directory`, each written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    # Shared heads are one tensor under two names; safetensors refuses aliases, so store each once.
    seen: dict[int, str] = {}
    aliases = {}
    for k in list(state):
        ptr = state[k].data_ptr()
        if ptr in seen:
            aliases[k] = seen[ptr]
            del state[k]
        else:
            seen[ptr] = k
    save_safetensors_atomic(state, directory / "model.safetensors")
    write_meta(directory / "model.json", MODEL_FORMAT,
               {"config": to_dict(model.cfg), "third": model.third_info, "aliases": aliases, **(extra or {})})
    return directory


def read_model_meta(directory: str | Path) -> dict:
    return read_meta(saved_dir(directory) / "model.json", MODEL_FORMAT,
                     "a classifier from `pretrain` loads as a third tower (model.third.source=checkpoint)")


def load_model(directory: str | Path, with_third: bool | None = None) -> ThreeTowers:
    """Rebuild a saved model (eval mode). h is rebuilt from its source only when needed (LiT) or
    asked for, and must have the fingerprint recorded at training time (`load_model_weights` checks)."""
    directory = saved_dir(directory)
    meta = read_model_meta(directory)
    cfg = from_dict(meta["config"])
    if with_third is None:
        with_third = cfg.model.method == "lit"
    third = build_third(cfg) if with_third else None
    model = create_model(cfg, third=third, third_info=meta["third"])
    load_model_weights(model, directory, meta)
    return model.eval()


def load_model_weights(model: ThreeTowers, directory: str | Path, meta: dict | None = None) -> None:
    """The weights saved in `directory` into `model`, strictly, except h: it is not stored, and the
    model keeps the h it was built with (which must be the one it was saved with)."""
    meta = meta or read_model_meta(directory)
    check_same_third(meta.get("third"), getattr(model, "third_info", None), str(directory))
    state = load_file(str(Path(directory) / "model.safetensors"))
    for alias, target in meta.get("aliases", {}).items():
        state[alias] = state[target]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("third.")]
    if missing or unexpected:
        raise ValueError(f"{directory}/model.safetensors does not fit its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
