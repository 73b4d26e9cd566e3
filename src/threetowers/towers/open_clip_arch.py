"""open_clip's CLIP in threetowers' terms: the one table of how our towers' config fields and
parameters correspond to open_clip's, read in both directions (`threetowers export`: ours -> open_clip;
`model.init_from`: open_clip -> ours), and the refusal of what our towers cannot be.

Our ViT and text transformer are open_clip's `VisionTransformer` and text transformer parameter for
parameter when configured as open_clip configures them: class-token pooling, a LayerNorm before the ViT
blocks (or none: `no_ln_pre`), no bias on the patch embedding, a causal text tower pooled at its
end-of-text token, linear projections, GELU or QuickGELU. A timm image tower is open_clip's `TimmModel`:
the same timm model as `trunk`, average pooling, a linear head without bias. Whatever else an open_clip
config sets (attentional pooling, layer scale, CoCa, a Hugging Face text tower, ...) is refused by name.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed

from ..schema import ConfigError

LOCAL_DIR = "local-dir:"  # open_clip's prefix for a model folder (open_clip_config.json + weights + tokenizer)
CONFIG_FILE = "open_clip_config.json"
# What open_clip loads from a local-dir, in its order of preference (open_clip/factory.py).
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
# open_clip's preprocessing default (open_clip/constants.py OPENAI_DATASET_MEAN / _STD), for configs without their own.
OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# ----------------------------------------------------------------------------- config fields

# open_clip's vision_cfg / text_cfg field -> our ImageTowerConfig / TextTowerConfig field, holding the same number.
VISION_FIELDS = {"image_size": "image_size", "patch_size": "patch_size", "width": "width", "layers": "depth",
                 "mlp_ratio": "mlp_ratio"}
TEXT_FIELDS = {"context_length": "context_length", "vocab_size": "vocab_size", "width": "width", "heads": "heads",
               "layers": "depth", "mlp_ratio": "mlp_ratio"}
# open_clip 3.3's defaults (CLIPVisionCfg / CLIPTextCfg in open_clip/model.py) for fields a config leaves out.
VISION_DEFAULTS = {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "head_width": 64, "mlp_ratio": 4.0}
TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "mlp_ratio": 4.0,
                 "pool_type": "argmax", "eos_id": 2}
TIMM_HEAD = {"timm_pool": "avg", "timm_proj": "linear", "timm_proj_bias": False}  # what our timm tower + head are

# What our towers are, as open_clip settings: (allowed values); any other value is refused, naming the setting.
_VISION_FIXED = {
    "ls_init_value": (None,), "patch_dropout": (0, 0.0), "attentional_pool": (False,), "pos_embed_type": ("learnable",),
    "pool_type": ("tok",), "act_kwargs": (None, {}), "norm_kwargs": (None, {}), "block_type": (None, "default"),
    "qk_norm": (False,), "scaled_cosine_attn": (False,), "scale_heads": (False,), "scale_attn_inner": (False,),
    "scale_attn": (False,), "scale_fc": (False,), "timm_drop": (0, 0.0), "timm_drop_path": (None, 0, 0.0),
    **{k: (v,) for k, v in TIMM_HEAD.items()},
}
_TEXT_FIXED = {
    "ls_init_value": (None,), "embed_cls": (False,), "pad_id": (0,), "no_causal_mask": (False,), "proj_bias": (False,),
    "proj_type": ("linear",), "act_kwargs": (None, {}), "norm_kwargs": (None, {}), "block_type": (None, "default"),
    "qk_norm": (False,), "scaled_cosine_attn": (False,), "scale_heads": (False,), "scale_attn_inner": (False,),
    "scale_attn": (False,), "scale_fc": (False,), "hf_model_name": (None, ""), "tokenizer_mode": (None, ""),
    "tokenizer_kwargs": (None, {}), "pool_type": ("argmax", "eos"),
}
# Settings that change nothing our towers compute (a LayerNorm after pooling one token is that token's
# LayerNorm), only what open_clip returns, downloads or tokenizes with (the tokenizer is checked on its own).
_VISION_FREE = {"final_ln_after_pool", "output_tokens", "attn_pooler_queries", "attn_pooler_heads",
                "timm_model_pretrained", "timm_model_name", "head_width", "no_ln_pre", *VISION_FIELDS}
_TEXT_FREE = {"final_ln_after_pool", "output_tokens", "hf_tokenizer_name", "eos_id", "hf_model_pretrained",
              "hf_proj_type", "hf_pooler_type", *TEXT_FIELDS}
_MODEL_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias",
               "nonscalar_logit_scale", "custom_text", "cast_dtype", "output_dict", "preprocess_cfg"}
# Why some settings are refused, in the words a user knows them by.
_NAMED = {"multimodal_cfg": "CoCa's multimodal decoder", "text_cfg.hf_model_name": "a Hugging Face text tower",
          "vision_cfg.attentional_pool": "attentional pooling", "text_cfg.embed_cls": "a text class token, as CoCa's",
          "vision_cfg.ls_init_value": "layer scale", "text_cfg.ls_init_value": "layer scale",
          "vision_cfg.pool_type": "threetowers' ViT pools its class token: tok",
          "text_cfg.pool_type": "threetowers' text tower pools its end-of-text token: argmax or eos"}


def vision_cfg(image) -> dict:
    """open_clip's vision_cfg for our ImageTowerConfig."""
    if image.kind != "vit":
        return {"image_size": image.image_size, "timm_model_name": image.timm_name, **TIMM_HEAD}
    return {**{theirs: getattr(image, ours) for theirs, ours in VISION_FIELDS.items()},
            "head_width": image.width // image.heads, "no_ln_pre": not image.pre_norm, "pool_type": "tok"}


def text_cfg(text) -> dict:
    """open_clip's text_cfg for our TextTowerConfig (pooled at the end-of-text token: add its eos_id)."""
    return {**{theirs: getattr(text, ours) for theirs, ours in TEXT_FIELDS.items()}, "pool_type": "eos"}


def arch_layer(model_cfg: dict, preprocess: dict, where: str) -> dict:
    """Our config fields (a layer for load_config) for an open_clip model_cfg; refuses what our towers are not."""
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    problems = _unsupported(model_cfg, vision, text)
    if problems:
        raise ConfigError(f"{where}: threetowers' towers cannot hold this open_clip model: {'; '.join(problems)}")
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    v = {**VISION_DEFAULTS, **vision}
    if isinstance(v["image_size"], (list, tuple)):  # [224, 224]: square (other sizes are refused above)
        v["image_size"] = v["image_size"][0]
    if vision.get("timm_model_name"):
        image = {"kind": "timm", "timm_name": vision["timm_model_name"], "image_size": v["image_size"]}
    else:
        image = {"kind": "vit", **{ours: v[theirs] for theirs, ours in VISION_FIELDS.items()},
                 "heads": v["width"] // v["head_width"], "pool": "cls", "pre_norm": not vision.get("no_ln_pre", False),
                 "patch_bias": False, "act": act, "mean": list(preprocess.get("mean", OPENAI_MEAN)),
                 "std": list(preprocess.get("std", OPENAI_STD))}
    t = {**TEXT_DEFAULTS, **text}
    layer = {"model": {"embed_dim": model_cfg["embed_dim"], "head": "linear", "image": image,
                       "text": {"kind": "transformer", **{ours: t[theirs] for theirs, ours in TEXT_FIELDS.items()},
                                "causal": True, "pool": "eot", "act": act}}}
    if model_cfg.get("init_logit_bias") is not None:  # a SigLIP-style model: its bias belongs to the sigmoid loss
        layer["loss"] = {"kind": "sigmoid", "init_bias": float(model_cfg["init_logit_bias"])}
    return layer


def _unsupported(model_cfg: dict, vision: dict, text: dict) -> list[str]:
    problems = [f"{k} ({_NAMED.get(k, 'not a setting threetowers knows')})" for k in model_cfg if k not in _MODEL_KEYS]
    if "embed_dim" not in model_cfg:
        problems.append("embed_dim is missing")
    layers, size = vision.get("layers", 12), vision.get("image_size", 224)
    if isinstance(layers, (list, tuple)):
        problems.append(f"vision_cfg.layers={layers} (a ModifiedResNet image tower)")
    if isinstance(size, (list, tuple)) and len(set(size)) > 1:
        problems.append(f"vision_cfg.image_size={size} (non-square images)")
    width, head_width = vision.get("width", 768), vision.get("head_width", 64)
    if not vision.get("timm_model_name") and isinstance(width, int) and width % head_width:
        problems.append(f"vision_cfg.width={width} is not a multiple of vision_cfg.head_width={head_width}")
    for section, cfg, fixed, free in (("vision_cfg", vision, _VISION_FIXED, _VISION_FREE),
                                      ("text_cfg", text, _TEXT_FIXED, _TEXT_FREE)):
        for key, value in cfg.items():
            if key in fixed and value not in fixed[key]:
                why = _NAMED.get(f"{section}.{key}", f"threetowers' towers have {key}={fixed[key][0]!r}")
                problems.append(f"{section}.{key}={value!r} ({why})")
            elif key not in fixed and key not in free:
                problems.append(f"{section}.{key} (not a setting threetowers knows)")
    return problems


# ----------------------------------------------------------------------------- reading an open_clip model


def read_open_clip_config(init_from: str, init_config: str = "") -> tuple[dict, dict, str]:
    """(model_cfg, preprocess_cfg, where it was read) of the open_clip model `model.init_from` names."""
    if init_from.startswith(LOCAL_DIR):
        if init_config:
            raise ConfigError(f"model.init_config={init_config!r}: model.init_from={init_from} is a local-dir "
                              f"folder, whose {CONFIG_FILE} is its config; leave model.init_config empty")
        path = Path(init_from[len(LOCAL_DIR):]) / CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"model.init_from={init_from}: {path} does not exist; a local-dir: folder holds "
                              f"{CONFIG_FILE}, the weights ({WEIGHT_FILES[0]}) and tokenizer.json, as "
                              "`threetowers export` writes them")
        return _model_cfg(_read_json(path, "model.init_from"), str(path))
    if not Path(init_from).is_file():
        raise ConfigError(f"model.init_from={init_from!r} is neither local-dir:PATH nor an existing weights file "
                          "(.pt, .bin, .safetensors)")
    if not init_config:
        raise ConfigError(f"model.init_from={init_from} is a weights file: name its architecture in "
                          "model.init_config (an open_clip model name such as ViT-B-32, or a model_cfg JSON file)")
    if init_config.endswith(".json") or Path(init_config).is_file():
        found = _model_cfg(_read_json(Path(init_config), "model.init_config"), init_config)
    else:
        found = _named_model_cfg(init_config)
    if found[0]["text_cfg"].get("hf_tokenizer_name"):
        raise ConfigError(f"{found[2]} tokenizes with the Hugging Face hub's {found[0]['text_cfg']['hf_tokenizer_name']}, "
                          "which threetowers does not download: save the model as an open_clip local-dir folder with "
                          "its tokenizer.json and use model.init_from=local-dir:PATH")
    return found


