"""The rule that picks the bundle's default OOD score (benchmarks/choose_default.py), on synthetic scored cases."""

import numpy as np
from helpers import REPO


def scored_cases():
    """10 subjects with 2 in-distribution cases and 4 shifted ones each (half failed, severities 3 and 5), 4
    far-OOD images; scores: the two baselines rank failures fairly well but miss the well segmented shifts,
    ``feature`` flags every shift whatever its Dice, ``capped`` is a baseline plus a bounded lift for shifted
    inputs, ``blind`` is the same but misses the far-OOD images, ``lucky`` is a baseline that happens to rank
    the failures of one subject perfectly."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(10):
        image = f"acdc/patient{s:03d}/patient{s:03d}_frame01.nii.gz"
        for _ in range(2):
            rows.append({"case": image, "kind": "id", "severity": 0, "dice": 0.9, "failed": False, "shifted": False})
        for i in range(4):
            failed = i % 2 == 0
            rows.append({"case": f"{image}|shift@{3 + 2 * (i // 2)}", "kind": "shift", "severity": 3 + 2 * (i // 2),
                         "dice": 0.5 if failed else 0.88, "failed": failed, "shifted": True})
    for k in range(4):
        rows.append({"case": f"far/{k}.png", "kind": "far", "severity": 0, "dice": None, "failed": True, "shifted": True})
    for r in rows:
        u = rng.random()
        output = r["failed"] + 2.0 * u + (5.0 if r["kind"] == "far" else 0.0)  # failures overlap good cases
        capped = output + 1.5 * r["shifted"]
        lucky = output + 10.0 * r["failed"] * r["case"].startswith("acdc/patient000")
        r["scores"] = {"entropy_fg": output, "msp_fg": 0.99 * output, "feature": 3.0 * r["shifted"] + u, "capped": capped,
                       "blind": capped - (20.0 if r["kind"] == "far" else 0.0), "lucky": lucky}
    return rows


def test_the_rule_keeps_only_scores_that_beat_the_baselines_on_failures_and_meet_the_detection_targets(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from choose_default import MIN_WIN_RATE, rank_scores

    ranking, eligible = rank_scores(scored_cases())
    figures = {r["score"]: r for r in ranking}
    assert figures["feature"]["shift_auroc"] > 0.99 and figures["feature"]["failure_auroc"] < figures["entropy_fg"]["failure_auroc"]
    assert figures["blind"]["far_auroc"] < 0.99
    assert figures["capped"]["win_rate"] >= MIN_WIN_RATE
    assert [r["score"] for r in eligible] == ["capped"]


def test_a_lead_that_one_subject_makes_does_not_survive_the_bootstrap(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from choose_default import MIN_WIN_RATE, beats_baselines, win_rate

    rows = [r for r in scored_cases() if r["dice"] is not None]
    assert beats_baselines(rows, "lucky") and beats_baselines(rows, "capped")
    assert win_rate(rows, "lucky") < MIN_WIN_RATE <= win_rate(rows, "capped")
