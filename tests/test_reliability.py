"""Nothing silently lost or wrong: the defects of issue 13, each with the test that would have caught it.

Shards cut short, extreme aspect ratios, CSV rows skipped, stale h caches for edited CSVs, evaluation
settings, non-finite weights and skip limits, full disks and misnamed weights files, unusable
checkpoints, config gaps, a stale tokenizer. (Repeated rows in a batch: tests/test_pairs.py.)
"""

import json
import math
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

from conftest import fake_third
from test_pairs import S, encode, good_members, keys, lenient, solid, write_tar
from threetowers.config import ConfigError, load_config
from threetowers.data.loader import build_train_data, load_or_train_tokenizer
from threetowers.data.transforms import ImageError, decode_rgb
from threetowers.core.formats import read_state_dict
from threetowers.training import checkpoint as ckpt
from threetowers.training.checkpoint import CheckpointError, list_checkpoints
from threetowers import EvaluationFailed, TrainingStopped, train
from train_helpers import FAST, SyntheticData


def config(tmp_path, method="clip", *overrides):
    extra = [] if method == "clip" else ["model.third.source=checkpoint"]
    return load_config(None, FAST + [f"model.method={method}", f"train.output_dir={tmp_path / 'run'}",
                                     "train.tensorboard=false", *extra, *overrides])


# ----------------------------------------------------------------------------- 1, 2: shards and images


def _member_offsets(path):
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar.getmembers()]


def test_a_shard_cut_inside_a_member_header_is_counted_as_truncated(tmp_path):
    shard = write_tar(tmp_path / "cut.tar", good_members("k", 6))
    name, header, _ = _member_offsets(shard)[6]  # the header of the 4th sample's image
    assert name == "k0003.jpg"
    shard.write_bytes(shard.read_bytes()[: header + 100])  # tarfile reads this as a normal end of archive
    data = lenient([str(shard)])
    assert keys(data) == ["k0000", "k0001", "k0002"]  # what precedes the cut is still used
    assert dict(data.counter.counts) == {"truncated_shard": 1}
    assert str(shard) in data.counter.examples["truncated_shard"][0]


def test_a_shard_cut_inside_member_data_is_counted_once(tmp_path):
    shard = write_tar(tmp_path / "cut.tar", good_members("k", 6))
    _, _, data_start = _member_offsets(shard)[6]
    shard.write_bytes(shard.read_bytes()[: data_start + 10])
    data = lenient([str(shard)])
    assert keys(data) == ["k0000", "k0001", "k0002"]
    assert sum(data.counter.counts.values()) == 1 and data.counter.counts["truncated_shard"] == 1


def test_an_intact_shard_is_not_flagged(tmp_path):
    shard = write_tar(tmp_path / "ok.tar", good_members("k", 3))
    data = lenient([str(shard)])
    assert len(keys(data)) == 3 and not data.counter.counts


def test_extreme_aspect_ratios_are_refused_before_decoding(tmp_path):
    banner = encode(solid((200, 10, 10), size=(1, 5000)), "PNG")
    with pytest.raises(ImageError) as err:
        decode_rgb(banner, keep_side=2 * 224)
    assert err.value.reason == "bad_aspect" and "1x5000" in err.value.detail
    assert decode_rgb(encode(solid((1, 2, 3), size=(400, 40)), "PNG")).size == (400, 40)  # 10:1 is fine
    shard = write_tar(tmp_path / "a.tar", good_members("k", 2) + [("wide.png", banner), ("wide.txt", b"a banner")])
    data = lenient([str(shard)])
    assert keys(data) == ["k0000", "k0001"] and dict(data.counter.counts) == {"bad_aspect": 1}


# ----------------------------------------------------------------------------- 3, 4: CSV rows and h's cache


def write_csv(root, n=40, missing=(), empty=()):
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = ["image,caption"]
    for i in range(n):
        path = root / "img" / f"{i}.png"
        if i not in missing:
            Image.new("RGB", (20, 20), ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256)).save(path)
        rows.append(f"img/{i}.png,{'' if i in empty else f'a picture number {i}'}")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


