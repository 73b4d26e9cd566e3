"""The main job end to end on a tiny budget: world -> pretrain h -> cache -> train all -> eval -> report."""

import json

from threetowers.apps.demo import load_demo_config, run_config, run_demo

TINY_RUN = [
    "model.embed_dim=16", "model.image.image_size=24", "model.image.patch_size=8", "model.image.width=32",
    "model.image.depth=1", "model.image.heads=2", "model.text.vocab_size=300", "model.text.context_length=16",
    "model.text.width=32", "model.text.depth=1", "model.text.heads=2", "data.world.num_pairs=256",
    "data.world.image_size=24", "train.steps=6", "train.batch_size=32", "optim.warmup_steps=2", "train.threads=1",
    "eval.num_images=60", "eval.retrieval_images=30", "eval.fewshot_shots=[2]", "eval.fewshot_seeds=[0]",
    "eval.mixing_alphas=[0.0,0.5,1.0]",
]


def test_quick_demo_pipeline_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("THREETOWERS_CACHE", str(tmp_path / "cache"))
    demo = load_demo_config("demo/quick", [
        f"output_dir={tmp_path / 'demo'}", "seeds=[0,1]", "imagenet_input_size=32",
        f"overrides=[{','.join(repr(o) for o in TINY_RUN)}]",
        "pretrain_overrides=[model.image.image_size=24,train.steps=4,train.batch_size=32,pretrain.num_images=128,"
        "pretrain.num_heldout=56,train.threads=1]",
    ])
    result = run_demo(demo)
    out = tmp_path / "demo"
    runs = json.loads((out / "results.json").read_text())["runs"]
    labels = {(r["method"], r["third"]) for r in runs}
    assert ("clip", None) in labels and ("lit", "object") in labels and ("3t", "scene") in labels
    assert len(runs) == 2 * len(labels)  # every configuration once per seed
    for run in runs:
        assert 0.0 <= run["metrics"]["zeroshot_object/top1"] <= 1.0
        assert "retrieval/t2i_R@1" in run["metrics"] and "fewshot_scene/2shot" in run["metrics"]
        assert run["curve"], "training curve recorded"
        assert bool(run["mixing"]) == (run["method"] == "3t")
    md = (out / "results.md").read_text()
    assert "The paper's claims" in md and "3T (object)" in md and "| C1 3T > LiT, retrieval |" in md
    assert "2 seed(s): there is no spread" in md and "**held**" not in md  # two seeds judge nothing
    for plot in ("metrics.png", "curves.png", "mixing.png", "world.png"):
        assert (out / plot).stat().st_size > 1000
    assert set(result["timings"]) == {"render", "pretrain", "cache", "train", "eval"}


def test_run_overrides_are_appended_and_checked_before_any_work():
    import pytest

    from threetowers.config import ConfigError

    demo = load_demo_config("demo/quick", ["seeds=[3]"], run_overrides=["loss.weights=[0.5,0.25,0.25]"])
    assert demo.seeds == [3] and demo.overrides[-1] == "loss.weights=[0.5,0.25,0.25]"
    assert "train.steps=100" in demo.overrides  # the preset's own overrides are kept
    with pytest.raises(ConfigError, match="did you mean loss.weights"):
        load_demo_config("demo/quick", run_overrides=["loss.wieghts=1"])
    heads = load_demo_config("demo/quick", ["methods=[clip,3t]"], run_overrides=["model.third.heads=per_term"])
    assert run_config(heads, "3t", "object", 0, ["model.third.source=checkpoint", "model.third.path=h"]
                      ).model.third.heads == "per_term"
    assert run_config(heads, "clip", None, 0).model.third.heads == "none"  # CLIP has no h to change
    with pytest.raises(ConfigError, match="model.method=lit has one term"):  # every method's run is checked
        load_demo_config("demo/quick", ["methods=[lit,3t]"], run_overrides=["model.third.heads=per_term"])
    with pytest.raises(ConfigError, match="--run key=value"):
        load_demo_config("demo/full", ["overrides=[loss.weights=[0.5,0.25,0.25]]"])
    gpu = load_demo_config("demo/gpu")  # every run of the GPU preset is a valid config (checked without a GPU)
    assert run_config(gpu, "3t", "object", 0, ["model.third.source=checkpoint", "model.third.path=h"]
                      ).train.batch_size == 1024


def test_failed_claims_get_hypotheses_with_their_ablation_commands():
    from threetowers.apps.report import HYPOTHESES, ablation_plan

    held = {"id": "C1", "claim": "3T > LiT on retrieval", "third": "object", "difference": 0.1, "se": 0.01,
            "verdict": "held"}
    assert ablation_plan([held]) == []
    failed = {**held, "third": "imagenet", "verdict": "not shown"}
    plan = "\n".join(ablation_plan([held, failed]))
    assert "1 of 2 checks (C1 h=imagenet: not shown)" in plan and "thirds=[imagenet]" in plan
    assert "thirds=[imagenet,object]" not in plan and "seeds=[0]" not in plan  # ablations that decide need seeds
    for _, _, run in HYPOTHESES:
        assert run in plan
