"""Object h pretraining recipe vs its ceiling on the demo's zero-shot object set (50 shots/class probe)."""
import sys, time, json
from dataclasses import replace
import threetowers.world.tasks as T
from threetowers.config import load_config
from threetowers.training.pretrain import pretrain
from threetowers.apps.demo import h_ceilings, world_overrides
from threetowers.eval.tasks import build_tasks
from threetowers.third.store import EvalFeatures
from threetowers.third.tower import load_third_tower
from threetowers.world import World

kind, lo, hi, steps, extra = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
T._RECIPES[("labelled", kind)] = replace(T._RECIPES[("labelled", kind)], contrast=(lo, hi))
out = f"/tmp/exp/{kind}_{lo}_{hi}_{steps}_{'_'.join(extra).replace('=','-')}"
wc = f"/tmp/exp/world_{kind}_{lo}_{hi}"
base = load_config("demo/base", [f"data.world.cache_dir={wc}", "eval.tasks=[zeroshot_object,zeroshot_scene]"])
t0 = time.time()
cfg = load_config("demo/pretrain", [f"pretrain.dataset=world_{kind}", f"train.output_dir={out}", f"train.steps={steps}",
                                   *world_overrides(base), "--resume" if False else "train.resume=never", *extra])
res = pretrain(cfg)
t1 = time.time()
tasks = build_tasks(base, ["zeroshot_object", "zeroshot_scene"])
h = load_third_tower(load_config("demo/base", ["model.method=3t", "model.third.source=checkpoint", f"model.third.path={out}/model"]).model.third)
c = h_ceilings(h, World(base.data.world), tasks, EvalFeatures(), 256, 50)
print(json.dumps({"kind": kind, "contrast": [lo, hi], "steps": steps, "extra": extra, "heldout": res["heldout_top1"],
                  "ceilings": c, "pretrain_s": round(t1 - t0, 1)}), flush=True)
