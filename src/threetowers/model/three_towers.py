"""One model for CLIP, LiT and 3T: built towers, heads and the term loss.

`ThreeTowers` takes towers already built (`model/factory.py` builds them and h, and does all file
I/O); it only adds the heads the method's terms need. Which modules exist follows from the terms;
which parameters train follows from which modules exist (h is frozen by construction). `forward(batch)` returns the loss, its parts and
the named embeddings; `encode_image` / `encode_text` give the inference pair (f, g), or (h, g_h) for
LiT. h is not used at inference for CLIP and 3T.

3T may have several h's (model.thirds): each h_k gets its own adaptors and heads and its own two
terms, through the same code as one h; the first h's modules and embeddings keep the names they
have with one h, h_k's add `_k` (`h_module_name`) and `.k` (`losses.per_h`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.sets import image_floats, resize_batch
from ..schema import Config, loss_weights, third_sections
from ..third.tower import ThirdTower, check_same_third, per_third
from ..towers.heads import make_head
from .losses import Term, TermLoss, method_terms, per_h

# The modules of each h (the frozen tower, its adaptors f_h and g_h, its heads h_f and h_g): the first h's
# keep their names (and so the state-dict names of every model saved with one h); h_k's add `_k`.
H_MODULES = ("third", "adapt_image", "adapt_text", "third_head_f", "third_head_g")


def h_module_name(base: str, k: int) -> str:
    return base if k == 0 else f"{base}_{k + 1}"


def model_terms(cfg: Config) -> list[Term]:
    """The loss terms of the configured method, over every h (`method_terms`)."""
    return method_terms(cfg.model.method, loss_weights(cfg), len(third_sections(cfg.model)))


def needed_embeddings(cfg: Config) -> set[str]:
    """The named embeddings the method's loss terms compare (e.g. {"image", "text"} for CLIP)."""
    return {name for t in model_terms(cfg) for name in (t.a, t.b)}


