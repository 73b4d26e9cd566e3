"""Architectures by name (model.arch) and starting from an open_clip model (model.init_from): the
config layers, CLIP's BPE tokenizer against open_clip's, the import (round trip, parity with open_clip),
a 3T run started from an open_clip model, and what is refused."""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

open_clip = pytest.importorskip("open_clip")

import threetowers as tt  # noqa: E402
from conftest import fake_third, tiny_config  # noqa: E402
from test_export import CAPTIONS, saved  # noqa: E402
from threetowers.config import ConfigError, arch_names, from_dict, load_config, resolve_config, to_dict  # noqa: E402
from threetowers.data.clip_bpe import clip_bpe_tokenizer  # noqa: E402
from threetowers.data.tokenizer import Tokenizer  # noqa: E402
from threetowers.interop.open_clip_export import WEIGHTS  # noqa: E402

TEXTS = ["A photo of a DOG!$ wow", "hello,world!!! 123 4.5 $100, 3rd-place (co-)winner; x=y+z/2 @home #tag",
         "Café über naïve — “curly” ‘quotes’ don't I'm we're", "emoji 🦓🐶 and 日本語", "  spaces\t\tand\nnewlines ",
         "", "!", "UPPER lower MiXeD 42nd 1990s", " ".join(["A very long caption, with punctuation!"] * 30)]
# A small open_clip CLIP (OpenAI's QuickGELU, CLIP's vocabulary) for what ViT-B-32 would make slow on a CPU.
SMALL = {"embed_dim": 16, "quick_gelu": True,
         "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
         "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its initial value (LayerNorms included), so that a swapped name shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def small_open_clip(tmp_path, model_cfg=SMALL, seed=0):
    """(open_clip model, its state dict file, its model_cfg JSON file)."""
    torch.manual_seed(seed)
    theirs = perturbed(open_clip.CLIP(**model_cfg), seed)
    torch.save(theirs.state_dict(), tmp_path / "small.pt")
    (tmp_path / "small.json").write_text(json.dumps(model_cfg))
    return theirs, tmp_path / "small.pt", tmp_path / "small.json"


def max_diff(ours, tokenizer, theirs, images, texts, context_length=77):
    """max |embedding difference| of ours and open_clip's, image and text, fp32 (after checking the ids)."""
    their_tokens = open_clip.get_tokenizer("ViT-B-32")(texts, context_length=context_length)
    assert torch.equal(tokenizer(texts), their_tokens)
    cfg = theirs.visual.preprocess_cfg if hasattr(theirs.visual, "preprocess_cfg") else {}
    mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1)
    with torch.no_grad():
        image = (ours.encode_image(images) - theirs.encode_image((images - mean) / std, normalize=True)).abs().max()
        text = (ours.encode_text(tokenizer(texts)) - theirs.encode_text(their_tokens, normalize=True)).abs().max()
    return float(image), float(text)


# ----------------------------------------------------------------------------- model.arch


def test_an_architecture_lies_between_the_preset_and_the_overrides(tmp_path):
    cfg = load_config("3t", ["model.arch=ViT-B-16", "model.image.image_size=128"])
    i, t = cfg.model.image, cfg.model.text
    assert (i.image_size, i.patch_size, i.width, i.depth, i.heads) == (128, 16, 768, 12, 12)  # the override wins
    assert (t.context_length, t.width, t.heads, t.depth, cfg.model.embed_dim) == (77, 512, 8, 12, 512)
    assert cfg.model.arch == "ViT-B-16" and cfg.model.method == "3t"
    assert load_config("tiny", ["model.arch=ViT-L-14"]).model.image.width == 1024  # over the preset's towers
    assert load_config("lit", ["model.arch=ViT-B-16"]).model.text.width == 512  # any method (LiT: g matters)
    mine = tmp_path / "mine.yaml"
    mine.write_text("defaults: [clip]\nmodel:\n  arch: ViT-B-32\n  image: {width: 64}\n")
    assert load_config(mine).model.image.width == 768  # a YAML's own towers are beneath its arch
    assert load_config(mine, ["model.image.width=64", "model.image.heads=1"]).model.image.width == 64
    # Saved and read back, the fields hold the shape: the arch is a record, not layered again.
    assert from_dict(to_dict(cfg)) == cfg
    assert resolve_config(cfg, ["train.steps=5"]).model.image.image_size == 128
    assert resolve_config(load_config("clip"), ["model.arch=ViT-B-32"]).model.image.patch_size == 32


