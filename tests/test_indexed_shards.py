"""Indexed webdataset shards: the step order, the tar index, h's embeddings per shard (build, resume,
refusal), bad-sample counts with any number of workers, and exact resume after SIGKILL."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, fake_third
from test_pairs import encode, good_members, solid, write_tar
from train_helpers import sigkill_after_first_checkpoint
from threetowers.config import load_config
from threetowers.data.indexed import MAX_OPEN
from threetowers.data.loader import build_train_data
from threetowers.data.order import permute, step_rows
from threetowers.data.shard_index import ensure_index, index_shard, open_index, read_member
from threetowers.third.store import ShardEmbeddings, cache_dir_for

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def make_shards(root: Path, sizes=(12, 9, 15, 10), bad: dict | None = None) -> list[Path]:
    """Shards of distinct solid-colour JPEGs with captions; `bad` = {shard: {i: member bytes}}."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, n in enumerate(sizes):
        members = good_members(f"s{s}-", n)
        for i, data in (bad or {}).get(s, {}).items():
            members[2 * i] = (members[2 * i][0], data)
        paths.append(write_tar(root / f"shard-{s:03d}.tar", members))
    return paths


def shard_config(tmp_path, shards, method="clip", *extra):
    third = [] if method == "clip" else ["model.third.source=checkpoint"]
    return load_config(None, TINY + [
        f"model.method={method}", *third, "data.source=webdataset", f"data.path={'::'.join(map(str, shards))}",
        f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'run'}", "train.batch_size=8",
        "model.text.vocab_size=300", "data.max_bad_fraction=0.5", *extra])


# ----------------------------------------------------------------------------- the order


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 100, 1000, 4097])
def test_permute_is_a_seeded_bijection(n):
    out = permute(np.arange(n), n, seed=3, epoch=1)
    assert sorted(out.tolist()) == list(range(n))
    assert np.array_equal(permute(np.arange(n), n, 3, 1), out)
    if n > 4:
        assert not np.array_equal(permute(np.arange(n), n, 3, 2), out)  # another epoch, another order


def test_step_rows_visit_every_row_once_per_epoch_and_never_twice_in_a_batch():
    n, batch = 46, 8
    seq = [step_rows(5, s, batch, n) for s in range(12)]
    flat = np.concatenate(seq)
    assert sorted(flat[:40].tolist()) == sorted(set(flat[:40].tolist()))  # the first 5 batches: no repeat
    assert all(len(set(b.tolist())) == batch for b in seq)  # step 5 straddles two epochs
    assert np.array_equal(step_rows(5, 7, batch, n), seq[7])  # a pure function of (seed, step)
    assert sorted(flat[:n].tolist()) == list(range(n))  # every row once in the first epoch


# ----------------------------------------------------------------------------- the index


def test_the_index_reads_each_member_back_and_counts_broken_shards(tmp_path):
    good, = make_shards(tmp_path / "d", sizes=(5,))
    records, bad = index_shard(str(good))
    assert [k.decode() for k in records["key"]] == [f"s0-{i:04d}" for i in range(5)] and not bad
    with open(good, "rb") as fh:
        image, caption = read_member(fh, records[3]["image"]), read_member(fh, records[3]["caption"])
    assert caption == b"caption s0-0003" and image == encode(solid((30, 100, 200)), "JPEG")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(good.read_bytes()[:2600])  # inside the third sample's data
    records, bad = index_shard(str(cut))
    assert bad == {"truncated_shard": 1} and 1 <= len(records) <= 3
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    records, bad = index_shard(str(junk))
    assert bad == {"unreadable_shard": 1} and len(records) == 0


def test_a_rewritten_shard_is_indexed_again_by_name(tmp_path):
    shard, = make_shards(tmp_path / "d", sizes=(5,))
    said = []
    assert ensure_index(str(shard), tmp_path / "idx", said.append)["rows"] == 5
    assert ensure_index(str(shard), tmp_path / "idx", said.append)["rows"] == 5 and said == []  # kept
    write_tar(shard, good_members("new-", 7))
    again = ensure_index(str(shard), tmp_path / "idx", said.append)
    assert again["rows"] == 7 and open_index(tmp_path / "idx", again["name"])["key"][0] == b"new-0000"
    assert len(said) == 1 and str(shard) in said[0] and "its content changed" in said[0]


# ----------------------------------------------------------------------------- batches


