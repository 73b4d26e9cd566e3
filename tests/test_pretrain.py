"""Issue 5's acceptance check: a classifier pretrained for seconds on the world's object set beats
chance by a clear margin, and loads as a frozen h whose embedding is its pre-logits."""

import torch

from threetowers.config import load_config
from threetowers.core.sets import as_float
from threetowers.third.classifier import load_classifier
from threetowers.third import load_third_tower
from threetowers.training.pretrain import pretrain


def test_pretrained_object_classifier_beats_chance_and_serves_as_h(tmp_path, monkeypatch):
    monkeypatch.setenv("THREETOWERS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "pre"
    result = pretrain("demo/pretrain", [
        "model.image.image_size=32", "data.world.image_size=32", "pretrain.num_images=4000", "pretrain.num_heldout=280",
        "train.steps=200", "train.batch_size=64", "train.threads=1", f"train.output_dir={out}",
        "train.tensorboard=false",
    ])
    chance = 1 / 28
    assert result["heldout_top1"] > 2.5 * chance, f"held-out top-1 {result['heldout_top1']:.3f} vs chance {chance:.3f}"

    classifier, meta = load_classifier(out / "model")
    h = load_third_tower(load_config(None, ["model.method=3t", "model.third.source=checkpoint",
                                            f"model.third.path={out / 'model'}"]).model.third)
    images = as_float(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8).numpy())
    features = h(images)
    assert features.shape == (4, classifier.head.in_features) and not features.requires_grad
    with torch.no_grad():
        assert torch.allclose(classifier.head(features), classifier.logits(images), atol=1e-5)