def test_an_unknown_architecture_names_the_closest_and_the_list():
    with pytest.raises(ConfigError, match=r"model.arch='ViT-B16'.*did you mean ViT-B-16.*"
                                          r"Choose one of ViT-B-16, ViT-B-32, ViT-L-14"):
        load_config("clip", ["model.arch=ViT-B16"])


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14"])
def test_the_architectures_are_open_clips_configs(name):
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    assert name in arch_names()
    theirs = open_clip.get_model_config(name)
    vision, text = CLIPVisionCfg(**theirs["vision_cfg"]), CLIPTextCfg(**theirs["text_cfg"])
    m = load_config("clip", [f"model.arch={name}"]).model
    assert m.embed_dim == theirs["embed_dim"] and not theirs.get("quick_gelu", False)
    assert (m.image.image_size, m.image.patch_size, m.image.width, m.image.depth, m.image.mlp_ratio) == \
        (vision.image_size, vision.patch_size, vision.width, vision.layers, vision.mlp_ratio)
    assert m.image.heads == vision.width // vision.head_width
    assert (m.text.context_length, m.text.vocab_size, m.text.width, m.text.heads, m.text.depth, m.text.mlp_ratio) == \
        (text.context_length, text.vocab_size, text.width, text.heads, text.layers, text.mlp_ratio)


# ----------------------------------------------------------------------------- CLIP's tokenizer


def test_clip_bpe_gives_open_clips_ids(tmp_path):
    tokenizer = clip_bpe_tokenizer(77)
    ids = tokenizer(TEXTS)
    assert torch.equal(ids, open_clip.get_tokenizer("ViT-B-32")(TEXTS))
    assert tokenizer.vocab_size == 49408 and ids[0, 0] == 49406 and ids[0, 6] == 0 and ids[0, 9] == 49407  # "!" is id 0
    assert ids[-1, 0] == 49406 and ids[-1, -1] == 49407 and tokenizer.truncated == 1  # cut, the end token kept last
    assert tokenizer.decode(ids[0]) == "a photo of a dog !$ wow"
    tokenizer.save(tmp_path / "tokenizer.json")  # saved with the run: read back as CLIP's, ids unshifted
    for again in (Tokenizer.from_file(tmp_path / "tokenizer.json", 77), pickle.loads(pickle.dumps(tokenizer))):
        assert again.zero_pads and again.offset == 0 and torch.equal(again(TEXTS), ids)
    # A file whose id 0 is a real token but that declares no padding keeps the old convention (ids shifted by one).
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    (tmp_path / "undeclared.json").write_text(json.dumps({**data, "padding": None}))
    assert Tokenizer.from_file(tmp_path / "undeclared.json", 77).offset == 1


# ----------------------------------------------------------------------------- model.init_from


def clip_tokenized(tmp_path):
    """A tiny CLIP whose tokenizer is CLIP's BPE (start token, id 0 doubling as padding), saved."""
    cfg = tiny_config("clip", "model.text.vocab_size=49408")
    model = perturbed(tt.create_model(cfg))
    tt.save_model(model, tmp_path / "clip_bpe")
    clip_bpe_tokenizer(cfg.model.text.context_length).save(tmp_path / "clip_bpe" / "tokenizer.json")
    return tmp_path / "clip_bpe"


