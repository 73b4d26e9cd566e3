"""One method with and without a setting, paired by seed, on every headline metric.

    python benchmarks/paired_ablation.py docs/results/demo_full_threads2/results.json docs/results/ablation_ema/results.json --method clip

`combine_ablation.py` judges the paper's claims, which compare methods; this answers "does this
setting help this method?": for each metric the ablation's run minus the main run of the same method,
h and seed, judged by the claims' rule (`apps/claims.py::judge`: held if the mean paired difference
exceeds 2 standard errors, contradicted below -2, not shown otherwise).
"""

import argparse
import json

from threetowers.apps.claims import judge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("main", help="the main demo's results.json")
    parser.add_argument("ablation", help="the ablation demo's results.json")
    parser.add_argument("--method", default="clip")
    parser.add_argument("--third", default=None, help="h's name (none for CLIP)")
    args = parser.parse_args()
    main_report, ablation = (json.load(open(path)) for path in (args.main, args.ablation))

    def per_seed(report: dict) -> dict[int, dict]:
        return {r["seed"]: r["metrics"] for r in report["runs"]
                if r["method"] == args.method and r["third"] == args.third}

    with_setting, without = per_seed(ablation), per_seed(main_report)
    if not with_setting or not without:
        raise SystemExit(f"no {args.method} runs (h={args.third}) in both reports")
    metrics = [m for m in next(iter(with_setting.values())) if isinstance(next(iter(with_setting.values()))[m], float)
               and "/mix" not in m and all(m in v for v in without.values())]
    print(f"| metric ({args.method}, seeds {sorted(set(with_setting) & set(without))}) | without | with | "
          "paired difference (points) | verdict |")
    print("|---|---|---|---|---|")
    for m in metrics:
        result = judge(with_setting, without, (m,), main_report.get("chance", {}))
        mean = lambda runs: 100 * sum(v[m] for v in runs.values()) / len(runs)  # noqa: E731
        print(f"| {m} | {mean(without):.1f} | {mean(with_setting):.1f} | {100 * result['difference']:+.1f} ± "
              f"{100 * result['se']:.1f} | {result['verdict']} |")


if __name__ == "__main__":
    main()
