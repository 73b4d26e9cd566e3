"""The run configuration's schema: typed dataclasses, their defaults, and what old saved configs meant.

Only data lives here, so that every layer (towers, h's sources, data, training) can take its
section of the config without importing the loading and validation code in `config.py`, which in
turn asks the registries above (h's sources) what is allowed. A whole run is one `Config`;
methods (clip, lit, 3t) are presets of it, not code paths.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field


METHODS = ("clip", "lit", "3t")


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
    act: str = "gelu"  # the blocks' activation: gelu | quick_gelu (OpenAI's CLIP weights; open_clip's quick_gelu)
    timm_name: str = ""  # kind=timm: model name, created with num_classes=0 (pooled features)
    weights: str = ""  # optional local weights file (safetensors or state dict) for kind=timm
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])


@dataclass
class TextTowerConfig:
    """The trained text tower g: our transformer over BPE tokens, or a local Hugging Face encoder."""

    kind: str = "transformer"  # transformer | hf (a pretrained encoder in `name`, with its own tokenizer)
    name: str = ""  # kind=hf: a local Hugging Face model folder (config.json, weights, tokenizer.json)
    lock: bool = False  # kind=hf: keep the encoder's weights frozen (only the heads on it train)
    vocab_size: int = 4096  # must match the tokenizer; `train` sets it from the tokenizer
    context_length: int = 32
    width: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    causal: bool = True
    pool: str = "eot"  # eot (the end-of-text token) | mean (over valid tokens) | cls (the first token; kind=hf)
    init: str = "clip"  # clip (CLIP's scheme; see models/blocks.py) | torch (PyTorch's layer defaults)
    act: str = "gelu"  # the blocks' activation: gelu | quick_gelu (OpenAI's CLIP weights; open_clip's quick_gelu)


@dataclass
class ThirdTowerConfig:
    """The frozen pretrained image model h (3T's third tower, LiT's locked image tower)."""

    source: str = "none"  # none, or a registered source: checkpoint | timm | torchvision | efficientnet_lite0 | callable | a plugin's
    name: str = ""  # timm/torchvision model name, or `package.module:callable`
    path: str = ""  # checkpoint of our `pretrain`, or a local weights file
    heads: str = "none"  # learned linear heads on h: none | shared | per_term
    head_dim: int = 0  # output size of heads on h; 0 = h's own embedding size
    input_size: int = 0  # 0 = the source's own input size; else resize h's input to this
    # h's arithmetic: auto (bf16 autocast on CUDA, fp32 on the CPU) | fp32 | bf16; part of the cache's identity
    precision: str = "auto"


@dataclass
class ModelConfig:
    method: str = "clip"  # clip | lit | 3t
    embed_dim: int = 128  # the shared space of f and g
    head: str = "linear"  # projection/adaptor head kind: linear | mlp
    # An open_clip architecture by name (configs/arch/: ViT-B-32, ViT-B-16, ViT-L-14), layered over the preset and
    # beneath the command line's overrides. Kept as a record: once loaded, the tower fields hold the shape.
    arch: str = ""
    # Start from an open_clip model: local-dir:PATH (a `threetowers export` / open_clip local-dir folder) or a
    # weights file (.pt, .bin, .safetensors) whose architecture init_config names (an open_clip model name such
    # as ViT-B-32, or a model_cfg JSON file). Its architecture is layered like arch; f, g, their projections and
    # the (f, g) temperature start from its weights (LiT: g's trunk only). A resumed run takes its checkpoint.
    init_from: str = ""
    init_config: str = ""
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    third: ThirdTowerConfig = field(default_factory=ThirdTowerConfig)
    # Several third towers h_1..h_K at once (3T only): a list of sections like `third`, each with its own source,
    # heads and adaptors. Unset (null) = the one h of `third` (K = 1). A layer that sets `thirds` replaces the
    # `third` of the layers beneath it (a preset's); both set at once is refused (docs/method.md, "Several third towers").
    thirds: list[ThirdTowerConfig] | None = None


@dataclass
class LossConfig:
    kind: str = "softmax"  # softmax (InfoNCE) | sigmoid (SigLIP)
    temperature: str = "per_term"  # per_term | shared
    init_scale: float = 1 / 0.07  # initial t = exp(log_t): CLIP's 1/0.07 = 14.29
    max_scale: float = 100.0  # clamp on t; 0 = no clamp
    init_bias: float = -10.0  # sigmoid only
    # 3T term weights, 1 + 2K numbers in the order (f, g), then (f_h, h), (g_h, h) for each h (model.thirds order):
    # null = (f, g) keeps 1/3 and the 2K h terms share 2/3 equally (K = 1: 1/3 each); see `loss_weights`.
    weights: list[float] | None = None


# ----------------------------------------------------------------------------- data


@dataclass
class WorldConfig:
    """The embedded benchmark: procedurally rendered captioned scenes (threetowers.world.world)."""

    seed: int = 0
    image_size: int = 48
    num_pairs: int = 20000
    caption_noise: float = 0.2
    sprites: str = "shapes"  # shapes | fashion_mnist | folder:PATH (comma-separated to mix)
    colour_words: float = 1.0  # the chance that a caption names an object's colour (below 1: shapes must be seen)
    scene_words: float = 1.0  # the chance that a caption names the background (else "a background")
    max_objects: int = 3  # the most objects in a training or retrieval picture (1-3)
    object_scale: float = 1.0  # multiplies every sprite's box (capped at the image side)
    cache_dir: str = ""  # "" = ~/.cache/threetowers/world


@dataclass
class DataConfig:
    source: str = "world"  # world | webdataset | csv
    path: str = ""  # shards (local path, brace pattern, pipe: URL) or CSV/TSV file
    image_column: str = "image"
    caption_column: str = "caption"
    # webdataset: indexed (random access to local shards: exact resume, h's embeddings cached per
    # shard) | stream (any URL, pipe: included; resume is statistically equivalent, not exact)
    shard_access: str = "indexed"
    resampled: bool = True  # stream only: sample shards with replacement (step-based training)
    shuffle_buffer: int = 2000  # stream only
    num_workers: int = 0  # DataLoader processes that read and decode batches (0: in the training process)
    augment: bool = False
    max_bad_fraction: float = 0.05
    tokenizer: str = ""  # path to a tokenizer.json; "" = train BPE on the training captions
    third_embeddings: str = "cache"  # cache (h's features computed once, no augmentation) | online
    cache_dir: str = ""  # where h's embedding cache lives; "" = <output_dir>/../cache
    cache_batch_size: int = 256  # images per h forward pass while building h's embedding cache
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
    # With model.init_from: the learning rate of the parameters it does not provide (3T's heads into and on
    # h's space, LiT's text head), as a multiple of lr: heads that start random beside pretrained towers.
    fresh_lr_scale: float = 1.0


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
    # A checkpoint also when this many minutes of wall time (rank 0's clock) have passed since the last one,
    # whatever the step time: bounds the work a hard kill loses (0 = off). docs/scale.md, "Pre-emption and restarts".
    checkpoint_minutes: float = 0.0
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto | never | PATH
    # Signals that stop the run cleanly: every rank finishes its step, a checkpoint is written, exit status 75
    # (core/preemption.py). Without SIGINT here, Ctrl-C interrupts at once (exit status 130).
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1"])
    on_nonfinite: str = "stop"  # stop | skip
    # With on_nonfinite=skip: stop anyway after this many skipped steps in a row, or in all.
    max_consecutive_skips: int = 5
    max_skipped_steps: int = 50
    log_every: int = 20
    progress: bool = True
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    # How long a rank may wait in a collective, above all for rank 0 alone rendering, decoding, building
    # caches or evaluating (torch's own default, 10 minutes, is too short for those).
    dist_timeout_minutes: float = 120.0
    tensorboard: bool = True  # TensorBoard event files in <output_dir>/tensorboard (the JSONL log is always written)
    grad_checkpointing: bool = False  # recompute the towers' activations in backward: less memory, ~1/3 more compute
    compile: bool = False  # torch.compile the training step's model (same results to rounding; pays off on GPUs)
    # An EMA of the trained weights (training/ema.py), 0 = off; e.g. 0.999 averages ~1/(1-0.999) = 1000 steps.
    # When on, the final model/ (what is evaluated and exported) holds the EMA; checkpoints keep the raw weights too.
    ema_decay: float = 0.0
    # The device's peak FLOP/s in the training precision, for the logged model-FLOPs utilisation
    # (perf/mfu); 0 = not reported. E.g. H100/H200 SXM bf16 dense 989e12, A100 bf16 312e12 (docs/benchmarks.md).
    peak_flops: float = 0.0


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


# ----------------------------------------------------------------------------- what the h settings mean


def third_sections(m: ModelConfig) -> list[tuple[str, ThirdTowerConfig]]:
    """Each h of the model with the config field that sets it: model.thirds[k] when the list is given,
    else model.third (K = 1; K = 0 for CLIP). The one reading of `third` and `thirds` everything uses."""
    if m.thirds is not None:
        return [(f"model.thirds[{k}]", t) for k, t in enumerate(m.thirds)]
    return [] if m.method == "clip" else [("model.third", m.third)]


def loss_weights(cfg: Config) -> list[float]:
    """The 3T term weights (w_fg, w_fh, w_gh, w_fh.2, w_gh.2, ..., w_fh.K, w_gh.K): loss.weights, or by default 1/3 for
    (f, g) and 2/3 shared equally by the 2K h terms. Why: f and g are what is kept at inference, and their
    term keeps the weight it has with one h however many h's there are, while adding an h neither
    outweighs the others nor grows the total pull towards h's (K = 1 gives today's 1/3 each)."""
    if cfg.loss.weights is not None:
        return [float(w) for w in cfg.loss.weights]
    k = len(third_sections(cfg.model))
    return [1 / 3] + ([2 / 3 / (2 * k)] * (2 * k) if k else [])  # K = 1: 2/3/2 is 1/3 to the last bit


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
