"""The one place a model is built, saved and loaded: towers, h (built once) and the model files.

`create_model(cfg)` builds f and g from the config and each h from its source (or takes built h's,
or only their identities); `save_model` / `load_model` write and read the public model format
(model.safetensors + model.json, `core/formats.py`). An h is never stored: it is identified by its
fingerprint and rebuilt from its source when needed. model.json records every h's identity under
`thirds` (a list, model.thirds order) and the first h's under `third`, as models with one h always had.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import from_dict, to_dict
from ..core.formats import MODEL_FORMAT, read_meta, save_safetensors_atomic, saved_dir, write_meta
from ..schema import Config, ConfigError, third_sections
from ..third.tower import ThirdTower, check_same_third, load_third_tower
from ..towers.build import build_image_tower, build_text_tower
from .three_towers import ThreeTowers, needed_embeddings


def build_thirds(cfg: Config, device: torch.device | str = "cpu") -> list[ThirdTower]:
    """The config's h's ([] for CLIP; model.thirds order), each built from its source on `device`.
    Two that turn out to be one h (the same weights, preprocessing and precision: what decides its
    embeddings) are refused, whatever their settings say."""
    built: list[ThirdTower] = []
    seen: dict[str, str] = {}
    for where, section in third_sections(cfg.model):
        third = load_third_tower(section, device)
        info = third.info()
        same = repr((info["fingerprint"], info["preprocessing"], info["precision"]))
        if same in seen:
            raise ConfigError(f"{seen[same]} and {where} are the same h ({info['name']}, weights "
                              f"{info['fingerprint'][:12]}, input size {info['preprocessing']['input_size']}, "
                              f"{info['precision']}): two copies of one h add nothing but a second weight; list it once")
        seen[same] = where
        built.append(third)
    return built


def create_model(cfg: Config, third: ThirdTower | list[ThirdTower] | None = None,
                 third_info: dict | list[dict] | None = None, with_third: bool = True) -> ThreeTowers:
    """A new model for `cfg`: f and g freshly initialised; the h's as given (one h, or a list in
    model.thirds order), else built from their sources (unless `with_third=False` or `third_info`
    is given: then the model knows only the h's identities)."""
    image = build_image_tower(cfg.model.image) if needed_embeddings(cfg) & {"image", "image_h"} else None
    text = build_text_tower(cfg.model.text)
    if third is None and third_info is None and with_third:
        third = build_thirds(cfg)  # after f and g: their initial weights do not depend on how h is built
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
               {"config": to_dict(model.cfg), "third": model.third_info, "thirds": model.third_infos,
                "aliases": aliases, **(extra or {})})
    return directory


def read_model_meta(directory: str | Path) -> dict:
    return read_meta(saved_dir(directory) / "model.json", MODEL_FORMAT,
                     "a classifier from `pretrain` loads as a third tower (model.third.source=checkpoint)")


def recorded_thirds(meta: dict) -> list[dict]:
    """Every h's identity a model.json records: `thirds`, or in a model saved before there could be
    several, the one under `third` (none for CLIP)."""
    if meta.get("thirds") is not None:
        return list(meta["thirds"])
    return [meta["third"]] if meta.get("third") else []


def load_model(directory: str | Path, with_third: bool | None = None) -> ThreeTowers:
    """Rebuild a saved model (eval mode). h is rebuilt from its source only when needed (LiT) or
    asked for, and must have the fingerprint recorded at training time (`load_model_weights` checks)."""
    directory = saved_dir(directory)
    meta = read_model_meta(directory)
    cfg = from_dict(meta["config"])
    if with_third is None:
        with_third = cfg.model.method == "lit"
    third = build_thirds(cfg) if with_third else None
    model = create_model(cfg, third=third, third_info=recorded_thirds(meta) or None)
    load_model_weights(model, directory, meta)
    return model.eval()


def load_model_weights(model: ThreeTowers, directory: str | Path, meta: dict | None = None) -> None:
    """The weights saved in `directory` into `model`, strictly, except h: it is not stored, and the
    model keeps the h it was built with (which must be the one it was saved with)."""
    meta = meta or read_model_meta(directory)
    recorded = recorded_thirds(meta)
    found = list(getattr(model, "third_infos", []))
    if recorded and len(recorded) != len(found):
        raise ValueError(f"{directory} was trained with {len(recorded)} third tower(s), this model has {len(found)}")
    for was, now in zip(recorded, found):
        check_same_third(was, now, str(directory))
    state = load_file(str(Path(directory) / "model.safetensors"))
    for alias, target in meta.get("aliases", {}).items():
        state[alias] = state[target]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.split(".", 1)[0] not in model.third_module_names]
    if missing or unexpected:
        raise ValueError(f"{directory}/model.safetensors does not fit its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
