"""The claims of an ablation that re-ran some methods, judged against the main demo's other runs.

    python benchmarks/combine_ablation.py docs/results/demo_full_threads2/results.json docs/results/ablation_per_term/results.json

An ablation such as `--run model.third.heads=per_term` re-runs only 3T (LiT and CLIP have no such
setting), so its own report has nothing to compare 3T with. This takes the main demo's runs, puts the
ablation's runs in place of those with the same method and h (same seeds: the pairing holds), and
prints the claims table by the demo's rule (`apps/claims.py`) and the ablation's own rows. Runs with
another h (`thirds=[imagenet_lite2] methods=[lit,3t]`) join the main runs as a column of their own.
"""

import json
import sys

from threetowers.apps.claims import Metrics, check_claims
from threetowers.apps.demo import aligned_of
from threetowers.apps.report import aggregate, label, summary_table, table


def main() -> None:
    main_report, ablation = (json.load(open(path)) for path in sys.argv[1:3])
    replaced = {(r["method"], r["third"]) for r in ablation["runs"]}
    runs = [r for r in main_report["runs"] if (r["method"], r["third"]) not in replaced] + ablation["runs"]
    thirds = {t: aligned_of(t) for t in dict.fromkeys(r["third"] for r in runs if r["third"])}
    # the claims' metrics as the main report recorded them (reports before they were recorded: the world's)
    metrics = Metrics(**{k: tuple(v) for k, v in main_report.get("claim_metrics", {}).items()})
    print(summary_table(check_claims(runs, thirds, main_report["chance"], metrics), list(thirds)))
    print()
    print(table(aggregate(ablation["runs"]), [label(m, t) for m, t in sorted(replaced, key=str)]))


if __name__ == "__main__":
    main()
