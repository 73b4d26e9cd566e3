"""The trainer: schedule, parameter groups, learning, what trains under each method, evaluation
hooks, non-finite losses, unwritable output, full disks, and the classifier job on the same loop."""

import errno
import json
import math

import pytest
import torch
from torch import nn

from conftest import fake_third
from threetowers.config import load_config
from threetowers import create_model, load_model
from threetowers.training import checkpoint as ckpt
from threetowers.training.checkpoint import CheckpointError, OutputDirError, list_checkpoints, verify
from threetowers.core.distributed import DistInfo
from threetowers import TrainingStopped, train
from threetowers.training.trainer import Job, forward_backward, run
from threetowers.training.optim import build_optimizer, build_scheduler, lr_factor, param_groups
from train_helpers import FAST, SyntheticData


def config(tmp_path, method="clip", *overrides):
    extra = [] if method == "clip" else ["model.third.source=checkpoint"]
    return load_config(None, FAST + [f"model.method={method}", f"train.output_dir={tmp_path / 'run'}", *extra,
                                     *overrides])


# ----------------------------------------------------------------------------- schedule and groups


def test_cosine_schedule_with_warmup_at_known_steps():
    f = lambda s: lr_factor(s, total_steps=110, warmup_steps=10, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)  # the cosine starts at the top
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert lr_factor(0, 10, 0) == 1.0


def test_scheduler_follows_the_factor_one_call_per_step(tmp_path):
    cfg = config(tmp_path, "clip", "optim.lr=0.01", "optim.warmup_steps=3", "train.steps=8")
    model = create_model(cfg)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    sched = build_scheduler(opt, cfg.optim, cfg.train.steps)
    seen = []
    for _ in range(8):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.01 * lr_factor(s, 8, 3) for s in range(8)])


def test_param_groups_exclude_norms_biases_embeddings_temperatures_and_frozen(tmp_path):
    cfg = config(tmp_path, "3t", "model.third.heads=per_term", "model.image.pool=cls", "loss.kind=sigmoid",
                 "model.head=mlp")
    model = create_model(cfg, third=fake_third())
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for name in ("image_tower.pos_embed", "image_tower.cls_token", "text_tower.pos_embed", "text_tower.token_embed.weight",
                 "image_tower.norm.weight", "image_tower.norm.bias", "image_tower.blocks.0.norm1.weight",
                 "image_tower.blocks.0.attn.qkv.bias", "loss.log_scale", "loss.bias", "proj_image.0.bias"):
        assert name in no_decay["names"], name
    for name in ("image_tower.patch_embed.weight", "image_tower.blocks.0.attn.qkv.weight", "text_tower.blocks.0.mlp.0.weight",
                 "proj_image.0.weight", "proj_image.2.weight", "adapt_text.2.weight", "third_head_f.weight",
                 "third_head_g.weight"):
        assert name in decay["names"], name
    named = dict(model.named_parameters())
    assert len(decay["names"]) + len(no_decay["names"]) == sum(p.requires_grad for p in named.values())
    assert not any(n.startswith("third.") for n in decay["names"] + no_decay["names"])
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.third.parameters())


# ----------------------------------------------------------------------------- learning


