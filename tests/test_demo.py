"""The main job end to end on a tiny budget: world -> pretrain h -> cache -> train all -> eval -> report."""

import json

import pytest

from threetowers.apps.cli import main
from threetowers.apps.demo import claim_output_dir, load_demo_config, run_config, run_demo

TINY_RUN = [
    "model.embed_dim=16", "model.image.image_size=24", "model.image.patch_size=8", "model.image.width=32",
    "model.image.depth=1", "model.image.heads=2", "model.text.vocab_size=300", "model.text.context_length=16",
    "model.text.width=32", "model.text.depth=1", "model.text.heads=2", "data.world.num_pairs=256",
    "data.world.image_size=24", "train.steps=6", "train.batch_size=32", "optim.warmup_steps=2", "train.threads=1",
    "eval.num_images=60", "eval.retrieval_images=30", "eval.fewshot_shots=[2]", "eval.fewshot_seeds=[0]",
    "eval.mixing_alphas=[0.0,0.5,1.0]",
]
# The pretrained h's on a tiny budget (a demo setting; tests/test_readme.py shortens the README's demo with both).
TINY_PRETRAIN = ("pretrain_overrides=[model.image.image_size=24,train.steps=4,train.batch_size=32,pretrain.num_images=128,"
                 "pretrain.num_heldout=56,train.threads=1]")


