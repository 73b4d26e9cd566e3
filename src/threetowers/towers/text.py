"""A text transformer tower: token ids [B, L] (pad id 0, padding after the eot) -> pooled features [B, width]."""

from __future__ import annotations

import torch
from torch import nn

from .blocks import Block, init_blocks


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
        init: str = "clip",
        act: str = "gelu",
    ):
        super().__init__()
        if pool not in ("eot", "mean"):
            raise ValueError(f"pool={pool!r}; expected eot or mean")
        self.vocab_size, self.context_length = vocab_size, context_length
        self.causal, self.pool, self.pad_id = causal, pool, pad_id
        self.dim = width
        self.token_embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(1, context_length, width) * 0.01)
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, act) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        if init == "clip":
            # CLIP's: token embeddings small (std 0.02) like the positions, instead of nn.Embedding's std 1,
            # which would drown every block's update to the residual stream at the start.
            nn.init.normal_(self.token_embed.weight, std=0.02)
            init_blocks(self.blocks, width)
        elif init != "torch":
            raise ValueError(f"init={init!r}; expected clip or torch")
        self._ids_checked = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"text tower expects tokens [B, <= {self.context_length}], got {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"text tower expects integer token ids, got {tokens.dtype}")
        # Reading the ids back is a host-device sync; on an accelerator only the first batch pays it
        # (a vocabulary that does not fit the tokenizer shows there), on the CPU every batch is checked.
        if tokens.numel() and (tokens.device.type == "cpu" or not self._ids_checked):
            if int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0:
                raise ValueError(f"token ids must be in [0, {self.vocab_size}); the tokenizer and model.text.vocab_size differ")
            self._ids_checked = True
        # Sequences are left-aligned, padding at the end. A sequence's length is the position after its
        # last non-padding token (the eot), not its count of non-padding ids: in CLIP's vocabulary id 0 is
        # also a real token ("!") that doubles as padding, and may occur inside a caption.
        n = tokens.shape[1]
        lengths = ((tokens != self.pad_id).long() * torch.arange(1, n + 1, device=tokens.device)).amax(dim=1)
        if tokens.device.type == "cpu" and n > 1:
            # Columns that are padding in every sequence change no valid token's output (padding is
            # masked or after it): drop them. (On an accelerator, finding them would cost a sync.)
            n = max(1, int(lengths.max()))
            tokens = tokens[:, :n]
        valid = torch.arange(n, device=tokens.device) < lengths[:, None]  # [B, L]
        if self.causal:
            # With padding only at the end, a valid query's causal window holds only valid keys: the
            # causal mask alone is exact for every position that is pooled, and needs no mask tensor.
            # (Padding queries see earlier tokens; their outputs are never pooled.)
            mask = None
        else:
            # Padding keys are masked, as a [B, 1, 1, L] mask that SDPA broadcasts. Key 0 stays visible
            # so that an all-padding row has a key to attend to instead of giving NaN.
            keys = valid.clone()
            keys[:, 0] = True
            mask = keys[:, None, None, :]
        x = self.token_embed(tokens) + self.pos_embed[:, :n]
        if self.pool == "mean":
            for block in self.blocks:
                x = block(x, mask, self.causal)
            x = self.norm(x)
            weights = valid.unsqueeze(-1).to(x.dtype)
            return (x * weights).sum(1) / weights.sum(1).clamp(min=1)
        # The end-of-text token is the last valid token of each sequence: only its output is used, so
        # the last block runs for it alone, and the final LayerNorm (per token) too.
        last = (lengths - 1).clamp(min=0)
        for block in self.blocks[:-1]:
            x = block(x, mask, self.causal)
        if len(self.blocks):
            return self.norm(self.blocks[-1](x, mask, self.causal, rows=last))
        return self.norm(x[torch.arange(x.shape[0], device=x.device), last])
