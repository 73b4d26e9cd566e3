"""Export a trained model to open_clip's `local-dir:` format, so open_clip, CLIP_benchmark and the
Hugging Face hub loader use it like any CLIP model.

The directory holds `open_clip_config.json` (model and preprocessing config), the weights
(`open_clip_model.safetensors`) and the tokenizer (`tokenizer.json` + `tokenizer_config.json`,
which open_clip reads through `transformers.AutoTokenizer`). What is exported is the inference
pair of CLIP and 3T: f and g with their projections (h is not needed at inference).

Our towers map onto open_clip's exactly, parameter for parameter, except for two things that
are mapped rather than copied: a bias on the patch embedding (open_clip's has none) is folded
into the patch tokens' position embeddings, which it is added to anyway; and our projections
(`nn.Linear`, [out, in]) become open_clip's matrices ([in, out]). Whatever open_clip cannot
represent is refused with the setting that differs. After writing, `check_parity` loads the
directory with open_clip and compares embeddings with ours.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from ..core.atomic import write_text_atomic
from ..core.formats import save_safetensors_atomic
from ..data.tokenizer import Tokenizer
from ..eval.tasks import load_saved
from ..model.factory import read_model_meta
from ..model.three_towers import ThreeTowers
from ..schema import Config

WEIGHTS = "open_clip_model.safetensors"
CONFIG = "open_clip_config.json"


class UnsupportedExport(ValueError):
    """The model has a part open_clip cannot represent; the message names the setting."""


def export_open_clip(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Write `out_dir` for `open_clip.create_model_and_transforms("local-dir:OUT_DIR")`. An existing
    `out_dir` is written into only if it is empty or an earlier export (nothing else is overwritten)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG).is_file())):
        raise FileExistsError(f"{out} exists and is not an earlier export ({CONFIG} missing); choose a new OUT_DIR")
    method = read_model_meta(model_dir)["config"]["model"]["method"]
    if method == "lit":
        raise UnsupportedExport(f"{model_dir} is a LiT model: its image side is the frozen third tower h, which "
                                "open_clip's towers do not hold; export a CLIP or 3T model (their f and g)")
    cfg, model, tokenizer = load_saved(model_dir, mixing=False)
    check_exportable(cfg, tokenizer)
    state = open_clip_state(model, cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic({k: v.contiguous() for k, v in state.items()}, out / WEIGHTS)
    save_tokenizer(tokenizer, out)
    write_text_atomic(out / CONFIG, json.dumps(open_clip_config(cfg, model, tokenizer), indent=2))  # last: marks it done
    return out


def check_exportable(cfg: Config, tokenizer: Tokenizer) -> None:
    """Refuse, naming the setting, what open_clip's CLIP cannot hold."""
    m = cfg.model
    problems = []
    if m.head != "linear":
        problems.append(f"model.head={m.head} (open_clip's projections are single matrices)")
    if m.image.kind == "vit" and m.image.pool != "cls":
        problems.append(f"model.image.pool={m.image.pool} (open_clip's ViT always has a class token that every "
                        "patch attends to)")
    if getattr(m.text, "kind", "transformer") != "transformer":
        problems.append(f"model.text.kind={m.text.kind} (only the built-in text transformer is exported)")
    if not m.text.causal:
        problems.append("model.text.causal=false (open_clip's text transformer masks padding only when causal)")
    if m.text.pool != "eot":
        problems.append(f"model.text.pool={m.text.pool} (open_clip pools the end-of-text token)")
    if tokenizer.offset:
        problems.append("a tokenizer whose id 0 is not padding (threetowers shifts its ids by one; open_clip would not)")
    if problems:
        raise UnsupportedExport("open_clip cannot represent " + "; ".join(problems))


def open_clip_state(model: ThreeTowers, cfg: Config) -> dict[str, torch.Tensor]:
    """Our f, g and projections under open_clip's parameter names."""
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if cfg.model.image.kind == "vit":
        out |= _vit(sd, cfg)
    else:  # timm: open_clip's TimmModel holds the same timm model as `trunk`, then a linear head
        out |= {"visual.trunk." + k[len("image_tower.model."):]: v for k, v in sd.items()
                if k.startswith("image_tower.model.")}
        out["visual.head.proj.weight"] = sd["proj_image.weight"]
    out |= _blocks(sd, "text_tower.blocks.", "transformer.resblocks.")
    out["token_embedding.weight"] = sd["text_tower.token_embed.weight"]
    out["positional_embedding"] = sd["text_tower.pos_embed"][0]
    out["ln_final.weight"], out["ln_final.bias"] = sd["text_tower.norm.weight"], sd["text_tower.norm.bias"]
    out["text_projection"] = sd["proj_text.weight"].T
    # The (f, g) term's temperature is the first (or the only, when shared) one.
    out["logit_scale"] = model.loss.scales()[0].detach().float().log().reshape(())
    if model.loss.bias is not None:
        out["logit_bias"] = model.loss.bias[0].detach().float().reshape(())
    return out


def _vit(sd: dict[str, torch.Tensor], cfg: Config) -> dict[str, torch.Tensor]:
    out = {"visual.conv1.weight": sd["image_tower.patch_embed.weight"],
           "visual.class_embedding": sd["image_tower.cls_token"].reshape(-1)}
    pos = sd["image_tower.pos_embed"][0].clone()
    if "image_tower.patch_embed.bias" in sd:  # added to every patch token, as its position embedding is
        pos[1:] += sd["image_tower.patch_embed.bias"]
    out["visual.positional_embedding"] = pos
    if cfg.model.image.pre_norm:
        out["visual.ln_pre.weight"], out["visual.ln_pre.bias"] = sd["image_tower.norm_pre.weight"], sd["image_tower.norm_pre.bias"]
    out |= _blocks(sd, "image_tower.blocks.", "visual.transformer.resblocks.")
    out["visual.ln_post.weight"], out["visual.ln_post.bias"] = sd["image_tower.norm.weight"], sd["image_tower.norm.bias"]
    out["visual.proj"] = sd["proj_image.weight"].T
    return out


