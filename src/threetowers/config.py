"""Loading a run configuration: YAML presets, `key.sub=value` overrides, validation.

The fields themselves live in `schema.py` (re-exported here, the config's one face). OmegaConf
does the merging and type checking; this module adds what OmegaConf does not: closest-key
suggestions, range and choice checks (h's sources: the registry in `third/registry.py` is asked),
and refusal of contradictory settings.
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .schema import (  # noqa: F401  (re-exported: the config's face)
    METHODS, Config, ConfigError, DataConfig, EvalConfig, ImageTowerConfig, LossConfig, ModelConfig, OptimConfig,
    PretrainConfig, TextTowerConfig, ThirdTowerConfig, TrainConfig, WorldConfig, fill_added_fields, loss_weights,
    third_sections,
)
from .third.sections import validate_thirds
from .core.distributed import world_size_from_env
from .core.preemption import signal_number
from .towers.open_clip_arch import arch_layer, read_open_clip_config

PRESET_DIR = Path(__file__).parent / "configs"
ARCH_DIR = PRESET_DIR / "arch"  # model.arch: open_clip's architectures by name, `model:` fields only

# ----------------------------------------------------------------------------- validation

_CHOICES = {
    "model.method": METHODS,
    "model.head": ("linear", "mlp"),
    "model.image.kind": ("vit", "timm"),
    "model.image.pool": ("cls", "gap"),
    "model.text.kind": ("transformer", "hf"),
    "model.text.pool": ("eot", "mean", "cls"),
    "model.image.init": ("clip", "torch"),
    "model.text.init": ("clip", "torch"),
    "model.image.act": ("gelu", "quick_gelu"),
    "model.text.act": ("gelu", "quick_gelu"),
    "loss.kind": ("softmax", "sigmoid"),
    "loss.temperature": ("per_term", "shared"),
    "data.source": ("world", "webdataset", "csv"),
    "data.shard_access": ("indexed", "stream"),
    "data.third_embeddings": ("cache", "online"),
    "train.precision": ("bf16", "fp32"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.device": ("auto", "cpu", "cuda"),
}
_POSITIVE = (
    "model.embed_dim", "model.image.image_size", "model.image.patch_size", "model.image.width",
    "model.image.depth", "model.image.heads", "model.text.vocab_size", "model.text.context_length",
    "model.text.width", "model.text.depth", "model.text.heads", "loss.init_scale", "train.steps",
    "train.batch_size", "train.grad_accum", "train.log_every", "train.checkpoint_every",
    "train.keep_checkpoints", "data.world.num_pairs", "data.world.image_size", "optim.lr", "optim.eps",
    "pretrain.num_images", "pretrain.num_heldout", "model.image.mlp_ratio", "model.text.mlp_ratio",
    "eval.num_images", "eval.retrieval_images", "eval.captions_per_image", "eval.batch_size",
    "train.dist_timeout_minutes",
    "data.cache_batch_size", "optim.fresh_lr_scale",
)
# Inclusive ranges [low, high] for fields that must not go negative or past a bound.
_RANGES = {
    "optim.weight_decay": (0.0, float("inf")),
    "optim.beta1": (0.0, 0.999999),
    "optim.beta2": (0.0, 0.999999),
    "optim.grad_clip": (0.0, float("inf")),
    "optim.warmup_steps": (0, float("inf")),
    "optim.min_lr_ratio": (0.0, 1.0),
    "train.threads": (0, float("inf")),
    "train.peak_flops": (0.0, float("inf")),
    "eval.every": (0, float("inf")),
    "train.seed": (0, 2**32 - 1),
    "train.max_consecutive_skips": (1, float("inf")),
    "train.max_skipped_steps": (1, float("inf")),
    "data.num_workers": (0, float("inf")),
    "data.shuffle_buffer": (0, float("inf")),
    "loss.max_scale": (0.0, float("inf")),
}
# Every float field must be a finite number (inf or nan would train nothing, silently).
_FINITE = ("optim.lr", "optim.eps", "optim.fresh_lr_scale", "optim.weight_decay", "optim.grad_clip", "loss.init_scale", "loss.max_scale",
           "loss.init_bias", "model.image.mlp_ratio", "model.text.mlp_ratio", "data.max_bad_fraction",
           "data.world.caption_noise", "data.world.colour_words", "data.world.scene_words",
           "data.world.object_scale", "train.dist_timeout_minutes")
PRETRAIN_DATASETS = ("world_object", "world_scene", "fashion_mnist", "folder:PATH")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(node):
        value = getattr(node, f.name)
        name = prefix + f.name
        keys.append(name)
        if is_dataclass(value):
            keys.extend(_all_keys(value, name + "."))
    return keys


def validate(cfg: Config, world_size: int = 1) -> Config:
    """Refuse values out of range and contradictory settings before any work starts."""
    for key, allowed in _CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")
    for key in _POSITIVE:
        value = _get(cfg, key)
        if not value > 0:
            raise ConfigError(f"{key}={value!r} must be > 0")
    for key in _FINITE:
        value = _get(cfg, key)
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be a finite number")
    for key, (low, high) in _RANGES.items():
        value = _get(cfg, key)
        if not low <= value <= high:
            raise ConfigError(f"{key}={value!r} is out of range; allowed: {low} <= {key.split('.')[-1]} <= {high}")
    ds = cfg.pretrain.dataset
    if ds not in PRETRAIN_DATASETS[:-1] and not (ds.startswith("folder:") and len(ds) > len("folder:")):
        raise ConfigError(f"pretrain.dataset={ds!r} is not allowed; choose one of {', '.join(PRETRAIN_DATASETS)}")
    m = cfg.model
    validate_init(cfg)
    if m.image.kind == "vit":
        if m.image.image_size % m.image.patch_size:
            raise ConfigError(
                f"model.image.image_size={m.image.image_size} must be divisible by "
                f"model.image.patch_size={m.image.patch_size}"
            )
        if m.image.width % m.image.heads:
            raise ConfigError(f"model.image.width={m.image.width} must be divisible by model.image.heads={m.image.heads}")
    if m.image.kind == "timm" and not m.image.timm_name:
        raise ConfigError("model.image.kind=timm needs model.image.timm_name (a timm model name)")
    if m.text.kind == "hf":
        if not m.text.name:
            raise ConfigError("model.text.kind=hf needs model.text.name: a local Hugging Face model folder "
                              "(config.json, model weights, tokenizer.json)")
        missing = [f for f in ("config.json", "tokenizer.json") if not (Path(m.text.name) / f).is_file()]
        if missing:
            raise ConfigError(f"model.text.name={m.text.name} is not a Hugging Face model folder ({', '.join(missing)} "
                              "missing); give the folder of a saved encoder, e.g. from save_pretrained")
        if m.text.pool == "eot":
            raise ConfigError("model.text.kind=hf needs model.text.pool=mean (sentence-transformers encoders such as "
                              "all-MiniLM-L6-v2) or cls (BERT's [CLS] token)")
        if cfg.data.tokenizer:
            raise ConfigError("model.text.kind=hf uses the encoder's own tokenizer; leave data.tokenizer empty")
    elif m.text.pool == "cls" or m.text.lock:
        raise ConfigError(f"model.text.{'pool=cls' if m.text.pool == 'cls' else 'lock=true'} is for a pretrained "
                          "encoder (model.text.kind=hf); our transformer pools eot or mean and always trains")
    elif m.text.width % m.text.heads:
        raise ConfigError(f"model.text.width={m.text.width} must be divisible by model.text.heads={m.text.heads}")
    validate_thirds(cfg)
    if cfg.loss.max_scale and cfg.loss.max_scale < cfg.loss.init_scale:
        raise ConfigError(f"loss.max_scale={cfg.loss.max_scale} is below loss.init_scale={cfg.loss.init_scale}")
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        raise ConfigError(f"data.max_bad_fraction={cfg.data.max_bad_fraction} must be in [0, 1]")
    if not 0 <= cfg.data.world.caption_noise <= 1:
        raise ConfigError(f"data.world.caption_noise={cfg.data.world.caption_noise} must be in [0, 1]")
    for key in ("colour_words", "scene_words"):
        if not 0 <= getattr(cfg.data.world, key) <= 1:
            raise ConfigError(f"data.world.{key}={getattr(cfg.data.world, key)} must be in [0, 1]")
    if cfg.data.world.max_objects not in (1, 2, 3):
        raise ConfigError(f"data.world.max_objects={cfg.data.world.max_objects} must be 1, 2 or 3")
    if not 0.5 <= cfg.data.world.object_scale <= 2:
        raise ConfigError(f"data.world.object_scale={cfg.data.world.object_scale} must be in [0.5, 2]")
    if cfg.data.source != "world" and not cfg.data.path:
        raise ConfigError(f"data.source={cfg.data.source} needs data.path")
    if not 0 <= cfg.train.ema_decay < 1:
        raise ConfigError(f"train.ema_decay={cfg.train.ema_decay} must be in [0, 1) (0 = off; e.g. 0.999)")
    validate_stopping(cfg.train)
    validate_eval(cfg.eval)
    per_rank = cfg.train.batch_size // world_size
    if cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the world size {world_size}")
    if per_rank % cfg.train.grad_accum:
        raise ConfigError(
            f"train.batch_size per rank ({per_rank}) is not divisible by train.grad_accum={cfg.train.grad_accum}"
        )
    return cfg


def validate_init(cfg: Config) -> None:
    """model.init_from's settings that contradict each other (its files are read when the config is loaded)."""
    m = cfg.model
    if cfg.optim.fresh_lr_scale != 1 and not m.init_from:
        raise ConfigError(f"optim.fresh_lr_scale={cfg.optim.fresh_lr_scale} scales the learning rate of what "
                          "model.init_from does not provide; without model.init_from every parameter starts fresh "
                          "and optim.lr is theirs: leave optim.fresh_lr_scale at 1")
    if m.init_config and not m.init_from:
        raise ConfigError(f"model.init_config={m.init_config!r} names the architecture of model.init_from, "
                          "which is empty; set model.init_from=FILE (or use model.arch to train that shape from scratch)")
    if not m.init_from:
        return
    if m.arch:
        raise ConfigError(f"model.arch={m.arch} and model.init_from={m.init_from} both name an architecture; the open_clip "
                          "model's config sets it (for a weights file: model.init_config), so drop model.arch")
    if m.text.kind != "transformer":
        raise ConfigError(f"model.init_from loads open_clip's text transformer into g; model.text.kind={m.text.kind} "
                          "has no place for it")
    if cfg.data.tokenizer:
        raise ConfigError("model.init_from brings its own tokenizer (the one its text tower was trained with); "
                          "leave data.tokenizer empty")


