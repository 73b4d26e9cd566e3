import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import fake_third, tiny_config
from threetowers.config import ConfigError
from threetowers.model.losses import contrastive_loss
from threetowers import create_model, load_model, save_model


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 16, 16, generator=g), "tokens": torch.randint(2, 64, (n, 12), generator=g)}


def _grads_after(model, term):
    model.zero_grad()
    emb = model.embeddings(_batch())
    idx = [t.name for t in model.terms].index(term)
    t = model.terms[idx]
    contrastive_loss(emb[t.a], emb[t.b], model.loss.scales()[idx]).backward()
    def touched(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    return touched


def test_3t_modules_and_embeddings():
    torch.manual_seed(0)
    model = create_model(tiny_config("3t", "model.third.heads=per_term"), third=fake_third())
    emb = model.embeddings(_batch())
    assert set(emb) == {"image", "text", "image_h", "text_h", "third_f", "third_g"}
    assert emb["image"].shape == (8, 16) and emb["third_f"].shape == (8, 24)
    for v in emb.values():
        assert torch.allclose(v.norm(dim=-1), torch.ones(8), atol=1e-5)
    assert model.third_head_f is not model.third_head_g


def test_gradient_routing_of_the_third_tower_terms():
    torch.manual_seed(0)
    model = create_model(tiny_config("3t"), third=fake_third())
    touched = _grads_after(model, "text_h~third_g")
    assert touched(model.text_tower) and touched(model.adapt_text)
    assert not touched(model.image_tower) and not touched(model.adapt_image)
    touched = _grads_after(model, "image_h~third_f")
    assert touched(model.image_tower) and touched(model.adapt_image)
    assert not touched(model.text_tower)
    assert all(p.grad is None for p in model.third.parameters())


def test_h_is_frozen_and_stays_in_eval_mode():
    model = create_model(tiny_config("3t"), third=fake_third())
    model.train()
    assert not model.third.module.training
    assert all(not p.requires_grad for p in model.third.parameters())
    out = model(_batch())
    assert out["embeddings"]["third_g"].requires_grad is False


def test_cached_third_embeddings_replace_h():
    torch.manual_seed(0)
    model = create_model(tiny_config("3t"), third=fake_third())
    batch = _batch()
    online = model(batch)["loss"].detach()
    cached = model({**batch, "third": model.third(batch["image"])})["loss"].detach()
    assert float(online) == pytest.approx(float(cached), rel=1e-6)
    with pytest.raises(ValueError, match=r"expected \[B, 24\]"):
        model({**batch, "third": torch.zeros(8, 7)})


def test_lit_uses_h_and_g_h_at_inference():
    torch.manual_seed(0)
    model = create_model(tiny_config("lit", "model.third.heads=shared"), third=fake_third())
    assert model.image_tower is None and model.proj_text is None
    images = _batch()["image"]
    h = model.third(images)
    expected = torch.nn.functional.normalize(model.third_head_g(h), dim=-1)
    assert torch.allclose(model.encode_image(images), expected, atol=1e-6)


def test_save_and_load_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    model = create_model(tiny_config("3t", "model.third.heads=shared"), third=fake_third()).eval()
    save_model(model, tmp_path / "m")
    batch = _batch()
    torch.save(batch, tmp_path / "batch.pt")
    expected_img, expected_txt = model.encode_image(batch["image"]), model.encode_text(batch["tokens"])
    code = (
        "import torch, sys; from threetowers import load_model;"
        f"m = load_model(r'{tmp_path / 'm'}'); b = torch.load(r'{tmp_path / 'batch.pt'}');"
        f"torch.save((m.encode_image(b['image']), m.encode_text(b['tokens'])), r'{tmp_path / 'out.pt'}')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    img, txt = torch.load(tmp_path / "out.pt")
    assert torch.equal(img, expected_img) and torch.equal(txt, expected_txt)
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["third"]["name"] == "fake-h" and len(meta["third"]["fingerprint"]) == 64


def test_loading_a_file_of_the_wrong_kind(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"format": "threetowers-classifier"}))
    with pytest.raises(ValueError, match="not a contrastive model"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.json is missing"):
        load_model(tmp_path / "nowhere")
    model = create_model(tiny_config("clip"))
    save_model(model, tmp_path / "clip")
    save_file({"bogus": torch.zeros(1)}, str(tmp_path / "clip" / "model.safetensors"))
    with pytest.raises(ValueError, match="does not fit its config"):
        load_model(tmp_path / "clip")


def test_bad_input_names_what_was_expected():
    model = create_model(tiny_config("clip"))
    with pytest.raises(ValueError, match=r"images \[B, 3, 16, 16\]"):
        model.encode_image(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="vocab_size"):
        model.encode_text(torch.full((2, 12), 999))
    with pytest.raises(ConfigError, match="model.method"):
        tiny_config("align")
    with pytest.raises(ConfigError, match="model.third.source"):
        tiny_config("clip", "model.third.source=timm")
    with pytest.raises(ValueError, match="head_dim"):
        create_model(tiny_config("3t", "model.third.head_dim=8"), third=fake_third())


@pytest.mark.parametrize("method", ["clip", "lit", "3t"])
def test_a_few_steps_lower_the_loss(method):
    torch.manual_seed(0)
    model = create_model(tiny_config(method, "model.third.heads=shared" if method == "lit" else "model.embed_dim=16"),
                        third=fake_third() if method != "clip" else None)
    batch = _batch(n=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = float(model(batch)["loss"].detach())
    for _ in range(15):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    assert float(model(batch)["loss"].detach()) < 0.7 * first


def test_models_saved_before_the_tower_defaults_changed_load_and_encode_alike():
    """Models and classifiers written at 694e437 (mean pooling, no pre-LayerNorm, patch bias) keep
    their architecture: their configs lack the new fields, which then mean what they meant then."""
    from pathlib import Path

    from safetensors.torch import load_file

    from threetowers.third.classifier import load_classifier

    root = Path(__file__).parent / "data" / "legacy_v694"
    expected = load_file(str(root / "outputs.safetensors"))
    model = load_model(root / "model")
    assert model.cfg.model.image.pool == "gap" and not model.cfg.model.image.pre_norm
    assert torch.allclose(model.encode_image(expected["x"]), expected["image"], atol=1e-6)
    assert torch.allclose(model.encode_text(expected["tokens"]), expected["text"], atol=1e-6)
    classifier, _ = load_classifier(root / "classifier")
    assert torch.allclose(classifier.forward_features(expected["x"]), expected["feat"], atol=1e-6)