def test_quick_demo_pipeline_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("THREETOWERS_CACHE", str(tmp_path / "cache"))
    demo = load_demo_config("demo/quick", [
        f"output_dir={tmp_path / 'demo'}", "seeds=[0,1]", "imagenet_input_size=32", "ceiling_shots=3",
        f"overrides=[{','.join(repr(o) for o in TINY_RUN)}]", TINY_PRETRAIN,
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
    # the ablations rerun this preset with the seeds to judge by, 3x its steps (6 here), each in its own folder
    assert "`threetowers demo --quick seeds=[0,1,2] thirds=[" in md
    assert "output_dir=demo-steps18 --run train.steps=18`" in md
    report = json.loads((out / "results.json").read_text())
    assert set(report["heldout_top1"]) == {"object", "scene"} and "Held-out top-1 of the pretrained h" in md
    for plot in ("metrics.png", "curves.png", "mixing.png", "world.png"):
        assert (out / plot).stat().st_size > 1000
    assert set(result["timings"]) == {"render", "pretrain", "ceilings", "runs", "cache", "train", "eval", "total"}
    # each h's ceiling on each zero-shot set, beside LiT's and 3T's zero-shot top-1 with it
    assert set(report["ceilings"]) == {"object", "scene", "imagenet"}
    assert all(0.0 <= v <= 1.0 for found in report["ceilings"].values() for v in found.values())
    assert set(report["ceilings"]["object"]) == {"zeroshot_object", "zeroshot_scene"}
    assert "## Each h's ceilings" in md and "| object | " in md


def test_a_demo_never_takes_over_another_demos_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    first = load_demo_config("demo/quick", [f"output_dir={out}"])
    claim_output_dir(first)
    claim_output_dir(load_demo_config("demo/quick", [f"output_dir={out}"]))  # the same demo again: goes on
    assert json.loads((out / "demo.json").read_text())["preset"] == "demo/quick"
    # the case: an ablation in the folder of an earlier demo would resume its runs and overwrite its report
    argv = ["demo", "--quick", f"output_dir={out}", "thirds=[scene]", "methods=[lit]", "--run", "train.steps=150"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "other settings" in err and "thirds ['object', 'scene', 'imagenet'] -> ['scene']" in err
    assert f"output_dir={out}-2" in err and sorted(p.name for p in out.iterdir()) == ["demo.json"]  # refused before any work
    with pytest.raises(FileExistsError, match="preset 'demo/quick' -> 'demo/full'"):
        claim_output_dir(load_demo_config("demo/full", [f"output_dir={out}"]))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="no demo record"):
        claim_output_dir(load_demo_config("demo/quick", [f"output_dir={tmp_path / 'mine'}"]))


def test_run_overrides_are_appended_and_checked_before_any_work():
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
    with pytest.raises(ConfigError, match="jobs=0: the runs to train at once must be 1 or more"):
        load_demo_config("demo/quick", ["jobs=0"])
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
    for _, _, _, run in HYPOTHESES:
        assert run.format(longer=2700) in plan  # longer: 3x the preset's 900 steps, never a no-op
    assert "`threetowers demo thirds=[imagenet] methods=[lit,3t] output_dir=demo-out-steps2700 --run train.steps=2700`" in plan
    quick = "\n".join(ablation_plan([failed], "threetowers demo --quick", 100, "demo-quick", seeds=1))
    assert "`threetowers demo --quick seeds=[0,1,2] thirds=[imagenet] methods=[3t] output_dir=demo-quick-per_term " in quick
    assert "--run train.steps=300`" in quick


def test_runs_at_once_give_the_same_results_as_one_at_a_time(tmp_path, monkeypatch):
    """jobs=2 runs each run in a worker process under its own threads: every metric, curve point and
    mixing value equals jobs=1's to the last bit; each worker's run writes its console to runs/<run>.log."""
    monkeypatch.setenv("THREETOWERS_CACHE", str(tmp_path / "cache"))
    rows = {}
    for jobs in (1, 2):
        demo = load_demo_config("demo/quick", [
            f"output_dir={tmp_path / f'jobs{jobs}'}", f"jobs={jobs}", "seeds=[0]", "thirds=[object]", "ceiling_shots=3",
            f"overrides=[{','.join(repr(o) for o in TINY_RUN)}]", TINY_PRETRAIN,
        ])
        result = run_demo(demo)
        rows[jobs] = result["runs"]
        assert {"runs", "total"} <= set(result["timings"])
    assert [(r["method"], r["third"]) for r in rows[2]] == [("clip", None), ("lit", "object"), ("3t", "object")]
    assert rows[1] == rows[2]
    runs = tmp_path / "jobs2" / "runs"
    assert sorted(p.name for p in runs.glob("*.log")) == ["3t_object_seed0.log", "clip_seed0.log", "lit_object_seed0.log"]
    assert "train done" in (runs / "clip_seed0.log").read_text()
    assert not list((tmp_path / "jobs1" / "runs").glob("*.log"))  # one at a time: the console is this process's
    # the demo's identity leaves jobs out: the same demo with another jobs goes on in its folder
    claim_output_dir(load_demo_config("demo/quick", [f"output_dir={tmp_path / 'jobs2'}", "jobs=1", "seeds=[0]",
                                                     "thirds=[object]", "ceiling_shots=3",
                                                     f"overrides=[{','.join(repr(o) for o in TINY_RUN)}]", TINY_PRETRAIN]))


def test_no_two_runs_build_one_cache_at_once_and_builders_start_first():
    from threetowers.apps.demo_runs import Run, _startable
    from threetowers.config import load_config

    cfg = load_config("tiny")
    runs = [Run("clip", None, 0, cfg), Run("lit", "object", 0, cfg, ("object",)), Run("3t", "object", 0, cfg, ("object",)),
            Run("3t", "object+scene", 0, cfg, ("object", "scene")), Run("3t", "scene", 0, cfg, ("scene",))]
    idx = list(range(len(runs)))
    # nothing built: the object and the scene builders first (the several-h run would build both: it waits)
    assert _startable(runs, idx, set(), set(), 2) == [2, 4]  # builders first, the longest (3T) of object's
    assert _startable(runs, idx, set(), set(), 5) == [2, 4, 0]  # then what reads no cache
    assert _startable(runs, idx, set(), {"object"}, 2) == [4, 0]  # object's is being built: its readers wait
    assert _startable(runs, idx, {"object"}, set(), 2) == [3, 0]  # object built: the several-h run builds scene
    assert _startable(runs, idx, {"object", "scene"}, set(), 9) == [0, 2, 3, 4, 1]  # all free, longest first


def test_a_failed_run_in_a_worker_names_the_run_and_its_log(tmp_path):
    from threetowers.apps.demo import WorldScoring
    from threetowers.apps.demo_runs import Run, run_all
    from threetowers.config import load_config

    bad = load_config("tiny", [f"train.output_dir={tmp_path / 'runs' / 'clip_seed0'}", "train.threads=1"])
    bad.data.source, bad.data.path = "csv", str(tmp_path / "missing.csv")  # passes the config, fails in the run
    good = load_config("tiny", [f"train.output_dir={tmp_path / 'runs' / 'other'}", "train.threads=1", "train.steps=1"])
    with pytest.raises(RuntimeError, match=r"seed 0: training clip failed .*clip_seed0\.log"):
        run_all([Run("clip", None, 0, bad), Run("clip", None, 1, good)], WorldScoring(good), 2, print)
    assert "missing.csv" in (tmp_path / "runs" / "clip_seed0.log").read_text()


def test_a_stop_signal_to_the_demo_alone_stops_its_runs_with_their_state_and_the_same_command_goes_on(tmp_path):
    """SIGTERM to the demo's own process (as a container's PID 1 gets it) reaches the runs in its worker
    processes: each stops at its next step with a checkpoint, no other run starts, exit status 75."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run = [o if not o.startswith("train.steps=") else "train.steps=150" for o in TINY_RUN] + ["train.log_every=5"]
    argv = [sys.executable, "-m", "threetowers", "demo", "--quick", f"output_dir={tmp_path / 'demo'}", "seeds=[0,1]",
            "thirds=[]", "methods=[clip]", f"overrides=[{','.join(repr(o) for o in run)}]"]  # no h: no pretraining
    env = {**os.environ, "THREETOWERS_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    logs = tmp_path / "demo" / "runs"
    deadline = time.time() + 120
    while time.time() < deadline and not any("step 5 " in p.read_text() for p in logs.glob("*.log")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "checkpointed where they stopped" in err and "Run the same command again to go on" in err
    assert list(logs.glob("*/checkpoints/step_*")), "a stopped run left its checkpoint"
    assert not (tmp_path / "demo" / "results.json").exists()
    again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    runs = json.loads((tmp_path / "demo" / "results.json").read_text())["runs"]
    assert [(r["method"], r["seed"]) for r in runs] == [("clip", 0), ("clip", 1)]
