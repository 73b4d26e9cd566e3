"""train.ema_decay: an EMA of the trained weights (training/ema.py). Its values against a hand-computed
average with the warm-up, what is evaluated and saved, off by default, exact resume, skipped steps,
resuming a checkpoint without one, buffers of any job, and the config's range."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from threetowers import create_model, train
from threetowers.config import ConfigError, load_config
from threetowers.core.distributed import DistInfo
from threetowers.training import optim
from threetowers.training.trainer import Job, run
from train_helpers import FAST, SyntheticData


def config(out, *overrides):
    return load_config("tiny", FAST + [f"train.output_dir={out}", "train.tensorboard=false", "eval.tasks=[]",
                                       *overrides])


def ckpt(out, step):
    return out / "checkpoints" / f"step_{step:07d}"


def ema_at(out, step):
    """The EMA tensors of checkpoint `step`, and how many updates made them."""
    with safe_open(str(ckpt(out, step) / "ema.safetensors"), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, int(fh.metadata()["updates"])


def weights(directory):
    return load_file(str(directory / "model.safetensors"))


def assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def warmed_up(decay, n):
    return min(decay, (1 + n) / (10 + n))


def test_the_ema_is_the_warmed_up_average_and_what_is_evaluated_and_saved(tmp_path):
    out = tmp_path / "ema"
    cfg = config(out, "train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=5",
                 "train.ema_decay=0.15", "eval.every=1", "optim.lr=1e-2")
    seen = {}

    def evaluate(model, step):
        seen[step] = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        return {}

    result = train(cfg, evaluate=evaluate, data=SyntheticData(cfg))
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)  # the run's initial weights
        initial = {k: p.detach().double() for k, p in create_model(cfg).named_parameters()}
    expected = dict(initial)
    for step in (1, 2, 3):  # d = min(0.15, 1/10) = 0.1 at the first update, then 0.15 (2/11 and 3/12 are above)
        d = warmed_up(0.15, step - 1)
        raw = weights(ckpt(out, step))
        expected = {k: d * expected[k] + (1 - d) * raw[k].double() for k in expected}
        ema, updates = ema_at(out, step)
        assert updates == step and ema.keys() == expected.keys()
        for k in ema:
            assert ema[k].dtype == torch.float32
            assert torch.allclose(ema[k].double(), expected[k], rtol=0, atol=1e-6), k
        assert_equal(seen[step], ema)  # periodic evaluation scores the EMA
    assert not torch.equal(ema["proj_text.weight"], weights(ckpt(out, 3))["proj_text.weight"])
    assert_equal(weights(out / "model"), ema)  # the final model is the EMA; the raw weights stay in the checkpoint
    assert json.loads((out / "model" / "model.json").read_text())["ema_decay"] == 0.15
    assert_equal({k: v for k, v in result.model.named_parameters()}, ema)

    # Off by default: no EMA file, model/ is the raw weights, and the EMA never changed the training.
    plain = tmp_path / "plain"
    cfg = config(plain, "train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=5", "optim.lr=1e-2")
    assert cfg.train.ema_decay == 0
    train(cfg, data=SyntheticData(cfg))
    assert not list(plain.rglob("ema.safetensors"))
    assert "ema_decay" not in json.loads((plain / "model" / "model.json").read_text())
    assert_equal(weights(plain / "model"), weights(ckpt(plain, 3)))
    for step in (1, 2, 3):
        assert_equal(weights(ckpt(plain, step)), weights(ckpt(out, step)))


def test_resume_is_bit_identical_with_the_ema(tmp_path):
    out = tmp_path / "run"
    overrides = ["train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=5", "train.ema_decay=0.9"]
    cfg = config(out, *overrides)
    train(cfg, data=SyntheticData(cfg))
    final, raw, (ema, updates) = weights(out / "model"), weights(ckpt(out, 6)), ema_at(out, 6)
    assert updates == 6

    cfg = config(out, *overrides, f"train.resume={ckpt(out, 2)}")
    train(cfg, data=SyntheticData(cfg))
    assert_equal(weights(out / "model"), final)
    assert_equal(weights(ckpt(out, 6)), raw)
    again, updates = ema_at(out, 6)
    assert_equal(again, ema) and updates == 6


@pytest.mark.parametrize("fused", [False, True])
def test_a_skipped_non_finite_step_leaves_the_ema_unchanged(tmp_path, monkeypatch, fused):
    if fused:  # fused AdamW (every CUDA run) runs the update on a skipped step too, with found_inf set
        import threetowers.training.trainer as trainer

        monkeypatch.setattr(trainer, "build_optimizer", lambda model, cfg, device: optim.build_optimizer(
            model, cfg, torch.device("cuda")))  # the device only picks fused=True; CPU AdamW has it too
    out = tmp_path / "run"
    cfg = config(out, "train.steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=5", "train.ema_decay=0.5",
                 "train.on_nonfinite=skip")
    train(cfg, data=SyntheticData(cfg, nan_steps={1}))  # the second step's images are NaN
    (ema1, n1), (ema2, n2), (ema3, n3) = (ema_at(out, s) for s in (1, 2, 3))
    assert (n1, n2, n3) == (1, 1, 2)  # the skipped step is not counted
    assert_equal(ema2, ema1)
    assert_equal(weights(ckpt(out, 2)), weights(ckpt(out, 1)))
    d = warmed_up(0.5, 1)  # the third step is the second update
    raw = weights(ckpt(out, 3))
    for k in ema3:
        assert torch.allclose(ema3[k].double(), d * ema2[k].double() + (1 - d) * raw[k].double(), rtol=0, atol=1e-6)


def test_turning_the_ema_on_or_off_or_changing_its_decay_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train.checkpoint_every=2"]
    cfg = config(out, *base, "train.steps=2")
    train(cfg, data=SyntheticData(cfg))
    capsys.readouterr()

    # A checkpoint without an EMA: the EMA starts from its weights (with the warm-up), and says so.
    cfg = config(out, *base, "train.steps=4", "train.ema_decay=0.9")
    train(cfg, data=SyntheticData(cfg))
    text = capsys.readouterr().out
    assert "holds no EMA" in text and "starts from its weights at step 2" in text
    assert "EMA of the weights, decay 0.9" in text
    ema, updates = ema_at(out, 4)
    assert updates == 2
    key = "proj_image.weight"  # an average of the weights since step 2: neither those nor the last ones
    assert not torch.equal(ema[key], weights(ckpt(out, 2))[key]) and not torch.equal(ema[key], weights(ckpt(out, 4))[key])

    # Another decay: a note, as for any other train.* change, and the EMA goes on.
    cfg = config(out, *base, "train.steps=6", "train.ema_decay=0.99")
    train(cfg, data=SyntheticData(cfg))
    assert "train.ema_decay: 0.9 -> 0.99" in capsys.readouterr().out
    assert ema_at(out, 6)[1] == 4

    # Off again: the EMA is not continued, and model/ is the raw weights.
    cfg = config(out, *base, "train.steps=8")
    train(cfg, data=SyntheticData(cfg))
    assert "not continued" in capsys.readouterr().out
    assert not (ckpt(out, 8) / "ema.safetensors").exists()
    assert_equal(weights(out / "model"), weights(ckpt(out, 8)))
    assert "ema_decay" not in json.loads((out / "model" / "model.json").read_text())


class BatchNormClassifier(nn.Module):
    """A job of its own with BatchNorm statistics (buffers), written without a model.json."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))

    def forward(self, batch):
        logits = self.net(batch["image"].flatten(1)[:, :5]).float()
        return {"loss": nn.functional.cross_entropy(logits, batch["label"])}


