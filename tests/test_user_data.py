"""A user's own data outside the world: class folders and captioned CSVs for evaluation, and class
folders or Fashion-MNIST for pretraining h."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from threetowers.config import load_config
from threetowers.data.folders import class_folder
from threetowers.core.sets import CaptionedSet, LabelledSet
from threetowers.world.sprites import FASHION_DIR
from threetowers.eval.tasks import build_tasks
from threetowers.training.pretrain import labelled_sets

COLOURS = {"blue_cup": (20, 40, 220), "green": (30, 200, 40), "red": (230, 20, 20)}  # sorted: the label order


def write_class_folder(root: Path, per_class: int = 4) -> Path:
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shade = tuple(c + i for c in rgb)  # every file distinct
            Image.new("RGB", (40 + 4 * i, 32), shade).save(root / name / f"{i}.png")  # not square: center-cropped
    (root / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # an image by name only
    (root / "red" / "notes.txt").write_text("not an image, not listed")
    return root


def test_class_folder_reads_labels_from_subfolders_and_skips_unreadable_files(tmp_path, capsys):
    data = class_folder(write_class_folder(tmp_path / "pets"), 16, 100, seed=0, what="test:folder")
    assert data.class_names == ["blue_cup", "green", "red"]
    assert data.images.shape == (12, 16, 16, 3) and data.images.dtype == np.uint8
    assert np.bincount(data.labels).tolist() == [4, 4, 4]
    for image, label in zip(data.images, data.labels):  # every image carries its own class's colour
        assert np.abs(image[8, 8].astype(int) - COLOURS[data.class_names[label]]).max() <= 6
    assert "skipped 1 unreadable images" in capsys.readouterr().out
    subset = class_folder(tmp_path / "pets", 16, 5, seed=1, what="test:folder")
    assert len(subset.labels) <= 5  # a seeded subset (the broken file may be among the 5 drawn)
    with pytest.raises(ValueError, match="test:folder: .*nowhere is not a folder"):
        class_folder(tmp_path / "nowhere", 16, 10, seed=0, what="test:folder")
    with pytest.raises(ValueError, match="at least 5 class subfolders"):
        class_folder(tmp_path / "pets", 16, 10, seed=0, what="test:folder", min_classes=5)


def test_eval_tasks_from_a_class_folder_and_a_captioned_csv(tmp_path):
    folder = write_class_folder(tmp_path / "pets")
    csv = tmp_path / "pairs.csv"
    csv.write_text("image,caption\n"
                   "pets/red/0.png,a red square\npets/green/0.png,a green square\n"
                   "pets/red/0.png,something red\n")
    cfg = load_config("tiny", ["eval.num_images=50"])
    tasks = build_tasks(cfg, [f"zeroshot:{folder}", f"retrieval:{csv}"])
    zs = tasks[f"zeroshot:{folder}"]
    assert isinstance(zs, LabelledSet) and zs.class_names == ["blue cup", "green", "red"]
    assert zs.images.shape[1:] == (cfg.model.image.image_size, cfg.model.image.image_size, 3)
    assert all("{}" in t for t in zs.templates)
    ret = tasks[f"retrieval:{csv}"]
    assert isinstance(ret, CaptionedSet) and len(ret.images) == 2  # rows sharing an image are one image
    assert ret.captions == ["a red square", "a green square", "something red"]
    assert ret.image_of_text.tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="unknown task 'zeroshot_colour'"):
        build_tasks(cfg, ["zeroshot_colour"])


def test_pretraining_sets_from_a_class_folder_are_split_without_overlap(tmp_path):
    folder = write_class_folder(tmp_path / "pets", per_class=6)
    cfg = load_config("pretrain", [f"pretrain.dataset=folder:{folder}", "pretrain.num_images=100",
                                   "pretrain.num_heldout=4", "model.image.image_size=16"])
    train, held = labelled_sets(cfg)
    assert len(held.labels) == 4 and len(train.labels) == 18 - 4
    assert train.class_names == held.class_names == ["blue_cup", "green", "red"]
    seen = {im.tobytes() for im in train.images}
    assert not any(im.tobytes() in seen for im in held.images)  # distinct files: no image in both


@pytest.mark.skipif(not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_pretraining_sets_from_fashion_mnist():
    cfg = load_config("pretrain", ["pretrain.dataset=fashion_mnist", "pretrain.num_images=300",
                                   "pretrain.num_heldout=100"])
    train, held = labelled_sets(cfg)
    assert train.images.shape == (300, 28, 28, 3) and held.images.shape == (100, 28, 28, 3)
    assert (train.images[..., 0] == train.images[..., 2]).all()  # grey as RGB
    assert set(np.unique(train.labels)) == set(range(10)) and train.class_names[0] == "t-shirt"
    assert train.images.std() > 20  # real garments, not blank
