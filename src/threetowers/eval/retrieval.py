"""Image-text retrieval Recall@k, exact and chunked, plus the ranking kernel every eval shares.

Scores are (weighted sums of) dot products. With one pair `(image_emb, text_emb, 1.0)` this is
plain CLIP/LiT retrieval; with `[(f, g, 1 - a), (h_g(h), g_h, a)]` it is the 3T/LiT score mixing
s_a = (1 - a)<f, g> + a<h_g(h), g_h> (the README's evaluation section). Both use `positive_ranks`, which never holds
more than `chunk_size` rows of the score matrix. Each direction is its own pass (two matmuls of
N x M x D): that way every rank compares scores from one row of one matmul, so ties are exact.

Rank and tie rule (pessimistic): for a query whose best-scoring positive has score p,

    rank = #{negatives j : s_j >= p}        (0-based; other positives never count)

so a negative that ties with the positive is ranked above it. A query is found at k iff
rank < k. Ranks are exact for the float32 scores the kernel computes (no approximate search).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

ScorePair = tuple[Tensor, Tensor, float]  # (query-side embeddings, gallery-side embeddings, weight)


def check_score_pairs(pairs: Sequence[ScorePair], names: tuple[str, str]) -> list[ScorePair]:
    """Validate `(a [Q, D_k], b [G, D_k], weight)` triples; return them as float32 tensors.

    `names` (e.g. ("image_emb", "text_emb")) only make the error messages readable.
    """
    if not pairs:
        raise ValueError("expected at least one (" + ", ".join(names) + ", weight) pair, got none")
    out: list[ScorePair] = []
    for k, pair in enumerate(pairs):
        if len(pair) != 3:
            raise ValueError(f"pair {k}: expected ({names[0]}, {names[1]}, weight), got {len(pair)} items")
        a, b, w = torch.as_tensor(pair[0]), torch.as_tensor(pair[1]), float(pair[2])
        for name, x in zip(names, (a, b)):
            if x.dim() != 2 or x.shape[0] == 0:
                raise ValueError(
                    f"pair {k}: {name} must be a non-empty 2-D [rows, dim] tensor, got shape {tuple(x.shape)}"
                )
            if not (x.is_floating_point() and bool(torch.isfinite(x).all())):
                raise ValueError(f"pair {k}: {name} must be floating point and finite (no NaN/inf)")
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"pair {k}: {names[0]} has dim {a.shape[1]} but {names[1]} has dim {b.shape[1]}")
        if not torch.isfinite(torch.tensor(w)):
            raise ValueError(f"pair {k}: weight must be finite, got {w}")
        if out and (a.shape[0] != out[0][0].shape[0] or b.shape[0] != out[0][1].shape[0]):
            raise ValueError(
                f"pair {k}: {names[0]}/{names[1]} have {a.shape[0]}/{b.shape[0]} rows, "
                f"pair 0 has {out[0][0].shape[0]}/{out[0][1].shape[0]}: every pair must score the same items"
            )
        out.append((a.float(), b.float(), w))
    return out


def check_labels(labels, n: int, n_values: int, name: str, what: str) -> Tensor:
    """1-D integer tensor of length n with values in [0, n_values)."""
    t = torch.as_tensor(labels)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with one entry per {what} ({n}), got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer indices, got dtype {t.dtype}")
    t = t.long()
    if n and (int(t.min()) < 0 or int(t.max()) >= n_values):
        raise ValueError(f"{name} must lie in [0, {n_values}), got values in [{int(t.min())}, {int(t.max())}]")
    return t


def _chunk_scores(pairs: Sequence[ScorePair], start: int, stop: int, out: Tensor) -> Tensor:
    """out = sum_k w_k a_k[start:stop] @ b_k^T, written into the reused [c, G] float32 buffer."""
    first = True
    for a, b, w in pairs:
        if w == 0.0:  # alpha = 0 or 1 in a mixing sweep: skip the matmul entirely
            continue
        # beta=0 ignores the buffer's old contents (even NaN), so the first term overwrites it
        torch.addmm(out, a[start:stop], b.T, beta=0.0 if first else 1.0, alpha=w, out=out)
        first = False
    return out.zero_() if first else out


def _count_ones(x: Tensor) -> Tensor:
    """Row sums of a float 0/1 matrix as int64, exact: blocks of 2**24 columns stay exact in float32."""
    block = 2**24
    return sum(x[:, j : j + block].sum(1).long() for j in range(0, x.shape[1], block))


def positive_ranks(
    pairs: Sequence[ScorePair], query_labels: Tensor, gallery_labels: Tensor, chunk_size: int = 1024
) -> Tensor:
    """Pessimistic 0-based rank of each query's best positive among the gallery (see module doc).

    Query q and gallery item j are positives iff `query_labels[q] == gallery_labels[j]`. Scores
    are computed `chunk_size` queries at a time, so memory is O(chunk_size x G), never Q x G.
    A query without any positive gets rank G (never found). Pairs must be validated already.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_query, n_gallery = pairs[0][0].shape[0], pairs[0][1].shape[0]
    # All (query, gallery) positive pairs, grouped by query: a query's positives are a contiguous
    # run of the gallery sorted by label, found with searchsorted (no dense [c, G] mask).
    order = torch.argsort(gallery_labels, stable=True)
    sorted_labels = gallery_labels[order].contiguous()
    lo = torch.searchsorted(sorted_labels, query_labels.contiguous(), side="left")
    n_pos = torch.searchsorted(sorted_labels, query_labels.contiguous(), side="right") - lo
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(n_pos, 0)])
    pair_query = torch.repeat_interleave(torch.arange(n_query), n_pos)
    pair_gallery = order[lo[pair_query] + torch.arange(pair_query.numel()) - offsets[pair_query]]

    ranks = torch.empty(n_query, dtype=torch.long)
    # One score buffer reused by every chunk: a fresh 200 MB allocation per chunk costs more in
    # page faults than the comparisons themselves.
    score_buf = torch.empty(min(chunk_size, n_query), n_gallery)
    for start in range(0, n_query, chunk_size):
        stop = min(start + chunk_size, n_query)
        s = _chunk_scores(pairs, start, stop, score_buf[: stop - start])
        p0, p1 = int(offsets[start]), int(offsets[stop])
        rows, cols = pair_query[p0:p1] - start, pair_gallery[p0:p1]
        pos = s[rows, cols]
        best = torch.full((stop - start,), float("-inf")).scatter_reduce_(0, rows, pos, "amax")
        positives_at_or_above = torch.zeros(stop - start, dtype=torch.long).index_add_(
            0, rows, (pos >= best[rows]).long()
        )
        # Compare in place (1.0 where s >= best, else 0.0) and sum the floats: a bool mask summed
        # as integers would allocate an int copy of the whole chunk and take 5x longer.
        ranks[start:stop] = _count_ones(s.ge_(best[:, None])) - positives_at_or_above
    return ranks


