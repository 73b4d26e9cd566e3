"""`threetowers embed`: a tower's embeddings of a folder, a CSV, shards and captions equal the model's
own `encode_*` on the same decoded pixels (to float16 rounding), bad rows are zeros and listed, a
killed run redoes only its part, a changed input or another tower is rebuilt by name, and under
torchrun the ranks split the shards."""

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TINY, tiny_config
from test_pairs import encode, write_tar
from test_third_pixels import noise, noise_shards
from threetowers import create_model, embed, load_embeddings, save_model
from threetowers.apps.cli import main
from threetowers.config import load_config
from threetowers.data.samples import BadSampleCounter, SampleDecoder
from threetowers.data.shard_index import shard_name
from threetowers.data.tokenizer import Tokenizer
from threetowers.data.transforms import DEFAULT_MAX_PIXELS
from threetowers.model.factory import load_model
from threetowers.third.classifier import Classifier, save_classifier

CAPTIONS = ["a red star", "a blue circle on stripes", "two green squares", "a photo of a cat", "a dog"]
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
F16 = 2e-3  # float16 rounding of values in [-1, 1], with room for the batch's own fp32 rounding


def saved(tmp_path, method="clip", name="model"):
    """A tiny model with every parameter moved off its initial value, saved with its tokenizer; lit/3t
    get an h that `load_model(with_third=True)` can rebuild (a saved classifier)."""
    extra = []
    if method != "clip":
        h = tmp_path / "h"
        if not h.exists():
            save_classifier(Classifier(tiny_config().model.image, 3), h, ["a", "b", "c"])
        extra = [f"model.third.path={h}"]
    cfg = tiny_config(method, "model.text.vocab_size=300", *extra)
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    save_model(model, tmp_path / name)
    Tokenizer.train(CAPTIONS * 20, 300, cfg.model.text.context_length).save(tmp_path / name / "tokenizer.json")
    return tmp_path / name


def pixels(source, size=16) -> torch.Tensor:
    """An image decoded as every reader decodes it for a tower (short side resized, centre crop)."""
    return SampleDecoder(size, False, BadSampleCounter(1.0), DEFAULT_MAX_PIXELS).decode_image(source)


def image_folder(root, n=7):
    """n noise PNGs of varied sizes in nested folders, and one broken file."""
    for i in range(n):
        path = root / ("sub" if i % 2 else "") / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        noise(i, (20 + 3 * i, 18 + i)).save(path)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / "sub" / "broken.jpg").write_bytes(b"not an image")
    return root


def record(out, name):
    return json.loads((out / f"{name}.json").read_text())


