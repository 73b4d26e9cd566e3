"""Several third towers at once (model.thirds): one h listed is today's 3T to the bit, two h's train
every head of both and nothing of either h, each h gets its own cache (arrays and shards), models of
one h saved before the list existed still load, and bad lists are refused naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, fake_third, tiny_config
from test_third_pixels import counting, decoded_for_h, noise_shards
from threetowers import create_model, load_model, save_model
from threetowers.config import ConfigError, load_config
from threetowers.core.sets import CaptionedSet, LabelledSet
from threetowers.data.loader import build_train_data, online_third_size
from threetowers.eval.suite import evaluate
from threetowers.model.factory import build_thirds, load_model_weights
from threetowers.third import FrozenImageModel, Preprocessing, ThirdTower
from threetowers.third.store import EvalFeatures
from threetowers.towers.vit import VisionTransformer

PER_TERM = {"source": "checkpoint", "heads": "per_term"}


def section(**fields) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"


def thirds_config(*sections: dict, extra: tuple[str, ...] = ()):
    """A tiny 3T config whose h's are listed in model.thirds (the h's themselves are passed built)."""
    return load_config(None, TINY + ["model.method=3t", f"model.thirds=[{', '.join(section(**s) for s in sections)}]",
                                     *extra])


def small_h(seed: int, dim: int, size: int) -> ThirdTower:
    """A random frozen h of input size `size` (fake_third's is 16)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = VisionTransformer(image_size=size, patch_size=4, width=dim, depth=1, heads=2)
    return ThirdTower(FrozenImageModel(module, dim, Preprocessing(size), f"small-h-{seed}"))


def make_h(path: str) -> FrozenImageModel:
    """A `callable` source that ignores its path: two sections naming it with two paths are one h."""
    return FrozenImageModel(fake_third().module, 24, Preprocessing(16), "same-h")


def batch_of(n=8, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 16, 16, generator=g), "tokens": torch.randint(2, 64, (n, 12), generator=g)}


TWO = ({**PER_TERM, "path": "h1"}, {**PER_TERM, "path": "h2", "head_dim": 12})
TERMS_OF_TWO = {"image~text", "image_h~third_f", "text_h~third_g", "image_h.2~third_f.2", "text_h.2~third_g.2"}


# ----------------------------------------------------------------------------- K = 1 is today's 3T


def test_one_h_listed_in_thirds_is_todays_3t_to_the_bit():
    h, batch = fake_third(), batch_of()
    torch.manual_seed(0)
    today = create_model(tiny_config("3t", "model.third.heads=per_term"), third=h)
    torch.manual_seed(0)
    listed = create_model(thirds_config(PER_TERM), third=[h])
    assert list(today.state_dict()) == list(listed.state_dict())  # same names, same order: old checkpoints fit
    assert all(torch.equal(a, b) for a, b in zip(today.state_dict().values(), listed.state_dict().values()))
    for extra in ({}, {"third": h(batch["image"])}):  # h online, and h cached
        a, b = today({**batch, **extra}), listed({**batch, **extra})
        assert {k for k in a if k.startswith(("loss", "scale"))} == {k for k in b if k.startswith(("loss", "scale"))}
        assert {k for k in a if k.startswith("loss/")} == {"loss/image~text", "loss/image_h~third_f",
                                                           "loss/text_h~third_g"}
        assert torch.allclose(a["loss"], b["loss"], rtol=1e-6, atol=0)  # fp32 rounding at most; in fact equal
        assert float(a["loss"].detach()) == float(b["loss"].detach())


def test_a_model_saved_with_one_h_before_the_list_existed_loads_and_encodes_alike():
    """tests/data/k1_v638: a 3T model (heads per_term) saved by the code of 638c326, with its outputs."""
    root = Path(__file__).parent / "data" / "k1_v638"
    expected = load_file(str(root / "outputs.safetensors"))
    assert "thirds" not in json.loads((root / "model" / "model.json").read_text())
    model = load_model(root / "model")
    x, tokens, h = expected["x"], expected["tokens"], expected["h"]
    assert model.third_infos[0]["name"] == "fake-h" and model.num_third_pairs == 1
    assert torch.equal(model.encode_image(x), expected["image"]) and torch.equal(model.encode_text(tokens), expected["text"])
    assert torch.equal(model.encode_image_third(x, h), expected["image_third"])
    assert torch.equal(model.encode_text_third(tokens), expected["text_third"])
    with torch.no_grad():
        assert torch.equal(model({"image": x, "tokens": tokens, "third": h})["loss"].reshape(1), expected["loss"])
    model.attach_thirds([fake_third()])  # the h it was trained with: accepted
    with pytest.raises(ValueError, match="trained with third tower fake-h"):
        model.attach_thirds([fake_third(seed=5)])