def test_any_job_gets_the_ema_and_its_buffers_are_the_live_ones(tmp_path):
    out = tmp_path / "run"
    cfg = config(out, "train.steps=4", "train.checkpoint_every=2", "train.ema_decay=0.5", "optim.lr=1e-2")
    torch.manual_seed(0)
    job = Job("pretrain", BatchNormClassifier(), SyntheticData(cfg, labelled=True, classes=3),
              lambda m, d: torch.save(m.state_dict(), d / "weights.pt"),
              lambda m, d: m.load_state_dict(torch.load(d / "weights.pt", weights_only=True)))
    run(cfg, job, DistInfo(0, 1, 0, torch.device("cpu"), owns_group=False))
    final = torch.load(out / "model" / "weights.pt", weights_only=True)
    last = torch.load(ckpt(out, 4) / "weights.pt", weights_only=True)
    ema, _ = ema_at(out, 4)
    assert set(ema) == {k for k, _ in BatchNormClassifier().named_parameters()}  # parameters only
    for k, value in final.items():
        assert torch.equal(value, ema[k] if k in ema else last[k]), k  # buffers: copied, not averaged
    assert not torch.equal(final["net.0.weight"], last["net.0.weight"])


@pytest.mark.parametrize("decay", ["1", "1.5", "-0.1", "nan"])
def test_ema_decay_out_of_range_is_refused(decay):
    with pytest.raises(ConfigError, match=r"train\.ema_decay"):
        load_config("tiny", [f"train.ema_decay={decay}"])
    assert load_config("tiny", ["train.ema_decay=0.999"]).train.ema_decay == 0.999
