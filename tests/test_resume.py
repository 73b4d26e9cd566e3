"""Exact resume: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one;
explicit, never and auto resume; a checkpoint of another model is refused; the real CLI and loader."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from threetowers.config import load_config
from threetowers.training.checkpoint import CheckpointError, list_checkpoints
from threetowers import train
from train_helpers import FAST, SyntheticData, sigkill_after_first_checkpoint

HELPER = Path(__file__).with_name("train_helpers.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def command(out: Path, *extra: str) -> list[str]:
    """`threetowers train tiny ...` on the synthetic data (tests/train_helpers.py is the CLI with it)."""
    return [sys.executable, str(HELPER), "train", "tiny", *FAST, f"train.output_dir={out}", "train.steps=12",
            "train.checkpoint_every=3", "train.keep_checkpoints=10", *extra]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_sigkilled_run_resumes_to_bit_identical_weights(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    # The uninterrupted run and the run to be killed go side by side; the latter sleeps per batch
    # (not a numerical change) so that the kill lands mid-run, after its first checkpoint.
    a = subprocess.Popen(command(full), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    b = subprocess.Popen(command(killed), env={**ENV, "TT_STEP_DELAY": "0.15"}, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    sigkill_after_first_checkpoint(b, killed)
    assert not (killed / "model").exists()
    done_before = max(s for s, _ in list_checkpoints(killed))
    assert done_before < 12
    out, _ = a.communicate(timeout=120)
    assert a.returncode == 0, out

    resumed = subprocess.run(command(killed), env=ENV, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming from" in resumed.stdout and f"at step {done_before}" in resumed.stdout

    assert_identical(weights(full / "model"), weights(killed / "model"))
    state_a = torch.load(full / "checkpoints/step_0000012/train_state.pt", weights_only=True)
    state_b = torch.load(killed / "checkpoints/step_0000012/train_state.pt", weights_only=True)
    for key, value in state_a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(value[name], state_b["optimizer"]["state"][key][name])
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # each step logged once, whatever the killed run had written


def test_explicit_resume_from_an_older_checkpoint_is_exact_and_sets_newer_ones_aside(tmp_path):
    overrides = [f"train.output_dir={tmp_path / 'run'}", "train.steps=6", "train.checkpoint_every=2",
                 "train.keep_checkpoints=5", "train.tensorboard=false"]
    cfg = load_config("tiny", FAST + overrides)
    first = train(cfg, data=SyntheticData(cfg))
    reference = {k: v.clone() for k, v in first.model.state_dict().items()}
    older = tmp_path / "run" / "checkpoints" / "step_0000002"
    cfg = load_config("tiny", FAST + overrides + [f"train.resume={older}"])
    again = train(cfg, data=SyntheticData(cfg))
    assert_identical(reference, again.model.state_dict())
    aside = sorted(p.name.split("-")[1] for p in (tmp_path / "run" / "checkpoints").glob("superseded-*"))
    assert aside == ["step_0000004", "step_0000006"]

    # resume=never starts over (same seed, same result) and sets the old timeline aside, never deletes it
    cfg = load_config("tiny", FAST + overrides + ["train.resume=never", "train.steps=2"])
    fresh = train(cfg, data=SyntheticData(cfg))
    assert fresh.step == 2 and len(list((tmp_path / "run" / "checkpoints").glob("superseded-*"))) == 5


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    overrides = FAST + [f"train.output_dir={tmp_path / 'run'}", "train.steps=2", "train.tensorboard=false"]
    cfg = load_config("tiny", overrides)
    train(cfg, data=SyntheticData(cfg))
    cfg = load_config("tiny", overrides + ["train.steps=4", "model.embed_dim=8"])
    with pytest.raises(CheckpointError, match=r"another model config \(model.embed_dim: 16 -> 8\)"):
        train(cfg, data=SyntheticData(cfg))


def test_a_checkpoint_of_another_model_is_refused_before_any_data_work(tmp_path, monkeypatch):
    import threetowers.training.contrastive as job

    overrides = FAST + [f"train.output_dir={tmp_path / 'run'}", "train.steps=2", "train.tensorboard=false",
                        "eval.tasks=[]"]
    cfg = load_config("tiny", overrides)
    train(cfg, data=SyntheticData(cfg))
    built = []
    monkeypatch.setattr(job, "build_train_data", lambda *a, **k: built.append(1) or SyntheticData(a[0]))
    with pytest.raises(CheckpointError, match=r"model.embed_dim: 16 -> 8.*train.output_dir=.*--resume never"):
        train(load_config("tiny", overrides + ["train.steps=4", "model.embed_dim=8"]))
    assert built == []  # refused before the data (and h's cache) were built
    train(load_config("tiny", overrides + ["train.steps=4", "model.embed_dim=8", "train.resume=never"]))
    assert built == [1]


def test_bad_sample_counts_go_on_from_the_checkpoint(tmp_path):
    overrides = FAST + [f"train.output_dir={tmp_path / 'run'}", "train.tensorboard=false", "train.checkpoint_every=2"]
    cfg = load_config("tiny", overrides + ["train.steps=2"])
    train(cfg, data=SyntheticData(cfg))  # SyntheticData counts one bad sample per process
    cfg = load_config("tiny", overrides + ["train.steps=4"])
    result = train(cfg, data=SyntheticData(cfg))
    assert result.metrics["data/bad/corrupt_image"] == 2  # 1 before the checkpoint + 1 since (was 1: reset)


def test_a_rank_the_checkpoint_did_not_have_gets_a_stream_of_its_own():
    from threetowers.training.checkpoint import rng_state
    from threetowers.training.resume import restore_rng

    torch.manual_seed(0)
    saved = [rng_state()]  # a checkpoint written by one process
    draws = []
    for rank in (0, 1, 2):
        restore_rng(saved, rank, torch.device("cpu"), seed=0, step=10, report=lambda message: None)
        draws.append(torch.rand(3))
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])  # at c7dddeb: all rank 0's
    restore_rng(saved, 1, torch.device("cpu"), seed=0, step=10, report=lambda message: None)
    assert torch.equal(torch.rand(3), draws[1])  # and still a pure function of (seed, rank, step)


def test_cli_with_the_real_loader_trains_and_resumes(tmp_path):
    pytest.importorskip("threetowers.world.world")
    out = tmp_path / "run"
    base = [sys.executable, "-m", "threetowers", "train", "tiny", f"train.output_dir={out}", "train.device=cpu",
            "train.progress=false", "data.world.num_pairs=64", "train.checkpoint_every=2", "train.log_every=1",
            "train.threads=1",
            f"data.world.cache_dir={tmp_path / 'world'}"]
    first = subprocess.run(base + ["train.steps=2"], env=ENV, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stdout + first.stderr
    second = subprocess.run(base + ["train.steps=4"], env=ENV, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "at step 2" in second.stdout and "model:" in second.stdout
    assert (out / "model" / "tokenizer.json").exists() and (out / "checkpoints" / "step_0000004").exists()
    vocab = json.loads((out / "model" / "model.json").read_text())["config"]["model"]["text"]["vocab_size"]
    assert vocab <= 300


def test_settings_of_an_older_checkpoint_are_compared_as_they_were_meant():
    """A checkpoint written before a field existed (train.ema_decay), or with the 3T weights spelled
    out (the default before null meant it), notes no change; a real change is noted."""
    from threetowers.config import to_dict
    from threetowers.core.distributed import DistInfo
    from threetowers.training.resume import check_resumable

    cfg = load_config("tiny", ["model.method=3t", "model.third.source=checkpoint", "model.third.path=h"])
    saved = to_dict(cfg)
    del saved["train"]["ema_decay"]
    saved["loss"]["weights"] = [1 / 3, 1 / 3, 1 / 3]
    notes: list[str] = []
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), owns_group=False)
    check_resumable({"config": saved}, cfg, info, notes.append)
    assert notes == []
    saved["loss"]["weights"] = [0.5, 0.25, 0.25]
    saved["train"]["ema_decay"] = 0.99
    check_resumable({"config": saved}, cfg, info, notes.append)
    assert len(notes) == 1 and "loss.weights: [0.5, 0.25, 0.25] -> [0.3333" in notes[0] and "train.ema_decay: 0.99 -> 0.0" in notes[0]
