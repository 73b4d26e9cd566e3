"""One model for CLIP, LiT and 3T: towers, heads and the term loss, built from the config.

Which modules exist follows from the terms the method needs; which parameters train follows from
which modules exist (h is frozen by construction). `forward(batch)` returns the loss, its parts and
the named embeddings; `encode_image` / `encode_text` give the inference pair (f, g), or (h, g_h) for
LiT. h is not used at inference for CLIP and 3T.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_path, write_json_atomic
from ..config import Config, from_dict, to_dict
from ..data.sets import resize_batch
from ..losses import TermLoss, method_terms
from .heads import make_head
from .third_tower import ThirdTower, load_third_tower
from .towers import build_image_tower, build_text_tower

MODEL_FORMAT = "threetowers-model"


class ThreeTowers(nn.Module):
    def __init__(self, cfg: Config, third: ThirdTower | None = None, third_info: dict | None = None):
        """`third`: a built h (else built from cfg.model.third). `third_info`: build without h, knowing
        only its identity (inference with f and g, or training on cached h embeddings)."""
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.method = m.method
        self.terms = method_terms(m.method, cfg.loss.weights)
        self.used = used = {name for t in self.terms for name in (t.a, t.b)}  # the named embeddings

        self.image_tower = build_image_tower(m.image) if used & {"image", "image_h"} else None
        self.text_tower = build_text_tower(m.text)
        if m.method != "clip" and third is None and third_info is None:
            third = load_third_tower(m.third)
        self.third = third
        self.third_info = third.info() if third is not None else third_info

        h_dim = self.third_info["dim"] if self.third_info else 0
        if m.third.heads == "none" and m.third.head_dim and m.third.head_dim != h_dim:
            raise ValueError(f"model.third.head_dim={m.third.head_dim} needs model.third.heads=shared or per_term "
                             f"(h's own embedding size is {h_dim})")
        third_dim = m.third.head_dim or h_dim
        image_init, text_init = m.image.init, m.text.init  # each tower's heads follow its initialisation
        self.proj_image = make_head(self.image_tower.dim, m.embed_dim, m.head, image_init) if "image" in used else None
        self.proj_text = make_head(self.text_tower.dim, m.embed_dim, m.head, text_init) if "text" in used else None
        self.adapt_image = make_head(self.image_tower.dim, third_dim, m.head, image_init) if "image_h" in used else None  # f_h
        self.adapt_text = make_head(self.text_tower.dim, third_dim, m.head, text_init) if "text_h" in used else None  # g_h
        # Heads on h: h_f for the (f_h, h) term, h_g for the (g_h, h) term; shared = one module.
        self.third_head_f = self.third_head_g = None
        if m.third.heads in ("shared", "per_term"):
            self.third_head_g = nn.Linear(h_dim, third_dim, bias=False)
            if "third_f" in used:
                self.third_head_f = self.third_head_g if m.third.heads == "shared" else nn.Linear(h_dim, third_dim, bias=False)
        self.loss = TermLoss(self.terms, cfg.loss.kind, cfg.loss.temperature, cfg.loss.init_scale,
                             cfg.loss.max_scale, cfg.loss.init_bias)

    # ------------------------------------------------------------------ embeddings

    def third_features(self, images: torch.Tensor | None, cached: torch.Tensor | None = None) -> torch.Tensor:
        """h's pre-logits: from the cache when given, else by running the frozen h."""
        dim = self.third_info["dim"]
        if cached is not None:
            if cached.ndim != 2 or cached.shape[1] != dim:
                raise ValueError(f"cached third-tower embeddings have shape {tuple(cached.shape)}; expected [B, {dim}] "
                                 f"for {self.third_info['name']}")
            return cached.float()
        if self.third is None:
            raise ValueError("this model was built without its third tower h; pass cached embeddings as batch['third']")
        return self.third(images)

    def embeddings(self, batch: dict) -> dict[str, torch.Tensor]:
        """All named embeddings the terms need, L2-normalised. batch: image, tokens, optional third."""
        needed = self.used
        out: dict[str, torch.Tensor] = {}
        if needed & {"image", "image_h"}:
            f = self.image_tower(batch["image"])
            if "image" in needed:
                out["image"] = self.proj_image(f)
            if "image_h" in needed:
                out["image_h"] = self.adapt_image(f)
        g = self.text_tower(batch["tokens"])
        if "text" in needed:
            out["text"] = self.proj_text(g)
        if "text_h" in needed:
            out["text_h"] = self.adapt_text(g)
        if needed & {"third_f", "third_g"}:
            h = self.third_features(batch.get("image"), batch.get("third"))
            if "third_f" in needed:
                out["third_f"] = self.third_head_f(h) if self.third_head_f is not None else h
            out["third_g"] = self.third_head_g(h) if self.third_head_g is not None else h
        return {k: F.normalize(v.float(), dim=-1) for k, v in out.items()}

    def forward(self, batch: dict) -> dict:
        emb = self.embeddings(batch)
        total, parts = self.loss(emb)
        return {"loss": total, **parts, "embeddings": emb}

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] at any size (resized to the tower's) -> L2-normalised embeddings."""
        if self.method == "lit":
            return self.encode_image_third(images)
        images = resize_batch(images, self.cfg.model.image.image_size)  # as in training, for any tower kind
        return F.normalize(self.proj_image(self.image_tower(images)).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.method == "lit":
            return self.encode_text_third(tokens)
        return F.normalize(self.proj_text(self.text_tower(tokens)).float(), dim=-1)

    @torch.no_grad()
    def encode_image_third(self, images: torch.Tensor, cached: torch.Tensor | None = None) -> torch.Tensor:
        """h_g(h(I)): the image side of the LiT-like pair a 3T model also holds."""
        h = self.third_features(images, cached)
        return F.normalize((self.third_head_g(h) if self.third_head_g is not None else h).float(), dim=-1)

    @torch.no_grad()
    def encode_text_third(self, tokens: torch.Tensor) -> torch.Tensor:
        """g_h(g(T)): the text side of the LiT-like pair."""
        return F.normalize(self.adapt_text(self.text_tower(tokens)).float(), dim=-1)

    @property
    def has_third_pair(self) -> bool:
        return self.method == "3t"

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but h (h is identified by its fingerprint and rebuilt from its source)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("third.")}


# ---------------------------------------------------------------------- save / load


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
    meta = {"format": MODEL_FORMAT, "version": 1, "config": to_dict(model.cfg), "third": model.third_info,
            "aliases": aliases, **(extra or {})}
    write_json_atomic(directory / "model.json", meta)
    return directory


def read_model_meta(directory: str | Path) -> dict:
    path = Path(directory) / "model.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved threetowers model: {path.name} is missing")
    meta = json.loads(path.read_text())
    if meta.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} holds a {meta.get('format', 'unknown')!r} checkpoint, not a contrastive model "
                         f"({MODEL_FORMAT}); a classifier from `pretrain` loads as a third tower "
                         "(model.third.source=checkpoint)")
    return meta


