"""Projection, adaptor and third-tower heads: linear by default, a small MLP as an option."""

from __future__ import annotations

from torch import nn


def make_head(in_dim: int, out_dim: int, kind: str = "linear", init: str = "clip") -> nn.Module:
    if kind == "linear":
        head = nn.Linear(in_dim, out_dim, bias=False)
        if init == "clip":  # CLIP's projections: std in_dim^-0.5, outputs at the scale of the inputs
            nn.init.normal_(head.weight, std=in_dim**-0.5)
        return head
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim, bias=False))
    raise ValueError(f"model.head={kind!r}; expected linear or mlp")