@pytest.mark.parametrize("method", ["clip", "lit", "3t"])
def test_a_few_steps_lower_the_loss(tmp_path, method):
    cfg = config(tmp_path, method, "train.steps=25", "optim.lr=3e-3", "train.checkpoint_every=100",
                 "train.tensorboard=false")
    h = fake_third() if method != "clip" else None
    result = train(cfg, third=h, data=SyntheticData(cfg, third=h, fixed=True))
    losses = [r["train/loss"] for r in result.curve]
    assert len(losses) == 25
    assert losses[-1] < 0.75 * losses[0], losses
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert result["model"] is result.model and result.step == 25


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("method", ["lit", "3t"])
def test_one_step_changes_exactly_what_should_train(tmp_path, method):
    cfg = config(tmp_path, method, "train.steps=1", "model.third.heads=shared", "data.third_embeddings=online",
                 "train.tensorboard=false")
    h = fake_third()
    with torch.random.fork_rng():
        torch.manual_seed(cfg.train.seed)
        before = _params(create_model(cfg, third=h))
    h_before = {k: v.clone() for k, v in h.state_dict().items()}
    result = train(cfg, third=h, data=SyntheticData(cfg))
    after = dict(result.model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k].detach())}
    for k, v in h.state_dict().items():
        assert torch.equal(v, h_before[k]), f"h changed: {k}"
    assert not any(k.startswith("third.") for k in changed)
    if method == "lit":
        assert model_has_no_image_tower(result.model)
        assert {"third_head_g.weight", "loss.log_scale"} <= changed
        assert any(k.startswith("text_tower.") for k in changed) and any(k.startswith("adapt_text.") for k in changed)
    else:
        for prefix in ("image_tower.", "text_tower.", "proj_image.", "proj_text.", "adapt_image.", "adapt_text.",
                       "third_head_g.", "loss.log_scale"):
            assert any(k.startswith(prefix) for k in changed), prefix
        assert not torch.equal(before["loss.log_scale"], after["loss.log_scale"].detach())
        scales = after["loss.log_scale"].detach()
        assert scales.numel() == 3 and all(scales != before["loss.log_scale"])  # every term's temperature moved


def model_has_no_image_tower(model) -> bool:
    return model.image_tower is None and model.third is not None


def test_gradient_accumulation_matches_the_full_batch_for_a_per_sample_loss():
    torch.manual_seed(0)
    model = Classifier()
    batch = {"image": torch.randn(8, 5), "label": torch.randint(0, 3, (8,))}
    grads = []
    for accum in (1, 2, 4):
        model.zero_grad()
        stats = forward_backward(model, batch, accum, torch.device("cpu"), "fp32")
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert set(stats) == {"loss", "acc"}
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and torch.allclose(grads[0], grads[2], atol=1e-6)