# ----------------------------------------------------------------------------- K = 2: the model


def test_two_h_train_every_head_of_both_and_nothing_of_either_h():
    h1, h2 = fake_third(), small_h(7, 20, 8)
    torch.manual_seed(0)
    model = create_model(thirds_config(*TWO), third=[h1, h2])
    out = model(batch_of())
    assert {k[len("loss/"):] for k in out if k.startswith("loss/")} == TERMS_OF_TWO
    assert out["embeddings"]["image_h.2"].shape == (8, 12) and out["embeddings"]["third_f"].shape == (8, 24)
    # The default weights: (f, g) keeps 1/3, the four h terms share 2/3.
    weights = {t.name: t.weight for t in model.terms}
    assert weights["image~text"] == 1 / 3 and all(weights[n] == 1 / 6 for n in TERMS_OF_TWO - {"image~text"})
    expected = sum(weights[n] * out[f"loss/{n}"] for n in TERMS_OF_TWO)
    assert torch.allclose(out["loss"].detach(), expected, rtol=1e-6)
    out["loss"].backward()
    for k in (0, 1):
        for base in ("adapt_image", "adapt_text", "third_head_f", "third_head_g"):
            module = model.h_module(base, k)
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), (base, k)
    assert model.loss.log_scale.shape == (5,) and bool((model.loss.log_scale.grad != 0).all())
    for h in (h1, h2):
        assert all(not p.requires_grad and p.grad is None for p in h.parameters()) and not h.module.training
    assert not any(k.split(".")[0] in ("third", "third_2") for k in model.trainable_state_dict())
    shared = create_model(thirds_config(*TWO, extra=("loss.temperature=shared",)), third=[h1, h2])
    assert shared.loss.log_scale.shape == (1,)


def test_two_h_cached_side_by_side_give_the_loss_of_running_them():
    h1, h2 = fake_third(), small_h(7, 20, 8)
    model = create_model(thirds_config(*TWO), third=[h1, h2])
    batch = batch_of()
    online = model(batch)["loss"]
    cached = torch.cat([h1(batch["image"]), h2(batch["image"])], dim=1)
    assert torch.allclose(model({**batch, "third": cached})["loss"], online, rtol=1e-6)
    with pytest.raises(ValueError, match=r"expected \[B, 44\] for fake-h \(24\) \+ small-h-7 \(20\)"):
        model({**batch, "third": cached[:, :24]})