def recall_at(ranks: Tensor, ks: Sequence[int], prefix: str, valid: Tensor | None = None) -> dict[str, float]:
    """{f"{prefix}{k}": fraction of (valid) queries with rank < k}."""
    if valid is not None:
        ranks = ranks[valid]
    n = ranks.numel()
    return {f"{prefix}{k}": (int((ranks < k).sum()) / n) if n else float("nan") for k in ks}


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def retrieval_ranks_mixed(
    pairs: Sequence[ScorePair], image_of_text, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """(i2t ranks [N], t2i ranks [M]) under the pessimistic rule; an image without captions gets rank M."""
    pairs = check_score_pairs(pairs, ("image_emb", "text_emb"))
    n_images, n_texts = pairs[0][0].shape[0], pairs[0][1].shape[0]
    owner = check_labels(image_of_text, n_texts, n_images, "image_of_text", "caption")
    image_ids = torch.arange(n_images)
    i2t = positive_ranks(pairs, image_ids, owner, chunk_size)
    t2i = positive_ranks([(b, a, w) for a, b, w in pairs], owner, image_ids, chunk_size)
    return i2t, t2i


def retrieval_recall_mixed(
    pairs: Sequence[ScorePair], image_of_text, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024
) -> dict[str, float]:
    """Recall@k in both directions for scores s = sum_k w_k <image_emb_k, text_emb_k>.

    `pairs`: list of `(image_emb [N, D_k], text_emb [M, D_k], weight)`; e.g. 3T mixing at alpha a is
    `[(f, g, 1 - a), (h_g(h), g_h, a)]`. `image_of_text[j]` is the image of caption j.

    - `i2t_R@k`: fraction of images with at least one caption whose best caption has rank < k.
      Images with no caption at all are not queries (they still compete in text->image).
    - `t2i_R@k`: fraction of captions whose image has rank < k.
    Ranks follow the pessimistic tie rule of the module docstring.
    """
    ks = check_ks(ks)
    i2t, t2i = retrieval_ranks_mixed(pairs, image_of_text, chunk_size)
    has_caption = torch.bincount(torch.as_tensor(image_of_text).long(), minlength=i2t.numel()) > 0
    return {**recall_at(i2t, ks, "i2t_R@", has_caption), **recall_at(t2i, ks, "t2i_R@")}


def retrieval_recall(
    image_emb: Tensor, text_emb: Tensor, image_of_text, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024
) -> dict[str, float]:
    """Recall@k for image->text (`i2t_R@k`) and text->image (`t2i_R@k`), fractions in [0, 1].

    `image_emb` [N, D] and `text_emb` [M, D] are L2-normalised; `image_of_text` int [M] maps each
    caption to its image. Exact ranks, pessimistic ties, O(chunk_size x max(N, M)) memory; see
    `retrieval_recall_mixed` for the definitions.
    """
    return retrieval_recall_mixed([(image_emb, text_emb, 1.0)], image_of_text, ks, chunk_size)
