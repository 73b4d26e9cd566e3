"""The evaluation suite: embed each task's data with a model, then apply the pure metrics.

Works with any object that has `encode_image(images01 [B, 3, H, W]) -> [B, D]` and
`encode_text(tokens [B, L]) -> [B, D]` (ours, or a wrapped model from another library). A 3T model
that also has `encode_image_third` (h with its head, h_g(h)) and `encode_text_third` (g_h) gets
the mixing sweep s_a = (1 - a)<f, g> + a<h_g(h), g_h> for every a in `mixing_alphas`, once per h
when it has several (`num_third_pairs`): keys `mix@a` for the first h, `mix.k@a` for h_k, k >= 2.

Where our model's image side runs the frozen h (LiT, and the mixing sweep), h's features of each
image set come from an `EvalFeatures` store (`third/store.py`): computed once per (h, set) and
passed to the model as `cached=`, so that models sharing an h do not run it again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..core.sets import CaptionedSet, LabelledSet, as_float
from ..model.losses import h_suffix
from ..third.store import EvalFeatures
from .retrieval import retrieval_recall_mixed
from .zeroshot import class_embeddings, zeroshot_accuracy_mixed

Encoder = Callable[[Tensor, slice], Tensor]  # (a prepared batch, its rows in the set) -> embeddings


def _device(model: Any) -> torch.device:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device("cpu")


def _encode(
    fns: Sequence[Encoder], prepare: Callable[[Any], Tensor], items, batch_size: int,
    device: torch.device, desc: str, progress: bool,
) -> list[Tensor]:
    """Run every fn on each prepared batch of `items`; one float32 CPU tensor [N, D_k] per fn."""
    outs: list[list[Tensor]] = [[] for _ in fns]
    for start in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress):
        rows = slice(start, start + batch_size)
        batch = prepare(items[rows]).to(device)
        for out, fn in zip(outs, fns):
            out.append(fn(batch, rows).float().cpu())
    return [torch.cat(o) for o in outs]


def _text_encoder(fn: Callable[[Tensor], Tensor]) -> Encoder:
    return lambda batch, rows: fn(batch)


def third_pairs(model: Any) -> int:
    """How many LiT-like pairs (h_g(h_k), g_h,k) the model holds: ours say (`num_third_pairs`); another
    object has one if it has `encode_image_third` and `encode_text_third`."""
    if hasattr(model, "num_third_pairs"):
        return model.num_third_pairs
    has_pair = getattr(model, "has_third_pair", hasattr(model, "encode_image_third") and hasattr(model, "encode_text_third"))
    return int(bool(has_pair))


def _pair_kwargs(k: int) -> dict:
    # The first pair is asked for as it always was (another library's model may take no `k`).
    return {} if k == 0 else {"k": k}


def image_encoders(model: Any, images, batch_size: int, device: torch.device, third_features: EvalFeatures,
                   pairs: int) -> list[Encoder]:
    """[f's encoder] + [h_g(h_k)'s for each of the first `pairs` h's] (the mixing sweep). Each h's features
    of `images` come from `third_features` when it runs our model's h; another library's model is
    called on the pixels."""
    plain_needs_h = getattr(model, "image_needs_third", False)
    held = list(getattr(model, "thirds", None) or [getattr(model, "third", None)])
    count = max(pairs, int(plain_needs_h))
    features: list[Tensor | None] = []
    for k in range(count):
        third = (held[k] if k < len(held) else None) or \
            (third_features.thirds[k] if k < len(third_features.thirds) else None)
        features.append(third_features.features(third, images, batch_size, device) if third is not None else None)

    def cached(k: int, rows: slice) -> Tensor | None:
        return None if features[k] is None else features[k][rows].to(device)

    plain: Encoder = ((lambda batch, rows: model.encode_image(batch, cached=cached(0, rows))) if plain_needs_h
                      else (lambda batch, rows: model.encode_image(batch)))

    def pair(k: int) -> Encoder:
        if features[k] is None:
            return lambda batch, rows: model.encode_image_third(batch, **_pair_kwargs(k))
        return lambda batch, rows: model.encode_image_third(batch, cached(k, rows), **_pair_kwargs(k))

    return [plain] + [pair(k) for k in range(pairs)]


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """An `nn.Module` in eval mode, without gradients, for the block; its training flag restored after."""
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training:
            model.train()


def encode_images(model: Any, images, batch_size: int = 256, third_features: EvalFeatures | None = None) -> Tensor:
    """`model.encode_image` over uint8 images [N, H, W, 3], batched, as one float32 CPU tensor."""
    device = _device(model)
    with eval_mode(model):
        fns = image_encoders(model, images, batch_size, device, third_features or EvalFeatures(), pairs=0)
        return _encode(fns, as_float, images, batch_size, device, "images", False)[0]


def mix_key(k: int, alpha: float) -> str:
    """The mixing sweep's key part for h_k at `alpha`: mix@0.5 (the first h, as with one h), mix.2@0.5, ..."""
    return f"mix{h_suffix(k)}@{alpha:g}"


def _score_pairs(main: tuple[Tensor, Tensor], third: tuple[Tensor, Tensor] | None, alpha: float | None):
    if alpha is None:
        return [(main[0], main[1], 1.0)]
    return [(main[0], main[1], 1.0 - alpha), (third[0], third[1], alpha)]


def evaluate(
    model: Any,
    tokenizer: Callable[[list[str]], Tensor],
    tasks: dict[str, LabelledSet | CaptionedSet],
    batch_size: int = 256,
    mixing_alphas: Sequence[float] | None = None,
    progress: bool = False,
    third_features: EvalFeatures | None = None,
) -> dict[str, float]:
    """Zero-shot metrics for each `LabelledSet`, retrieval Recall@k for each `CaptionedSet`.

    Keys: `{task}/top1`, `{task}/top5`, `{task}/mean_per_class_recall`, `{task}/i2t_R@1`, ...;
    with mixing (`mixing_alphas` given, and a 3T model: `num_third_pairs`, or for another object, one
    with `encode_image_third` and `encode_text_third`) also `{task}/mix@{alpha}/{metric}`, and for a
    model with several h's `{task}/mix.{k}@{alpha}/{metric}` for h_k, k >= 2; other models skip the sweep.
    An `nn.Module` is put in eval mode for the call and restored afterwards. `third_features`: the
    store of h's features to share across calls (default: one for this call).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for name, task in tasks.items():
        if not isinstance(task, (LabelledSet, CaptionedSet)):
            raise ValueError(f"task {name!r}: expected a LabelledSet or CaptionedSet, got {type(task).__name__}")
    # Our models say how many pairs they hold (one per h for 3T); another object is asked for the two methods.
    pairs = third_pairs(model) if mixing_alphas else 0
    for a in mixing_alphas or ():
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"mixing_alphas must lie in [0, 1], got {a}")
    sweep: list[tuple[int, float] | None] = [None] + [(k, a) for k in range(pairs) for a in mixing_alphas or ()]
    text_fns = [model.encode_text] + [partial(model.encode_text_third, **_pair_kwargs(k)) for k in range(pairs)]
    third_features = third_features or EvalFeatures()
    device = _device(model)
    results: dict[str, float] = {}

    def tokenize_to_device(texts: list[str]) -> Tensor:
        return tokenizer(texts).to(device)

    with eval_mode(model):
        for name, task in tasks.items():
            image_fns = image_encoders(model, task.images, batch_size, device, third_features, pairs)
            images = _encode(image_fns, as_float, task.images, batch_size, device, f"{name} images", progress)
            if isinstance(task, LabelledSet):
                classes = [
                    class_embeddings(fn, tokenize_to_device, task.class_names, task.templates, batch_size).cpu()
                    for fn in text_fns
                ]
                targets, metric = task.labels, zeroshot_accuracy_mixed
            else:
                classes = _encode([_text_encoder(fn) for fn in text_fns], tokenizer, task.captions, batch_size,
                                  device, f"{name} captions", progress)
                targets, metric = task.image_of_text, retrieval_recall_mixed
            for point in sweep:
                k, alpha = point if point is not None else (0, None)
                third = (images[1 + k], classes[1 + k]) if alpha is not None else None
                scores = metric(_score_pairs((images[0], classes[0]), third, alpha), targets)
                prefix = name if alpha is None else f"{name}/{mix_key(k, alpha)}"
                results.update({f"{prefix}/{m}": v for m, v in scores.items()})
    return results