def _named_model_cfg(init_config: str) -> tuple[dict, dict, str]:
    if ":" in init_config:  # hf-hub:... would download
        raise ConfigError(f"model.init_config={init_config!r}: threetowers reads no hub; give an open_clip model "
                          "name, a model_cfg JSON file, or model.init_from=local-dir:PATH")
    try:
        import open_clip
    except ImportError:
        raise ConfigError(f"model.init_config={init_config} names an open_clip model, which needs open_clip "
                          "(pip install open-clip-torch); or give the model_cfg as a JSON file") from None
    model_cfg = open_clip.get_model_config(init_config)
    if model_cfg is None:
        close = difflib.get_close_matches(init_config, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ConfigError(f"model.init_config={init_config!r} is not an open_clip model name{hint} "
                          "(open_clip.list_models() lists them), nor a model_cfg JSON file")
    return _model_cfg(model_cfg, f"open_clip's {init_config}")


def _model_cfg(data: dict, where: str) -> tuple[dict, dict, str]:
    """An open_clip_config.json ({model_cfg, preprocess_cfg}) or a bare model_cfg."""
    model_cfg = data.get("model_cfg", data)
    if not isinstance(model_cfg, dict) or "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
        raise ConfigError(f"{where} is not an open_clip model config (vision_cfg and text_cfg missing)")
    return model_cfg, data.get("preprocess_cfg", model_cfg.get("preprocess_cfg", {})), where


def _read_json(path: Path, field: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{field}: {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{field}: {path} is not valid JSON ({err})") from None


def weights_file(init_from: str) -> Path:
    """The weights of `model.init_from`: the file itself, or the one open_clip would load from a local-dir."""
    if not init_from.startswith(LOCAL_DIR):
        return Path(init_from)
    directory = Path(init_from[len(LOCAL_DIR):])
    found = next((directory / name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    if found is None:
        raise ConfigError(f"model.init_from={init_from} holds no weights ({' or '.join(WEIGHT_FILES)})")
    return found


# ----------------------------------------------------------------------------- parameters

# Our block's parameter names -> open_clip's ResidualAttentionBlock's (q, k, v are stacked alike).
BLOCK_NAMES = {"norm1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
               "attn.proj": "attn.out_proj", "norm2": "ln_2", "mlp.0": "mlp.c_fc", "mlp.2": "mlp.c_proj"}
BLOCKS = {"image_tower.blocks.": "visual.transformer.resblocks.", "text_tower.blocks.": "transformer.resblocks."}
TIMM_TRUNK = ("image_tower.model.", "visual.trunk.")
# (our name in ThreeTowers' state dict, open_clip's, how the tensors differ): "" not at all; "batch" ours has a
# leading axis of 1; "flat" ours is [1, 1, W], theirs [W]; "T" ours is nn.Linear's [out, in], theirs [in, out].
VIT_PARAMS = [
    ("image_tower.patch_embed.weight", "visual.conv1.weight", ""), ("image_tower.cls_token", "visual.class_embedding", "flat"),
    ("image_tower.pos_embed", "visual.positional_embedding", "batch"),
    ("image_tower.norm_pre.weight", "visual.ln_pre.weight", ""), ("image_tower.norm_pre.bias", "visual.ln_pre.bias", ""),
    ("image_tower.norm.weight", "visual.ln_post.weight", ""), ("image_tower.norm.bias", "visual.ln_post.bias", ""),
    ("proj_image.weight", "visual.proj", "T"),
]
TIMM_PARAMS = [("proj_image.weight", "visual.head.proj.weight", "")]
TEXT_PARAMS = [
    ("text_tower.token_embed.weight", "token_embedding.weight", ""), ("text_tower.pos_embed", "positional_embedding", "batch"),
    ("text_tower.norm.weight", "ln_final.weight", ""), ("text_tower.norm.bias", "ln_final.bias", ""),
    ("proj_text.weight", "text_projection", "T"),
]
TOWER_PREFIXES = ("image_tower.", "text_tower.", "proj_image.", "proj_text.")  # what open_clip holds of ours


def open_clip_name(key: str, timm: bool = False) -> tuple[str, str] | None:
    """(open_clip's name, how the tensors differ) for one of our state dict's keys; None if it has none."""
    for ours, theirs, how in (TIMM_PARAMS if timm else VIT_PARAMS) + TEXT_PARAMS:
        if key == ours:
            return theirs, how
    if timm and key.startswith(TIMM_TRUNK[0]):
        return TIMM_TRUNK[1] + key[len(TIMM_TRUNK[0]):], ""
    for ours, theirs in BLOCKS.items():
        if key.startswith(ours):
            index, rest = key[len(ours):].split(".", 1)
            name = next((new + rest[len(old):] for old, new in BLOCK_NAMES.items() if rest.startswith(old)), None)
            return (f"{theirs}{index}.{name}", "") if name else None
    return None


_TO_OPEN_CLIP = {"": lambda t: t, "batch": lambda t: t[0], "flat": lambda t: t.reshape(-1), "T": lambda t: t.T}
_FROM_OPEN_CLIP = {"": lambda t: t, "batch": lambda t: t[None], "flat": lambda t: t.reshape(1, 1, -1), "T": lambda t: t.T}


def to_open_clip(tensor: torch.Tensor, how: str) -> torch.Tensor:
    return _TO_OPEN_CLIP[how](tensor)


def from_open_clip(tensor: torch.Tensor, how: str) -> torch.Tensor:
    return _FROM_OPEN_CLIP[how](tensor)


def fit_positions(key: str, tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Position embeddings for other sizes than open_clip's, as fine-tuning at another resolution does:
    the image grid resampled bicubically (timm's resample_abs_pos_embed; the class token's kept), the
    text positions cut to a shorter context (a causal text tower never reads later positions). Any
    other tensor, or a longer context, is returned as it is (and refused for its shape)."""
    if tuple(tensor.shape) == tuple(shape) or tensor.ndim != 3 or tensor.shape[2] != shape[2]:
        return tensor
    if key == "text_tower.pos_embed" and shape[1] < tensor.shape[1]:
        return tensor[:, : shape[1]].clone()
    old, new = math.isqrt(tensor.shape[1] - 1), math.isqrt(shape[1] - 1)
    if key == "image_tower.pos_embed" and old * old + 1 == tensor.shape[1] and new * new + 1 == shape[1]:
        return resample_abs_pos_embed(tensor, [new, new], [old, old], num_prefix_tokens=1)
    return tensor


def state_from_open_clip(theirs: dict[str, torch.Tensor], shapes: dict[str, torch.Size], timm: bool,
                         where: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Our tensors for each key of `shapes` (our name -> shape) from open_clip's state `theirs`, and the
    open_clip names used; refuses, naming the parameters, what does not fit."""
    out, used, problems = {}, set(), []
    for key, shape in shapes.items():
        found = open_clip_name(key, timm)
        if found is None or found[0] not in theirs:
            problems.append(f"{key} has no counterpart" + (f" ({found[0]} missing)" if found else ""))
            continue
        tensor = from_open_clip(theirs[found[0]], found[1])
        tensor = fit_positions(key, tensor, shape)
        if tuple(tensor.shape) != tuple(shape):
            needed = tuple(to_open_clip(torch.empty(shape, device="meta"), found[1]).shape)
            problems.append(f"{found[0]} has shape {tuple(theirs[found[0]].shape)}; the configured {key} needs {needed}")
            continue
        out[key] = tensor
        used.add(found[0])
    if problems:
        raise ConfigError(f"{where} does not fit the configured towers: {'; '.join(problems[:6])}"
                          + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else ""))
    return out, used
