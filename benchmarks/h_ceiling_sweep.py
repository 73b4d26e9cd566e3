"""One pretraining recipe of a demo h against its ceilings: how the object h's recipe was chosen (issue 25).

    python benchmarks/h_ceiling_sweep.py object 0.15 0.45 300     # the recipe before issue 25
    python benchmarks/h_ceiling_sweep.py object 0.15 1.0 600      # the one chosen
    python benchmarks/h_ceiling_sweep.py object 0.15 1.0 600 optim.lr=0.002   # extra pretrain overrides

Pretrains the demo's classifier (`demo/pretrain`) on the world's labelled set of KIND with the
background contrast drawn from [LOW, HIGH] for STEPS steps, then measures its ceilings exactly as
the demo does (`apps.demo.h_ceilings`: a linear probe on h's pre-logits, 50 images per class of the
evaluation recipe, tested on the zero-shot sets). Prints one JSON line: held-out top-1 on h's own
labels, the ceilings, the pretraining seconds. Each recipe renders into a world cache of its own
(`--out`), so no variant reads another's pictures. Results of the sweep that chose the recipe:
docs/results/h_ceilings/object_h_recipe.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import threetowers.world.tasks as world_tasks  # noqa: E402
from threetowers.apps.demo import h_ceilings, world_overrides  # noqa: E402
from threetowers.config import load_config  # noqa: E402
from threetowers.eval.tasks import build_tasks  # noqa: E402
from threetowers.third.store import EvalFeatures  # noqa: E402
from threetowers.third.tower import load_third_tower  # noqa: E402
from threetowers.training.pretrain import pretrain  # noqa: E402
from threetowers.world import World  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["object", "scene"])
    parser.add_argument("low", type=float)
    parser.add_argument("high", type=float)
    parser.add_argument("steps", type=int)
    parser.add_argument("overrides", nargs="*", help="extra key=value for the pretraining run")
    parser.add_argument("--out", type=Path, default=Path("/tmp/h_ceiling_sweep"))
    args = parser.parse_args()
    key = ("labelled", args.kind)
    world_tasks._RECIPES[key] = replace(world_tasks._RECIPES[key], contrast=(args.low, args.high))
    run = args.out / f"{args.kind}_{args.low}_{args.high}_{args.steps}_{'_'.join(args.overrides).replace('=', '-')}"
    base = load_config("demo/base", [f"data.world.cache_dir={args.out / f'world_{args.low}_{args.high}'}"])
    t0 = time.perf_counter()
    result = pretrain(load_config("demo/pretrain", [
        f"pretrain.dataset=world_{args.kind}", f"train.output_dir={run}", f"train.steps={args.steps}",
        "train.resume=never", *world_overrides(base), *args.overrides]))
    seconds = time.perf_counter() - t0
    tasks = build_tasks(base, ["zeroshot_object", "zeroshot_scene"])
    h = load_third_tower(load_config("demo/base", ["model.method=3t", "model.third.source=checkpoint",
                                                   f"model.third.path={run / 'model'}"]).model.third)
    ceilings = h_ceilings(h, World(base.data.world), tasks, EvalFeatures(), base.eval.batch_size)
    print(json.dumps({"kind": args.kind, "contrast": [args.low, args.high], "steps": args.steps,
                      "extra": args.overrides, "heldout": result["heldout_top1"], "ceilings": ceilings,
                      "pretrain_s": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