def test_two_h_save_and_load_and_the_mixing_sweep_per_h(tmp_path):
    h1, h2 = fake_third(), small_h(7, 20, 8)
    model = create_model(thirds_config(*TWO), third=[h1, h2]).eval()
    save_model(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    assert meta["third"] == meta["thirds"][0] and [t["name"] for t in meta["thirds"]] == ["fake-h", "small-h-7"]
    loaded = load_model(tmp_path / "m")  # without its h's (3T needs none at inference)
    x, tokens = batch_of(4)["image"], batch_of(4)["tokens"]
    assert torch.equal(loaded.encode_image(x), model.encode_image(x))
    assert torch.equal(loaded.encode_image_third(x, h2(x), k=1), model.encode_image_third(x, k=1))
    assert torch.equal(loaded.encode_text_third(tokens, k=1), model.encode_text_third(tokens, k=1))
    swapped = create_model(thirds_config(*TWO), third=[h1, small_h(8, 20, 8)])
    with pytest.raises(ValueError, match="trained with third tower small-h-7"):
        load_model_weights(swapped, tmp_path / "m")

    def tokenize(texts):
        return torch.tensor([[2 + (hash(w) % 60) for w in (t.split() * 12)[:12]] for t in texts])

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    tasks = {"zs": LabelledSet(images, np.array([0, 1, 2, 0, 1, 2]), ["red", "green", "blue"], ["a {}."]),
             "ret": CaptionedSet(images, [f"caption {i}" for i in range(6)], np.arange(6))}
    results = evaluate(loaded, tokenize, tasks, batch_size=4, mixing_alphas=[0.0, 1.0],
                       third_features=EvalFeatures([h1, h2]))
    assert {"zs/mix@1/top1", "zs/mix.2@1/top1", "ret/mix.2@0/i2t_R@1"} <= set(results)
    assert not any("mix.1@" in k or "mix.3@" in k for k in results)
    assert results["zs/mix.2@0/top1"] == results["zs/top1"]  # alpha 0: f and g alone, whichever h


def test_a_model_of_two_h_exports_as_open_clip_without_them(tmp_path):
    pytest.importorskip("open_clip")
    from test_export import CAPTIONS
    from threetowers import check_parity, export_open_clip
    from threetowers.data.tokenizer import Tokenizer

    cfg = thirds_config(*TWO, extra=("model.text.vocab_size=300",))
    model = create_model(cfg, third=[fake_third(), small_h(7, 20, 8)]).eval()
    save_model(model, tmp_path / "m")
    Tokenizer.train(CAPTIONS * 20, 300, cfg.model.text.context_length).save(tmp_path / "m" / "tokenizer.json")
    out = export_open_clip(tmp_path / "m", tmp_path / "oc")
    diff = check_parity(tmp_path / "m", out)
    assert diff["image"] <= 1e-5 and diff["text"] <= 1e-5


# ----------------------------------------------------------------------------- K = 2: the caches


def world_settings(tmp_path) -> list[str]:
    return ["data.world.num_pairs=64", "data.world.image_size=24", "train.batch_size=8", "model.text.vocab_size=300",
            f"data.cache_dir={tmp_path / 'cache'}", f"data.world.cache_dir={tmp_path / 'world'}",
            f"train.output_dir={tmp_path / 'run'}"]


def test_two_h_on_arrays_each_get_a_cache_of_running_that_h(tmp_path):
    h1, h2 = fake_third(), small_h(7, 20, 8)
    cached = build_train_data(thirds_config(*TWO, extra=tuple(world_settings(tmp_path))), third=[h1, h2])
    assert len({c.directory for c in cached.third_caches}) == 2
    online = build_train_data(thirds_config(*TWO, extra=(*world_settings(tmp_path), "data.third_embeddings=online")),
                              third=[h1, h2])
    a, b = next(iter(cached.batches(2))), next(iter(online.batches(2)))
    assert a["keys"] == b["keys"] and a["third"].shape == (8, 24 + 20) and "third" not in b
    expected = torch.cat([h1(b["image"]), h2(b["image"])], dim=1)  # each h at its own size, from the stored pixels
    assert torch.allclose(a["third"], expected.half().float())
    calls = counting(h1)  # h1 alone, as model.third: the cache of the pair's run is its own
    alone = build_train_data(load_config(None, TINY + ["model.method=3t", "model.third.source=checkpoint",
                                                       "model.third.path=h1", *world_settings(tmp_path)]), third=h1)
    assert calls == [] and alone.third_cache.directory == cached.third_caches[0].directory


def test_two_h_on_indexed_shards_each_get_embeddings_of_running_that_h(tmp_path):
    shards = noise_shards(tmp_path / "d", sizes=(6, 7))
    h1, h2 = fake_third(), small_h(7, 20, 8)
    cfg = thirds_config(*TWO, extra=(
        "data.source=webdataset", f"data.path={'::'.join(map(str, shards))}", f"data.cache_dir={tmp_path / 'cache'}",
        f"train.output_dir={tmp_path / 'run'}", "train.batch_size=4", "model.text.vocab_size=300"))
    data = build_train_data(cfg, third=[h1, h2])
    dirs = data.shards.embedding_dirs
    assert len(dirs) == 2 and dirs[0] != dirs[1] and data.shards.embedding_dir == dirs[0]
    for row in range(len(data)):
        image, _, _, _ = data.rows.read(row)
        for k, (h, size) in enumerate(((h1, 16), (h2, 8))):  # each h's pixels decoded at its own size
            assert torch.allclose(data.rows.third_embedding(row, k), h(decoded_for_h(image, size)[None])[0].half().float())
    batch = next(iter(data.batches(1)))
    assert batch["third"].shape == (4, 44)
    rows = [data.rows.read(r)[2] for r in range(len(data))]
    first = rows.index(batch["keys"][0])
    assert torch.equal(batch["third"][0], torch.cat([data.rows.third_embedding(first, 0),
                                                     data.rows.third_embedding(first, 1)]))
    calls = [counting(h1), counting(h2)]
    build_train_data(cfg, third=[h1, h2])  # built once: a second run reads them
    assert calls == [[], []]


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("overrides, message", [
    (["model.thirds=[]"], r"model.thirds=\[\] lists no third tower"),
    ([f"model.thirds=[{section(source='checkpoint', path='a')}, {section(source='checkpoint', path='a')}]"],
     r"model.thirds\[0\] and model.thirds\[1\] are the same h"),
    ([f"model.thirds=[{section(**TWO[0])}, {section(**TWO[1])}]", "loss.weights=[0.5,0.25,0.25]"],
     r"loss.weights=\[0.5, 0.25, 0.25\] must be five non-negative numbers \(fg, fh, gh, fh.2, gh.2\)"),
    ([f"model.thirds=[{section(**TWO[0])}]", "model.third.source=checkpoint"], "model.third and model.thirds are both set"),
    ([f"model.thirds=[{section(**TWO[0])}, {section(**TWO[1])}]", "model.method=lit"],
     "model.method=lit takes one third tower"),
    ([f"model.thirds=[{section(source='checkpoint', path='a', heads='both')}]"], r"model.thirds\[0\].heads='both'"),
    ([f"model.thirds=[{section(source='checkpoint', path='a', heds='none')}]"],
     r"unknown config key 'model.thirds\[0\].heds'.*did you mean model.thirds\[0\].heads"),
])
def test_bad_lists_are_refused_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, TINY + ["model.method=3t", *overrides])