def csv_config(tmp_path, csv, method="clip", *overrides):
    return config(tmp_path, method, "data.source=csv", f"data.path={csv}", "model.text.vocab_size=300",
                  "train.batch_size=8", "data.max_bad_fraction=0.2", "eval.tasks=[]",
                  f"data.cache_dir={tmp_path / 'cache'}", *overrides)


def test_skipped_csv_rows_are_reported_in_the_log_and_on_the_console(tmp_path, capsys):
    csv = write_csv(tmp_path / "d", missing=(3, 7), empty=(11,))
    cfg = csv_config(tmp_path, csv, "clip", "train.steps=2")
    result = train(cfg)
    assert "skipped 3 of 40 samples bad" in capsys.readouterr().out
    assert result.metrics["data/bad/unreadable_file"] == 2 and result.metrics["data/bad/empty_caption"] == 1
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("data/bad/unreadable_file") == 2 for r in logged)


def _cache_error(data, third, csv_root):
    """max |cached h - h(image)| over the rows, the image read from its file as written in the CSV now."""
    worst = 0.0
    for i, key in enumerate(data.keys):
        image = torch.from_numpy(np.array(Image.open(csv_root / key).convert("RGB").resize((S, S)))).float() / 255
        fresh = third(image.permute(2, 0, 1)[None])
        worst = max(worst, (data.third_cache.rows(np.array([i])) - fresh).abs().max().item())
    return worst


def test_an_edited_csv_never_reuses_a_stale_h_cache(tmp_path):
    root = tmp_path / "d"
    csv = write_csv(root, n=16)
    third = fake_third()
    cfg = csv_config(tmp_path, csv, "lit", f"model.image.image_size={S}")
    first = build_train_data(cfg, third=third)
    assert _cache_error(first, third, root) < 1e-2
    lines = csv.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]  # two rows swapped
    csv.write_text("\n".join(lines) + "\n")
    assert _cache_error(build_train_data(cfg, third=third), third, root) < 1e-2
    Image.new("RGB", (20, 20), (255, 255, 255)).save(root / "img" / "5.png")  # an image replaced in place
    assert _cache_error(build_train_data(cfg, third=third), third, root) < 1e-2


# ----------------------------------------------------------------------------- 5: evaluation settings


@pytest.mark.parametrize("override,field", [
    ("eval.tasks=[zeroshot_objcet]", "zeroshot_object"), ("eval.num_images=0", "eval.num_images"),
    ("eval.fewshot_shots=[-1]", "eval.fewshot_shots"), ("eval.mixing_alphas=[2.0]", "eval.mixing_alphas"),
    ("eval.retrieval_images=0", "eval.retrieval_images"), ("eval.batch_size=0", "eval.batch_size"),
])
def test_evaluation_settings_are_checked_before_any_work(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config("tiny", [override])


def test_a_failing_evaluation_never_costs_the_trained_model(tmp_path):
    cfg = config(tmp_path, "clip", "train.steps=3", "train.checkpoint_every=2")

    def evaluate(model, step):
        raise RuntimeError("the evaluation broke")

    with pytest.raises(EvaluationFailed, match="trained and saved.*the evaluation broke"):
        train(cfg, evaluate=evaluate, data=SyntheticData(cfg))
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [3, 2]


# ----------------------------------------------------------------------------- 6, 7: non-finite weights, skip limits


def test_an_infinite_learning_rate_is_refused():
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config("tiny", ["optim.lr=inf"])


def test_an_update_that_makes_weights_non_finite_stops_before_any_checkpoint(tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step
    calls = []

    def overflowing_step(self, *args, **kwargs):  # the update of step 3 overflows (as a huge lr would)
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = math.inf
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    cfg = config(tmp_path, "clip", "train.checkpoint_every=1", "train.steps=5", "train.on_nonfinite=skip")
    with pytest.raises(TrainingStopped, match="weights are non-finite at step 3.*step_0000002"):
        train(cfg, data=SyntheticData(cfg))
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 1]
    for _, path in list_checkpoints(tmp_path / "run"):  # whatever was written has finite weights
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())
    assert not (tmp_path / "run" / "model").exists()


