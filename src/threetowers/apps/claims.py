"""The paper's six claims, and the rule that decides each one from paired runs over seeds.

    C1  3T > LiT on retrieval
    C2  3T > CLIP on retrieval
    C3  3T > CLIP on classification
    C4  LiT > 3T on classification when h's labels match the task (JFT's role)
    C5  3T > LiT on classification with an h whose labels and domain both differ (ImageNet-21k's role)
    C6  3T > LiT on object classification with a scene-pretrained h (Places365's role)

Retrieval is the mean of I→T and T→I R@1; classification the zero-shot top-1 of the tasks named.
On the world these are its retrieval set and its object and scene sets; on a prepared benchmark
(`threetowers prepare clipart`) every retrieval set and every zero-shot set the demo reports
(`Metrics`): C4 and C6 need an h pretrained on the world's own labels, so they apply to the world only.

The rule. Runs of the same seed share the data order, so the two sides of a claim are paired by
seed: d_s = A_s − B_s, averaged over the claim's metrics. With n ≥ 3 seeds, the verdict is
**held** if mean(d) > 2·SE (SE = std(d) / √n), **contradicted** if mean(d) < −2·SE, and **not
shown** otherwise. **Not testable**: on every metric of the claim both sides are within 2× chance
(nothing was learned to compare). With fewer than 3 seeds there is no spread to judge: **not
judged**, whatever the difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RETRIEVAL = ("retrieval/i2t_R@1", "retrieval/t2i_R@1")
SEVERAL = "several"  # what the labels of several h's at once (3T with model.thirds) match: no one task, so C1-C3 only
ZS = {"object": "zeroshot_object/top1", "scene": "zeroshot_scene/top1"}
CLASSIFICATION = (ZS["object"], ZS["scene"])
MIN_SEEDS = 3
HELD, CONTRADICTED, NOT_SHOWN, NOT_TESTABLE, NOT_JUDGED = "held", "contradicted", "not shown", "not testable", "not judged"


@dataclass(frozen=True)
class Metrics:
    """The metrics that retrieval and classification claims average over."""

    retrieval: tuple[str, ...] = RETRIEVAL
    classification: tuple[str, ...] = CLASSIFICATION


WORLD = Metrics()


@dataclass(frozen=True)
class Claim:
    id: str
    text: str
    a: str  # method on the winning side: "3t" or "lit"
    b: str  # "lit" or "clip"
    metrics: tuple[str, ...]


# One row label per claim, whatever h (C4's task depends on h: the row says what the cells share).
SHORT = {"C1": "3T > LiT, retrieval", "C2": "3T > CLIP, retrieval", "C3": "3T > CLIP, classification",
         "C4": "LiT > 3T on the task h's labels match", "C5": "3T > LiT, h's labels and domain differ",
         "C6": "3T > LiT on objects, scene-pretrained h"}


def claims_for(third: str, aligned: str, metrics: Metrics = WORLD) -> list[Claim]:
    """The claims that apply to an h whose labels match `aligned` ("object", "scene" or "none")."""
    out = [Claim("C1", "3T > LiT on retrieval", "3t", "lit", metrics.retrieval),
           Claim("C2", "3T > CLIP on retrieval", "3t", "clip", metrics.retrieval),
           Claim("C3", "3T > CLIP on classification", "3t", "clip", metrics.classification)]
    if aligned in ZS:
        out.append(Claim("C4", f"LiT > 3T on {aligned} classification: h's labels match the task", "lit", "3t",
                         (ZS[aligned],)))
    if aligned == "none":
        out.append(Claim("C5", "3T > LiT on classification: h's labels and domain differ", "3t", "lit",
                         metrics.classification))
    if aligned == "scene":
        out.append(Claim("C6", "3T > LiT on object classification with a scene-pretrained h", "3t", "lit",
                         (ZS["object"],)))
    return [c for c in out if c.metrics]  # a benchmark without zero-shot sets has no classification claims


def judge(a: dict[int, dict], b: dict[int, dict], metrics: tuple[str, ...], chance: dict[str, float]) -> dict:
    """The verdict of "a > b" from per-seed metrics {seed: {metric: value}} (the rule above)."""
    seeds = sorted(set(a) & set(b))
    diffs = np.array([np.mean([a[s][m] - b[s][m] for m in metrics]) for s in seeds])
    n = len(seeds)
    mean = float(diffs.mean()) if n else math.nan
    se = float(diffs.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    at_chance = all(max(np.mean([a[s][m] for s in seeds]), np.mean([b[s][m] for s in seeds])) <= 2 * chance[m]
                    for m in metrics if m in chance) and all(m in chance for m in metrics)
    if at_chance:
        verdict = NOT_TESTABLE
    elif n < MIN_SEEDS:
        verdict = NOT_JUDGED
    elif mean > 2 * se:
        verdict = HELD
    elif mean < -2 * se:
        verdict = CONTRADICTED
    else:
        verdict = NOT_SHOWN
    return {"verdict": verdict, "difference": mean, "se": se, "seeds": n}


def check_claims(runs: list[dict], thirds: dict[str, str], chance: dict[str, float],
                 metrics: Metrics = WORLD) -> list[dict]:
    """Every claim for every h that has the runs it needs. `runs`: the demo's run records."""
    by = {}
    for run in runs:
        by.setdefault((run["method"], run["third"] if run["method"] != "clip" else None), {})[run["seed"]] = run["metrics"]
    out = []
    for third, aligned in thirds.items():
        for claim in claims_for(third, aligned, metrics):
            a, b = by.get((claim.a, third)), by.get((claim.b, None if claim.b == "clip" else third))
            if not a or not b or any(m not in r for r in (*a.values(), *b.values()) for m in claim.metrics):
                continue
            out.append({"id": claim.id, "claim": claim.text, "third": third, **judge(a, b, claim.metrics, chance)})
    return out


def summary_table(checked: list[dict], thirds: list[str]) -> str:
    """C1–C6 × h: the verdict, and the mean paired difference ± its standard error in points."""
    if not checked:  # e.g. a demo of 3T alone (an ablation judged against another demo's runs)
        return ("No claim is checked here: each compares two of CLIP, LiT and 3T, and this demo did not run both "
                "sides of any (`benchmarks/combine_ablation.py` judges such runs against another demo's).")
    cell = {(c["id"], c["third"]): c for c in checked}
    texts = {c["id"]: SHORT[c["id"]] for c in checked}
    lines = ["| claim | " + " | ".join(f"h = {t}" for t in thirds) + " |", "|---" * (len(thirds) + 1) + "|"]
    for cid in sorted(texts):
        row = []
        for third in thirds:
            c = cell.get((cid, third))
            if c is None:
                row.append("–")
            elif math.isnan(c["se"]):
                row.append(f"{c['verdict']} ({100 * c['difference']:+.1f})")
            else:
                row.append(f"**{c['verdict']}** ({100 * c['difference']:+.1f} ± {100 * c['se']:.1f})"
                           if c["verdict"] == HELD else f"{c['verdict']} ({100 * c['difference']:+.1f} ± {100 * c['se']:.1f})")
        lines.append(f"| {cid} {texts[cid]} | " + " | ".join(row) + " |")
    return "\n".join(lines)