def test_a_list_over_a_presets_h_replaces_it():
    cfg = load_config("3t", [f"model.thirds=[{section(**TWO[0])}, {section(**TWO[1])}]"])
    assert cfg.model.third.source == "none" and [t.path for t in cfg.model.thirds] == ["h1", "h2"]


def test_two_sections_that_build_one_h_are_refused_when_built():
    cfg = thirds_config({"source": "callable", "name": "test_thirds:make_h", "path": "a"},
                        {"source": "callable", "name": "test_thirds:make_h", "path": "b"})
    with pytest.raises(ConfigError, match=r"model.thirds\[0\] and model.thirds\[1\] are the same h \(same-h"):
        build_thirds(cfg)


def test_online_h_of_two_sizes_need_their_own_pixels_where_the_data_decodes_them(tmp_path):
    cfg = thirds_config(*TWO, extra=("data.source=csv", "data.path=pairs.csv", "data.third_embeddings=online"))
    with pytest.raises(ConfigError, match=r"input sizes \[8, 16\].*data.third_embeddings=cache"):
        online_third_size(cfg, [fake_third(), small_h(7, 20, 8)])


# ----------------------------------------------------------------------------- the demo


def test_the_demo_runs_3t_with_several_h_as_one_entry(tmp_path, monkeypatch):
    from test_demo import TINY_PRETRAIN, TINY_RUN
    from threetowers.apps.demo import load_demo_config, run_demo

    monkeypatch.setenv("THREETOWERS_CACHE", str(tmp_path / "cache"))
    demo = load_demo_config("demo/quick", [
        f"output_dir={tmp_path / 'demo'}", "seeds=[0]", "thirds=[object,object+scene]", "methods=[lit,3t]",
        "ceiling_shots=3", f"overrides=[{','.join(repr(o) for o in TINY_RUN)}]", TINY_PRETRAIN,
    ], run_overrides=["model.third.heads=shared"])
    run_demo(demo)
    out = tmp_path / "demo"
    report = json.loads((out / "results.json").read_text())
    runs = {(r["method"], r["third"]): r for r in report["runs"]}
    assert set(runs) == {("lit", "object"), ("3t", "object"), ("3t", "object+scene")}  # no LiT with two h's
    several = runs["3t", "object+scene"]
    assert several["mixing"] and set(several["mixing_h"]) == {"2"} and "mixing_h" not in runs["3t", "object"]
    assert not any("mix" in k for k in several["metrics"])
    assert set(report["ceilings"]) == {"object", "scene"}  # each h alone, the scene h too
    md = (out / "results.md").read_text()
    assert "| 3T (object+scene) |" in md and "3T (object+scene) − 3T (object)" in md
    # the run's h's: the two pretrained classifiers in the name's order, each with the demo's model.third.* ablation
    meta = json.loads((out / "runs" / "3t_object+scene_seed0" / "model" / "model.json").read_text())
    assert [(Path(t["path"]).parent.name, t["heads"]) for t in meta["config"]["model"]["thirds"]] == [
        ("pretrain_object", "shared"), ("pretrain_scene", "shared")]
    assert meta["third"] == meta["thirds"][0] and len({t["fingerprint"] for t in meta["thirds"]}) == 2


def test_the_demo_checks_several_h_before_any_work():
    from threetowers.apps.demo import load_demo_config

    with pytest.raises(ConfigError, match=r"demo thirds \['object\+sky'\] unknown"):
        load_demo_config("demo/quick", ["thirds=[object+sky]"])
    with pytest.raises(ConfigError, match="loss.weights=.*must be five"):
        load_demo_config("demo/quick", ["thirds=[object+scene]"], run_overrides=["loss.weights=[0.5,0.25,0.25]"])