def test_a_folder_is_embedded_in_parts_equal_to_encode_image_with_bad_rows_listed(tmp_path, capsys):
    model_dir, folder, out = saved(tmp_path), image_folder(tmp_path / "photos"), tmp_path / "emb"
    assert main(["embed", str(model_dir), str(folder), "--out", str(out), "--part-size", "3", "--batch-size", "2",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "8 rows in 3 parts (3 built, 0 reused)" in printed
    assert "1 row could not be embedded" in printed
    assert "corrupt_image x1 (e.g. sub/broken.jpg in part-00001)" in printed
    keys, emb = load_embeddings(out)
    assert keys == sorted(keys) and len(keys) == 8 and keys[4] == "sub/broken.jpg"
    assert emb.dtype == np.float16 and emb.shape == (8, 16)
    assert not emb[4].any() and record(out, "part-00001")["bad"] == {"1": "corrupt_image"}
    model = load_model(model_dir)
    good = [i for i in range(8) if i != 4]
    expected = model.encode_image(torch.stack([pixels(folder / keys[i]) for i in good]))
    assert np.abs(emb[good].astype(np.float32) - expected.numpy()).max() < F16
    assert np.allclose(np.linalg.norm(emb[good].astype(np.float32), axis=1), 1.0, atol=F16)
    assert load_embeddings(out, skip_bad=True)[0] == [keys[i] for i in good]
    index = json.loads((out / "index.json").read_text())
    assert [p["name"] for p in index["parts"]] == ["part-00000", "part-00001", "part-00002"]
    assert record(out, "part-00000")["keys"] == keys[:3] and record(out, "part-00000")["third"]["name"] == "clip/image"


def test_a_killed_run_redoes_only_its_part_and_a_changed_input_or_tower_is_rebuilt_by_name(tmp_path):
    model_dir, folder, out = saved(tmp_path), image_folder(tmp_path / "photos"), tmp_path / "emb"
    first = embed(model_dir, folder, out, part_size=3, device="cpu", progress=False)
    mtimes = {p: (out / f"{p}.npy").stat().st_mtime_ns for p in first.parts}
    (out / "part-00001.json").unlink()  # killed while building part 1: no record, the mark of a finished part
    messages = []
    again = embed(model_dir, folder, out, part_size=3, device="cpu", progress=False, report=messages.append)
    assert again.built == ["part-00001"] and messages == [f"part-00001 of {folder} (rows 4..6): embedding it again: "
                                                          "its build did not finish"]
    assert all((out / f"{p}.npy").stat().st_mtime_ns == mtimes[p] for p in ("part-00000", "part-00002"))

    noise(99, (30, 30)).save(folder / "img0.png")  # an image replaced since
    messages.clear()
    changed = embed(model_dir, folder, out, part_size=3, device="cpu", progress=False, report=messages.append)
    assert changed.built == ["part-00000"] and "its input was rewritten since (digest" in messages[0]
    assert messages[0].startswith("part-00000 of")

    messages.clear()
    wider = embed(model_dir, folder, out, part_size=3, dtype="float32", device="cpu", progress=False,
                  report=messages.append)
    assert wider.built == wider.parts and len(messages) == 3
    assert "built with another model, tower, dtype or precision (fingerprint" in messages[0]
    assert load_embeddings(out)[1].dtype == np.float32

    fewer = embed(model_dir, folder, out, part_size=5, dtype="float32", device="cpu", progress=False)
    assert fewer.parts == ["part-00000", "part-00001"] and not (out / "part-00002.npy").exists()
    fp32 = load_embeddings(out)[1]
    messages.clear()
    embed(model_dir, folder, out, part_size=5, dtype="float32", amp=True, device="cpu", progress=False,
          report=messages.append)  # bf16 autocast: another precision, so other embeddings
    assert "(precision 'fp32' -> 'bf16-autocast')" in messages[0] and len(messages) == 2
    assert 0 < np.abs(load_embeddings(out)[1] - fp32).max() < 0.05
    with pytest.raises(ValueError, match="holds the embeddings of another input"):
        embed(model_dir, tmp_path / "photos" / "sub", out, device="cpu", progress=False)


def test_a_csv_image_column_is_embedded_once_per_image(tmp_path):
    model_dir, folder = saved(tmp_path), image_folder(tmp_path / "photos", n=3)
    table = tmp_path / "photos" / "pairs.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filepath", "title"])
        writer.writerows([["img0.png", "a"], ["sub/img1.png", "b"], ["img0.png", "again"], ["", "no image"],
                          ["missing.png", "gone"], ["img2.png", "c"]])
    result = embed(model_dir, table, tmp_path / "emb", image_column="filepath", device="cpu", progress=False)
    keys, emb = load_embeddings(tmp_path / "emb")
    assert keys == ["img0.png", "sub/img1.png", "row4", "missing.png", "img2.png"]
    assert result.bad == {"missing_image": 1, "unreadable_file": 1} and not emb[2:4].any()
    expected = load_model(model_dir).encode_image(torch.stack([pixels(folder / k) for k in keys[:2] + keys[4:]]))
    assert np.abs(emb[[0, 1, 4]].astype(np.float32) - expected.numpy()).max() < F16
    with pytest.raises(ValueError, match=r"no column 'image' \(--image-column\)"):
        embed(model_dir, table, tmp_path / "other", device="cpu", progress=False)