class ThreeTowers(nn.Module):
    def __init__(self, cfg: Config, image_tower: nn.Module | None, text_tower: nn.Module,
                 third: ThirdTower | list[ThirdTower] | None = None, third_info: dict | list[dict] | None = None):
        """Built towers: f (None when no term needs it, as in LiT), g, and the h's (one, or a list in
        model.thirds order), or only their identities `third_info` (inference with f and g, or training
        on cached h embeddings)."""
        super().__init__()
        self.cfg = cfg
        m = cfg.model
        self.method = m.method
        self.terms = model_terms(cfg)
        self.used = used = needed_embeddings(cfg)
        if (image_tower is None) != (not used & {"image", "image_h"}):
            raise ValueError(f"model.method={m.method} {'needs' if image_tower is None else 'has no use for'} an image tower f")
        sections = third_sections(m)
        towers = per_third(third, len(sections), "third")
        infos = [t.info() if t is not None else i for t, i in zip(towers, per_third(third_info, len(sections), "third_info"))]
        if any(i is None for i in infos):
            raise ValueError(f"model.method={m.method} needs its third tower h, or at least h's identity (third_info)")
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.third_infos: list[dict] = infos
        for name in H_MODULES:  # CLIP too has them, as None
            setattr(self, name, None)
        for k, tower in enumerate(towers):  # registered before the heads, as with one h: the parameter order of old checkpoints
            setattr(self, h_module_name("third", k), tower)

        image_init, text_init = m.image.init, m.text.init  # each tower's heads follow its initialisation
        self.proj_image = make_head(self.image_tower.dim, m.embed_dim, m.head, image_init) if "image" in used else None
        self.proj_text = make_head(self.text_tower.dim, m.embed_dim, m.head, text_init) if "text" in used else None
        for k, (where, section) in enumerate(sections):
            h_dim = infos[k]["dim"]
            if section.heads == "none" and section.head_dim and section.head_dim != h_dim:
                raise ValueError(f"{where}.head_dim={section.head_dim} needs {where}.heads=shared or per_term "
                                 f"(h's own embedding size is {h_dim})")
            third_dim = section.head_dim or h_dim
            heads = {"adapt_image": make_head(self.image_tower.dim, third_dim, m.head, image_init)  # f_h
                     if per_h("image_h", k) in used else None,
                     "adapt_text": make_head(self.text_tower.dim, third_dim, m.head, text_init)  # g_h
                     if per_h("text_h", k) in used else None}
            # Heads on h: h_f for the (f_h, h) term, h_g for the (g_h, h) term; shared = one module.
            heads["third_head_g"] = heads["third_head_f"] = None
            if section.heads in ("shared", "per_term"):
                heads["third_head_g"] = nn.Linear(h_dim, third_dim, bias=False)
                if per_h("third_f", k) in used:
                    heads["third_head_f"] = heads["third_head_g"] if section.heads == "shared" else \
                        nn.Linear(h_dim, third_dim, bias=False)
            for name, module in heads.items():
                setattr(self, h_module_name(name, k), module)
        self.loss = TermLoss(self.terms, cfg.loss.kind, cfg.loss.temperature, cfg.loss.init_scale,
                             cfg.loss.max_scale, cfg.loss.init_bias)

    def h_module(self, base: str, k: int) -> nn.Module | None:
        """h_k's module `base` (one of H_MODULES)."""
        return getattr(self, h_module_name(base, k))

    @property
    def thirds(self) -> list[ThirdTower | None]:
        """The h's in model.thirds order (None where the model holds only h's identity)."""
        return [self.h_module("third", k) for k in range(len(self.third_infos))]

    @property
    def third_info(self) -> dict | None:
        """The first h's identity (None for CLIP); every h's: `third_infos`."""
        return self.third_infos[0] if self.third_infos else None

    def attach_thirds(self, thirds: list[ThirdTower]) -> None:
        """Give a model that holds only h's identities (trained on cached embeddings) its h's back."""
        for k, tower in enumerate(per_third(thirds, len(self.third_infos), "thirds")):
            check_same_third(self.third_infos[k], tower.info(), "this model")
            setattr(self, h_module_name("third", k), tower)

    # ------------------------------------------------------------------ embeddings

    def split_cached(self, cached: torch.Tensor | list[torch.Tensor] | None) -> list[torch.Tensor | None]:
        """batch["third"] per h: the h's cached embeddings side by side, [B, sum of their dims] in
        model.thirds order (what the data gives: one tensor to ship and split), or a list of [B, D_k]."""
        dims = [info["dim"] for info in self.third_infos]
        if cached is None or isinstance(cached, (list, tuple)):
            return per_third(cached, len(dims), "batch['third']")
        if cached.ndim != 2 or cached.shape[1] != sum(dims):
            names = " + ".join(f"{info['name']} ({info['dim']})" for info in self.third_infos)
            raise ValueError(f"cached third-tower embeddings have shape {tuple(cached.shape)}; expected "
                             f"[B, {sum(dims)}] for {names}")
        return list(cached.split(dims, dim=1))

    def third_features(self, images: torch.Tensor | None, cached: torch.Tensor | None = None, k: int = 0) -> torch.Tensor:
        """h_k's pre-logits: from the cache when given, else by running the frozen h_k on `images` (h's
        own pixels: any size, resized and normalised by h)."""
        info = self.third_infos[k]
        if cached is not None:
            if cached.ndim != 2 or cached.shape[1] != info["dim"]:
                raise ValueError(f"cached third-tower embeddings have shape {tuple(cached.shape)}; expected "
                                 f"[B, {info['dim']}] for {info['name']}")
            return cached.float()
        third = self.h_module("third", k)
        if third is None:
            raise ValueError("this model was built without its third tower h; pass cached embeddings as batch['third'] "
                             "(or load it with with_third=True)")
        return third(images)

    def embeddings(self, batch: dict) -> dict[str, torch.Tensor]:
        """All named embeddings the terms need, L2-normalised. batch: image (uint8 [B, H, W, 3] as
        stored, or float [B, 3, H, W] in [0, 1]; any size, resized here to f's on the batch's device),
        tokens, and for the h's either their cached embeddings `third` (see `split_cached`) or their own
        pixels `third_image` (without them, each h runs on `image`)."""
        needed = self.used
        out: dict[str, torch.Tensor] = {}
        f = None
        if needed & {"image", *(per_h("image_h", k) for k in range(len(self.third_infos)))}:
            f = self.image_tower(resize_batch(image_floats(batch["image"]), self.cfg.model.image.image_size))
            if "image" in needed:
                out["image"] = self.proj_image(f)
        g = self.text_tower(batch["tokens"])
        if "text" in needed:
            out["text"] = self.proj_text(g)
        cached = self.split_cached(batch.get("third"))
        for k in range(len(self.third_infos)):
            if per_h("image_h", k) in needed:
                out[per_h("image_h", k)] = self.h_module("adapt_image", k)(f)
            if per_h("text_h", k) in needed:
                out[per_h("text_h", k)] = self.h_module("adapt_text", k)(g)
            third_f, third_g = per_h("third_f", k), per_h("third_g", k)
            if third_f in needed or third_g in needed:
                h = self.third_features(batch.get("third_image", batch.get("image")), cached[k], k)
                head_f, head_g = self.h_module("third_head_f", k), self.h_module("third_head_g", k)
                out[third_g] = head_g(h) if head_g is not None else h
                if third_f in needed:  # heads=none or shared: the same tensor (one gather across ranks)
                    out[third_f] = out[third_g] if head_f is head_g else head_f(h)
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
    def encode_image_third(self, images: torch.Tensor, cached: torch.Tensor | None = None, k: int = 0) -> torch.Tensor:
        """h_g(h(I)) of h_k (the first h by default): the image side of a LiT-like pair a 3T model also holds."""
        h = self.third_features(images, cached, k)
        head_g = self.h_module("third_head_g", k)
        return F.normalize((head_g(h) if head_g is not None else h).float(), dim=-1)

    @torch.no_grad()
    def encode_text_third(self, tokens: torch.Tensor, k: int = 0) -> torch.Tensor:
        """g_h(g(T)) of h_k: the text side of the LiT-like pair."""
        return F.normalize(self.h_module("adapt_text", k)(self.text_tower(tokens)).float(), dim=-1)

    @property
    def has_third_pair(self) -> bool:
        return self.method == "3t"

    @property
    def num_third_pairs(self) -> int:
        """How many LiT-like pairs (h_g(h_k(I)), g_h,k(T)) the model holds: one per h for 3T, else none."""
        return len(self.third_infos) if self.has_third_pair else 0

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the h's (each identified by its fingerprint and rebuilt from its source)."""
        return {k: v for k, v in self.state_dict().items() if k.split(".", 1)[0] not in self.third_module_names}

    @property
    def third_module_names(self) -> set[str]:
        """The module names of the frozen h's (`third`, `third_2`, ...), never stored with the model."""
        return {h_module_name("third", k) for k in range(max(len(self.third_infos), 1))}