@pytest.mark.parametrize("method, overrides", [
    ("clip", ("model.image.patch_bias=true",)),  # folded into the positions on export; the import has none
    ("3t", ("model.third.heads=shared", "loss.kind=sigmoid")),
    ("clip", ("model.image.kind=timm", "model.image.timm_name=test_resnet")),
    ("clip", "clip_bpe"),
])
def test_export_import_export_gives_the_same_tensors(tmp_path, method, overrides):
    model_dir = clip_tokenized(tmp_path) if overrides == "clip_bpe" else saved(tmp_path, method, *overrides)
    first = tt.export_open_clip(model_dir, tmp_path / "oc1")
    assert max(tt.check_parity(model_dir, first).values()) <= 1e-5
    model, tokenizer = tt.import_open_clip(f"local-dir:{first}")
    tt.save_model(model, tmp_path / "imported")
    tokenizer.save(tmp_path / "imported" / "tokenizer.json")
    second = tt.export_open_clip(tmp_path / "imported", tmp_path / "oc2")
    a, b = load_file(str(first / WEIGHTS)), load_file(str(second / WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    original = tt.load_model(model_dir)
    theirs_tokenizer = Tokenizer.from_file(model_dir / "tokenizer.json", original.cfg.model.text.context_length)
    assert torch.equal(tokenizer(CAPTIONS), theirs_tokenizer(CAPTIONS))
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model.encode_image(images) - original.encode_image(images)).abs().max() <= 1e-5
        assert (model.encode_text(tokenizer(CAPTIONS)) - original.encode_text(tokenizer(CAPTIONS))).abs().max() <= 1e-5


def test_a_random_open_clip_vit_b_32_imports_with_open_clips_embeddings(tmp_path):
    torch.manual_seed(0)
    theirs = perturbed(open_clip.create_model("ViT-B-32"))
    torch.save(theirs.state_dict(), tmp_path / "vit_b_32.pt")
    ours, tokenizer = tt.import_open_clip(str(tmp_path / "vit_b_32.pt"), "ViT-B-32")
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert max(max_diff(ours, tokenizer, theirs, images, TEXTS)) <= 1e-5
    assert float(ours.loss.scales()[0].detach()) == pytest.approx(float(theirs.logit_scale.detach().exp()), rel=1e-6)


def test_a_small_quick_gelu_model_imports_for_clip_and_lit(tmp_path):
    theirs, weights, config = small_open_clip(tmp_path)
    ours, tokenizer = tt.import_open_clip(str(weights), str(config))
    assert ours.cfg.model.image.act == ours.cfg.model.text.act == "quick_gelu"
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert max(max_diff(ours, tokenizer, theirs, images, TEXTS, context_length=16)) <= 1e-5
    # An open_clip training checkpoint (its state dict under DDP's `module.` names) loads the same.
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in theirs.state_dict().items()}}, tmp_path / "ckpt.pt")
    again, _ = tt.import_open_clip(str(tmp_path / "ckpt.pt"), str(config))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))
    # LiT takes g's trunk only: its text head maps into h's space, which open_clip has no counterpart for.
    lit, _ = tt.import_open_clip(str(weights), str(config), ["model.method=lit", "model.third.source=checkpoint"],
                                 third=fake_third())
    assert torch.equal(lit.text_tower.token_embed.weight, theirs.token_embedding.weight)
    assert torch.equal(lit.text_tower.blocks[1].mlp[2].weight, theirs.transformer.resblocks[1].mlp.c_proj.weight)
    assert lit.image_tower is None and lit.adapt_text.weight.shape == (24, 32)


def world_run(tmp_path, weights, config, *extra):
    return ["model.third.path=", f"model.init_from={weights}", f"model.init_config={config}",
            f"train.output_dir={tmp_path / 'run'}", "train.steps=2", "train.batch_size=8", "train.progress=false",
            "train.threads=1", "train.device=cpu", "optim.lr=1e-12", "optim.warmup_steps=0", "data.world.num_pairs=32",
            "data.world.image_size=24", f"data.world.cache_dir={tmp_path / 'world'}", f"data.cache_dir={tmp_path / 'c'}",
            "eval.tasks=[zeroshot_object]", "eval.num_images=16", "eval.mixing_alphas=[]", *extra]


def test_a_3t_run_starts_from_an_open_clip_model_and_resumes_from_its_checkpoint(tmp_path):
    theirs, weights, config = small_open_clip(tmp_path)
    result = tt.train("3t", world_run(tmp_path, weights, config), third=fake_third())
    model = result.model.cpu()
    assert result.step == 2 and torch.isfinite(torch.tensor(result.metrics["train/loss"]))
    # lr 1e-12: after its steps the model still holds open_clip's f, g, projections and temperature.
    assert torch.allclose(model.text_tower.token_embed.weight, theirs.token_embedding.weight, atol=1e-6)
    assert torch.allclose(model.proj_image.weight, theirs.visual.proj.T, atol=1e-6)
    assert float(model.loss.scales()[0].detach()) == pytest.approx(float(theirs.logit_scale.detach().exp()), rel=1e-5)
    assert model.adapt_image is not None and model.adapt_text is not None  # 3T's adaptor heads: fresh
    saved_tokenizer = Tokenizer.from_file(tmp_path / "run" / "tokenizer.json", 16)
    assert saved_tokenizer.zero_pads and torch.equal(saved_tokenizer(TEXTS), clip_bpe_tokenizer(16)(TEXTS))
    # A resumed run takes its checkpoint: the weights file is not read again (here it would not even fit).
    torch.save({"visual.proj": torch.zeros(3, 3)}, weights)
    again = tt.train("3t", world_run(tmp_path, weights, config, "train.steps=3"), third=fake_third())
    assert again.step == 3


# ----------------------------------------------------------------------------- refusals