def validate_stopping(t: TrainConfig) -> None:
    """train.stop_signals name signals a process can catch; train.checkpoint_minutes is 0 (off) or more."""
    for name in t.stop_signals:
        try:
            signal_number(str(name))
        except ValueError as err:
            raise ConfigError(f"train.stop_signals={list(t.stop_signals)}: {err}") from None
    if not (math.isfinite(t.checkpoint_minutes) and t.checkpoint_minutes >= 0):
        raise ConfigError(f"train.checkpoint_minutes={t.checkpoint_minutes} must be > 0 (the minutes between two "
                          "checkpoints) or 0 (off)")


WORLD_TASKS = ("zeroshot_object", "zeroshot_scene", "retrieval", "fewshot_object", "fewshot_scene")
USER_TASKS = ("zeroshot:", "retrieval:")  # zeroshot:FOLDER, retrieval:CSV


def validate_eval(e: EvalConfig) -> None:
    """The evaluation settings, checked before training so that a typo cannot cost a finished run."""
    for name in e.tasks:
        user = next((p for p in USER_TASKS if name.startswith(p)), None)
        if name not in WORLD_TASKS and not (user and len(name) > len(user)):
            close = difflib.get_close_matches(name, WORLD_TASKS, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"eval.tasks: unknown task {name!r}{hint} Choose from {', '.join(WORLD_TASKS)}, "
                              "zeroshot:FOLDER, retrieval:CSV")
    if any(not k > 0 for k in e.fewshot_shots):
        raise ConfigError(f"eval.fewshot_shots={list(e.fewshot_shots)} must all be > 0")
    if any(s < 0 for s in e.fewshot_seeds):
        raise ConfigError(f"eval.fewshot_seeds={list(e.fewshot_seeds)} must all be >= 0")
    if any(not (math.isfinite(a) and 0 <= a <= 1) for a in e.mixing_alphas):
        raise ConfigError(f"eval.mixing_alphas={list(e.mixing_alphas)} must all be in [0, 1]")