class Classifier(nn.Module):
    """A stand-in for models.classifier.Classifier: forward(batch) -> {"loss", "acc"}."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.LayerNorm(16), nn.Linear(16, 3))

    def forward(self, batch):
        logits = self.net(batch["image"].flatten(1)[:, :5]).float()
        return {"loss": nn.functional.cross_entropy(logits, batch["label"]),
                "acc": (logits.argmax(-1) == batch["label"]).float().mean()}


def test_the_same_loop_trains_a_classifier_job_and_resumes_it(tmp_path):
    cfg = config(tmp_path, "clip", "train.steps=6", "train.checkpoint_every=3", "optim.lr=1e-2", "train.tensorboard=false")
    info = DistInfo(0, 1, 0, torch.device("cpu"), owns_group=False)

    def job():
        torch.manual_seed(0)
        return Job("pretrain", Classifier(), SyntheticData(cfg, labelled=True, classes=3),
                   lambda m, d: torch.save(m.state_dict(), d / "weights.pt"),
                   lambda m, d: m.load_state_dict(torch.load(d / "weights.pt", weights_only=True)))

    calls = []
    result = run(cfg, job(), info, lambda m, step: calls.append(step) or {"top1": 0.5})
    assert calls == [6] and result["eval/top1"] == 0.5 and "train/acc" in result.metrics
    assert [s for s, _ in list_checkpoints(cfg.train.output_dir)] == [6, 3]
    first = {k: v.clone() for k, v in result.model.state_dict().items()}
    # The finished run resumes at its end: nothing to train, the same weights.
    again = run(cfg, job(), info)
    assert again.step == 6
    assert all(torch.equal(first[k], v) for k, v in again.model.state_dict().items())


def test_evaluate_hook_runs_every_n_steps_and_at_the_end_without_touching_training(tmp_path):
    cfg = config(tmp_path, "clip", "train.steps=5", "eval.every=2", "train.checkpoint_every=100",
                 "train.tensorboard=false")
    seen = []

    def evaluate(model, step):
        seen.append((step, model.training, torch.is_grad_enabled()))
        torch.rand(100)  # consumes RNG; the training streams must not notice
        return {"score": float(step), "eval/other": torch.tensor(1.0)}

    result = train(cfg, evaluate=evaluate, data=SyntheticData(cfg))
    assert seen == [(2, False, False), (4, False, False), (5, False, False)]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/score" in r]
    assert [r["step"] for r in evals] == [2, 4, 5] and evals[-1]["eval/other"] == 1.0
    assert result["score"] == 5.0
    train_records = [r for r in records if "train/loss" in r]
    r = train_records[-1]
    for key in ("train/lr", "train/samples_per_s", "time/data_s", "time/step_s", "time/data_fraction",
                "train/scale/image~text", "train/loss/image~text", "data/bad/corrupt_image", "train/nonfinite_skipped"):
        assert key in r, key
    assert r["data/bad/corrupt_image"] == 1 and 0 <= r["time/data_fraction"] <= 1


def test_run_files_are_written(tmp_path):
    cfg = config(tmp_path, "clip", "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=1")
    train(cfg, data=SyntheticData(cfg))
    out = tmp_path / "run"
    assert load_config(out / "config.yaml").model == cfg.model
    assert [s for s, _ in list_checkpoints(out)] == [4]  # keep_checkpoints=1
    step = out / "checkpoints" / "step_0000004"
    assert verify(step) is None
    names = set(json.loads((step / "manifest.json").read_text())["files"])
    assert names == {"model.safetensors", "model.json", "tokenizer.json", "train_state.pt", "config.yaml"}
    state = torch.load(step / "train_state.pt", weights_only=True)
    assert state["step"] == 4 and state["world_size"] == 1 and len(state["rng"]) == 1
    assert verify(out / "model") is None and (out / "model" / "tokenizer.json").exists()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    model = load_model(out / "model")
    assert torch.equal(model.proj_image.weight, load_model(step).proj_image.weight)


# ----------------------------------------------------------------------------- failures


def test_nonfinite_loss_stops_and_leaves_the_last_checkpoint(tmp_path):
    cfg = config(tmp_path, "clip", "train.steps=8", "train.checkpoint_every=2", "train.tensorboard=false")
    with pytest.raises(TrainingStopped, match=r"non-finite loss or gradient at step 4 .*step_0000002.*on_nonfinite=skip"):
        train(cfg, data=SyntheticData(cfg, nan_steps={3}))
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]
    assert verify(tmp_path / "run" / "checkpoints" / "step_0000002") is None
    assert not (tmp_path / "run" / "model").exists()


@pytest.mark.parametrize("fused", [False, True])
def test_a_skipped_step_changes_nothing_and_fused_adamw_skips_it_on_the_device(fused):
    """Fused AdamW (every CUDA run; it also runs on the CPU) takes the skip as a device flag: no host
    sync in the step. Weights, moments and the step count stay as they were."""
    from threetowers.schema import TrainConfig
    from threetowers.training.nonfinite import NonFiniteSteps

    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=fused)
    guard = NonFiniteSteps(opt, TrainConfig(on_nonfinite="skip"), 0, torch.device("cpu"))
    assert guard.on_device is fused

    def step(bad: bool) -> torch.Tensor:
        loss = layer(torch.randn(2, 4)).sum() * (math.nan if bad else 1.0)
        loss.backward()
        flag = guard.apply(["train/loss"], loss.detach().reshape(1), 1, opt.step)
        opt.zero_grad()
        return flag

    step(False)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    moments = [opt.state[p]["exp_avg"].clone() for p in layer.parameters()]
    assert float(step(True)) == 1.0
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    assert all(torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, layer.parameters()))
    assert all(float(opt.state[p]["step"]) == 1 for p in layer.parameters())
    assert float(step(False)) == 0.0 and not torch.equal(before["weight"], layer.weight)
    lines = []
    assert guard.check(3, None, lines.append) == 1 and lines[0].startswith("steps 1..3: 1 step(s)")


def test_skips_between_log_lines_are_counted_at_the_next_one(tmp_path):
    cfg = config(tmp_path, "clip", "train.steps=10", "train.on_nonfinite=skip", "train.tensorboard=false",
                 "train.log_every=5")
    result = train(cfg, data=SyntheticData(cfg, nan_steps={1, 3, 6}))
    assert [r["train/nonfinite_skipped"] for r in result.curve if "train/nonfinite_skipped" in r] == [2, 3]


def test_nonfinite_loss_can_skip_the_step_and_count_it(tmp_path):
    cfg = config(tmp_path, "clip", "train.steps=5", "train.on_nonfinite=skip", "train.tensorboard=false")
    result = train(cfg, data=SyntheticData(cfg, nan_steps={1, 3}))
    assert result.metrics["train/nonfinite_skipped"] == 2
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert math.isfinite(result.metrics["train/loss"])
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_0000005" / "train_state.pt", weights_only=True)
    assert state["nonfinite_skipped"] == 2


def test_unwritable_output_dir_is_reported_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = config(tmp_path, "clip", f"train.output_dir={blocker / 'run'}")
    with pytest.raises(OutputDirError, match=r"train.output_dir=.*is not writable"):
        train(cfg, data=SyntheticData(cfg))
    with pytest.raises(OutputDirError, match="free"):
        ckpt.check_writable(tmp_path / "ok", need_bytes=1 << 62)


def test_a_failed_checkpoint_write_keeps_the_earlier_ones(tmp_path, monkeypatch):
    cfg = config(tmp_path, "clip", "train.steps=4", "train.checkpoint_every=2", "train.tensorboard=false")
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if "step_0000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(CheckpointError, match=r"step_0000004 \(no space left on device\).*intact"):
        train(cfg, data=SyntheticData(cfg))
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step_0000002"]  # no temp dir left behind
    assert verify(root / "step_0000002") is None


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    cfg = config(tmp_path, "clip", "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=3",
                 "train.tensorboard=false")
    train(cfg, data=SyntheticData(cfg))
    root = tmp_path / "run" / "checkpoints"
    weights = root / "step_0000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    state = root / "step_0000004" / "train_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    state.write_bytes(bytes(data))
    assert "truncated" in verify(root / "step_0000006") and "corrupt" in verify(root / "step_0000004")
    capsys.readouterr()
    cfg2 = config(tmp_path, "clip", "train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=3",
                  "train.tensorboard=false")
    result = train(cfg2, data=SyntheticData(cfg2))
    out = capsys.readouterr().out
    assert "step_0000006 is unusable" in out and "step_0000004 is unusable" in out
    assert "resuming from" in out and "step_0000002 at step 2" in out
    assert result.step == 8
    assert sorted(p.name.split("-")[0] for p in root.iterdir() if p.name.startswith("corrupt")) == ["corrupt", "corrupt"]
    with pytest.raises(CheckpointError, match="unusable"):
        ckpt.find_resume(tmp_path, str(next(root.glob("corrupt-step_0000006*"))))


def test_pretrain_runs_the_classifier_through_the_same_loop(tmp_path):
    from threetowers.third.classifier import load_classifier
    from threetowers.third import load_third_tower
    from threetowers.training.pretrain import pretrain

    out = tmp_path / "pre"
    result = pretrain("pretrain", ["model.image.image_size=24", "model.image.patch_size=8", "model.image.width=32",
                                   "model.image.depth=1", "model.image.heads=2", "data.world.image_size=24",
                                   "pretrain.num_images=64", "pretrain.num_heldout=32", "train.steps=3",
                                   "train.batch_size=16", "train.progress=false", "train.device=cpu",
                                   "train.tensorboard=false", f"data.world.cache_dir={tmp_path / 'world'}",
                                   f"train.output_dir={out}"])
    assert 0.0 <= result["heldout_top1"] <= 1.0 and "train/acc" in result.metrics and result.step == 3
    model, meta = load_classifier(out / "model")
    assert meta["num_classes"] == model.num_classes and len(meta["class_names"]) == model.num_classes
    h = load_third_tower(load_config(None, ["model.method=lit", "model.third.source=checkpoint",
                                            f"model.third.path={out / 'model'}"]).model.third)
    assert h.dim == 32
