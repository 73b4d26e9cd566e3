"""Few-shot transfer on frozen image embeddings: the closed-form ridge-regression probe.

Protocol (big_vision style, as used by the LiT and 3T papers): k images per class are sampled
from the train split; features are standardised with the train shots' per-dimension mean and std;
a linear map with an unpenalised bias is fitted by ridge regression to one-hot targets
(equivalently to 2*onehot-1: the argmax does not change under that affine map when the bias is
free); the prediction is the argmax. Reported: test accuracy, mean and spread over seeds.

Choice of the L2 strength: one SVD of the train features gives the solution for every lambda of
`L2_GRID`; lambda is chosen by exact leave-one-out accuracy on the train shots (the closed-form
hat-matrix identity, no refits), ties going to the larger lambda. With one shot per class
leave-one-out is meaningless (it removes a whole class), so a fixed `DEFAULT_L2` is used.
Pass a single float as `l2` to fix lambda yourself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

L2_GRID: tuple[float, ...] = tuple(2.0**i for i in range(-4, 17, 2))  # in standardised-feature units
DEFAULT_L2 = 2.0**10  # used when lambda cannot be selected (one shot per class)
_STD_EPS = 1e-5  # keeps constant dimensions finite after standardisation


def _check_probe_inputs(train_emb, train_labels, test_emb, test_labels) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    x, xt = torch.as_tensor(train_emb), torch.as_tensor(test_emb)
    y, yt = torch.as_tensor(train_labels), torch.as_tensor(test_labels)
    for name, e, lab in (("train", x, y), ("test", xt, yt)):
        if e.dim() != 2 or e.shape[0] == 0:
            raise ValueError(f"{name}_emb must be a non-empty 2-D [N, D] tensor, got shape {tuple(e.shape)}")
        if not (e.is_floating_point() and bool(torch.isfinite(e).all())):
            raise ValueError(f"{name}_emb must be floating point and finite (no NaN/inf)")
        if lab.dim() != 1 or lab.shape[0] != e.shape[0]:
            raise ValueError(
                f"{name}_labels must be 1-D with one label per row of {name}_emb ({e.shape[0]}), "
                f"got shape {tuple(lab.shape)}"
            )
        if lab.is_floating_point() or lab.dtype == torch.bool or int(lab.min()) < 0:
            raise ValueError(f"{name}_labels must be non-negative integers, got dtype {lab.dtype}")
    if x.shape[1] != xt.shape[1]:
        raise ValueError(f"train_emb has dim {x.shape[1]} but test_emb has dim {xt.shape[1]}")
    n_classes = int(max(y.max(), yt.max())) + 1
    return x.double(), y.long(), xt.double(), yt.long(), n_classes


def _standardise(x: Tensor, xt: Tensor) -> tuple[Tensor, Tensor]:
    mean, std = x.mean(0), x.std(0, correction=0) + _STD_EPS
    return (x - mean) / std, (xt - mean) / std


class _Ridge:
    """Ridge regression with free bias for every lambda at the cost of one SVD.

    X (centred) = U S V^T, Yc = Y - mean(Y): W(l) = V diag(S / (S^2 + l)) U^T Yc, the train fit is
    U diag(S^2 / (S^2 + l)) U^T Yc + mean(Y), and the hat matrix diagonal (incl. the bias) is
    h_i = 1/n + sum_r U_ir^2 S_r^2 / (S_r^2 + l).
    """

    def __init__(self, x: Tensor, y: Tensor, n_classes: int):
        self.y = y
        self.targets = F.one_hot(y, n_classes).double()
        self.target_mean = self.targets.mean(0)
        self.mean = x.mean(0)
        self.u, self.s, vh = torch.linalg.svd(x - self.mean, full_matrices=False)
        self.v = vh.T
        self.proj = self.u.T @ (self.targets - self.target_mean)  # [r, C]

    def predict(self, xt: Tensor, l2: float) -> Tensor:
        return ((xt - self.mean) @ self.v) @ ((self.s / (self.s**2 + l2))[:, None] * self.proj) + self.target_mean

    def loo_predictions(self, l2: float) -> Tensor:
        """Exact leave-one-out predictions for the train points: y - (y - fit) / (1 - h)."""
        shrink = self.s**2 / (self.s**2 + l2)
        fit = self.u @ (shrink[:, None] * self.proj) + self.target_mean
        h = 1.0 / len(self.y) + (self.u**2) @ shrink
        return self.targets - (self.targets - fit) / (1.0 - h).clamp_min(1e-12)[:, None]

    def select_l2(self, grid: Sequence[float]) -> float:
        accs = {l2: float((self.loo_predictions(l2).argmax(1) == self.y).double().mean()) for l2 in grid}
        best = max(accs.values())
        return max(l2 for l2, acc in accs.items() if acc == best)


def fewshot_ridge(train_emb, train_labels, test_emb, test_labels, l2: float | Sequence[float] = L2_GRID) -> float:
    """Test accuracy of the closed-form ridge probe fitted on (train_emb, train_labels).

    `l2`: a float fixes lambda; a sequence is a grid searched by leave-one-out accuracy on the
    train shots (falls back to `DEFAULT_L2` when some class has a single shot). Lambda is in units
    of the standardised features.
    """
    x, y, xt, yt, n_classes = _check_probe_inputs(train_emb, train_labels, test_emb, test_labels)
    grid = [float(l2)] if isinstance(l2, (int, float)) else [float(v) for v in l2]
    if not grid or min(grid) <= 0:
        raise ValueError(f"l2 must be positive (a float or a non-empty grid), got {l2}")
    x, xt = _standardise(x, xt)
    ridge = _Ridge(x, y, n_classes)
    if len(grid) == 1:
        chosen = grid[0]
    elif int(torch.bincount(y)[torch.unique(y)].min()) >= 2:
        chosen = ridge.select_l2(grid)
    else:
        chosen = DEFAULT_L2
    return float((ridge.predict(xt, chosen).argmax(1) == yt).double().mean())


def linear_probe(
    train_emb, train_labels, test_emb, test_labels, l2: float = 1e-4, max_iter: int = 200
) -> float:
    """Test accuracy of multinomial logistic regression (full-batch L-BFGS, L2 penalty on weights)."""
    x, y, xt, yt, n_classes = _check_probe_inputs(train_emb, train_labels, test_emb, test_labels)
    x, xt = _standardise(x, xt)
    weight = torch.zeros(x.shape[1], n_classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers often sit inside no_grad
        opt.step(closure)
    with torch.no_grad():
        return float(((xt @ weight + bias).argmax(1) == yt).double().mean())


def sample_shots(labels, shots: int, seed: int) -> np.ndarray:
    """Sorted indices of `shots` distinct examples of every class in `labels`, reproducible by seed."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < shots:
            raise ValueError(f"class {c} has {len(idx)} examples, fewer than the {shots} shots asked for")
        picked.append(rng.choice(idx, size=shots, replace=False))
    return np.sort(np.concatenate(picked))


