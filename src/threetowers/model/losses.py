"""Contrastive alignment terms and the weighted sum over them (CLIP, LiT and 3T are term lists).

With `torch.distributed` initialised, each rank gathers the other ranks' embeddings *with
gradient*, and computes its own rows against the global batch (labels offset by rank). The mean
of the per-rank losses equals the single-process loss on the global batch, and DDP's gradient
averaging then gives exactly the single-process gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.distributed import gather_with_grad, rank

# Named embeddings a term can align; see shared/DESIGN.md.
EMBEDDINGS = ("image", "text", "image_h", "text_h", "third_f", "third_g")


@dataclass(frozen=True)
class Term:
    a: str
    b: str
    weight: float

    @property
    def name(self) -> str:
        return f"{self.a}~{self.b}"


def method_terms(method: str, weights_3t: list[float] | tuple[float, ...] = (1 / 3,) * 3) -> list[Term]:
    """The alignment terms of each method, over named embeddings."""
    if method == "clip":
        return [Term("image", "text", 1.0)]
    if method == "lit":
        return [Term("third_g", "text_h", 1.0)]
    if method == "3t":
        w_fg, w_fh, w_gh = weights_3t
        return [Term("image", "text", w_fg), Term("image_h", "third_f", w_fh), Term("text_h", "third_g", w_gh)]
    raise ValueError(f"model.method={method!r}; expected clip, lit or 3t")


def contrastive_loss(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float, bias: torch.Tensor | float | None = None,
    kind: str = "softmax",
) -> torch.Tensor:
    """Contrastive loss between L2-normalised `a`, `b` [N, D] (row i of a pairs with row i of b).

    softmax: ½ [CE(t·a bᵀ, diag) + CE(t·b aᵀ, diag)];  sigmoid: −(1/N) Σ_ij log σ(z_ij (t·a_i·b_j + bias)).
    `scale` is the multiplier t (not its log). Computed in fp32 whatever the autocast dtype.
    """
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"contrastive_loss needs two [N, D] batches of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if kind not in ("softmax", "sigmoid"):
        raise ValueError(f"loss kind {kind!r}; expected softmax or sigmoid")
    if kind == "sigmoid" and bias is None:
        raise ValueError("the sigmoid loss needs a bias")
    # Autocast would run the logits' matmul in bf16; the loss is meant to be fp32 end to end.
    with torch.autocast(a.device.type, enabled=False):
        a, b = a.float(), b.float()
        n = a.shape[0]
        a_all, b_all = gather_with_grad(a), gather_with_grad(b)
        offset = rank() * n
        labels = torch.arange(n, device=a.device) + offset
        if kind == "softmax":
            logits_ab = scale * a @ b_all.T
            logits_ba = scale * b @ a_all.T
            return 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))
        logits = scale * a @ b_all.T + bias
        signs = -torch.ones_like(logits)
        signs[torch.arange(n, device=a.device), labels] = 1.0
        return -F.logsigmoid(signs * logits).sum() / n


class TermLoss(nn.Module):
    """The weighted sum of contrastive terms with learned temperatures (per term or shared)."""

    def __init__(self, terms: list[Term], kind: str = "softmax", temperature: str = "per_term",
                 init_scale: float = 10.0, max_scale: float = 100.0, init_bias: float = -10.0):
        super().__init__()
        self.terms, self.kind, self.max_scale = list(terms), kind, max_scale
        n = len(self.terms) if temperature == "per_term" else 1
        self.log_scale = nn.Parameter(torch.full((n,), math.log(init_scale)))
        self.bias = nn.Parameter(torch.full((n,), float(init_bias))) if kind == "sigmoid" else None

    def scales(self) -> torch.Tensor:
        scale = self.log_scale.float().exp()
        return scale.clamp(max=self.max_scale) if self.max_scale else scale

    def forward(self, emb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scales = self.scales()
        weighted, parts = [], {}
        for i, term in enumerate(self.terms):
            j = i if len(scales) > 1 else 0
            bias = self.bias[j].float() if self.bias is not None else None
            loss = contrastive_loss(emb[term.a], emb[term.b], scales[j], bias, self.kind)
            parts[f"loss/{term.name}"] = loss.detach()
            parts[f"scale/{term.name}"] = scales[j].detach()
            weighted.append(term.weight * loss)
        # One stack-and-sum rather than a running `total = total + ...`: the same sum, but under
        # torch.compile (2.14) the running form returned a total without grad_fn beside the detached parts.
        return torch.stack(weighted).sum(), parts
