"""The verdict rule for the paper's claims: paired over seeds, held only beyond 2 standard errors."""

import math

from threetowers.apps.claims import (
    CONTRADICTED, HELD, NOT_JUDGED, NOT_SHOWN, NOT_TESTABLE, check_claims, claims_for, judge, summary_table,
)

CHANCE = {"zeroshot_object/top1": 1 / 28, "zeroshot_scene/top1": 1 / 11, "retrieval/i2t_R@1": 1 / 500,
          "retrieval/t2i_R@1": 1 / 500}
M = ("retrieval/i2t_R@1",)


def per_seed(values: list[float], metric: str = M[0]) -> dict[int, dict]:
    return {s: {metric: v} for s, v in enumerate(values)}


def test_a_difference_inside_the_spread_is_never_held():
    a, b = per_seed([0.50, 0.30, 0.41]), per_seed([0.40, 0.40, 0.40])  # mean +0.003, spread ~0.06
    assert judge(a, b, M, CHANCE)["verdict"] == NOT_SHOWN


def test_a_consistent_paired_difference_is_held_even_when_the_sides_vary_a_lot():
    a, b = per_seed([0.20, 0.60, 0.41]), per_seed([0.18, 0.57, 0.39])  # every seed +0.02..0.03
    out = judge(a, b, M, CHANCE)
    assert out["verdict"] == HELD and math.isclose(out["difference"], 0.07 / 3) and out["seeds"] == 3
    assert judge(b, a, M, CHANCE)["verdict"] == CONTRADICTED


def test_both_sides_within_twice_chance_is_not_testable():
    z = ("zeroshot_object/top1",)
    a, b = per_seed([0.06, 0.07, 0.065], z[0]), per_seed([0.03, 0.03, 0.035], z[0])  # all below 2/28 = 0.071
    assert judge(a, b, z, CHANCE)["verdict"] == NOT_TESTABLE
    a = per_seed([0.20, 0.21, 0.22], z[0])  # one side learned: testable, and held
    assert judge(a, b, z, CHANCE)["verdict"] == HELD


def test_one_or_two_seeds_are_never_judged():
    assert judge(per_seed([0.9]), per_seed([0.1]), M, CHANCE)["verdict"] == NOT_JUDGED
    assert judge(per_seed([0.9, 0.8]), per_seed([0.1, 0.2]), M, CHANCE)["verdict"] == NOT_JUDGED


def test_each_h_gets_its_claims_and_the_table_lists_them():
    assert [c.id for c in claims_for("object", "object")] == ["C1", "C2", "C3", "C4"]
    assert [c.id for c in claims_for("scene", "scene")] == ["C1", "C2", "C3", "C4", "C6"]
    assert [c.id for c in claims_for("imagenet", "none")] == ["C1", "C2", "C3", "C5"]
    metrics = {"retrieval/i2t_R@1": 0.3, "retrieval/t2i_R@1": 0.3, "zeroshot_object/top1": 0.3,
               "zeroshot_scene/top1": 0.5}
    runs = [{"method": "clip", "third": None, "seed": s, "metrics": dict(metrics)} for s in range(3)]
    for s in range(3):
        runs.append({"method": "lit", "third": "imagenet", "seed": s, "metrics": {**metrics, "zeroshot_scene/top1": 0.7}})
        runs.append({"method": "3t", "third": "imagenet", "seed": s,
                     "metrics": {**metrics, "retrieval/i2t_R@1": 0.4 + 0.01 * s, "retrieval/t2i_R@1": 0.4}})
    checked = {c["id"]: c for c in check_claims(runs, {"imagenet": "none"}, CHANCE)}
    assert checked["C1"]["verdict"] == HELD and checked["C2"]["verdict"] == HELD
    assert checked["C3"]["verdict"] == NOT_SHOWN  # identical classification: no difference at all
    assert checked["C5"]["verdict"] == CONTRADICTED  # LiT wins scenes by 20 points on every seed
    table = summary_table(list(checked.values()), ["imagenet"])
    assert "| C1 3T > LiT, retrieval | **held** (+10.5 ± 0.3) |" in table and "C5 3T > LiT, h's labels" in table


def test_a_demo_of_one_method_says_no_claim_is_checked_instead_of_an_empty_table():
    runs = [{"method": "3t", "third": "imagenet", "seed": s, "metrics": {"retrieval/i2t_R@1": 0.4}} for s in range(3)]
    checked = check_claims(runs, {"imagenet": "none"}, CHANCE)
    assert checked == []
    assert summary_table(checked, ["imagenet"]).startswith("No claim is checked here")