# Our block's parameter names -> open_clip's ResidualAttentionBlock's (q, k, v are stacked alike).
_BLOCK_NAMES = {"norm1": "ln_1", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
                "attn.proj": "attn.out_proj", "norm2": "ln_2", "mlp.0": "mlp.c_fc", "mlp.2": "mlp.c_proj"}


def _blocks(sd: dict[str, torch.Tensor], ours: str, theirs: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if not key.startswith(ours):
            continue
        index, rest = key[len(ours):].split(".", 1)
        name = next((new + rest[len(old):] for old, new in _BLOCK_NAMES.items() if rest.startswith(old)), None)
        if name is None:
            raise UnsupportedExport(f"block parameter {key} has no counterpart in open_clip")
        out[f"{theirs}{index}.{name}"] = value
    return out


def open_clip_config(cfg: Config, model: ThreeTowers, tokenizer: Tokenizer) -> dict:
    m = cfg.model
    if m.image.kind == "vit":
        vision = {"image_size": m.image.image_size, "patch_size": m.image.patch_size, "width": m.image.width,
                  "layers": m.image.depth, "head_width": m.image.width // m.image.heads,
                  "mlp_ratio": m.image.mlp_ratio, "no_ln_pre": not m.image.pre_norm, "pool_type": "tok"}
        mean, std = list(m.image.mean), list(m.image.std)
    else:
        vision = {"image_size": m.image.image_size, "timm_model_name": m.image.timm_name, "timm_pool": "avg",
                  "timm_proj": "linear", "timm_proj_bias": False}
        mean, std = model.image_tower.mean.flatten().tolist(), model.image_tower.std.flatten().tolist()
    text = {"context_length": m.text.context_length, "vocab_size": m.text.vocab_size, "width": m.text.width,
            "heads": m.text.heads, "layers": m.text.depth, "mlp_ratio": m.text.mlp_ratio, "pool_type": "eos",
            "eos_id": tokenizer.eot_id, "pad_id": tokenizer.pad_id,
            # non-empty: open_clip then reads the tokenizer files of this directory (HFTokenizer)
            "hf_tokenizer_name": "threetowers"}
    model_cfg = {"embed_dim": m.embed_dim, "quick_gelu": False, "vision_cfg": vision, "text_cfg": text}
    if model.loss.bias is not None:
        model_cfg["init_logit_bias"] = float(model.loss.bias[0].detach())
    # Our evaluation resizes (bilinear) and centre-crops images to the tower's size; f normalises itself,
    # which open_clip leaves to the transform.
    preprocess = {"size": m.image.image_size, "mean": mean, "std": std, "interpolation": "bilinear",
                  "resize_mode": "shortest"}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess,
            "threetowers": {"method": m.method, "init_logit_scale": math.log(float(model.loss.scales()[0].detach()))}}


def save_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    """The tokenizer as `transformers` loads it: the same BPE, with the eot appended by its
    post-processor (truncation then keeps the eot last, as ours does) and padding with id 0."""
    hf = HFTokenizer.from_str(tokenizer.hf.to_str())
    eot = tokenizer.eot_token
    hf.post_processor = processors.TemplateProcessing(single=f"$A {eot}", special_tokens=[(eot, tokenizer.eot_id)])
    write_text_atomic(directory / "tokenizer.json", hf.to_str(pretty=True))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": hf.id_to_token(tokenizer.pad_id),
              "eos_token": eot, "model_max_length": tokenizer.context_length, "clean_up_tokenization_spaces": False}
    write_text_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2))


def require_open_clip():
    """open_clip, or the error that says how to get it (an optional dependency: imported here only)."""
    try:
        import open_clip
    except ImportError:
        raise UnsupportedExport("checking an export needs open_clip: pip install open-clip-torch "
                                "(or export with --no-check to skip the check)") from None
    return open_clip


def check_parity(model_dir: str | Path, out_dir: str | Path, texts: list[str] | None = None,
                 n_images: int = 8, seed: int = 0) -> dict[str, float]:
    """Load `out_dir` with open_clip and compare with our model on random images and on `texts`
    (open_clip's tokenizer against ours, then the embeddings): max |difference| per side, fp32."""
    open_clip = require_open_clip()
    _, ours, tokenizer = load_saved(model_dir, mixing=False)
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out_dir}")
    their_tokenizer = open_clip.get_tokenizer(f"local-dir:{out_dir}")
    theirs.eval()
    ours.eval()
    size = ours.cfg.model.image.image_size
    images = torch.rand(n_images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    texts = texts or ["a picture of a red star on a striped background.", "two things: a cross and a box.",
                      "an image", " ".join(["a very long caption"] * 20)]
    tokens = tokenizer(texts)
    their_tokens = their_tokenizer(texts)
    if not torch.equal(tokens, their_tokens):
        raise UnsupportedExport(f"open_clip tokenizes differently from threetowers in {out_dir}/tokenizer.json")
    mean = torch.tensor(theirs.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(theirs.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        image_diff = (ours.encode_image(images) - theirs.encode_image((images - mean) / std, normalize=True)).abs().max()
        text_diff = (ours.encode_text(tokens) - theirs.encode_text(their_tokens, normalize=True)).abs().max()
    return {"image": float(image_diff), "text": float(text_diff)}
