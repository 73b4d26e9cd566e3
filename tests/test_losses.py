import math

import pytest
import torch
import torch.nn.functional as F

from threetowers.model.losses import TermLoss, Term, contrastive_loss, method_terms


def _pair(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def direct_softmax(a, b, t):
    # Written from the formula in docs/method.md, row by row, without matrix helpers.
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


def test_scale_clamp_is_on_the_parameter_after_an_update():
    loss = TermLoss([Term("x", "y", 1.0)], init_scale=10.0, max_scale=50.0)
    with torch.no_grad():
        loss.log_scale.fill_(math.log(1000.0))
    loss.clamp_()
    assert float(loss.scales()[0].detach()) == pytest.approx(50.0)


def test_a_temperature_above_the_bound_comes_back_down():
    """At c7dddeb the clamp sat in the forward: above max_scale t's gradient was exactly zero and t
    stayed at 100 for good. Now the loss pulls it back (data whose optimum is near t = 5)."""
    torch.manual_seed(0)
    a = F.normalize(torch.randn(32, 8), dim=-1)
    b = F.normalize(a + 1.2 * torch.randn(32, 8), dim=-1)  # noisy pairs: a low t is best
    loss = TermLoss([Term("x", "y", 1.0)], init_scale=10.0, max_scale=100.0)
    with torch.no_grad():
        loss.log_scale.fill_(math.log(101.0))  # training pushed it past the bound
    opt = torch.optim.Adam(loss.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        loss({"x": a, "y": b})[0].backward()
        opt.step()
        loss.clamp_()  # as the trainer does after every update (ThreeTowers.after_update)
    assert float(loss.scales()[0].detach()) < 30.0


def test_distributed_term_loss_gathers_the_distinct_embeddings_once_in_fp32(monkeypatch):
    """3T with model.third.heads=none as rank 1 of 2: one gather of the five distinct tensors (third_f is
    third_g) side by side, in fp32, and each term contrasted against the gathered rows."""
    import threetowers.model.losses as losses

    g = torch.Generator().manual_seed(7)
    h = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    emb = {k: F.normalize(torch.randn(4, d, generator=g), dim=-1) for k, d in
           [("image", 6), ("text", 6), ("image_h", 8), ("text_h", 8)]}
    emb["image"] = emb["image"].bfloat16()
    emb["third_f"] = emb["third_g"] = h
    calls = []

    def fake_gather(x, world_size):  # rank 0's rows: this rank's, reversed (any layout-independent stand-in)
        calls.append((tuple(x.shape), x.dtype, world_size))
        return torch.cat([x.flip(0), x])

    monkeypatch.setattr(losses, "gather_with_grad", fake_gather)
    loss = TermLoss(method_terms("3t", [0.5, 0.3, 0.2]), init_scale=10.0)
    loss.distribute(1, 2)
    total, parts = loss(emb)
    assert calls == [((4, 6 + 6 + 8 + 8 + 8), torch.float32, 2)]
    everyone = {k: torch.cat([v.float().flip(0), v.float()]) for k, v in emb.items()}
    expected = sum(t.weight * float(contrastive_loss(emb[t.a], emb[t.b], 10.0, a_all=everyone[t.a],
                                                     b_all=everyone[t.b], rank=1)) for t in loss.terms)
    assert float(total.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(parts["loss/image~text"]) != pytest.approx(float(contrastive_loss(emb["image"], emb["text"], 10.0)))

    loss.distribute(0, 1)  # back to local: no collective at all
    calls.clear()
    assert float(loss(emb)[0].detach()) == pytest.approx(
        sum(t.weight * float(contrastive_loss(emb[t.a], emb[t.b], 10.0)) for t in loss.terms), rel=1e-5)
    assert calls == []
    with pytest.raises(ValueError, match="rank 2 of a world of 2"):
        loss.distribute(2, 2)


def test_heads_none_gives_third_f_and_third_g_as_one_tensor():
    from conftest import fake_third, tiny_config
    from threetowers import create_model

    model = create_model(tiny_config("3t", "model.third.heads=none"), third=fake_third())
    batch = {"image": torch.rand(2, 3, 16, 16), "tokens": torch.randint(2, 64, (2, 12))}
    emb = model.embeddings(batch)
    assert emb["third_f"] is emb["third_g"]
    assert model.loss.world_size == 1  # a built model's loss is local until the training job distributes it
