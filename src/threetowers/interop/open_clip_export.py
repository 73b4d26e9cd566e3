"""Export a trained model to open_clip's `local-dir:` format, so open_clip, CLIP_benchmark and the
Hugging Face hub loader use it like any CLIP model.

The directory holds `open_clip_config.json` (model and preprocessing config), the weights
(`open_clip_model.safetensors`) and the tokenizer (`tokenizer.json` + `tokenizer_config.json`,
which open_clip reads through `transformers.AutoTokenizer`). What is exported is the inference
pair of CLIP and 3T: f and g with their projections (h is not needed at inference).

Our towers map onto open_clip's exactly, parameter for parameter (the table, shared with the import
of `model.init_from`, is `towers/open_clip_arch.py`), except for two things that are mapped rather than
copied: a bias on the patch embedding (open_clip's has none) is folded into the patch tokens' position
embeddings, which it is added to anyway; and our projections (`nn.Linear`, [out, in]) become
open_clip's matrices ([in, out]). Whatever open_clip cannot represent is refused with the setting that
differs. After writing, `check_parity` loads the directory with open_clip and compares embeddings with ours.
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
from ..towers.open_clip_arch import CONFIG_FILE as CONFIG
from ..towers.open_clip_arch import TOWER_PREFIXES, WEIGHT_FILES, open_clip_name, text_cfg, to_open_clip, vision_cfg

WEIGHTS = WEIGHT_FILES[0]


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
    if m.image.kind == "vit" and m.image.act != m.text.act:
        problems.append(f"model.image.act={m.image.act} with model.text.act={m.text.act} (open_clip has one "
                        "activation, quick_gelu or not, for both towers)")
    if tokenizer.offset:
        problems.append("a tokenizer whose id 0 is not padding (threetowers shifts its ids by one; open_clip would not)")
    if problems:
        raise UnsupportedExport("open_clip cannot represent " + "; ".join(problems))


def open_clip_state(model: ThreeTowers, cfg: Config) -> dict[str, torch.Tensor]:
    """Our f, g and projections under open_clip's parameter names."""
    sd = {k: v.detach().float() for k, v in model.state_dict().items() if k.startswith(TOWER_PREFIXES)}
    patch_bias = sd.pop("image_tower.patch_embed.bias", None)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        found = open_clip_name(key, timm=cfg.model.image.kind == "timm")
        if found is None:
            raise UnsupportedExport(f"parameter {key} has no counterpart in open_clip")
        out[found[0]] = to_open_clip(value, found[1])
    if patch_bias is not None:  # added to every patch token, as its position embedding is
        out["visual.positional_embedding"] = out["visual.positional_embedding"].clone()
        out["visual.positional_embedding"][1:] += patch_bias
    # The (f, g) term's temperature is the first (or the only, when shared) one.
    out["logit_scale"] = model.loss.scales()[0].detach().float().log().reshape(())
    if model.loss.bias is not None:
        out["logit_bias"] = model.loss.bias[0].detach().float().reshape(())
    return out


def open_clip_config(cfg: Config, model: ThreeTowers, tokenizer: Tokenizer) -> dict:
    m = cfg.model
    vision = vision_cfg(m.image)
    if m.image.kind == "vit":
        mean, std = list(m.image.mean), list(m.image.std)
    else:
        mean, std = model.image_tower.mean.flatten().tolist(), model.image_tower.std.flatten().tolist()
    text = {**text_cfg(m.text), "eos_id": tokenizer.eot_id, "pad_id": tokenizer.pad_id,
            # non-empty: open_clip then reads the tokenizer files of this directory (HFTokenizer)
            "hf_tokenizer_name": "threetowers"}
    model_cfg = {"embed_dim": m.embed_dim, "quick_gelu": m.text.act == "quick_gelu", "vision_cfg": vision,
                 "text_cfg": text}
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
    post-processor (truncation then keeps the eot last, as ours does) and padding with id 0. CLIP's
    (`zero_pads`) is written as it is: its post-processor adds its start and end tokens already."""
    eot = tokenizer.eot_token
    if tokenizer.zero_pads:
        tokenizer.save(directory / "tokenizer.json")
        hf = tokenizer.hf
    else:
        hf = HFTokenizer.from_str(tokenizer.hf.to_str())
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