def check_eval_paths(e: EvalConfig) -> None:
    """The folders and files that `zeroshot:` / `retrieval:` tasks name exist (checked before training)."""
    for name in e.tasks:
        prefix = next((p for p in USER_TASKS if name.startswith(p)), None)
        if prefix and not Path(name[len(prefix):]).exists():
            raise ConfigError(f"eval.tasks: {name!r} names {name[len(prefix):]!r}, which does not exist")


# ----------------------------------------------------------------------------- loading


# Lists of sections: the fields each entry may set are those of the section named here.
_LIST_SECTIONS = {"model.thirds": "model.third"}


def _check_keys(overrides: DictConfig | dict, valid: list[str], where: str) -> None:
    flat = OmegaConf.to_container(OmegaConf.create(overrides)) if not isinstance(overrides, dict) else overrides

    def walk(node: Any, prefix: str, shown: str) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            name, show = f"{prefix}{key}", f"{shown}{key}"
            if name not in valid:
                close = [shown + c[len(prefix):] for c in difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
                         if c.startswith(prefix)] or difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"unknown config key {show!r} in {where}{hint}")
            if name in _LIST_SECTIONS and isinstance(value, list):
                for i, item in enumerate(value):
                    walk(item, _LIST_SECTIONS[name] + ".", f"{show}[{i}].")
            else:
                walk(value, name + ".", show + ".")

    walk(flat, "", "")