def test_batches_are_a_function_of_the_step_with_any_number_of_workers(tmp_path):
    broken = {1: {2: b"not an image"}, 2: {0: b"\xff\xd8 cut jpeg"}}
    shards = make_shards(tmp_path / "d", bad=broken)
    runs = {}
    for workers in (0, 1, 2):
        data = build_train_data(shard_config(tmp_path, shards, "clip", f"data.num_workers={workers}"))
        it = data.batches(0)
        got = [next(it) for _ in range(12)]  # 96 samples: more than an epoch of 46
        runs[workers] = ([b["keys"] for b in got], torch.cat([b["image"] for b in got]), data.bad_samples())
        resumed = next(data.batches(9))
        assert resumed["keys"] == got[9]["keys"] and torch.equal(resumed["image"], got[9]["image"])
    for workers in (1, 2):
        assert runs[workers][0] == runs[0][0] and torch.equal(runs[workers][1], runs[0][1])
        assert runs[workers][2] == runs[0][2]
    keys, _, bad = runs[0]
    assert sum(bad.values()) >= 2 and set(bad) <= {"corrupt_image", "truncated_image"}
    assert all(len(set(k)) == 8 for k in keys) and not {"s1-0002", "s2-0000"} & {k for b in keys for k in b}
    # The first epoch: no sample twice, but for a bad sample's substitute (a random row, which may come again)
    assert len({k for b in keys[:5] for k in b}) >= 40 - sum(bad.values())


# ----------------------------------------------------------------------------- h's embeddings per shard


def test_h_runs_once_per_shard_and_a_killed_build_redoes_only_its_shard(tmp_path):
    shards = make_shards(tmp_path / "d", bad={1: {4: b"garbage"}})
    h = fake_third()
    calls = []
    original = h.forward
    h.forward = lambda images: calls.append(len(images)) or original(images)
    cfg = shard_config(tmp_path, shards, "3t")
    data = build_train_data(cfg, third=h)
    assert sum(calls) == 46 - 1  # every decodable sample once; the broken one is recorded instead
    directory = cache_dir_for(tmp_path / "cache", h.info(), "shards")
    records = sorted(directory.glob("*.json"))
    assert len(records) == 4 and json.loads(records[1].read_text())["bad"] == {"4": "corrupt_image"}
    assert data.shards.known_bad == {12 + 4: "corrupt_image"}
    for row in range(len(data)):  # each row's cached pre-logits are h's of that very sample
        if row == 16:
            continue
        image, caption, _, _ = data.rows.read(row)
        expected = original(data.dataset.decoder.decode(image, caption)[0][None]).float()[0]
        assert torch.allclose(data.rows.third_embedding(row), expected.half().float())

    calls.clear()
    build_train_data(cfg, third=h)
    assert calls == []  # everything finished is reused
    records[2].unlink()  # a build killed inside shard 2 leaves no record for it
    build_train_data(cfg, third=h)
    assert sum(calls) == 15
    calls.clear()
    records[0].with_suffix(".npy").unlink()  # an embedding file lost after its record was written
    build_train_data(cfg, third=h)
    assert sum(calls) == 12


def test_stale_embeddings_are_rebuilt_with_the_shard_and_the_reason(tmp_path, capsys):
    shards = make_shards(tmp_path / "d")
    cfg = shard_config(tmp_path, shards, "lit")
    first = build_train_data(cfg, third=fake_third())
    write_tar(shards[3], good_members("s3-", 11))  # rewritten after its embeddings were built
    data = build_train_data(cfg, third=fake_third())
    out = capsys.readouterr().out
    assert f"shard {shards[3]}" in out and "its content changed" in out and "the shard was rewritten" in out
    assert len(data) == len(first) + 1 and data.rows.third_embedding(len(data) - 1).shape == (24,)
    other = build_train_data(cfg, third=fake_third(seed=9))  # another h: its own directory, built anew
    assert not torch.equal(other.rows.third_embedding(0), data.rows.third_embedding(0))
    name = sorted(cache_dir_for(tmp_path / "cache", fake_third().info(), "shards").glob("*.json"))[0]
    record = json.loads(name.read_text())
    record["third"]["fingerprint"] = "0" * 64
    name.write_text(json.dumps(record))
    build_train_data(cfg, third=fake_third())
    assert "built with another h" in capsys.readouterr().out


def test_lit_on_cached_shards_never_decodes_an_image_and_skips_known_bad_rows(tmp_path, monkeypatch):
    shards = make_shards(tmp_path / "d", bad={0: {1: b"garbage"}})
    cfg = shard_config(tmp_path, shards, "lit", "model.third.heads=shared")
    data = build_train_data(cfg, third=fake_third())
    monkeypatch.setattr(data.dataset.decoder, "decode", lambda *a: pytest.fail("LiT decoded an image"))
    read = data.rows.read
    images_read = []
    monkeypatch.setattr(data.rows, "read", lambda row, image=True, caption=True: images_read.append(image)
                        or read(row, image, caption))
    batches = [next(data.batches(s)) for s in range(6)]
    assert images_read and not any(images_read)  # not even the image bytes are read
    assert all("image" not in b and b["third"].shape == (8, 24) for b in batches)
    assert "s0-0001" not in {k for b in batches for k in b["keys"]}
    assert data.bad_samples().get("corrupt_image", 0) >= 1


