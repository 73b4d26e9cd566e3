"""One model for CLIP, LiT and 3T: built towers, heads and the term loss.

`ThreeTowers` takes towers already built (`model/factory.py` builds them and h, and does all file
I/O); it only adds the heads the method's terms need. Which modules exist follows from the terms;
which parameters train follows from which modules exist (h is frozen by construction). `forward(batch)` returns the loss, its parts and
the named embeddings; `encode_image` / `encode_text` give the inference pair (f, g), or (h, g_h) for
LiT. h is not used at inference for CLIP and 3T.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.sets import image_floats, resize_batch
from ..schema import Config
from ..third.tower import ThirdTower
from ..towers.heads import make_head
from .losses import TermLoss, method_terms


def needed_embeddings(cfg: Config) -> set[str]:
    """The named embeddings the method's loss terms compare (e.g. {"image", "text"} for CLIP)."""
    return {name for t in method_terms(cfg.model.method, cfg.loss.weights) for name in (t.a, t.b)}


class ThreeTowers(nn.Module):
    def __init__(self, cfg: Config, image_tower: nn.Module | None, text_tower: nn.Module,
                 third: ThirdTower | None = None, third_info: dict | None = None):
        """Built towers: f (None when no term needs it, as in LiT), g, and h, or only h's identity
        `third_info` (inference with f and g, or training on cached h embeddings)."""
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.method = m.method
        self.terms = method_terms(m.method, cfg.loss.weights)
        self.used = used = needed_embeddings(cfg)
        if (image_tower is None) != (not used & {"image", "image_h"}):
            raise ValueError(f"model.method={m.method} {'needs' if image_tower is None else 'has no use for'} an image tower f")
        if m.method != "clip" and third is None and third_info is None:
            raise ValueError(f"model.method={m.method} needs its third tower h, or at least h's identity (third_info)")
        self.image_tower = image_tower
        self.text_tower = text_tower
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
        """h's pre-logits: from the cache when given, else by running the frozen h on `images` (h's
        own pixels: any size, resized and normalised by h)."""
        dim = self.third_info["dim"]
        if cached is not None:
            if cached.ndim != 2 or cached.shape[1] != dim:
                raise ValueError(f"cached third-tower embeddings have shape {tuple(cached.shape)}; expected [B, {dim}] "
                                 f"for {self.third_info['name']}")
            return cached.float()
        if self.third is None:
            raise ValueError("this model was built without its third tower h; pass cached embeddings as batch['third'] "
                             "(or load it with with_third=True)")
        return self.third(images)

    def embeddings(self, batch: dict) -> dict[str, torch.Tensor]:
        """All named embeddings the terms need, L2-normalised. batch: image (uint8 [B, H, W, 3] as
        stored, or float [B, 3, H, W] in [0, 1]; any size, resized here to f's on the batch's device),
        tokens, and for h either its cached embeddings `third` or its own pixels `third_image`
        (without them, h runs on `image`)."""
        needed = self.used
        out: dict[str, torch.Tensor] = {}
        if needed & {"image", "image_h"}:
            f = self.image_tower(resize_batch(image_floats(batch["image"]), self.cfg.model.image.image_size))
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
            h = self.third_features(batch.get("third_image", batch.get("image")), batch.get("third"))
            out["third_g"] = self.third_head_g(h) if self.third_head_g is not None else h
            if "third_f" in needed:  # heads=none or shared: the same tensor (one gather across ranks)
                same = self.third_head_f is self.third_head_g
                out["third_f"] = out["third_g"] if same else self.third_head_f(h)
        # Each distinct tensor normalised once: with heads=none, third_f and third_g stay one tensor,
        # which the loss then gathers across ranks once.
        distinct = {id(v): v for v in out.values()}
        normed = {i: F.normalize(v.float(), dim=-1) for i, v in distinct.items()}
        return {k: normed[id(v)] for k, v in out.items()}

    def after_update(self) -> None:
        """Called by the trainer after every optimizer step: the temperatures back within loss.max_scale."""
        self.loss.clamp_()

    def forward(self, batch: dict) -> dict:
        emb = self.embeddings(batch)
        total, parts = self.loss(emb)
        return {"loss": total, **parts, "embeddings": emb}

    @property
    def image_needs_third(self) -> bool:
        """Whether `encode_image` runs h (LiT): an evaluation may then pass h's features as `cached`."""
        return self.method == "lit"

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, cached: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [0, 1] at any size (resized to the tower's) -> L2-normalised embeddings.
        `cached`: h's features of these images, for LiT (whose image side is h)."""
        if self.image_needs_third:
            return self.encode_image_third(images, cached)
        images = resize_batch(image_floats(images), self.cfg.model.image.image_size)  # as in training, for any tower kind
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
