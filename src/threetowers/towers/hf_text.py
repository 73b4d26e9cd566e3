"""A pretrained Hugging Face text encoder as the text tower g (`model.text.kind=hf`).

The encoder is read from a local folder (`model.text.name`: config.json, weights, tokenizer.json;
nothing is downloaded) with `transformers.AutoModel`, an optional dependency
(`pip install "threetowers[hf]"`). It takes our token ids (its own tokenizer, with its special
tokens, padding id 0) and pools its last hidden states: `mean` over the real tokens (what
sentence-transformers encoders such as all-MiniLM-L6-v2 were trained with) or `cls` (the first
token, BERT's [CLS]). `lock=True` freezes it (LiT's "locked text" arm): its weights do not train
and it runs in eval mode, so dropout never fires; only the heads on it learn.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def auto_model(path: str | Path) -> nn.Module:
    try:
        from transformers import AutoModel
    except ImportError:
        raise ValueError("model.text.kind=hf needs transformers: pip install 'threetowers[hf]'") from None
    try:
        return AutoModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"model.text.name={path} could not be loaded as a Hugging Face encoder: {err}") from None


class HFTextTower(nn.Module):
    def __init__(self, path: str | Path, pool: str = "mean", lock: bool = False, pad_id: int = 0):
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"model.text.pool={pool!r}; a Hugging Face encoder pools mean or cls")
        self.encoder = auto_model(path)
        self.pool, self.lock, self.pad_id = pool, lock, pad_id
        self.dim = self.encoder.config.hidden_size
        self.context_length = getattr(self.encoder.config, "max_position_embeddings", None)
        if lock:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> HFTextTower:
        super().train(mode)
        if self.lock:
            self.encoder.eval()  # a locked encoder never runs dropout
        return self

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        valid = tokens != self.pad_id
        if tokens.device.type == "cpu" and tokens.shape[1] > 1:  # columns that are padding everywhere: dropped
            n = max(1, int(valid.sum(dim=1).max()))
            tokens, valid = tokens[:, :n], valid[:, :n]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.lock):
            hidden = self.encoder(input_ids=tokens, attention_mask=valid.long()).last_hidden_state
        if self.pool == "cls":
            return hidden[:, 0]
        weights = valid.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
