"""Typed run configuration: dataclasses, YAML presets, `key.sub=value` overrides, validation.

OmegaConf does the merging and type checking; this module adds what OmegaConf does not:
closest-key suggestions, range and choice checks, and refusal of contradictory settings.
A whole run is one `Config`; methods (clip, lit, 3t) are presets of it, not code paths.
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

METHODS = ("clip", "lit", "3t")
PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A user error in a configuration: the message names the field and what is allowed."""


# ----------------------------------------------------------------------------- model


@dataclass
class ImageTowerConfig:
    """The trained image tower f: our ViT, or any timm model by name."""

    kind: str = "vit"  # vit | timm
    image_size: int = 32
    patch_size: int = 4
    width: int = 192
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    # Defaults chosen by the ablation in docs/towers.md (benchmarks/bench_quality.py).
    pool: str = "cls"  # cls (a class token) | gap (mean over the patch tokens)
    pre_norm: bool = True  # a LayerNorm on the embedded patches before the first block (CLIP's ln_pre)
    patch_bias: bool = False  # a bias in the patch embedding (redundant with pre_norm's offset)
    init: str = "clip"  # clip (CLIP's scheme; see models/blocks.py) | torch (PyTorch's layer defaults)
    timm_name: str = ""  # kind=timm: model name, created with num_classes=0 (pooled features)
    weights: str = ""  # optional local weights file (safetensors or state dict) for kind=timm
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class TextTowerConfig:
    """The trained text tower g: a transformer over BPE tokens."""

    vocab_size: int = 4096  # must match the tokenizer; `train` sets it from the tokenizer
    context_length: int = 32
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    causal: bool = True
    pool: str = "eot"  # eot (the end-of-text token) | mean (over valid tokens)
    init: str = "clip"  # clip (CLIP's scheme; see models/blocks.py) | torch (PyTorch's layer defaults)


@dataclass
class ThirdTowerConfig:
    """The frozen pretrained image model h (3T's third tower, LiT's locked image tower)."""

    source: str = "none"  # none | checkpoint | timm | torchvision | efficientnet_lite0 | callable
    name: str = ""  # timm/torchvision model name, or `package.module:callable`
    path: str = ""  # checkpoint of our `pretrain`, or a local weights file
    heads: str = "none"  # learned linear heads on h: none | shared | per_term
    head_dim: int = 0  # output size of heads on h; 0 = h's own embedding size
    input_size: int = 0  # 0 = the source's own input size; else resize h's input to this


@dataclass
class ModelConfig:
    method: str = "clip"  # clip | lit | 3t
    embed_dim: int = 128  # the shared space of f and g
    head: str = "linear"  # projection/adaptor head kind: linear | mlp
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    third: ThirdTowerConfig = field(default_factory=ThirdTowerConfig)


@dataclass
class LossConfig:
    kind: str = "softmax"  # softmax (InfoNCE) | sigmoid (SigLIP)
    temperature: str = "per_term"  # per_term | shared
    init_scale: float = 1 / 0.07  # initial t = exp(log_t): CLIP's 1/0.07 = 14.29
    max_scale: float = 100.0  # clamp on t; 0 = no clamp
    init_bias: float = -10.0  # sigmoid only
    # 3T term weights, in the order (f, g), (f_h, h), (g_h, h).
    weights: list[float] = field(default_factory=lambda: [1 / 3, 1 / 3, 1 / 3])


# ----------------------------------------------------------------------------- data


@dataclass
class WorldConfig:
    """The embedded benchmark: procedurally rendered captioned scenes (threetowers.data.world)."""

    seed: int = 0
    image_size: int = 48
    num_pairs: int = 20000
    caption_noise: float = 0.2
    sprites: str = "shapes"  # shapes | fashion_mnist | folder:PATH (comma-separated to mix)
    cache_dir: str = ""  # "" = ~/.cache/threetowers/world


@dataclass
class DataConfig:
    source: str = "world"  # world | webdataset | csv
    path: str = ""  # shards (local path, brace pattern, pipe: URL) or CSV/TSV file
    image_column: str = "image"
    caption_column: str = "caption"
    resampled: bool = True  # webdataset: sample with replacement (step-based training)
    shuffle_buffer: int = 2000
    num_workers: int = 0
    augment: bool = False
    max_bad_fraction: float = 0.05
    tokenizer: str = ""  # path to a tokenizer.json; "" = train BPE on the training captions
    third_embeddings: str = "cache"  # cache (h's features computed once, no augmentation) | online
    cache_dir: str = ""  # where h's embedding cache lives; "" = <output_dir>/../cache
    world: WorldConfig = field(default_factory=WorldConfig)