def test_skipping_non_finite_steps_has_limits(tmp_path):
    cfg = config(tmp_path, "clip", "train.on_nonfinite=skip", "train.steps=40", "train.max_consecutive_skips=3")
    with pytest.raises(TrainingStopped, match="3 steps in a row"):
        train(cfg, data=SyntheticData(cfg, nan_steps=set(range(1, 40))))
    cfg = config(tmp_path, "clip", "train.on_nonfinite=skip", "train.steps=40", "train.max_skipped_steps=4",
                 "train.resume=never")
    with pytest.raises(TrainingStopped, match="4 in all"):
        train(cfg, data=SyntheticData(cfg, nan_steps={1, 5, 9, 13, 17}))


# ----------------------------------------------------------------------------- 8, 9: full disk, misnamed weights


def test_a_full_disk_while_writing_safetensors_is_a_clear_error(tmp_path, monkeypatch):
    import threetowers.core.formats as formats

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    cfg = config(tmp_path, "clip", "train.steps=2", "train.checkpoint_every=1")
    monkeypatch.setattr(formats, "save_file", full)
    with pytest.raises(CheckpointError, match="could not write .*step_0000001.*StorageFull.*intact"):
        train(cfg, data=SyntheticData(cfg))


def test_a_pickle_named_safetensors_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="named .safetensors but is not a readable safetensors file"):
        read_state_dict(path)


# ----------------------------------------------------------------------------- 10, 11: unusable checkpoints


def _trained(tmp_path, steps=4):
    cfg = config(tmp_path, "clip", f"train.steps={steps}", "train.checkpoint_every=2", "train.keep_checkpoints=3")
    train(cfg, data=SyntheticData(cfg))
    return tmp_path / "run"


def test_when_every_checkpoint_is_unusable_the_run_stops_and_keeps_its_log(tmp_path):
    out = _trained(tmp_path)
    log = (out / "metrics.jsonl").read_text()
    for _, path in list_checkpoints(out):
        weights = path / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-10])
    cfg = config(tmp_path, "clip", "train.steps=6", "train.checkpoint_every=2")
    with pytest.raises(CheckpointError, match="no usable checkpoint is left"):
        train(cfg, data=SyntheticData(cfg))
    assert (out / "metrics.jsonl").read_text() == log


def test_an_unreadable_train_state_with_a_matching_manifest_falls_back(tmp_path, capsys):
    out = _trained(tmp_path)
    newest = out / "checkpoints" / "step_0000004"
    state = newest / "train_state.pt"
    state.write_bytes(b"")  # unreadable, and the manifest is rewritten to match it
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["train_state.pt"] = {"size": 0, "sha256": ckpt.sha256_file(state)}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    cfg = config(tmp_path, "clip", "train.steps=6", "train.checkpoint_every=2")
    result = train(cfg, data=SyntheticData(cfg))
    text = capsys.readouterr().out
    assert "could not read" in text and "train_state.pt: EOFError" in text
    assert "step_0000002 at step 2" in text and result.step == 6


# ----------------------------------------------------------------------------- 12, 13: config gaps, tokenizer


@pytest.mark.parametrize("override,field", [
    ("model.image.mlp_ratio=0", "model.image.mlp_ratio"), ("data.num_workers=-1", "data.num_workers"),
    ("data.shuffle_buffer=-5", "data.shuffle_buffer"), ("train.seed=-1", "train.seed"),
    ("loss.init_scale=nan", "loss.init_scale"),
])
def test_config_gaps_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field):
        load_config("tiny", [override])


def test_3t_with_all_loss_weights_zero_is_refused():
    with pytest.raises(ConfigError, match="every weight 0"):
        load_config("3t", ["loss.weights=[0,0,0]"])


def test_a_saved_tokenizer_is_reused_only_for_the_same_data(tmp_path, capsys):
    cfg = load_config("tiny", [])
    first = load_or_train_tokenizer(cfg, ["a red square"] * 50, tmp_path, "data-a")
    again = load_or_train_tokenizer(cfg, ["something else entirely"] * 50, tmp_path, "data-a")
    assert again.hf.get_vocab() == first.hf.get_vocab()  # same data: the saved one (resume)
    other = load_or_train_tokenizer(cfg, ["zebra quokka xylophone"] * 50, tmp_path, "data-b")
    assert "trained on other data" in capsys.readouterr().out
    assert other.hf.get_vocab() != first.hf.get_vocab()
    assert math.isfinite(other.vocab_size)
