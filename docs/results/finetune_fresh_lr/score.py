"""Scores of the fine-tuned runs (run.sh) on the prepared benchmark's retrieval sets, paired by seed."""
import json
import statistics
import sys

from threetowers import load_model
from threetowers.apps.prepared import PreparedBenchmark
from threetowers.data.tokenizer import load_tokenizer

out, data = (sys.argv[1:3] + ["/tmp/ft", "/tmp/clipart"][len(sys.argv[1:3]):])
bench = PreparedBenchmark.open(data, ["emoji_retrieval", "clipart_retrieval"])
rows = []
for seed in (0, 1, 2):
    for scale in (1, 10):
        directory = f"{out}/run_s{seed}_x{scale}/model"
        model = load_model(directory).eval()
        tokenizer = load_tokenizer(f"{directory}/tokenizer.json", model.cfg.model.text)
        metrics = bench.evaluate(model, tokenizer, model.cfg.model.image.image_size, 256)
        rows.append({"seed": seed, "fresh_lr_scale": scale, "metrics": metrics})
        print(seed, scale, {k: round(100 * v, 1) for k, v in metrics.items() if k.endswith("R@1")}, flush=True)
keys = [k for k in rows[0]["metrics"] if k.endswith("R@1")]
summary = {}
for k in keys + ["mean R@1"]:
    get = (lambda r: statistics.mean(r["metrics"][m] for m in keys)) if k == "mean R@1" else (lambda r, k=k: r["metrics"][k])
    diffs = [100 * (get(rows[2 * s + 1]) - get(rows[2 * s])) for s in range(3)]
    summary[k] = {"x1": [round(100 * get(rows[2 * s]), 2) for s in range(3)],
                  "x10": [round(100 * get(rows[2 * s + 1]), 2) for s in range(3)],
                  "paired_diff_mean": statistics.mean(diffs), "paired_diff_se": statistics.stdev(diffs) / 3 ** 0.5}
    print(f"{k}: x10 - x1 = {summary[k]['paired_diff_mean']:+.2f} ± {summary[k]['paired_diff_se']:.2f} points", flush=True)
json.dump({"runs": rows, "summary": summary}, open(f"{out}/fresh_lr.json", "w"), indent=1)
