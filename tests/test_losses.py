import math

import pytest
import torch
import torch.nn.functional as F

from threetowers.model.losses import TermLoss, Term, contrastive_loss, method_terms


def _pair(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def direct_softmax(a, b, t):
    # Written from the formula in shared/DESIGN.md, row by row, without matrix helpers.
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        row = [t * float(a[i] @ b[j]) for j in range(n)]
        col = [t * float(b[i] @ a[j]) for j in range(n)]
        total += -(row[i] - math.log(sum(math.exp(x) for x in row)))
        total += -(col[i] - math.log(sum(math.exp(x) for x in col)))
    return total / (2 * n)


def direct_sigmoid(a, b, t, bias):
    n = a.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-z * (t * float(a[i] @ b[j]) + bias)))
    return total / n


@pytest.mark.parametrize("t", [1.0, 10.0])
def test_softmax_matches_formula(t):
    a, b = _pair()
    assert float(contrastive_loss(a, b, t)) == pytest.approx(direct_softmax(a, b, t), rel=1e-5)


@pytest.mark.parametrize("t,bias", [(10.0, -10.0), (3.0, 0.5)])
def test_sigmoid_matches_formula(t, bias):
    a, b = _pair(seed=1)
    assert float(contrastive_loss(a, b, t, bias, kind="sigmoid")) == pytest.approx(direct_sigmoid(a, b, t, bias), rel=1e-5)


def test_softmax_is_symmetric_and_sigmoid_too():
    a, b = _pair(seed=2)
    assert float(contrastive_loss(a, b, 5.0)) == pytest.approx(float(contrastive_loss(b, a, 5.0)), rel=1e-6)
    s_ab = float(contrastive_loss(a, b, 5.0, -2.0, "sigmoid"))
    assert s_ab == pytest.approx(float(contrastive_loss(b, a, 5.0, -2.0, "sigmoid")), rel=1e-6)


def test_aligned_pairs_give_the_minimum():
    a, b = _pair(n=8, d=16, seed=3)
    aligned = float(contrastive_loss(a, a, 20.0))
    assert aligned < float(contrastive_loss(a, b, 20.0))
    # Orthogonal aligned pairs at a high temperature: the loss is close to its bound of 0.
    eye = torch.eye(8)
    assert float(contrastive_loss(eye, eye, 50.0)) < 1e-6
    # Any permutation of the partners is worse than the identity pairing.
    perm = torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])
    assert float(contrastive_loss(a, a[perm], 20.0)) > aligned


def test_bad_shapes_are_refused():
    a, b = _pair()
    with pytest.raises(ValueError, match="equal shape"):
        contrastive_loss(a, b[:3], 1.0)
    with pytest.raises(ValueError, match="softmax or sigmoid"):
        contrastive_loss(a, b, 1.0, kind="hinge")
    with pytest.raises(ValueError, match="bias"):
        contrastive_loss(a, b, 1.0, kind="sigmoid")


def test_method_terms_are_data():
    assert [t.name for t in method_terms("clip")] == ["image~text"]
    assert [t.name for t in method_terms("lit")] == ["third_g~text_h"]
    t3 = method_terms("3t", [0.5, 0.25, 0.25])
    assert [(t.a, t.b, t.weight) for t in t3] == [("image", "text", 0.5), ("image_h", "third_f", 0.25), ("text_h", "third_g", 0.25)]
    with pytest.raises(ValueError, match="clip, lit or 3t"):
        method_terms("align")


def test_term_loss_is_the_weighted_sum_with_per_term_and_shared_scales():
    a, b = _pair(seed=4)
    c, d = _pair(seed=5)
    terms = [Term("x", "y", 0.7), Term("u", "v", 0.3)]
    per_term = TermLoss(terms, init_scale=10.0)
    with torch.no_grad():
        per_term.log_scale[1] = math.log(2.0)
    total, parts = per_term({"x": a, "y": b, "u": c, "v": d})
    expected = 0.7 * float(contrastive_loss(a, b, 10.0)) + 0.3 * float(contrastive_loss(c, d, 2.0))
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(parts["scale/u~v"]) == pytest.approx(2.0)
    shared = TermLoss(terms, temperature="shared", init_scale=10.0)
    assert shared.log_scale.shape == (1,)
    assert float(shared({"x": a, "y": b, "u": c, "v": d})[1]["scale/u~v"]) == pytest.approx(10.0)


def test_scale_clamp():
    loss = TermLoss([Term("x", "y", 1.0)], init_scale=10.0, max_scale=50.0)
    with torch.no_grad():
        loss.log_scale.fill_(math.log(1000.0))
    assert float(loss.scales()[0].detach()) == pytest.approx(50.0)