def test_a_name_that_is_not_an_open_clip_config_is_refused(tmp_path):
    _, weights, _ = small_open_clip(tmp_path)
    with pytest.raises(ConfigError, match=r"model.init_config='ViT-B-33' is not an open_clip model name; closest: ViT-B-32"):
        load_config(None, [f"model.init_from={weights}", "model.init_config=ViT-B-33"])
    with pytest.raises(ConfigError, match=r"model.init_from=.*needs|name its architecture in model.init_config"):
        load_config(None, [f"model.init_from={weights}"])
    with pytest.raises(ConfigError, match=r"model.init_from=.*open_clip_config.json does not exist"):
        load_config(None, [f"model.init_from=local-dir:{tmp_path}"])


def test_a_state_dict_that_does_not_fit_is_refused_before_any_data_work(tmp_path):
    _, weights, _ = small_open_clip(tmp_path)
    wider = {**SMALL, "vision_cfg": {**SMALL["vision_cfg"], "width": 96}}
    (tmp_path / "wider.json").write_text(json.dumps(wider))
    with pytest.raises(ConfigError, match=r"does not fit the configured towers: .*visual.conv1.weight has shape "
                                          r"\(64, 3, 8, 8\); the configured image_tower.patch_embed.weight needs \(96, 3, 8, 8\)"):
        tt.train("3t", world_run(tmp_path, weights, tmp_path / "wider.json"), third=fake_third())
    assert not (tmp_path / "world").exists() and not (tmp_path / "run" / "tokenizer.json").exists()


@pytest.mark.parametrize("change, named", [
    ({"vision_cfg": {"attentional_pool": True}}, r"vision_cfg.attentional_pool=True \(attentional pooling\)"),
    ({"vision_cfg": {"pool_type": "avg"}}, r"vision_cfg.pool_type='avg'"),
    ({"vision_cfg": {"layers": [3, 4, 6, 3]}}, r"vision_cfg.layers=\[3, 4, 6, 3\] \(a ModifiedResNet"),
    ({"text_cfg": {"hf_model_name": "roberta-base"}}, r"text_cfg.hf_model_name='roberta-base' \(a Hugging Face text tower"),
    ({"text_cfg": {"pool_type": "last"}}, r"text_cfg.pool_type='last' \(threetowers' text tower pools its end-of-text"),
    ({"text_cfg": {"proj_bias": True}}, r"text_cfg.proj_bias=True"),
    ({"text_cfg": {"no_causal_mask": True}}, r"text_cfg.no_causal_mask=True"),
    ({"multimodal_cfg": {"width": 32}}, r"multimodal_cfg \(CoCa's multimodal decoder\)"),
    ({"vision_cfg": {"timm_model_name": "test_resnet", "timm_pool": "token"}}, r"vision_cfg.timm_pool='token'"),
])
def test_a_tower_ours_cannot_be_is_refused_by_name(tmp_path, change, named):
    _, weights, _ = small_open_clip(tmp_path)
    model_cfg = {**SMALL, **{k: ({**SMALL[k], **v} if k in SMALL else v) for k, v in change.items()}}
    (tmp_path / "other.json").write_text(json.dumps(model_cfg))
    with pytest.raises(ConfigError, match=r"threetowers' towers cannot hold this open_clip model: .*" + named):
        load_config(None, [f"model.init_from={weights}", f"model.init_config={tmp_path / 'other.json'}"])


def test_named_open_clip_models_ours_cannot_be_are_refused(tmp_path):
    _, weights, _ = small_open_clip(tmp_path)
    for name, named in (("coca_ViT-B-32", "multimodal_cfg"), ("RN50", "ModifiedResNet"),
                        ("ViT-B-16-SigLIP", "does not download")):
        with pytest.raises(ConfigError, match=named):
            load_config(None, [f"model.init_from={weights}", f"model.init_config={name}"])


def test_contradictory_init_settings_are_refused(tmp_path):
    _, weights, config = small_open_clip(tmp_path)
    init = [f"model.init_from={weights}", f"model.init_config={config}"]
    for extra, named in ((["model.arch=ViT-B-32"], "drop model.arch"), (["data.tokenizer=tok.json"], "data.tokenizer"),
                         (["model.text.kind=hf", "model.text.name=x"], "model.text.kind=hf")):
        with pytest.raises(ConfigError, match=named):
            load_config(None, init + extra)
    with pytest.raises(ConfigError, match="model.init_from, which is empty"):
        load_config(None, [f"model.init_config={config}"])


