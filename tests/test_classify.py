"""`threetowers classify`: on a labelled folder, the share of images whose top label is their folder's
class equals `threetowers eval`'s zero-shot top-1 on that folder, and every score is the library's
image embedding times its class embedding; bad input is refused by name before any work."""

import csv
import re

import numpy as np
import pytest
import torch
from PIL import Image

from test_embed import pixels, saved
from test_third_pixels import noise_shards
from threetowers import classify, embed, evaluate, load_embeddings
from threetowers.apps.cli import main
from threetowers.data.tokenizer import load_tokenizer
from threetowers.eval.tasks import folder_task
from threetowers.eval.zeroshot import DEFAULT_TEMPLATES, class_embeddings
from threetowers.inference import classification, read_templates
from threetowers.model.factory import load_model

CLASSES = ("red_star", "blue_circle", "green_square")


def class_folders(root, per_class=5):
    """root/<class>/i.png: each image a random colour with noise (a random tiny model then tells them
    apart; noise alone looks the same to it, and it would give one label to everything)."""
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, 3) + rng.normal(0, 60, (20, 24 + i, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("method", ["clip", "lit"])
def test_classify_scores_what_eval_scores(tmp_path, method):
    model_dir, root = saved(tmp_path, method), class_folders(tmp_path / "classes")
    names = folder_task(str(root), 16, 1000).class_names  # as eval names the classes: "red star", ...
    assert names == sorted(n.replace("_", " ") for n in CLASSES)
    result = classify(model_dir, root, names)
    predicted = [best[0][0] for best in result.top(1)]
    truth = [key.split("/")[0].replace("_", " ") for key in result.keys]
    top1 = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    assert top1 == evaluate(model_dir, [f"zeroshot:{root}"])[f"zeroshot:{root}/top1"]

    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir / "tokenizer.json", model.cfg.model.text)
    classes = class_embeddings(model.encode_text, tokenizer, names, DEFAULT_TEMPLATES)
    images = model.encode_image(torch.stack([pixels(root / key) for key in result.keys]))
    assert result.scores.shape == (15, 3) and np.abs(result.scores - (images @ classes.T).numpy()).max() < 1e-5
    assert len(set(predicted)) > 1  # a model that says one label for everything would prove little


def test_the_command_prints_the_top_labels_and_writes_a_csv(tmp_path, capsys):
    model_dir, root = saved(tmp_path), class_folders(tmp_path / "classes", per_class=2)
    (root / "red_star" / "broken.png").write_bytes(b"not a png")
    assert main(["classify", str(model_dir), str(root), "--labels", "red star, blue circle,green square",
                 "--top-k", "2"]) == 0
    printed = capsys.readouterr().out
    written = tmp_path / "classify.csv"  # MODEL_DIR/../classify.csv
    assert f"wrote {written}" in printed and "6 images classified" in printed
    assert "1 image could not be read" in printed and "red_star/broken.png (corrupt_image)" in printed
    rows = list(csv.DictReader(open(written)))
    assert list(rows[0]) == ["image", "label_1", "score_1", "label_2", "score_2", "bad"]
    result = classify(model_dir, root, ["red star", "blue circle", "green square"])
    assert [r["image"] for r in rows] == result.keys and len(rows) == 7
    for row, best in zip(rows, result.top(2)):
        if row["bad"]:
            assert row["bad"] == "corrupt_image" and row["label_1"] == "" and best == []
            continue
        assert [row["label_1"], row["label_2"]] == [label for label, _ in best]
        assert float(row["score_1"]) == pytest.approx(best[0][1], abs=1e-6)
        assert float(row["score_1"]) >= float(row["score_2"])
        assert re.search(rf"{re.escape(row['image'])} +{best[0][0]} {best[0][1]:.3f}  {best[1][0]} ", printed)


def test_bad_input_is_refused_by_name_before_any_work(tmp_path, capsys, monkeypatch):
    model_dir, root = saved(tmp_path), class_folders(tmp_path / "classes", per_class=1)
    monkeypatch.setattr(classification, "load_saved", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "empty").mkdir()
    no_slot = tmp_path / "templates.txt"
    no_slot.write_text("a photo of a {}.\na picture\n")
    cases = [
        ([str(tmp_path / "classes"), str(root), "--labels", "a,b"], r"MODEL_DIR .*classes is not a saved model"),
        ([str(model_dir), str(root), "--labels", " , "], r"--labels names no labels; give at least one"),
        ([str(model_dir), str(root), "--labels", "cat,dog,cat"], r"--labels names 'cat' more than once"),
        ([str(model_dir), str(tmp_path / "empty"), "--labels", "cat,dog"], r"empty holds no images"),
        ([str(model_dir), str(root), "--labels", "cat", "--templates", str(no_slot)],
         r"--templates .*templates.txt: line 2 \('a picture'\) has no '\{\}' where the label goes"),
    ]
    for args, message in cases:
        assert main(["classify", *args]) == 1, args
        err = capsys.readouterr().err
        assert re.search(message, err), (message, err)
    assert not (tmp_path / "classify.csv").exists()
    clip_benchmark_style = tmp_path / "cb.txt"
    clip_benchmark_style.write_text("a photo of the {c}.\n\n{c}\n")  # CLIP_benchmark's templates write {c}
    assert read_templates(clip_benchmark_style) == ["a photo of the {}.", "{}"]


def test_shards_are_classified_through_the_readers_of_embed(tmp_path):
    model_dir, out = saved(tmp_path), tmp_path / "emb"
    noise_shards(tmp_path / "d", sizes=(3, 4))
    pattern = str(tmp_path / "d" / "shard-{000..001}.tar")
    result = classify(model_dir, pattern, ["a red star", "a dog"], ["{}", "a photo of {}"])
    embed(model_dir, pattern, out, dtype="float32", device="cpu", progress=False)
    keys, emb = load_embeddings(out)
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir / "tokenizer.json", model.cfg.model.text)
    classes = class_embeddings(model.encode_text, tokenizer, ["a red star", "a dog"], ["{}", "a photo of {}"])
    assert result.keys == keys == [f"s{s}-{i:04d}" for s, n in ((0, 3), (1, 4)) for i in range(n)]
    assert np.abs(result.scores - emb @ classes.numpy().T).max() < 1e-5
