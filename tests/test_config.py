"""Configs: presets, overrides, and errors that name the field and what is allowed; the CLI's
help and its one-line config errors."""

import subprocess
import sys

import pytest

from threetowers.apps.cli import build_parser, main
from threetowers.config import ConfigError, Config, from_dict, load_config, to_dict


@pytest.mark.parametrize("preset", ["clip", "lit", "3t", "tiny", "pretrain"])
def test_presets_load_and_round_trip(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert from_dict(to_dict(cfg)) == cfg
    if preset in ("lit", "3t"):
        assert cfg.model.method == preset and cfg.model.third.source == "checkpoint"


def test_overrides_and_yaml_files_with_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("defaults: [tiny]\noptim:\n  lr: 0.005\ntrain:\n  steps: 7\n")
    cfg = load_config(path, ["train.steps=9", "model.text.causal=false", "loss.weights=[0.5,0.25,0.25]"])
    assert cfg.optim.lr == 0.005 and cfg.train.steps == 9 and cfg.model.text.causal is False
    assert cfg.model.image.width == 32  # from the tiny preset
    assert cfg.loss.weights == [0.5, 0.25, 0.25]


def test_an_empty_override_sets_the_empty_string():
    cfg = load_config("3t", ["model.third.source=efficientnet_lite0", "model.third.path=", "model.third.name=a=b"])
    assert cfg.model.third.path == "" and cfg.model.third.name == "a=b"  # the preset's checkpoint path is cleared
    assert load_config("3t").model.third.path == "runs/pretrain/model"


def test_unknown_keys_name_the_closest_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' in overrides; did you mean optim.lr"):
        load_config("clip", ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"'train.batch_sise'.*did you mean train.batch_size"):
        load_config("clip", ["train.batch_sise=3"])
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  imgae:\n    width: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.imgae' in preset; did you mean model.image"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"no config file or preset named 'clpi'; presets: .*clip"):
        load_config("clpi")


def test_wrong_types_name_the_field_and_value():
    with pytest.raises(ConfigError, match=r"^optim.lr: Value 'fast' of type 'str' could not be converted to Float$"):
        load_config("clip", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"train.steps.*'many'.*Integer"):
        load_config("clip", ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"override 'train.steps' must look like key.sub=value"):
        load_config("clip", ["train.steps"])


@pytest.mark.parametrize("override, message", [
    ("train.steps=0", r"train.steps=0 must be > 0"),
    ("optim.lr=-1", r"optim.lr=-1.0 must be > 0"),
    ("optim.min_lr_ratio=2", r"optim.min_lr_ratio=2.0 is out of range; allowed: 0.0 <= min_lr_ratio <= 1.0"),
    ("optim.warmup_steps=-5", r"optim.warmup_steps=-5 is out of range"),
    ("optim.beta2=1.5", r"optim.beta2=1.5 is out of range"),
    ("train.precision=fp16", r"train.precision='fp16' is not allowed; choose one of bf16, fp32"),
    ("train.on_nonfinite=ignore", r"train.on_nonfinite='ignore' is not allowed; choose one of stop, skip"),
    ("train.device=tpu", r"train.device='tpu' is not allowed; choose one of auto, cpu, cuda"),
    ("pretrain.dataset=imagenet", r"pretrain.dataset='imagenet' is not allowed; choose one of .*folder:PATH"),
    ("loss.weights=[1,1]", r"loss.weights=\[1.0, 1.0\] must be three non-negative numbers"),
])
def test_values_out_of_range_or_not_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("clip", [override])


def test_contradictory_settings_are_refused():
    with pytest.raises(ConfigError, match=r"model.method=clip uses no third tower, but model.third.source='timm'"):
        load_config("clip", ["model.third.source=timm"])
    with pytest.raises(ConfigError, match=r"model.method=clip uses no third tower.*heads='shared'"):
        load_config("clip", ["model.third.heads=shared"])
    with pytest.raises(ConfigError, match=r"model.method=3t needs a frozen pretrained image model"):
        load_config("3t", ["model.third.source=none"])
    with pytest.raises(ConfigError, match=r"lit has one term; model.third.heads must be none or shared"):
        load_config("lit", ["model.third.heads=per_term"])


def test_batch_size_must_divide_by_world_size_and_accumulation():
    assert load_config("clip", ["train.batch_size=12"], world_size=3).train.batch_size == 12
    with pytest.raises(ConfigError, match=r"train.batch_size=10 is not divisible by the world size 4"):
        load_config("clip", ["train.batch_size=10"], world_size=4)
    with pytest.raises(ConfigError, match=r"per rank \(6\) is not divisible by train.grad_accum=4"):
        load_config("clip", ["train.batch_size=12", "train.grad_accum=4"], world_size=2)


# ----------------------------------------------------------------------------- CLI


def test_cli_config_errors_are_one_line_with_status_2(capsys):
    assert main(["train", "clip", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean optim.lr" in err and "Traceback" not in err
    assert main(["pretrain", "pretrain", "pretrain.dataset=nope"]) == 2
    assert "pretrain.dataset='nope'" in capsys.readouterr().err
    assert main(["train", "clip", "--resume", "never", "train.batch_size=0"]) == 2


def test_cli_help_explains_itself_with_examples(capsys):
    for argv in (["--help"], ["train", "--help"], ["pretrain", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text
    assert main([]) == 2  # no subcommand: prints the help
    assert "train" in capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices
    assert {"train", "pretrain"} <= set(sub)


def test_eval_takes_overrides_before_or_after_its_tasks(tmp_path, monkeypatch):
    from threetowers.apps import cli

    calls = []
    monkeypatch.setattr(cli, "evaluate", lambda model, tasks, overrides: calls.append((tasks, overrides)) or {"x": 0.5})
    out = ["--out", str(tmp_path / "scores.json")]
    assert main(["eval", "m", "--tasks", "zeroshot_object", "zeroshot:/data/a=b", "eval.num_images=200", *out]) == 0
    assert main(["eval", "m", "eval.batch_size=8", "--tasks", "eval.num_images=200", *out]) == 0
    assert calls == [(["zeroshot_object", "zeroshot:/data/a=b"], ["eval.num_images=200"]),  # a task's path may hold "="
                     (None, ["eval.batch_size=8", "eval.num_images=200"])]  # overrides only: the model's own tasks


def test_python_m_threetowers_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "threetowers", "train", "clip", "model.third.source=timm"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("threetowers: config error: model.method=clip uses no third tower")
    assert done.stdout == ""
