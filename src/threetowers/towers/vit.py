"""A plain Vision Transformer image tower: images in [0, 1] -> pooled features [B, width]."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Block, init_blocks


class VisionTransformer(nn.Module):
    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        width: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        pool: str = "cls",
        mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        std: tuple[float, ...] = (0.5, 0.5, 0.5),
        pre_norm: bool = True,
        patch_bias: bool = False,
        init: str = "clip",
        act: str = "gelu",
    ):
        super().__init__()
        if pool not in ("cls", "gap"):
            raise ValueError(f"pool={pool!r}; expected cls or gap")
        self.image_size, self.patch_size, self.pool = image_size, patch_size, pool
        self.dim = width
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=patch_bias)
        num_tokens = (image_size // patch_size) ** 2 + (pool == "cls")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, width) * 0.02)
        # A LayerNorm on the embedded tokens, before the first block (CLIP's ln_pre).
        self.norm_pre = nn.LayerNorm(width) if pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, act) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        if init == "clip":
            # CLIP's: the class token and positions at the scale of a unit-variance token (std width^-0.5).
            nn.init.normal_(self.pos_embed, std=width**-0.5)
            if self.cls_token is not None:
                nn.init.normal_(self.cls_token, std=width**-0.5)
            init_blocks(self.blocks, width)
        elif init != "torch":
            raise ValueError(f"init={init!r}; expected clip or torch")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != self.image_size:
            raise ValueError(
                f"image tower expects images [B, 3, {self.image_size}, {self.image_size}], got {tuple(images.shape)}"
            )
        x = self.patch_embed((images - self.mean) / self.std).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm_pre(x + self.pos_embed)
        if self.pool == "cls":
            # Only the class token's output is used: the last block runs for it alone (keys and values
            # from every token), and the final LayerNorm, which is per token, too.
            for block in self.blocks[:-1]:
                x = block(x)
            if len(self.blocks):
                return self.norm(self.blocks[-1](x, rows=torch.zeros(x.shape[0], dtype=torch.long, device=x.device)))
            return self.norm(x[:, 0])
        for block in self.blocks:
            x = block(x)
        return self.norm(x).mean(dim=1)