# ----------------------------------------------------------------------------- training


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0  # 0 = off
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    steps: int = 500
    batch_size: int = 128  # global batch, split across ranks
    grad_accum: int = 1
    precision: str = "bf16"  # bf16 | fp32
    threads: int = 0  # torch threads; 0 = leave torch's default
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | never | PATH
    on_nonfinite: str = "stop"  # stop | skip
    # With on_nonfinite=skip: stop anyway after this many skipped steps in a row, or in all.
    max_consecutive_skips: int = 5
    max_skipped_steps: int = 50
    log_every: int = 20
    progress: bool = True
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    tensorboard: bool = True  # TensorBoard event files in <output_dir>/tensorboard (the JSONL log is always written)


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N steps during training; 0 = only at the end
    # World tasks: zeroshot_object, zeroshot_scene, retrieval, fewshot_object, fewshot_scene; your own
    # data: zeroshot:FOLDER (one subfolder per class) and retrieval:CSV (image path + caption columns).
    tasks: list[str] = field(default_factory=lambda: [
        "zeroshot_object", "zeroshot_scene", "retrieval", "fewshot_object", "fewshot_scene"])
    num_images: int = 1000  # images per zero-shot task and few-shot test set
    retrieval_images: int = 500  # held-out world images for retrieval (captions_per_image each)
    captions_per_image: int = 5
    fewshot_shots: list[int] = field(default_factory=lambda: [1, 5, 10])
    fewshot_seeds: list[int] = field(default_factory=lambda: [0, 1])
    batch_size: int = 256
    # 3T only: also score with s_a = (1 - a)<f, g> + a<h_g(h), g_h> for each a (an evaluation option).
    mixing_alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])


@dataclass
class PretrainConfig:
    """`threetowers pretrain`: a supervised classifier (model.image's architecture) that later serves as h."""

    dataset: str = "world_object"  # world_object | world_scene | fashion_mnist | folder:PATH
    num_images: int = 20000  # training images (world: rendered from data.world.seed; others: at most this many)
    num_heldout: int = 1000  # held-out images for the top-1 accuracy reported at the end


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


# ----------------------------------------------------------------------------- validation

_CHOICES = {
    "model.method": METHODS,
    "model.head": ("linear", "mlp"),
    "model.image.kind": ("vit", "timm"),
    "model.image.pool": ("cls", "gap"),
    "model.text.pool": ("eot", "mean"),
    "model.image.init": ("clip", "torch"),
    "model.text.init": ("clip", "torch"),
    "model.third.source": ("none", "checkpoint", "timm", "torchvision", "efficientnet_lite0", "callable"),
    "model.third.heads": ("none", "shared", "per_term"),
    "loss.kind": ("softmax", "sigmoid"),
    "loss.temperature": ("per_term", "shared"),
    "data.source": ("world", "webdataset", "csv"),
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
    "eval.every": (0, float("inf")),
    "train.seed": (0, 2**32 - 1),
    "train.max_consecutive_skips": (1, float("inf")),
    "train.max_skipped_steps": (1, float("inf")),
    "data.num_workers": (0, float("inf")),
    "data.shuffle_buffer": (0, float("inf")),
    "loss.max_scale": (0.0, float("inf")),
}
# Every float field must be a finite number (inf or nan would train nothing, silently).
_FINITE = ("optim.lr", "optim.eps", "optim.weight_decay", "optim.grad_clip", "loss.init_scale", "loss.max_scale",
           "loss.init_bias", "model.image.mlp_ratio", "model.text.mlp_ratio", "data.max_bad_fraction",
           "data.world.caption_noise")
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
    if m.text.width % m.text.heads:
        raise ConfigError(f"model.text.width={m.text.width} must be divisible by model.text.heads={m.text.heads}")
    if m.method == "clip":
        if m.third.source != "none" or m.third.heads != "none":
            raise ConfigError(
                "model.method=clip uses no third tower, but model.third.source="
                f"{m.third.source!r}, model.third.heads={m.third.heads!r}; use method=lit or 3t, "
                "or set model.third.source=none"
            )
    else:
        if m.third.source == "none":
            raise ConfigError(
                f"model.method={m.method} needs a frozen pretrained image model: set model.third.source "
                "(checkpoint | timm | torchvision | efficientnet_lite0 | callable)"
            )
        if m.method == "lit" and m.third.heads == "per_term":
            raise ConfigError("model.method=lit has one term; model.third.heads must be none or shared")
    weights = list(cfg.loss.weights)
    if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ConfigError(f"loss.weights={weights} must be three non-negative numbers (fg, fh, gh)")
    if m.method == "3t" and not sum(weights) > 0:
        raise ConfigError(f"loss.weights={weights}: with every weight 0, 3T has no loss to train on; give at "
                          "least one term a positive weight")
    if cfg.loss.max_scale and cfg.loss.max_scale < cfg.loss.init_scale:
        raise ConfigError(f"loss.max_scale={cfg.loss.max_scale} is below loss.init_scale={cfg.loss.init_scale}")
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        raise ConfigError(f"data.max_bad_fraction={cfg.data.max_bad_fraction} must be in [0, 1]")
    if not 0 <= cfg.data.world.caption_noise <= 1:
        raise ConfigError(f"data.world.caption_noise={cfg.data.world.caption_noise} must be in [0, 1]")
    if cfg.data.source != "world" and not cfg.data.path:
        raise ConfigError(f"data.source={cfg.data.source} needs data.path")
    validate_eval(cfg.eval)
    per_rank = cfg.train.batch_size // world_size
    if cfg.train.batch_size % world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the world size {world_size}")
    if per_rank % cfg.train.grad_accum:
        raise ConfigError(
            f"train.batch_size per rank ({per_rank}) is not divisible by train.grad_accum={cfg.train.grad_accum}"
        )
    return cfg


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


