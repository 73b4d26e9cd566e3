"""The transformer block shared by the image and text towers (pre-norm, SDPA attention).

A tower that pools one token per sequence (the class token, the end-of-text token) can run its last
block for that token alone (`rows`): keys and values still come from every token, but the query,
the output projection and the MLP run on one token per sequence instead of all of them. The pooled
output is the same; the last block costs about a sixth of a full one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, W] -> [B, N, W], or [B, 1, W] for the query tokens `rows` [B] (one per sequence).

        `mask`: boolean, broadcastable to [B, H, N, N] (True = may attend); with `rows` it must be a
        key mask ([B, 1, 1, N] or None).
        """
        b, n, w = x.shape
        d = w // self.heads
        if rows is None:
            # Split q, k, v along the "3" axis and hand SDPA strided [B, H, N, d] views: its backward
            # then stacks dq, dk, dv straight into qkv's [B, N, 3, H, d] layout, without a copy.
            q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(b, n, 3, self.heads, d).unbind(2))
            # SDPA cannot take both a mask and is_causal; is_causal alone (no mask tensor) is the fast path.
            out = attention(q, k, v, mask, causal and mask is None)
            return self.proj(out.transpose(1, 2).reshape(b, n, w))
        w_q, w_kv = self.qkv.weight.split([w, 2 * w])
        b_q, b_kv = self.qkv.bias.split([w, 2 * w])
        q = F.linear(x[torch.arange(b, device=x.device), rows], w_q, b_q).view(b, self.heads, 1, d)
        k, v = (t.transpose(1, 2) for t in F.linear(x, w_kv, b_kv).view(b, n, 2, self.heads, d).unbind(2))
        if causal:  # one query at position rows[i] sees keys 0..rows[i]
            keys = (torch.arange(n, device=x.device) <= rows[:, None])[:, None, None, :]
            mask = keys if mask is None else mask & keys
        return self.proj(single_query_attention(q, k, v, mask).reshape(b, 1, w))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              causal: bool) -> torch.Tensor:
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


def single_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one query per sequence (q [B, H, 1, d]), written out and computed in fp32.

    It is a small product, so fp32 costs nothing; and unlike SDPA on the CPU, whose split of a
    single query's keys over threads makes the result depend on the thread count, it gives the
    same result however many threads run it (a model saved and reloaded elsewhere encodes alike).
    """
    dtype = q.dtype
    with torch.autocast(q.device.type, enabled=False):
        scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5  # [B, H, 1, N]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(dim=-1) @ v.float()).to(dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with (open_clip's
    `quick_gelu`); weights trained with one activation are not the same model under the other."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}  # model.image.act / model.text.act


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str = "gelu"):
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act={act!r}; expected one of {', '.join(ACTIVATIONS)}")
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), ACTIVATIONS[act](), nn.Linear(hidden, width))

    checkpointing = False  # train.grad_checkpointing: recompute activations in backward instead of storing them

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, W] -> [B, N, W]; with `rows` [B] (the token of each sequence that is used later)
        only those tokens' outputs, [B, W]."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            # Only the block's input is kept for backward; its inner activations (about 2/3 of a
            # transformer's activation memory) are recomputed. The same arithmetic, so the same grads.
            return checkpoint(self._forward, x, mask, causal, rows, use_reentrant=False)
        return self._forward(x, mask, causal, rows)

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                 rows: torch.Tensor | None) -> torch.Tensor:
        if rows is None:
            x = x + self.attn(self.norm1(x), mask, causal)
            return x + self.mlp(self.norm2(x))
        x = x[torch.arange(x.shape[0], device=x.device), rows] + self.attn(self.norm1(x), mask, causal, rows)[:, 0]
        return x + self.mlp(self.norm2(x))


def init_blocks(blocks: nn.ModuleList, width: int) -> None:
    """CLIP's initialisation of a residual stack: normal weights, zero biases, and the two projections
    that write into the residual stream scaled down by sqrt(2 * depth), so that the stream's variance
    at the output does not grow with depth."""
    attn_std, fc_std = width**-0.5, (2 * width) ** -0.5
    out_std = attn_std * (2 * max(1, len(blocks))) ** -0.5
    for block in blocks:
        for layer, std in ((block.attn.qkv, attn_std), (block.attn.proj, out_std),
                           (block.mlp[0], fc_std), (block.mlp[2], out_std)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)
