"""Large batches: activation checkpointing and torch.compile change no result; model FLOPs and MFU are logged."""

import pytest
import torch

from conftest import fake_third, tiny_config
from threetowers import create_model, train
from threetowers.config import load_config
from threetowers.towers.build import set_grad_checkpointing
from threetowers.training.flops import train_flops_per_pair
from train_helpers import FAST, SyntheticData


def batch(cfg, rows=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    size, length = cfg.model.image.image_size, cfg.model.text.context_length
    tokens = torch.randint(2, cfg.model.text.vocab_size, (rows, length), generator=g)
    tokens[:, 7:] = 0
    return {"image": torch.rand(rows, 3, size, size, generator=g), "tokens": tokens}


def grads(model, b):
    model.zero_grad(set_to_none=True)
    loss = model(b)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method,extra", [("clip", []), ("3t", ["model.text.pool=mean", "model.image.pool=gap"]),
                                          ("clip", ["model.image.kind=timm", "model.image.timm_name=resnet10t",
                                                    "model.image.image_size=32"])])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(method, extra):
    cfg = tiny_config(method, "model.text.depth=2", "model.image.depth=2", *extra)
    torch.manual_seed(0)
    model = create_model(cfg, third=fake_third() if method != "clip" else None).train()
    b = batch(cfg)
    plain_loss, plain = grads(model, b)
    saved = []
    assert set_grad_checkpointing(model) >= 1
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        ckpt_loss, ckpt = grads(model, b)
    assert torch.equal(plain_loss, ckpt_loss) and plain.keys() == ckpt.keys()
    for name in plain:
        assert torch.allclose(plain[name], ckpt[name], rtol=1e-5, atol=1e-7), name
    set_grad_checkpointing(model, False)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t, lambda t: t):
        grads(model, b)
    assert sum(saved) < sum(kept)  # what backward keeps: less with checkpointing


def test_a_frozen_h_is_never_recomputed():
    model = create_model(tiny_config("3t"), third=fake_third())
    n = set_grad_checkpointing(model)
    assert n == 2  # the image and text towers' blocks (depth 1 each); h's blocks stay as they are
    assert not any(getattr(m, "checkpointing", False) for m in model.third.modules())


def test_flops_per_pair_follow_the_towers_shapes():
    counts = []
    for depth in (2, 3):
        cfg = tiny_config("clip", f"model.image.depth={depth}")
        model = create_model(cfg)
        counts.append(train_flops_per_pair(model, batch(cfg), torch.device("cpu")))
        assert all(p.grad is None for p in model.parameters()) and model.training  # nothing left behind
    # One more full block of the image tower, per pair: forward 24 W^2 N (qkv, proj, MLP) + 4 N^2 W
    # (attention) FLOPs for N tokens of width W; backward twice that.
    w, n = 32, (16 // 4) ** 2 + 1
    assert counts[1] - counts[0] == pytest.approx(3 * (24 * w * w * n + 4 * n * n * w), rel=0.02)


def test_the_trainer_logs_flops_and_mfu_and_checkpointing_trains_the_same(tmp_path):
    def run(name, *extra):
        cfg = load_config(None, FAST + ["model.method=clip", f"train.output_dir={tmp_path / name}", "train.steps=4",
                                        "train.peak_flops=1e12", *extra])
        return train(cfg, data=SyntheticData(cfg))

    plain, ckpt = run("plain"), run("ckpt", "train.grad_checkpointing=true")
    last = plain.curve[-1]
    assert last["perf/flops_per_pair"] > 0
    assert last["perf/mfu"] == pytest.approx(last["perf/tflops_per_device"] * 1e12 / 1e12)
    a, b = plain.model.state_dict(), ckpt.model.state_dict()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


def test_a_compiled_step_trains_the_same_to_rounding(tmp_path):
    def run(name, *extra):
        cfg = load_config(None, FAST + ["model.method=clip", f"train.output_dir={tmp_path / name}", "train.steps=3",
                                        "train.precision=fp32", *extra])
        return train(cfg, data=SyntheticData(cfg)).model.state_dict()

    eager, compiled = run("eager"), run("compiled", "train.compile=true")
    for k in eager:
        assert torch.allclose(eager[k], compiled[k], rtol=1e-4, atol=1e-5), k

