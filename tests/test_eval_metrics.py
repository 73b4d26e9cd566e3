"""Evaluation metrics: hand-computed values, tie rule, chunk parity, mixing, probes, input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from threetowers.eval import (
    DEFAULT_L2,
    class_embeddings,
    fewshot_eval,
    fewshot_ridge,
    linear_probe,
    positive_ranks,
    retrieval_ranks_mixed,
    retrieval_recall,
    retrieval_recall_mixed,
    sample_shots,
    zeroshot_accuracy,
    zeroshot_accuracy_mixed,
)
from threetowers.eval.fewshot import _Ridge

# ----------------------------------------------------------------------------- retrieval, by hand

# With one-hot image embeddings, score(image i, caption j) is exactly caption j's i-th coordinate,
# so this table *is* the score matrix (rows: images 0..2, columns: captions 0..4).
SCORES = torch.tensor(
    [
        [0.9, 0.2, 0.6, 0.1, 0.3],
        [0.4, 0.8, 0.6, 0.7, 0.2],
        [0.5, 0.1, 0.5, 0.9, 0.5],
    ]
)
OWNER = torch.tensor([0, 0, 1, 1, 2])  # images 0 and 1 have two captions each, image 2 has one


def test_retrieval_recall_by_hand_with_ties_and_several_captions():
    # image->text: best positive caption vs negatives scoring >= it (ties count against)
    #   image 0: positives c0=.9, c1=.2 -> best .9; negatives .6 .1 .3  -> rank 0
    #   image 1: positives c2=.6, c3=.7 -> best .7; negatives .4 .8 .2  -> rank 1
    #   image 2: positive  c4=.5;  negatives .5 (tie) .1 .5 (tie) .9    -> rank 3 (optimistic: 1)
    # text->image (columns):
    #   c0 [.9 .4 .5] own 0 -> 0;  c1 [.2 .8 .1] own 0 -> 1;  c2 [.6 .6 .5] own 1 -> 1 (tie)
    #   c3 [.1 .7 .9] own 1 -> 1;  c4 [.3 .2 .5] own 2 -> 0
    i2t, t2i = retrieval_ranks_mixed([(torch.eye(3), SCORES.T, 1.0)], OWNER)
    assert i2t.tolist() == [0, 1, 3]
    assert t2i.tolist() == [0, 1, 1, 1, 0]
    r = retrieval_recall(torch.eye(3), SCORES.T, OWNER, ks=(1, 2, 4))
    assert r == pytest.approx(
        {"i2t_R@1": 1 / 3, "i2t_R@2": 2 / 3, "i2t_R@4": 1.0, "t2i_R@1": 2 / 5, "t2i_R@2": 1.0, "t2i_R@4": 1.0}
    )
    assert all(isinstance(v, float) for v in r.values())


def test_retrieval_default_keys_and_k_beyond_gallery():
    r = retrieval_recall(torch.eye(3), SCORES.T, OWNER)
    assert list(r) == ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]
    assert r["i2t_R@5"] == r["i2t_R@10"] == r["t2i_R@5"] == 1.0  # k >= gallery size: always found


def test_image_without_captions_is_no_query_but_still_a_distractor():
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.9, 0.95]])  # image 2 has no caption
    owner = torch.tensor([0, 1])
    r = retrieval_recall(images, texts, owner, ks=(1,))
    # i2t over images 0 and 1 only: image 0 finds caption 0 (1.0 vs .2); image 1: .9 vs .0 -> found
    assert r["i2t_R@1"] == 1.0
    # t2i: caption 1 scores image 2 (.95) above its own image 1 (.9)
    assert r["t2i_R@1"] == 0.5


def _brute_ranks(scores: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray) -> list[int]:
    ranks = []
    for q, row in enumerate(scores):
        pos = gallery_labels == query_labels[q]
        ranks.append(len(row) if not pos.any() else int((row[~pos] >= row[pos].max()).sum()))
    return ranks


def _integer_embeddings(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """Small integers: every dot product is exact in float32, so ties are frequent and real."""
    return torch.randint(-1, 3, (n, d), generator=gen).float()


@pytest.mark.parametrize("chunk", [1, 3, 16, 1000])
def test_ranks_match_brute_force_with_many_ties(chunk):
    gen = torch.Generator().manual_seed(1)
    images, texts = _integer_embeddings(23, 3, gen), _integer_embeddings(61, 3, gen)
    owner = torch.randint(0, 23, (61,), generator=gen)
    i2t, t2i = retrieval_ranks_mixed([(images, texts, 1.0)], owner, chunk_size=chunk)
    s = (images @ texts.T).double().numpy()
    assert i2t.tolist() == _brute_ranks(s, np.arange(23), owner.numpy())
    assert t2i.tolist() == _brute_ranks(s.T, owner.numpy(), np.arange(23))


def test_mixed_ranks_match_brute_force():
    gen = torch.Generator().manual_seed(2)
    f, g = _integer_embeddings(19, 4, gen), _integer_embeddings(40, 4, gen)
    h, gh = _integer_embeddings(19, 3, gen), _integer_embeddings(40, 3, gen)
    owner = torch.arange(40) % 19
    i2t, t2i = retrieval_ranks_mixed([(f, g, 0.75), (h, gh, 0.25)], owner, chunk_size=5)
    s = 0.75 * (f @ g.T).double().numpy() + 0.25 * (h @ gh.T).double().numpy()
    assert i2t.tolist() == _brute_ranks(s, np.arange(19), owner.numpy())
    assert t2i.tolist() == _brute_ranks(s.T, owner.numpy(), np.arange(19))


@pytest.mark.parametrize("chunk", [1, 7, 37, 64, 5000])
def test_chunked_equals_unchunked_on_random_data(chunk):
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(37, 16, generator=gen), dim=1)
    owner = torch.cat([torch.arange(37), torch.randint(0, 37, (76,), generator=gen)])  # 1 to several each
    texts = F.normalize(images[owner] + 0.9 * torch.randn(113, 16, generator=gen), dim=1)
    full = retrieval_recall(images, texts, owner, ks=(1, 5, 10), chunk_size=10**6)
    assert retrieval_recall(images, texts, owner, ks=(1, 5, 10), chunk_size=chunk) == full
    assert 0.0 < full["i2t_R@1"] < full["i2t_R@10"] <= 1.0  # a non-trivial problem


def test_mixing_endpoints_and_numpy_inputs():
    gen = torch.Generator().manual_seed(3)
    f, h = F.normalize(torch.randn(10, 8, generator=gen), dim=1), F.normalize(torch.randn(10, 5, generator=gen), dim=1)
    g, gh = F.normalize(torch.randn(20, 8, generator=gen), dim=1), F.normalize(torch.randn(20, 5, generator=gen), dim=1)
    owner = np.arange(20) % 10
    only_fg = retrieval_recall(f.numpy(), g.numpy(), owner)
    assert retrieval_recall_mixed([(f, g, 1.0), (h, gh, 0.0)], owner) == only_fg
    assert retrieval_recall_mixed([(f, g, 0.0), (h, gh, 1.0)], owner) == retrieval_recall(h, gh, owner)


def test_positive_ranks_query_without_positive_is_never_found():
    pairs = [(torch.ones(2, 1), torch.ones(4, 1), 1.0)]
    ranks = positive_ranks(pairs, torch.tensor([0, 9]), torch.tensor([0, 1, 2, 3]))
    assert ranks.tolist() == [3, 4]  # all three negatives tie with the positive; label 9 has no positive


# ----------------------------------------------------------------------------- zero-shot

# class embeddings one-hot: image rows are the class scores themselves
ZS_IMAGES = torch.tensor(
    [
        [0.9, 0.1, 0.0],  # label 0 -> rank 0
        [0.5, 0.5, 0.0],  # label 0 -> tie with class 1 -> rank 1 (pessimistic)
        [0.7, 0.2, 0.1],  # label 0 -> rank 0
        [0.8, 0.1, 0.1],  # label 0 -> rank 0
        [0.2, 0.3, 0.5],  # label 1 -> rank 1
        [0.1, 0.2, 0.7],  # label 2 -> rank 0
    ]
)
ZS_LABELS = torch.tensor([0, 0, 0, 0, 1, 2])


def test_zeroshot_by_hand():
    r = zeroshot_accuracy(ZS_IMAGES, torch.eye(3), ZS_LABELS, ks=(1, 2, 5))
    # top1 = 4/6; top2: every rank <= 1; top5 with 3 classes clipped -> 1; per class: 3/4, 0/1, 1/1
    assert r == pytest.approx({"top1": 4 / 6, "top2": 1.0, "top5": 1.0, "mean_per_class_recall": (0.75 + 0 + 1) / 3})
    default = zeroshot_accuracy(ZS_IMAGES, torch.eye(3), ZS_LABELS, chunk_size=4)
    assert set(default) == {"top1", "top5", "mean_per_class_recall"}
    assert default["top1"] == pytest.approx(4 / 6)


def test_zeroshot_mean_per_class_recall_skips_absent_classes():
    r = zeroshot_accuracy(ZS_IMAGES[:4], torch.eye(3), ZS_LABELS[:4])  # only class 0 present
    assert r["mean_per_class_recall"] == pytest.approx(3 / 4) == r["top1"]


def test_zeroshot_mixing_changes_the_prediction():
    image_f, image_h = torch.tensor([[0.6, 0.4]]), torch.tensor([[0.3, 0.7]])
    classes = torch.eye(2)
    label = torch.tensor([0])
    def mixed(a):
        return zeroshot_accuracy_mixed([(image_f, classes, 1 - a), (image_h, classes, a)], label, ks=(1,))["top1"]
    # s_a = (1-a)[.6 .4] + a[.3 .7]: right for a < 1/3, wrong above
    assert [mixed(a) for a in (0.0, 0.25, 0.5, 1.0)] == [1.0, 1.0, 0.0, 0.0]


def test_class_embeddings_mean_of_normalised_templates_batched():
    names, templates = ["cat", "dog", "owl"], ["a {}.", "the {} here", "{}!"]
    prompts = [t.replace("{}", n) for n in names for t in templates]
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(len(prompts), 6, generator=gen) * torch.rand(len(prompts), 1, generator=gen) * 5
    calls = []

    def tokenize(texts):
        return torch.tensor([[prompts.index(t)] for t in texts])

    def encode_text(tokens):
        calls.append(len(tokens))
        return vectors[tokens[:, 0]]  # deliberately not normalised

    expected = F.normalize(F.normalize(vectors, dim=1).view(3, 3, 6).mean(1), dim=1)
    got = class_embeddings(encode_text, tokenize, names, templates, batch_size=4)
    assert torch.allclose(got, expected, atol=1e-6)
    assert calls == [4, 4, 1]
    assert torch.allclose(class_embeddings(encode_text, tokenize, names, templates, batch_size=1), got, atol=1e-6)
    with pytest.raises(ValueError, match="placeholder"):
        class_embeddings(encode_text, tokenize, names, ["no slot"])


# ----------------------------------------------------------------------------- few-shot


def _clusters(n_classes: int, per_class: int, dim: int, seed: int, noise: float = 0.3):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    x = centres[labels] + noise * torch.randn(len(labels), dim, generator=gen)
    return F.normalize(x, dim=1), labels


@pytest.mark.parametrize("shots", [1, 5])
def test_fewshot_ridge_recovers_separable_problem(shots):
    x, y = _clusters(5, shots, 32, seed=0)
    xt, yt = _clusters(5, 40, 32, seed=1)
    assert fewshot_ridge(x, y, xt, yt) == 1.0
    assert fewshot_ridge(x, y, xt, yt, l2=DEFAULT_L2) == 1.0


def test_fewshot_ridge_is_at_chance_on_random_labels():
    gen = torch.Generator().manual_seed(0)
    x, xt = torch.randn(40, 32, generator=gen), torch.randn(4000, 32, generator=gen)
    y, yt = torch.arange(4).repeat(10), torch.randint(0, 4, (4000,), generator=gen)
    assert fewshot_ridge(x, y, xt, yt) == pytest.approx(0.25, abs=0.04)


def test_ridge_predictions_and_leave_one_out_match_explicit_solves():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=gen).double(), torch.arange(3).repeat(4)
    ridge, l2 = _Ridge(x, y, 3), 0.7
    targets = F.one_hot(y, 3).double()
    for i in range(12):
        keep = torch.arange(12) != i
        xk, tk = x[keep], targets[keep]
        xm, tm = xk.mean(0), tk.mean(0)  # free (unpenalised) bias
        w = torch.linalg.solve((xk - xm).T @ (xk - xm) + l2 * torch.eye(5), (xk - xm).T @ (tk - tm))
        assert torch.allclose(ridge.loo_predictions(l2)[i], (x[i] - xm) @ w + tm, atol=1e-10)
    xm, tm = x.mean(0), targets.mean(0)
    w = torch.linalg.solve((x - xm).T @ (x - xm) + l2 * torch.eye(5), (x - xm).T @ (targets - tm))
    xt = torch.randn(4, 5, generator=gen).double()
    assert torch.allclose(ridge.predict(xt, l2), (xt - xm) @ w + tm, atol=1e-10)


def test_linear_probe_separable_and_random():
    x, y = _clusters(4, 10, 16, seed=0)
    xt, yt = _clusters(4, 30, 16, seed=1)
    assert linear_probe(x, y, xt, yt) == 1.0
    gen = torch.Generator().manual_seed(0)
    xt, yt = torch.randn(2000, 16, generator=gen), torch.randint(0, 4, (2000,), generator=gen)
    assert linear_probe(x, y, xt, yt) == pytest.approx(0.25, abs=0.05)


def test_sample_shots():
    labels = np.repeat(np.arange(3), [4, 6, 5])
    idx = sample_shots(labels, 3, seed=0)
    assert np.bincount(labels[idx]).tolist() == [3, 3, 3] and len(set(idx)) == 9
    assert (sample_shots(labels, 3, seed=0) == idx).all() and not (sample_shots(labels, 3, seed=1) == idx).all()
    with pytest.raises(ValueError, match="class 0 has 4 examples"):
        sample_shots(labels, 5, seed=0)


def test_fewshot_eval_means_stds_and_embeds_the_test_set_once():
    pool_x, pool_y = _clusters(4, 30, 16, seed=0)
    test = _clusters(4, 20, 16, seed=1)
    embedded = []

    def embed_fn(inputs):
        embedded.append(len(inputs))
        return inputs * 2.0  # any fixed map of the inputs

    def make_sets(shots, seed):
        idx = torch.as_tensor(sample_shots(pool_y.numpy(), shots, seed))
        return (pool_x[idx], pool_y[idx]), test

    r = fewshot_eval(embed_fn, make_sets, shots=(1, 5), seeds=(0, 1, 2))
    assert r == {"1shot/mean": 1.0, "1shot/std": 0.0, "5shot/mean": 1.0, "5shot/std": 0.0}
    assert embedded.count(80) == 1 and len(embedded) == 1 + 6  # test once, six train sets

    gen = torch.Generator().manual_seed(5)

    def random_sets(shots, seed):  # features unrelated to labels: chance level, non-zero spread
        train = (torch.randn(4 * shots, 8, generator=gen), torch.arange(4).repeat(shots))
        return train, (torch.randn(200, 8, generator=gen), torch.randint(0, 4, (200,), generator=gen))

    noisy = fewshot_eval(lambda v: v, random_sets, shots=(2,), seeds=(0, 1, 2, 3))
    assert 0.0 < noisy["2shot/std"] < 0.2 and 0.1 < noisy["2shot/mean"] < 0.4


# ----------------------------------------------------------------------------- input errors


PROBE_TEST = (torch.randn(2, 3), torch.arange(2))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: retrieval_recall(torch.randn(3), torch.randn(5, 4), OWNER), "image_emb must be a non-empty 2-D"),
        (lambda: retrieval_recall(torch.randn(3, 4), torch.randn(5, 3), OWNER), "dim 4 but text_emb has dim 3"),
        (lambda: retrieval_recall(torch.randn(3, 4), torch.randn(5, 4), OWNER[:4]), "one entry per caption"),
        (lambda: retrieval_recall(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])), r"in \[0, 3\)"),
        (lambda: retrieval_recall(torch.randn(3, 4), torch.randn(5, 4), OWNER.float()), "integer"),
        (lambda: retrieval_recall(torch.full((3, 4), float("nan")), torch.randn(5, 4), OWNER), "finite"),
        (lambda: retrieval_recall(torch.randn(3, 4), torch.randn(5, 4), OWNER, ks=(0,)), "ks must be positive"),
        (lambda: retrieval_recall(torch.randn(3, 4), torch.randn(5, 4), OWNER, chunk_size=0), "chunk_size"),
        (
            lambda: retrieval_recall_mixed(
                [(torch.randn(3, 4), torch.randn(5, 4), 0.5), (torch.randn(2, 4), torch.randn(5, 4), 0.5)], OWNER
            ),
            "every pair must score the same items",
        ),
        (lambda: retrieval_recall_mixed([], OWNER), "at least one"),
        (lambda: zeroshot_accuracy(torch.randn(6, 3), torch.eye(3), ZS_LABELS + 1), r"labels must lie in \[0, 3\)"),
        (lambda: zeroshot_accuracy(torch.randn(6, 3), torch.eye(4), ZS_LABELS), "class_emb has dim 4"),
        (lambda: fewshot_ridge(torch.randn(4, 3), torch.arange(3), *PROBE_TEST), "train_labels must be 1-D"),
        (lambda: fewshot_ridge(torch.randn(4, 3), torch.arange(4), torch.randn(2, 5), PROBE_TEST[1]), "test_emb has dim 5"),
        (lambda: fewshot_ridge(torch.randn(4, 3), torch.arange(4), *PROBE_TEST, l2=0.0), "l2 must be positive"),
    ],
)
def test_shape_and_value_errors_are_clear(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------- suite (embedding + metrics)

COLOURS = ["red", "green", "blue"]


class ColourModel(torch.nn.Module):
    """Image embedding = mean colour, text embedding = one-hot colour word; the 'third' image side
    sees every colour shifted by one, so mixing towards it makes predictions wrong."""

    def __init__(self, third: bool = True):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))
        if third:
            self.encode_image_third = lambda x: self.encode_image(x).roll(1, dims=1)
            self.encode_text_third = self.encode_text

    def encode_image(self, images):
        assert not self.training and images.dtype == torch.float32 and images.max() <= 1.0
        return F.normalize(images.mean((2, 3)), dim=1)

    def encode_text(self, tokens):
        return F.one_hot(tokens[:, 0], 3).float()


def colour_tokenizer(texts):
    words = [t.replace(".", "").split() for t in texts]
    return torch.tensor([[next(COLOURS.index(w) for w in ws if w in COLOURS), 0] for ws in words])


def solid_images(colours):
    images = np.zeros((len(colours), 4, 4, 3), dtype=np.uint8)
    images[np.arange(len(colours)), :, :, colours] = 255
    return images


def test_evaluate_zeroshot_retrieval_and_mixing_sweep():
    from threetowers.core.sets import CaptionedSet, LabelledSet
    from threetowers.eval import evaluate

    labels = np.array([0, 1, 2, 2, 1, 0, 0])
    tasks = {
        "colours": LabelledSet(solid_images(labels), labels, COLOURS, ["a {} thing.", "{}"]),
        "captions": CaptionedSet(
            solid_images([0, 1, 2]), ["red", "a red one", "green", "blue.", "blue blue"], np.array([0, 0, 1, 2, 2])
        ),
    }
    model = ColourModel().train()
    r = evaluate(model, colour_tokenizer, tasks, batch_size=2, mixing_alphas=[0.0, 0.25, 0.5, 1.0])
    assert model.training  # restored
    assert r["colours/top1"] == r["colours/mean_per_class_recall"] == 1.0
    assert r["captions/i2t_R@1"] == r["captions/t2i_R@1"] == 1.0
    # s_a = (1-a) onehot(c) + a onehot(c+1): right below a = 0.5, a tie (counted wrong) at 0.5
    assert [r[f"colours/mix@{a}/top1"] for a in ("0", "0.25", "0.5", "1")] == [1.0, 1.0, 0.0, 0.0]
    assert r["captions/mix@0.25/t2i_R@1"] == 1.0 and r["captions/mix@1/t2i_R@1"] == 0.0
    plain = evaluate(ColourModel(third=False), colour_tokenizer, tasks, mixing_alphas=[0.5])
    assert not any("mix@" in k for k in plain) and plain["colours/top5"] == 1.0
    with pytest.raises(ValueError, match="task 'bad'"):
        evaluate(model, colour_tokenizer, {"bad": [1, 2]})
