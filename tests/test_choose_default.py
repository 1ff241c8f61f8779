"""The rule that picks the bundle's default OOD score (benchmarks/choose_default.py), on synthetic scored cases."""

import numpy as np
from helpers import REPO


def scored_cases():
    """20 in-distribution cases, 40 shifted (half failed) at severities 3 and 5, 4 far-OOD images; scores:
    the two baselines rank failures fairly well but miss the well segmented shifts, ``feature`` flags every
    shift whatever its Dice, ``capped`` is a baseline plus a bounded lift for shifted inputs, ``blind`` is
    the same but misses the far-OOD images."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(20):
        rows.append({"kind": "id", "severity": 0, "dice": 0.9, "failed": False, "shifted": False, "u": rng.random()})
    for i in range(40):
        failed = i % 2 == 0
        rows.append({"kind": "shift", "severity": 3 if i < 20 else 5, "dice": 0.5 if failed else 0.88, "failed": failed,
                     "shifted": True, "u": rng.random()})
    for _ in range(4):
        rows.append({"kind": "far", "severity": 0, "dice": None, "failed": True, "shifted": True, "u": rng.random()})
    for r in rows:
        output = r["failed"] + 2.0 * r["u"] + (5.0 if r["kind"] == "far" else 0.0)  # failures overlap good cases
        capped = output + 1.5 * r["shifted"]
        r["scores"] = {"entropy_fg": output, "msp_fg": 0.99 * output, "feature": 3.0 * r["shifted"] + r["u"], "capped": capped,
                       "blind": capped - (20.0 if r["kind"] == "far" else 0.0)}
    return rows


def test_the_rule_keeps_only_scores_that_beat_the_baselines_on_failures_and_meet_the_detection_targets(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from choose_default import rank_scores

    ranking, eligible = rank_scores(scored_cases())
    figures = {r["score"]: r for r in ranking}
    assert figures["feature"]["shift_auroc"] > 0.99 and figures["feature"]["failure_auroc"] < figures["entropy_fg"]["failure_auroc"]
    assert figures["blind"]["far_auroc"] < 0.99
    assert [r["score"] for r in eligible] == ["capped"]