def test_a_checkpoint_written_before_these_fields_existed_still_resumes():
    """A saved model config without model.arch / init_from / init_config / act meant their defaults."""
    from threetowers.training.checkpoint import CheckpointError
    from threetowers.training.resume import _check_model

    now = to_dict(tiny_config())["model"]
    old = json.loads(json.dumps(now))
    for section, key in (("", "arch"), ("", "init_from"), ("", "init_config"), ("image", "act"), ("text", "act")):
        del (old[section] if section else old)[key]
    _check_model(old, now, "the checkpoint")
    old["image"]["act"] = "quick_gelu"
    with pytest.raises(CheckpointError, match=r"model.image.act: 'quick_gelu' -> 'gelu'"):
        _check_model(old, now, "the checkpoint")


def test_another_image_size_resamples_the_positions_and_a_shorter_context_cuts_them(tmp_path):
    """Fine-tuning at another resolution or with shorter captions: the image grid's position embeddings
    are resampled (timm's bicubic resample, the class token kept), the text's cut to the shorter context;
    text that fits the shorter context embeds exactly as open_clip's; a longer context is refused."""
    from timm.layers import resample_abs_pos_embed

    theirs, weights, config = small_open_clip(tmp_path)
    ours, tokenizer = tt.import_open_clip(str(weights), str(config),
                                          ["model.image.image_size=48", "model.text.context_length=12"])
    grid = resample_abs_pos_embed(theirs.visual.positional_embedding[None], [6, 6], [4, 4], num_prefix_tokens=1)
    assert ours.image_tower.pos_embed.shape == (1, 37, 64) and torch.equal(ours.image_tower.pos_embed.detach(), grid)
    assert torch.equal(ours.image_tower.pos_embed.detach()[0, 0], theirs.visual.positional_embedding[0])  # class token
    assert torch.equal(ours.text_tower.pos_embed.detach()[0], theirs.positional_embedding[:12])
    short = ["a red star", "two dogs on grass"]
    with torch.no_grad():
        mine = ours.encode_text(tokenizer(short))
        their = theirs.encode_text(open_clip.get_tokenizer("ViT-B-32")(short, context_length=16), normalize=True)
    assert float((mine - their).abs().max()) <= 1e-5
    assert ours.encode_image(torch.rand(2, 3, 48, 48)).shape == (2, 16)
    with pytest.raises(ConfigError, match=r"positional_embedding has shape \(16, 32\); the configured "
                                          r"text_tower.pos_embed needs \(20, 32\)"):
        tt.import_open_clip(str(weights), str(config), ["model.text.context_length=20"])


def test_heads_that_start_fresh_can_learn_at_a_rate_of_their_own(tmp_path):
    """optim.fresh_lr_scale: what model.init_from does not provide (3T's heads into and on h's space) gets
    optimizer groups of its own at lr x the scale; the towers, projections and temperatures keep lr. A
    resume with another scale is refused (the groups are the checkpoint's); without init_from it is refused."""
    from threetowers.training.checkpoint import CheckpointError
    from threetowers.training.optim import build_optimizer

    _, weights, config = small_open_clip(tmp_path)
    cfg = load_config("3t", world_run(tmp_path, weights, config, "optim.lr=1e-4", "optim.fresh_lr_scale=10"))
    model = tt.create_model(cfg, third=fake_third())
    groups = build_optimizer(model, cfg.optim, torch.device("cpu")).param_groups
    by_lr = {}
    for group in groups:
        by_lr.setdefault(group["lr"], []).extend(p for p in group["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    fresh = {names[id(p)] for lr, ps in by_lr.items() if lr == pytest.approx(1e-3) for p in ps}
    kept = {names[id(p)] for lr, ps in by_lr.items() if lr == pytest.approx(1e-4) for p in ps}
    assert fresh and all(n.startswith(("adapt_", "third_head")) for n in fresh), fresh
    assert {"adapt_image.weight", "adapt_text.weight"} <= fresh
    assert "image_tower.pos_embed" in kept and "proj_text.weight" in kept and "loss.log_scale" in kept
    assert len(fresh) + len(kept) == sum(p.requires_grad for p in model.parameters())
    tt.train("3t", world_run(tmp_path, weights, config, "optim.fresh_lr_scale=10"), third=fake_third())
    tokenizer = (tmp_path / "run" / "tokenizer.json").stat().st_mtime_ns
    with pytest.raises(CheckpointError, match=r"optim.fresh_lr_scale was 10.0 .* resume with optim.fresh_lr_scale=10.0"):
        tt.train("3t", world_run(tmp_path, weights, config, "train.steps=3"), third=fake_third())
    assert (tmp_path / "run" / "tokenizer.json").stat().st_mtime_ns == tokenizer  # refused before any data work
    with pytest.raises(ConfigError, match="without model.init_from every parameter starts fresh"):
        load_config("3t", ["optim.fresh_lr_scale=10"])
