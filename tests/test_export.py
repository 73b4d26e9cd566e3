"""Export to open_clip: the directory open_clip loads encodes as our model does (fp32, max |diff| <= 1e-5),
its tokenizer gives our ids, and CLIP_benchmark scores it as `threetowers eval --benchmark` does."""

import json
import sys

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from conftest import fake_third, tiny_config  # noqa: E402
from test_benchmark import CLASSES, TEMPLATES, wds_dataset  # noqa: E402
from threetowers import UnsupportedExport, check_parity, create_model, export_open_clip, save_model  # noqa: E402
from threetowers.apps.cli import main  # noqa: E402
from threetowers.data.tokenizer import Tokenizer  # noqa: E402

CAPTIONS = [t.format(c=c) for c in CLASSES for t in TEMPLATES] + ["a red star on a striped background"]


def saved(tmp_path, method="clip", *overrides, name="model"):
    """A tiny model with every parameter moved off its initial value, saved with its tokenizer."""
    cfg = tiny_config(method, "model.text.vocab_size=300", *overrides)
    torch.manual_seed(0)
    model = create_model(cfg, third=fake_third() if method != "clip" else None).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    tokenizer = Tokenizer.train(CAPTIONS * 20, 300, cfg.model.text.context_length)
    save_model(model, tmp_path / name)
    tokenizer.save(tmp_path / name / "tokenizer.json")
    return tmp_path / name


@pytest.mark.parametrize("method, overrides", [
    ("clip", ("model.image.patch_bias=true",)),  # the bias is folded into the position embeddings
    ("clip", ("model.image.pre_norm=false", "loss.kind=sigmoid")),
    ("3t", ("model.third.heads=shared",)),
    ("clip", ("model.image.kind=timm", "model.image.timm_name=test_resnet")),
])
def test_open_clip_loads_the_export_and_encodes_alike(tmp_path, method, overrides):
    model_dir = saved(tmp_path, method, *overrides)
    out = export_open_clip(model_dir, tmp_path / "oc")
    diff = check_parity(model_dir, out)  # also asserts open_clip's tokens equal ours (long captions cut alike)
    assert diff["image"] <= 1e-5 and diff["text"] <= 1e-5
    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert sum(p.numel() for p in theirs.parameters()) > 0
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["threetowers"]["method"] == method


def test_what_open_clip_cannot_hold_is_refused_by_name(tmp_path):
    for overrides, named in ((("model.head=mlp",), "model.head=mlp"), (("model.image.pool=gap",), "model.image.pool=gap"),
                             (("model.text.pool=mean",), "model.text.pool=mean")):
        model_dir = saved(tmp_path, "clip", *overrides, name="m-" + named)
        with pytest.raises(UnsupportedExport, match=named.replace(".", r"\.")):
            export_open_clip(model_dir, tmp_path / "oc")
    lit = saved(tmp_path, "lit", name="lit")
    with pytest.raises(UnsupportedExport, match="LiT"):
        export_open_clip(lit, tmp_path / "oc")
    assert not (tmp_path / "oc").exists()  # refused before writing anything


def test_export_never_overwrites_a_folder_that_is_not_an_export(tmp_path, capsys):
    model_dir = saved(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["export", str(model_dir), str(tmp_path / "mine")]) == 1
    assert "is not an earlier export" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert main(["export", str(model_dir), str(tmp_path / "oc")]) == 0
    assert "max |embedding difference|" in capsys.readouterr().out
    assert main(["export", str(model_dir), str(tmp_path / "oc")]) == 0  # an earlier export is updated


def test_export_without_open_clip_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    model_dir = saved(tmp_path)
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if not installed: `import open_clip` raises ImportError
    assert main(["export", str(model_dir), str(tmp_path / "oc")]) == 1
    err = capsys.readouterr().err
    assert "pip install open-clip-torch" in err and "--no-check" in err and not (tmp_path / "oc").exists()
    assert main(["export", str(model_dir), str(tmp_path / "oc"), "--no-check"]) == 0  # asked for: written unchecked
    assert (tmp_path / "oc" / "open_clip_model.safetensors").is_file()


