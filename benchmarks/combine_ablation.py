"""The claims of an ablation that re-ran some methods, judged against the main demo's other runs.

    python benchmarks/combine_ablation.py docs/results/demo_full/results.json docs/results/ablation_per_term/results.json

An ablation such as `--run model.third.heads=per_term` re-runs only 3T (LiT and CLIP have no such
setting), so its own report has nothing to compare 3T with. This takes the main demo's runs, puts the
ablation's runs in place of those with the same method (same seeds: the pairing holds), and prints
the claims table by the demo's rule (`apps/claims.py`) and the ablation's own rows.
"""

import json
import sys

from threetowers.apps.claims import check_claims
from threetowers.apps.demo import ALIGNED
from threetowers.apps.report import aggregate, label, summary_table, table


def main() -> None:
    main_report, ablation = (json.load(open(path)) for path in sys.argv[1:3])
    replaced = {r["method"] for r in ablation["runs"]}
    runs = [r for r in main_report["runs"] if r["method"] not in replaced] + ablation["runs"]
    thirds = {t: ALIGNED[t] for t in dict.fromkeys(r["third"] for r in runs if r["third"])}
    print(summary_table(check_claims(runs, thirds, main_report["chance"]), list(thirds)))
    print()
    print(table(aggregate(ablation["runs"]), [label(m, t) for t in thirds for m in sorted(replaced)]))


if __name__ == "__main__":
    main()