def resolve_preset(name_or_path: str) -> Path:
    """A preset name (`clip`, `demo/3t_object`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    names = sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in PRESET_DIR.rglob("*.yaml")
                   if ARCH_DIR not in p.parents)
    raise ConfigError(f"no config file or preset named {name_or_path!r}; presets: {', '.join(names)}")


def load_config(
    preset: str | Path | None = None, overrides: list[str] | dict | None = None, world_size: int = 1,
    base: dict | None = None,
) -> Config:
    """Defaults <- YAML preset (may name `defaults: [other]` presets first) <- the architecture that
    model.arch or model.init_from names <- overrides, validated: an explicit override beats the
    architecture, which beats the preset's towers. `base`: a resolved config (a saved one, a Config's
    dict) over the defaults; an architecture is layered over it only if the preset or overrides name one."""
    valid = _all_keys(Config())
    merged = OmegaConf.structured(Config)
    try:
        if base is not None:
            _check_keys(base, valid, "config")
            merged = OmegaConf.merge(merged, base)
        layers = [("preset", layer) for layer in _preset_layers(resolve_preset(str(preset)))] if preset is not None else []
        if overrides:
            layers.append(("overrides", OmegaConf.to_container(override_layer(overrides))))
        for where, layer in layers:
            _check_keys(layer, valid, where)
        architecture = _architecture_layer({key: _last_set(layers, key) for key in ("arch", "init_from", "init_config")})
        if architecture:
            _check_keys(architecture, valid, "model.arch / model.init_from")
            layers.insert(len(layers) - bool(overrides), ("", architecture))
        for _, layer in layers:
            merged = _merge_layer(merged, layer)
    except (ValidationError, ConfigKeyError) as err:
        raise ConfigError(f"{err.full_key}: {str(err.msg).splitlines()[0]}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(str(err)) from None
    cfg: Config = OmegaConf.to_object(merged)
    return validate(cfg, world_size)


def _merge_layer(merged: DictConfig, layer: dict) -> DictConfig:
    """`layer` over `merged`. A layer that sets model.thirds replaces the model.third of the layers beneath it
    (a preset's one h), as an override replaces a preset's value; model.third and model.thirds set by the
    same layer, or model.third set over a list, contradict each other and are refused by `validate_thirds`."""
    model = layer.get("model") if isinstance(layer.get("model"), dict) else {}
    if model.get("thirds") is not None and "third" not in model:
        merged.model.third = OmegaConf.structured(ThirdTowerConfig)
    return OmegaConf.merge(merged, layer)


def _last_set(layers: list[tuple[str, dict]], key: str) -> str:
    """model.<key> as the last of `layers` that sets it has it ("" if none does)."""
    values = [layer["model"][key] for _, layer in layers if isinstance(layer.get("model"), dict) and key in layer["model"]]
    return str(values[-1]) if values and values[-1] is not None else ""


def arch_names() -> list[str]:
    return sorted(p.stem for p in ARCH_DIR.glob("*.yaml"))


def _architecture_layer(model: dict) -> dict:
    """The `model:` fields that model.arch (a file in configs/arch/) or model.init_from (an open_clip
    model's config) names, or {} when neither is set."""
    if model["init_from"] and not model["arch"]:  # both set: refused by validate_init, with the reason
        return arch_layer(*read_open_clip_config(model["init_from"], model["init_config"]))
    if not model["arch"]:
        return {}
    names = arch_names()
    if model["arch"] not in names:
        close = difflib.get_close_matches(model["arch"], names, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"model.arch={model['arch']!r} is not an architecture threetowers knows{hint} "
                          f"Choose one of {', '.join(names)} (files in {ARCH_DIR})")
    layer: dict = {}
    for part in _preset_layers(ARCH_DIR / f"{model['arch']}.yaml"):
        if set(part) - {"model"}:
            raise ConfigError(f"{ARCH_DIR / model['arch']}.yaml may set only model: fields, not {sorted(set(part) - {'model'})}")
        layer = OmegaConf.to_container(OmegaConf.merge(layer, part))
    return layer


def override_layer(overrides: list[str] | dict) -> DictConfig:
    """`key.sub=value` strings (or a nested dict) as one OmegaConf layer. `key=` with nothing after
    the `=` sets the empty string (OmegaConf alone would read it as null), e.g. model.third.path=."""
    if isinstance(overrides, dict):
        return OmegaConf.create(overrides)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} must look like key.sub=value")
    return OmegaConf.from_dotlist([o + "''" if o.endswith("=") else o for o in overrides])


def _preset_layers(path: Path) -> list[dict]:
    data = OmegaConf.to_container(OmegaConf.load(path)) or {}
    parents = data.pop("defaults", [])
    layers: list[dict] = []
    for parent in parents:
        layers.extend(_preset_layers(resolve_preset(parent)))
    return layers + [data]


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def from_dict(data: dict) -> Config:
    """Rebuild a Config saved with a run or checkpoint (unknown keys are an error)."""
    return load_config(None, base=fill_added_fields(data))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def resolve_config(cfg_or_preset: Config | str | Path, overrides: list[str] | dict | None = None,
                   world_size: int | None = None) -> Config:
    """A validated private copy of the config: from a Config, a preset name or a YAML path, plus overrides."""
    world_size = world_size or world_size_from_env()
    if not isinstance(cfg_or_preset, Config):
        return load_config(cfg_or_preset, overrides, world_size=world_size)
    if not overrides:
        return validate(copy.deepcopy(cfg_or_preset), world_size)
    return load_config(None, overrides, world_size=world_size, base=to_dict(cfg_or_preset))
