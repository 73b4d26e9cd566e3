"""Contrastive alignment terms and the weighted sum over them (CLIP, LiT and 3T are term lists).

The loss is local unless the training job says otherwise: `TermLoss.distribute(rank, world_size)`
(as open_clip's `ClipLoss(rank, world_size)`) makes each rank gather the other ranks' embeddings
*with gradient* and compute its own rows against the global batch (labels offset by rank). The mean
of the per-rank losses then equals the single-process loss on the global batch, and DDP's gradient
averaging gives exactly the single-process gradient. Nothing here looks at the process group by
itself, so a loss computed on one rank alone (an evaluation hook's) never waits for the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.distributed import gather_with_grad

# Named embeddings a term can align; see docs/method.md. Those of h (the last four) are per h: h_k's
# carry `per_h`'s suffix.
EMBEDDINGS = ("image", "text", "image_h", "text_h", "third_f", "third_g")


def h_suffix(k: int) -> str:
    """The suffix of h_k's names (k counts from 0 in model.thirds order): none for the first h, so that
    one h is named as it always was (image_h, loss/image_h~third_f, mix@a), and `.k+1` for the others
    (image_h.2, loss/image_h.2~third_f.2, mix.2@a). A name never depends on how many h's there are."""
    return "" if k == 0 else f".{k + 1}"


def per_h(name: str, k: int) -> str:
    return name + h_suffix(k)


@dataclass(frozen=True)
class Term:
    a: str
    b: str
    weight: float

    @property
    def name(self) -> str:
        return f"{self.a}~{self.b}"


def method_terms(method: str, weights_3t: list[float] | tuple[float, ...] = (1 / 3,) * 3,
                 num_thirds: int = 1) -> list[Term]:
    """The alignment terms of each method, over named embeddings. 3T with K = `num_thirds` h's:
    (image, text), then (image_h, third_f) and (text_h, third_g) of each h, weighted by `weights_3t`
    (1 + 2K numbers in that order; `schema.loss_weights` gives them)."""
    if method == "clip":
        return [Term("image", "text", 1.0)]
    if method == "lit":
        return [Term("third_g", "text_h", 1.0)]
    if method == "3t":
        if len(weights_3t) != 1 + 2 * num_thirds:
            raise ValueError(f"3T with {num_thirds} third tower(s) needs {1 + 2 * num_thirds} term weights, "
                             f"got {list(weights_3t)}")
        terms = [Term("image", "text", weights_3t[0])]
        for k in range(num_thirds):
            terms += [Term(per_h("image_h", k), per_h("third_f", k), weights_3t[1 + 2 * k]),
                      Term(per_h("text_h", k), per_h("third_g", k), weights_3t[2 + 2 * k])]
        return terms
    raise ValueError(f"model.method={method!r}; expected clip, lit or 3t")


def contrastive_loss(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | float, bias: torch.Tensor | float | None = None,
    kind: str = "softmax", *, a_all: torch.Tensor | None = None, b_all: torch.Tensor | None = None, rank: int = 0,
) -> torch.Tensor:
    """Contrastive loss between L2-normalised `a`, `b` [N, D] (row i of a pairs with row i of b).

    softmax: ½ [CE(t·a bᵀ, diag) + CE(t·b aᵀ, diag)];  sigmoid: −(1/N) Σ_ij log σ(z_ij (t·a_i·b_j + bias)).
    `scale` is the multiplier t (not its log). Computed in fp32 whatever the autocast dtype.
    `a_all`, `b_all`: every rank's rows in rank order (this rank's, `a` and `b`, at `rank` * N), to
    contrast this rank's rows against; by default `a` and `b` themselves, a batch on one process.
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
        a_all = a if a_all is None else a_all.float()
        b_all = b if b_all is None else b_all.float()
        n = a.shape[0]
        labels = torch.arange(n, device=a.device) + rank * n
        if kind == "softmax":
            logits_ab = scale * a @ b_all.T
            logits_ba = scale * b @ a_all.T
            return 0.5 * (F.cross_entropy(logits_ab, labels) + F.cross_entropy(logits_ba, labels))
        logits = scale * a @ b_all.T + bias
        signs = -torch.ones_like(logits)
        signs[torch.arange(n, device=a.device), labels] = 1.0
        return -F.logsigmoid(signs * logits).sum() / n


class TermLoss(nn.Module):
    """The weighted sum of contrastive terms with learned temperatures (per term or shared).

    Local (rank 0 of 1) until `distribute` says which rank of how many this process is."""

    def __init__(self, terms: list[Term], kind: str = "softmax", temperature: str = "per_term",
                 init_scale: float = 10.0, max_scale: float = 100.0, init_bias: float = -10.0,
                 rank: int = 0, world_size: int = 1):
        super().__init__()
        self.terms, self.kind, self.max_scale = list(terms), kind, max_scale
        n = len(self.terms) if temperature == "per_term" else 1
        self.log_scale = nn.Parameter(torch.full((n,), math.log(init_scale)))
        self.bias = nn.Parameter(torch.full((n,), float(init_bias))) if kind == "sigmoid" else None
        self.distribute(rank, world_size)

    def distribute(self, rank: int, world_size: int) -> None:
        """Contrast against the global batch of `world_size` ranks (gathered in forward); 0, 1: local only.
        Every rank must then call forward together, as in a training step."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of a world of {world_size}")
        self.rank, self.world_size = rank, world_size

    def scales(self) -> torch.Tensor:
        # No clamp here: above the bound a clamp in the forward has zero gradient, and t could never
        # come back down. The bound is kept on the parameter itself, after each update (`clamp_`).
        return self.log_scale.float().exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep t <= loss.max_scale by clamping log t in place (as open_clip does after its optimizer
        step); the trainer calls it after every update, through the model's `after_update`."""
        if self.max_scale:
            self.log_scale.clamp_(max=math.log(self.max_scale))

    def gather(self, emb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every rank's rows of each embedding the terms use, in one collective: the distinct tensors
        (with heads=none on an h, its third_f and third_g are one) side by side as one fp32 [N, ΣD]."""
        names = list(dict.fromkeys(name for t in self.terms for name in (t.a, t.b)))
        if self.world_size == 1:
            return {name: emb[name] for name in names}
        distinct = list({id(emb[name]): emb[name] for name in names}.values())
        with torch.autocast(distinct[0].device.type, enabled=False):
            together = gather_with_grad(torch.cat([x.float() for x in distinct], dim=1), self.world_size)
        parts = together.split([x.shape[1] for x in distinct], dim=1)
        by_id = {id(x): part for x, part in zip(distinct, parts)}
        return {name: by_id[id(emb[name])] for name in names}

    def forward(self, emb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scales = self.scales()
        every = self.gather(emb)
        weighted, parts = [], {}
        for i, term in enumerate(self.terms):
            j = i if len(scales) > 1 else 0
            bias = self.bias[j].float() if self.bias is not None else None
            loss = contrastive_loss(emb[term.a], emb[term.b], scales[j], bias, self.kind,
                                    a_all=every[term.a], b_all=every[term.b], rank=self.rank)
            parts[f"loss/{term.name}"] = loss.detach()
            parts[f"scale/{term.name}"] = scales[j].detach()
            weighted.append(term.weight * loss)
        # One stack-and-sum rather than a running `total = total + ...`: the same sum, but under
        # torch.compile (2.14) the running form returned a total without grad_fn beside the detached parts.
        return torch.stack(weighted).sum(), parts
