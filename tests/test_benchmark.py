"""Standard benchmarks through CLIP_benchmark: a tiny dataset in its webdataset layout, scored by the
library's dataset builder, classifier and logits, equal to our own suite on the same images."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("clip_benchmark")

from conftest import tiny_config  # noqa: E402
from threetowers import create_model, save_model  # noqa: E402
from threetowers.apps.cli import main  # noqa: E402
from threetowers.core.sets import CaptionedSet, LabelledSet  # noqa: E402
from threetowers.data.tokenizer import Tokenizer  # noqa: E402
from threetowers.eval.benchmark import run_benchmark, write_wds_classification, write_wds_retrieval  # noqa: E402
from threetowers.eval.suite import evaluate  # noqa: E402

CLASSES = ["red square", "green_circle", "blue star"]
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}."]


def wds_dataset(root, n=24, size=16):
    """CLIP_benchmark's layout (test/nshards.txt, test/0.tar with KEY.png + KEY.cls, classnames.txt,
    zeroshot_classification_templates.txt), written by our `write_wds_classification`."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % len(CLASSES)
    write_wds_classification(root, LabelledSet(images, labels, CLASSES, [t.replace("{c}", "{}") for t in TEMPLATES]))
    assert (root / "zeroshot_classification_templates.txt").read_text().splitlines() == TEMPLATES
    return images, labels


def model_and_tokenizer():
    cfg = tiny_config("clip", "model.text.vocab_size=300")
    torch.manual_seed(0)
    tokenizer = Tokenizer.train([t.format(c=c) for c in CLASSES for t in TEMPLATES] * 20, 300,
                                cfg.model.text.context_length)
    return cfg, create_model(cfg).eval(), tokenizer


def test_clip_benchmark_scores_equal_our_suite_on_the_same_images(tmp_path):
    images, labels = wds_dataset(tmp_path / "ds")
    cfg, model, tokenizer = model_and_tokenizer()
    theirs = run_benchmark(model, tokenizer, "wds/tiny", tmp_path / "ds", cfg.model.image.image_size, batch_size=7)
    ours = evaluate(model, tokenizer, {"tiny": LabelledSet(images, labels, [c.replace("_", " ") for c in CLASSES],
                                                           [t.replace("{c}", "{}") for t in TEMPLATES])})
    assert set(theirs) == {f"benchmark/wds/tiny/fp32/{m}" for m in ("top1", "top5", "mean_per_class_recall")}
    for metric in ("top1", "top5", "mean_per_class_recall"):
        assert theirs[f"benchmark/wds/tiny/fp32/{metric}"] == pytest.approx(ours[f"tiny/{metric}"], abs=1e-9)
    assert theirs["benchmark/wds/tiny/fp32/top5"] == 1.0  # 3 classes: top-5 holds every class


def test_clip_benchmark_retrieval_equals_our_suite_with_several_captions_per_image(tmp_path):
    """Images with one or two captions each: CLIP_benchmark's R@k equal our suite's (the captions of
    an image stay together through its batching)."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (13, 16, 16, 3), dtype=np.uint8)
    owners = [i for i in range(13) for _ in range(1 + i % 2)]
    # distinct short captions of the tokenizer's words: three class names, the digits of j in base 3
    captions = [f"{CLASSES[j % 3]} {CLASSES[j // 3 % 3]} {CLASSES[j // 9]}" for j in range(len(owners))]
    data = CaptionedSet(images, captions, np.array(owners))
    write_wds_retrieval(tmp_path / "ret", data)
    cfg, model, tokenizer = model_and_tokenizer()
    theirs = run_benchmark(model, tokenizer, "wds/ret", tmp_path / "ret", cfg.model.image.image_size, batch_size=4)
    ours = evaluate(model, tokenizer, {"ret": data})
    for k in (1, 5, 10):
        assert theirs[f"benchmark/wds/ret/fp32/text_retrieval_recall@{k}"] == pytest.approx(ours[f"ret/i2t_R@{k}"])
        assert theirs[f"benchmark/wds/ret/fp32/image_retrieval_recall@{k}"] == pytest.approx(ours[f"ret/t2i_R@{k}"])
    assert 0 < ours["ret/t2i_R@5"] < 1  # not a degenerate case


def test_a_dataset_root_without_its_files_is_one_clear_error(tmp_path):
    wds_dataset(tmp_path / "ds")
    (tmp_path / "ds" / "classnames.txt").unlink()
    cfg, model, tokenizer = model_and_tokenizer()
    with pytest.raises(FileNotFoundError, match="classnames.txt missing"):
        run_benchmark(model, tokenizer, "wds/tiny", tmp_path / "ds", 16)


def test_threetowers_eval_benchmark_writes_the_same_json_as_other_tasks(tmp_path, capsys):
    wds_dataset(tmp_path / "ds")
    cfg, model, tokenizer = model_and_tokenizer()
    save_model(model, tmp_path / "model")
    tokenizer.save(tmp_path / "model" / "tokenizer.json")
    out = tmp_path / "scores.json"
    assert main(["eval", str(tmp_path / "model"), "--benchmark", "wds/tiny", "--dataset-root", str(tmp_path / "ds"),
                 "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert 0 <= scores["benchmark/wds/tiny/fp32/top1"] <= 1 and "benchmark/wds/tiny/fp32/top1" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "model"), "--benchmark", "wds/tiny", "--dataset-root", str(tmp_path / "nope")]) == 1
    assert "is not a folder" in capsys.readouterr().err


def test_threetowers_world_wds_writes_the_worlds_zeroshot_set_in_that_layout(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("THREETOWERS_CACHE", str(tmp_path / "cache"))
    assert main(["world", "wds", str(tmp_path / "objects"), "--what", "object", "-n", "12"]) == 0
    assert len((tmp_path / "objects" / "classnames.txt").read_text().splitlines()) == 28  # the world's shapes
    assert (tmp_path / "objects" / "test" / "0.tar").is_file() and "{c}" in (
        tmp_path / "objects" / "zeroshot_classification_templates.txt").read_text()
    assert main(["world", "wds", str(tmp_path / "pairs")]) == 1  # captioned pairs are no labelled set
    assert "--what object" in capsys.readouterr().err