def load_model(directory: str | Path, with_third: bool | None = None) -> ThreeTowers:
    """Rebuild a saved model. h is rebuilt from its source only when needed (LiT) or asked for,
    and must have the fingerprint recorded at training time."""
    meta = read_model_meta(directory)
    cfg = from_dict(meta["config"])
    if with_third is None:
        with_third = cfg.model.method == "lit"
    third = load_third_tower(cfg.model.third) if with_third and cfg.model.method != "clip" else None
    if third is not None and meta["third"] and third.fingerprint != meta["third"]["fingerprint"]:
        raise ValueError(f"the third tower {third.name} rebuilt from {cfg.model.third.source} differs from the one "
                         f"this model was trained with (weights fingerprint {third.fingerprint[:12]} vs "
                         f"{meta['third']['fingerprint'][:12]})")
    model = ThreeTowers(cfg, third=third, third_info=meta["third"])
    load_weights(model, directory, meta)
    return model.eval()


def load_weights(model: ThreeTowers, directory: str | Path, meta: dict) -> None:
    """The saved weights in `directory` into `model`, strictly, except h: it is not stored, and the
    model keeps the h it was built with."""
    state = load_file(str(Path(directory) / "model.safetensors"))
    for alias, target in meta.get("aliases", {}).items():
        state[alias] = state[target]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("third.")]
    if missing or unexpected:
        raise ValueError(f"{directory}/model.safetensors does not fit its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def save_safetensors_atomic(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write tensors (contiguous, on CPU) to a safetensors file atomically."""
    with atomic_path(path) as tmp:
        try:
            save_file(state, str(tmp))
        except SafetensorError as err:  # safetensors reports a full disk or a failed write as its own error type
            raise OSError(f"could not write {path}: {err}") from None