# ----------------------------------------------------------------------------- exact resume after SIGKILL


def train_command(tmp_path, out: Path, shards) -> list[str]:
    return [sys.executable, "-m", "threetowers", "train", "tiny", *TINY, "model.method=3t",
            "model.third.source=checkpoint", f"model.third.path={tmp_path / 'h'}", "data.source=webdataset",
            f"data.path={'::'.join(map(str, shards))}", f"data.cache_dir={tmp_path / 'cache'}",
            f"train.output_dir={out}", "train.batch_size=8", "train.steps=30", "train.checkpoint_every=3",
            "train.keep_checkpoints=10", "train.threads=1", "train.device=cpu", "train.progress=false",
            "model.text.vocab_size=300", "eval.tasks=[]", "data.num_workers=1", "data.max_bad_fraction=0.5"]


def test_a_sigkilled_run_on_shards_resumes_to_bit_identical_weights(tmp_path):
    from threetowers.third.classifier import Classifier, save_classifier
    from threetowers.training.checkpoint import list_checkpoints

    shards = make_shards(tmp_path / "d", bad={2: {3: b"garbage"}})
    cfg = load_config(None, TINY)
    save_classifier(Classifier(cfg.model.image, 3), tmp_path / "h", ["a", "b", "c"])
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(train_command(tmp_path, full, shards), env=ENV, check=True, capture_output=True, timeout=300)
    victim = subprocess.Popen(train_command(tmp_path, killed, shards), env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    sigkill_after_first_checkpoint(victim, killed)
    assert max(s for s, _ in list_checkpoints(killed)) < 30 and not (killed / "model").exists()
    subprocess.run(train_command(tmp_path, killed, shards), env=ENV, check=True, capture_output=True, timeout=300)
    a, b = load_file(str(full / "model" / "model.safetensors")), load_file(str(killed / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_process_keeps_a_bounded_number_of_shards_open(tmp_path):
    shards = make_shards(tmp_path / "d", sizes=(3,) * (MAX_OPEN + 6))
    data = build_train_data(shard_config(tmp_path, shards, "clip"))
    assert len(data) == 3 * (MAX_OPEN + 6) and data.rows.locate(4) == (1, 1)
    keys = [data.rows.read(row)[2] for row in range(len(data))]
    assert keys[4] == "s1-0001" and keys[-1] == f"s{MAX_OPEN + 5}-0002"
    assert len(data.rows.files.items) == MAX_OPEN and len(data.rows.indexes.items) == MAX_OPEN
    data.rows._pid = -1  # as seen from a DataLoader worker: it opens files of its own
    assert data.rows.read(0)[2] == "s0-0000" and len(data.rows.files.items) == 1


def test_torchrun_ranks_split_the_cache_build(tmp_path):
    from threetowers.third.classifier import Classifier, save_classifier

    shards = make_shards(tmp_path / "d")
    save_classifier(Classifier(load_config(None, TINY).model.image, 3), tmp_path / "h", ["a", "b", "c"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "-m",
           "threetowers", "cache", "tiny", *TINY, "model.method=3t", "model.third.source=checkpoint",
           f"model.third.path={tmp_path / 'h'}", "data.source=webdataset", f"data.path={'::'.join(map(str, shards))}",
           f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'run'}", "train.batch_size=8",
           "model.text.vocab_size=300", "train.device=cpu", "train.threads=1"]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "46 samples in 4 shards" in out.stdout
    records = sorted((tmp_path / "cache").rglob("shards/*.json"))
    assert len(records) == 4


def test_embeddings_of_another_shape_are_refused(tmp_path):
    shards = make_shards(tmp_path / "d", sizes=(20,))
    h = fake_third()
    data = build_train_data(shard_config(tmp_path, shards, "3t"), third=h)
    directory, name = data.shards.embedding_dir, data.shards.names[0]
    meta = ensure_index(str(shards[0]), tmp_path / "cache" / "index")
    assert ShardEmbeddings.open(directory, name, h.info(), meta["identity"], 20)[0] is not None
    np.save(directory / f"{name}.npy", np.zeros((19, 24), np.float16))
    found, why = ShardEmbeddings.open(directory, name, h.info(), meta["identity"], 20)
    assert found is None and "shape" in why
