"""A text transformer tower: token ids [B, L] (pad id 0) -> pooled features [B, width]."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Block


class TextTransformer(nn.Module):
    def __init__(
        self,
        vocab_size: int = 4096,
        context_length: int = 32,
        width: int = 256,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        causal: bool = True,
        pool: str = "eot",
        pad_id: int = 0,
    ):
        super().__init__()
        if pool not in ("eot", "mean"):
            raise ValueError(f"pool={pool!r}; expected eot or mean")
        self.vocab_size, self.context_length = vocab_size, context_length
        self.causal, self.pool, self.pad_id = causal, pool, pad_id
        self.dim = width
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"text tower expects tokens [B, <= {self.context_length}], got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"text tower expects integer token ids, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}); the tokenizer and model.text.vocab_size differ")
        n = tokens.shape[1]
        valid = tokens != self.pad_id  # [B, L]; sequences are left-aligned, padding at the end
        # Keys that are padding are masked; with a causal mask padding sits after every valid query anyway.
        mask = valid[:, None, None, :].expand(-1, 1, n, n)
        if self.causal:
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril()
        # A padding query whose keys are all masked would give NaN; let every query see itself.
        mask = mask | torch.eye(n, dtype=torch.bool, device=tokens.device)
        x = self.token_embed(tokens) + self.pos_embed[:, :n]
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        if self.pool == "eot":
            # The end-of-text token is the last valid token of each sequence.
            last = valid.sum(dim=1).clamp(min=1) - 1
            return x[torch.arange(x.shape[0], device=x.device), last]
        weights = valid.unsqueeze(-1).to(x.dtype)
        return (x * weights).sum(1) / weights.sum(1).clamp(min=1)
