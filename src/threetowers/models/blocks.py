"""The transformer block shared by the image and text towers (pre-norm, SDPA attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        b, n, w = x.shape
        # Split q, k, v along the "3" axis and hand SDPA strided [B, H, N, d] views: its backward then
        # stacks dq, dk, dv straight into qkv's [B, N, 3, H, d] layout, without a permute-and-copy.
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(b, n, 3, self.heads, w // self.heads).unbind(2))
        # `mask`: boolean, broadcastable to [B, H, N, N] (True = may attend); SDPA cannot take both it
        # and is_causal, and is_causal (no mask tensor at all) is the fast path.
        out = attention(q, k, v, mask, causal and mask is None)
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """SDPA; on the CPU in fp32 even under bf16/fp16 autocast.

    The CPU's fused attention kernel is about twice as slow in bf16 as in fp32 (forward and backward),
    and attention is a small share of a block's FLOPs, so upcasting q, k, v is both faster and more
    exact there. On accelerators the low-precision kernels (flash) are the fast ones.
    """
    dtype = q.dtype
    if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):  # autocast would cast q, k, v straight back down
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal)
        return out.to(dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask, causal)
        return x + self.mlp(self.norm2(x))