def _inputs_and_labels(split: Any, name: str) -> tuple[Any, Any]:
    if hasattr(split, "images") and hasattr(split, "labels"):  # LabelledSet and friends
        return split.images, split.labels
    if isinstance(split, (tuple, list)) and len(split) == 2:
        return split[0], split[1]
    raise ValueError(
        f"make_sets must return (train, test), each a LabelledSet or (inputs, labels); {name} is {type(split).__name__}"
    )


def fewshot_eval(
    embed_fn: Callable[[Any], Tensor],
    make_sets: Callable[[int, int], tuple[Any, Any]],
    shots: Sequence[int] = (1, 5, 10, 25),
    seeds: Sequence[int] = (0, 1, 2),
    l2: float | Sequence[float] = L2_GRID,
) -> dict[str, float]:
    """Ridge few-shot accuracy per shot count: `{k}shot/mean` and `{k}shot/std` over seeds.

    `make_sets(shots, seed)` returns `(train, test)`, each a `LabelledSet` or `(inputs, labels)`;
    `embed_fn(inputs) -> [N, D]`. Each distinct inputs object is embedded once (a test set that
    `make_sets` returns again and again is embedded only the first time). The std is the sample
    standard deviation over seeds (0 for a single seed).
    """
    cache: dict[int, tuple[Any, Tensor]] = {}  # id -> (object kept alive so ids stay unique, embedding)

    def embed(inputs: Any) -> Tensor:
        if id(inputs) not in cache:
            cache[id(inputs)] = (inputs, torch.as_tensor(embed_fn(inputs)))
        return cache[id(inputs)][1]

    out: dict[str, float] = {}
    for k in shots:
        accs = []
        for seed in seeds:
            train, test = make_sets(k, seed)
            (x, y), (xt, yt) = _inputs_and_labels(train, "train"), _inputs_and_labels(test, "test")
            accs.append(fewshot_ridge(embed(x), y, embed(xt), yt, l2=l2))
        out[f"{k}shot/mean"] = float(np.mean(accs))
        out[f"{k}shot/std"] = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
    return out