def test_shards_are_embedded_one_part_a_shard_and_a_rewritten_shard_is_rebuilt(tmp_path):
    model_dir, out = saved(tmp_path), tmp_path / "emb"
    shards = noise_shards(tmp_path / "d", sizes=(5, 4, 6))
    members = [(f"x-{i}.png", encode(noise(50 + i), "PNG")) for i in range(3)]  # images without captions
    shards.append(write_tar(tmp_path / "d" / "shard-003.tar", members + [("x-3.png", b"broken")]))
    pattern = str(tmp_path / "d" / "shard-{000..003}.tar")
    result = embed(model_dir, pattern, out, device="cpu", progress=False)
    assert result.parts == [shard_name(str(s)) for s in shards] and result.rows == 19
    assert result.bad == {"corrupt_image": 1} and result.examples["corrupt_image"] == [f"x-3 in {result.parts[3]}"]
    model = load_model(model_dir)
    last = np.load(out / f"{result.parts[3]}.npy")
    expected = model.encode_image(torch.stack([pixels(data) for _, data in members]))
    assert np.abs(last[:3].astype(np.float32) - expected.numpy()).max() < F16 and not last[3].any()
    assert record(out, result.parts[0])["keys"] == [f"s0-{i:04d}" for i in range(5)]

    write_tar(shards[1], [(f"s1-{i:04d}.png", encode(noise(70 + i), "PNG")) for i in range(4)])
    messages = []
    again = embed(model_dir, pattern, out, device="cpu", progress=False, report=messages.append)
    assert again.built == [result.parts[1]]
    assert messages[0].startswith(f"shard {shards[1]}: its") and messages[0].endswith("indexing it again")
    assert f"shard {shards[1]}: embedding it again: its input was rewritten since" in messages[-1]


def test_captions_are_embedded_by_the_text_tower_with_keys_by_line(tmp_path):
    model_dir = saved(tmp_path)
    lines = tmp_path / "captions.txt"
    lines.write_text("a red star\n\na dog on stripes\n")
    result = embed(model_dir, lines, tmp_path / "emb", texts=True, dtype="float32", device="cpu", progress=False)
    keys, emb = load_embeddings(tmp_path / "emb")
    assert keys == ["1", "2", "3"] and result.bad == {"empty_caption": 1} and not emb[1].any()
    tokenizer = Tokenizer.from_file(model_dir / "tokenizer.json", 12)
    expected = load_model(model_dir).encode_text(tokenizer(["a red star", "a dog on stripes"]))
    assert np.abs(emb[[0, 2]] - expected.numpy()).max() < 1e-5
    assert record(tmp_path / "emb", "part-00000")["third"]["name"] == "clip/text"


def test_the_third_tower_of_a_3t_model_is_h_through_its_head(tmp_path):
    model_dir, folder = saved(tmp_path, "3t"), image_folder(tmp_path / "photos", n=4)
    embed(model_dir, folder, tmp_path / "emb", tower="third", dtype="float32", device="cpu", progress=False)
    keys, emb = load_embeddings(tmp_path / "emb", skip_bad=True)
    model = load_model(model_dir, with_third=True)
    expected = model.encode_image_third(torch.stack([pixels(folder / k, model.third.preprocessing.input_size)
                                                     for k in keys]))
    assert emb.shape == (4, model.third_info["dim"]) and np.abs(emb - expected.numpy()).max() < 1e-5
    plain = embed(model_dir, folder, tmp_path / "emb_f", device="cpu", progress=False)  # f: another space
    assert plain.rows == 5 and load_embeddings(tmp_path / "emb_f")[1].shape == (5, 16)