def numpy_safe_accuracy(output, target, topk=(1,)):
    """clip-benchmark 1.6.2's `accuracy` with `.item()` where it calls float() on a one-element array,
    which NumPy >= 2.4 refuses (the only change; see eval/benchmark.py)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [float(correct[:k].reshape(-1).float().sum().item()) / len(target) for k in topk]


def test_clip_benchmark_scores_the_export_as_threetowers_eval_does(tmp_path, monkeypatch):
    """CLIP_benchmark's own command line on the exported model against `threetowers eval --benchmark`."""
    cli = pytest.importorskip("clip_benchmark.cli")
    from clip_benchmark.metrics import zeroshot_classification
    monkeypatch.setattr(zeroshot_classification, "accuracy", numpy_safe_accuracy)
    wds_dataset(tmp_path / "ds", n=30, size=20)  # 20 px: both sides resize to the tower's 16 px
    model_dir = saved(tmp_path)
    export_open_clip(model_dir, tmp_path / "oc")
    assert main(["eval", str(model_dir), "--benchmark", "wds/tiny", "--dataset-root", str(tmp_path / "ds"),
                 "--out", str(tmp_path / "ours.json")]) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())
    monkeypatch.setattr("sys.argv", ["clip_benchmark", "eval", "--model", f"local-dir:{tmp_path / 'oc'}",
                                     "--pretrained", "", "--model_type", "open_clip", "--dataset", "wds/tiny",
                                     "--dataset_root", str(tmp_path / "ds"), "--task", "zeroshot_classification",
                                     "--no_amp", "--batch_size", "8", "--num_workers", "0",
                                     "--output", str(tmp_path / "theirs.json")])
    cli.main()
    theirs = json.loads((tmp_path / "theirs.json").read_text())["metrics"]
    assert theirs["acc1"] == pytest.approx(ours["benchmark/wds/tiny/fp32/top1"], abs=1e-9)
    assert theirs["mean_per_class_recall"] == pytest.approx(ours["benchmark/wds/tiny/fp32/mean_per_class_recall"],
                                                            abs=1e-9)


# ----------------------------------------------------------------------------- architectures by name


@pytest.mark.parametrize("method", ["3t"])  # a 3T model exports its (f, g) pair, as CLIP does (~15 s each on 2 cores)
def test_an_architecture_by_name_exports_as_open_clips_own(tmp_path, method):
    """model.arch=ViT-B-32 is open_clip's ViT-B-32: the export's config has its shape and open_clip encodes alike."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from threetowers.config import load_config
    from threetowers.data.clip_bpe import clip_bpe_tokenizer

    third = ["model.third.source=checkpoint"] if method == "3t" else []
    cfg = load_config(None, ["model.arch=ViT-B-32", f"model.method={method}", *third])
    tokenizer = clip_bpe_tokenizer(cfg.model.text.context_length)
    # The vocabulary size comes from the tokenizer (train sets it so); CLIP's BPE has open_clip's 49,408 ids.
    cfg.model.text.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    model = create_model(cfg, third=fake_third() if method == "3t" else None).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_model(model, tmp_path / "model")
    tokenizer.save(tmp_path / "model" / "tokenizer.json")
    out = export_open_clip(tmp_path / "model", tmp_path / "oc")

    exported = json.loads((out / "open_clip_config.json").read_text())["model_cfg"]
    theirs = open_clip.get_model_config("ViT-B-32")
    vision, text = CLIPVisionCfg(**theirs["vision_cfg"]), CLIPTextCfg(**theirs["text_cfg"])
    assert exported["embed_dim"] == theirs["embed_dim"] and exported["quick_gelu"] is False
    for key in ("image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio", "pool_type", "no_ln_pre"):
        assert exported["vision_cfg"][key] == getattr(vision, key), key
    for key in ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"):
        assert exported["text_cfg"][key] == getattr(text, key), key
    diff = check_parity(tmp_path / "model", out, n_images=2)  # open_clip's tokens equal ours too
    assert diff["image"] <= 1e-5 and diff["text"] <= 1e-5
