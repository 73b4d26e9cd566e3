"""Zero-shot classification: prompt-ensembled class embeddings, top-k and mean per-class recall.

Classification is retrieval of the one right class per image, so accuracy uses the same chunked
kernel and the same pessimistic tie rule as retrieval (`retrieval.positive_ranks`): an image is
correct at k iff fewer than k wrong classes score >= its true class. k is clipped to the number of
classes C (top-5 with 3 classes is 1.0). Mixing (3T/LiT) is a weighted sum of score matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from threetowers.eval.retrieval import ScorePair, check_ks, check_labels, check_score_pairs, positive_ranks

# The prompts of a user's own classes (`zeroshot:FOLDER` in `threetowers eval`, and `threetowers classify`
# without --templates): one constant, so that both score the same class embeddings.
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of the {}.")


def class_embeddings(
    encode_text: Callable[[Tensor], Tensor],
    tokenize: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    progress: bool = False,
) -> Tensor:
    """[C, D]: for each class, the L2-normalised mean of its L2-normalised template embeddings.

    Templates contain "{}" where the class name goes ("a photo of a {}."). All C x T prompts are
    encoded in batches of `batch_size` under `torch.no_grad()`.
    """
    if not class_names:
        raise ValueError("class_names is empty")
    if not templates:
        raise ValueError("templates is empty: give at least one prompt template such as 'a photo of a {}.'")
    for t in templates:
        if "{}" not in t:
            raise ValueError(f"template {t!r} has no '{{}}' placeholder for the class name")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [t.replace("{}", name) for name in class_names for t in templates]  # class-major
    chunks = []
    with torch.no_grad():
        for start in tqdm(range(0, len(prompts), batch_size), desc="class prompts", disable=not progress):
            batch = prompts[start : start + batch_size]
            emb = encode_text(tokenize(batch))
            if emb.dim() != 2 or emb.shape[0] != len(batch):
                raise ValueError(
                    f"encode_text returned shape {tuple(emb.shape)} for {len(batch)} prompts; expected [B, D]"
                )
            chunks.append(F.normalize(emb.float(), dim=-1))
    per_prompt = torch.cat(chunks).view(len(class_names), len(templates), -1)
    return F.normalize(per_prompt.mean(1), dim=-1)


def zeroshot_accuracy_mixed(
    pairs: Sequence[ScorePair], labels, ks: Sequence[int] = (1, 5), chunk_size: int = 1024
) -> dict[str, float]:
    """Zero-shot metrics for scores s = sum_k w_k <image_emb_k, class_emb_k>.

    `pairs`: list of `(image_emb [N, D_k], class_emb [C, D_k], weight)`; `labels` int [N] in [0, C).
    Returns `top{k}` for each k (fractions) and `mean_per_class_recall`: top-1 recall of each class
    that occurs in `labels`, averaged over those classes (classes without images are left out).
    """
    ks = check_ks(ks)
    pairs = check_score_pairs(pairs, ("image_emb", "class_emb"))
    n_images, n_classes = pairs[0][0].shape[0], pairs[0][1].shape[0]
    labels = check_labels(labels, n_images, n_classes, "labels", "image")
    ranks = positive_ranks(pairs, labels, torch.arange(n_classes), chunk_size)
    out = {f"top{k}": int((ranks < k).sum()) / n_images for k in ks}
    per_class_n = torch.bincount(labels, minlength=n_classes)
    per_class_hits = torch.bincount(labels, weights=(ranks == 0).double(), minlength=n_classes)
    present = per_class_n > 0
    out["mean_per_class_recall"] = float((per_class_hits[present] / per_class_n[present]).mean())
    return out


def zeroshot_accuracy(
    image_emb: Tensor, class_emb: Tensor, labels, ks: Sequence[int] = (1, 5), chunk_size: int = 1024
) -> dict[str, float]:
    """`top1`, `top5` and `mean_per_class_recall` of nearest-class-embedding prediction.

    `image_emb` [N, D] and `class_emb` [C, D] L2-normalised (see `class_embeddings`), `labels`
    int [N]. Batched over images (chunks of `chunk_size`); ties count as errors.
    """
    return zeroshot_accuracy_mixed([(image_emb, class_emb, 1.0)], labels, ks, chunk_size)