def test_combinations_that_mean_nothing_are_refused_before_any_work(tmp_path, capsys):
    model_dir, folder = saved(tmp_path), image_folder(tmp_path / "photos", n=1)
    lines = tmp_path / "c.txt"
    lines.write_text("a dog\n")
    out = str(tmp_path / "emb")
    cases = [
        ([str(model_dir), str(folder), "--tower", "third"], "--tower third needs a model with a third tower h"),
        ([str(model_dir), str(lines), "--texts", "--tower", "third"], "--texts embeds captions with the text tower"),
        ([str(model_dir), str(folder), "--tower", "text"], "--tower text embeds captions: add --texts"),
        ([str(tmp_path / "photos"), str(folder)], r"is not a saved model \(it has no model.json\); give a run.s"),
        ([str(tmp_path / "none"), str(folder)], "MODEL_DIR .*none does not exist"),
        ([str(model_dir), str(tmp_path / "empty")], "holds no images"),
        ([str(model_dir), str(tmp_path / "nope.tar")], "INPUT .*nope.tar: no such file or folder"),
    ]
    (tmp_path / "empty").mkdir()
    for args, message in cases:
        assert main(["embed", *args, "--out", out, "--device", "cpu"]) == 1, args
        assert re.search(message, capsys.readouterr().err), message
    assert not os.path.exists(out)  # refused before anything was written


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_torchrun_ranks_split_the_shards(tmp_path):
    model_dir, out = saved(tmp_path), tmp_path / "emb"
    shards = noise_shards(tmp_path / "d", sizes=(3, 2, 3, 2))
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m",
           "threetowers", "embed", str(model_dir), str(tmp_path / "d" / "shard-{000..003}.tar"), "--out", str(out),
           "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("10 rows in 4 parts (4 built, 0 reused)") == 1  # rank 0 alone reports
    names = [shard_name(str(s)) for s in shards]
    assert [record(out, n)["rank"] for n in names] == [0, 1, 0, 1]
    keys, emb = load_embeddings(out)
    assert len(keys) == 10 and np.allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=F16)


def test_each_h_of_a_model_with_several_is_embedded_by_its_own_name(tmp_path, capsys):
    """--tower third.K: h_K through its own head, in h_K's space; third (= third.1) the first h; a K the
    model has not is refused with the names it has."""
    for name, classes in (("h", 3), ("h2", 4)):
        save_classifier(Classifier(tiny_config().model.image, classes), tmp_path / name, [str(c) for c in range(classes)])
    sections = f"[{{source: checkpoint, path: {tmp_path / 'h'}}}, {{source: checkpoint, path: {tmp_path / 'h2'}, heads: per_term, head_dim: 12}}]"
    cfg = load_config(None, TINY + ["model.method=3t", "model.text.vocab_size=300", f"model.thirds={sections}"])
    torch.manual_seed(0)
    save_model(create_model(cfg).eval(), tmp_path / "model")
    folder = image_folder(tmp_path / "photos", n=4)
    model = load_model(tmp_path / "model", with_third=True)
    for tower, k, dim in (("third", 0, model.third_infos[0]["dim"]), ("third.2", 1, 12)):
        out = tmp_path / f"emb_{tower}"
        embed(tmp_path / "model", folder, out, tower=tower, dtype="float32", device="cpu", progress=False)
        keys, emb = load_embeddings(out, skip_bad=True)
        size = model.thirds[k].preprocessing.input_size
        expected = model.encode_image_third(torch.stack([pixels(folder / key, size) for key in keys]), k=k)
        assert emb.shape == (4, dim) and np.abs(emb - expected.numpy()).max() < 1e-5
    assert main(["embed", str(tmp_path / "model"), str(folder), "--tower", "third.3", "--out", str(tmp_path / "e3"),
                 "--device", "cpu"]) == 1
    assert "this model has 2 third tower(s) h; choose third, third.2" in capsys.readouterr().err