def _check_keys(overrides: DictConfig | dict, valid: list[str], where: str) -> None:
    flat = OmegaConf.to_container(OmegaConf.create(overrides)) if not isinstance(overrides, dict) else overrides

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            name = f"{prefix}{key}"
            if name not in valid:
                close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"unknown config key {name!r} in {where}{hint}")
            walk(value, name + ".")

    walk(flat, "")


def resolve_preset(name_or_path: str) -> Path:
    """A preset name (`clip`, `demo/3t_object`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.exists():
        return preset
    names = sorted(str(p.relative_to(PRESET_DIR).with_suffix("")) for p in PRESET_DIR.rglob("*.yaml"))
    raise ConfigError(f"no config file or preset named {name_or_path!r}; presets: {', '.join(names)}")


def load_config(
    preset: str | Path | None = None, overrides: list[str] | dict | None = None, world_size: int = 1
) -> Config:
    """Defaults <- YAML preset (may name `defaults: [other]` presets first) <- overrides, validated."""
    valid = _all_keys(Config())
    merged = OmegaConf.structured(Config)
    try:
        if preset is not None:
            for layer in _preset_layers(resolve_preset(str(preset))):
                _check_keys(layer, valid, "preset")
                merged = OmegaConf.merge(merged, layer)
        if overrides:
            layer = override_layer(overrides)
            _check_keys(OmegaConf.to_container(layer), valid, "overrides")
            merged = OmegaConf.merge(merged, layer)
    except (ValidationError, ConfigKeyError) as err:
        raise ConfigError(f"{err.full_key}: {str(err.msg).splitlines()[0]}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(str(err)) from None
    cfg: Config = OmegaConf.to_object(merged)
    return validate(cfg, world_size)


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


# Fields added after the first saved models: the value a saved config without them meant (the
# architecture those models were built with), so that they still load as they were trained.
_ADDED_FIELDS = {
    ("model", "image", "pre_norm"): False, ("model", "image", "patch_bias"): True,
    ("model", "image", "init"): "torch", ("model", "text", "init"): "torch",
}


def fill_added_fields(data: dict, section: tuple[str, ...] = ()) -> dict:
    """A copy of a saved config (or of its `section`, e.g. ("model", "image")) with the fields added
    since it was written set to what their absence meant."""
    data = copy.deepcopy(data)
    for path, value in _ADDED_FIELDS.items():
        if path[: len(section)] != section:
            continue
        node = data
        for part in path[len(section):-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] not in node:
            node[path[-1]] = value
    return data


def from_dict(data: dict) -> Config:
    """Rebuild a Config saved with a run or checkpoint (unknown keys are an error)."""
    return load_config(None, fill_added_fields(data))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
