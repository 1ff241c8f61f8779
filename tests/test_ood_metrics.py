"""Case-level OOD evaluation metrics on hand-computed and synthetic examples."""

import math
import warnings

import pytest
import torch

from cmr_ood.ood.metrics import (
    at_threshold,
    aurc,
    case_calibration_error,
    confidence_from_scores,
    detection_metrics,
    evaluate_scores,
    failure_auroc,
    fit_threshold,
    plot_risk_coverage,
    risk_coverage,
)

INF = math.inf


@pytest.mark.parametrize("scores_id, scores_ood", [
    ([0.1, 0.2, 0.3], [0.4, 0.5]),
    ([100.0, 101.0, 102.0], [103.0, 104.0]),  # a sigmoid would squash all of these into ties at 1
    ([0.0, 1.0, 2.0], [3.0, INF, INF]),  # no heart found: +inf
])
def test_perfectly_separated_scores(scores_id, scores_ood):
    m = detection_metrics(scores_id, scores_ood)
    assert m == pytest.approx({"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0, "detection_error": 0.0})


def test_reversed_scores():
    m = detection_metrics([3.0, 4.0, INF], [0.0, 1.0, 2.0])
    assert m["auroc"] == pytest.approx(0.0)
    assert m["fpr95"] == pytest.approx(1.0)
    assert m["detection_error"] == pytest.approx(0.5)


def test_hand_computed_case_with_a_tie():
    # pairs (ood > id) + 0.5 ties: 2 + 2.5 + 3 of 9
    m = detection_metrics([0.1, 0.3, 0.5], [0.4, 0.5, 0.9])
    assert m["auroc"] == pytest.approx(7.5 / 9, abs=1e-6)
    # OOD positive, by decreasing score: (R, P) = (1/3, 1), (2/3, 2/3) at the tie 0.5, (1, 3/4)
    assert m["aupr_out"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3, abs=1e-6)
    # ID positive, by increasing score: (1/3, 1), (2/3, 1), (2/3, 2/3), (1, 3/5)
    assert m["aupr_in"] == pytest.approx((1 + 1 + 3 / 5) / 3, abs=1e-6)
    # threshold 0.5 (3rd of 3 ID scores) accepts OOD 0.4 and 0.5
    assert m["fpr95"] == pytest.approx(2 / 3)
    # best threshold 0.3: TPR 2/3, FPR 0
    assert m["detection_error"] == pytest.approx(1 / 6, abs=1e-6)


def test_auroc_equals_mann_whitney_and_fpr95_equals_the_threshold_rule():
    g = torch.Generator().manual_seed(1)
    scores_id = torch.randint(0, 30, (57,), generator=g).double()  # many ties
    scores_ood = torch.randint(10, 40, (43,), generator=g).double()
    m = detection_metrics(scores_id, scores_ood)
    diff = scores_ood[:, None] - scores_id[None, :]
    mann_whitney = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean()
    assert m["auroc"] == pytest.approx(float(mann_whitney), abs=1e-6)
    t = fit_threshold(scores_id)
    decision = at_threshold(torch.cat([scores_id, scores_ood]), torch.arange(100) >= 57, t)
    assert m["fpr95"] == pytest.approx(decision["fpr"])
    assert decision["tpr"] >= 0.95


@pytest.mark.parametrize("bad", [[], [0.1, math.nan]])
def test_empty_or_nan_scores_are_rejected(bad):
    with pytest.raises(ValueError, match="scores_ood"):
        detection_metrics([0.1, 0.2], bad)
    with pytest.raises(ValueError, match="scores_id_validation"):
        fit_threshold(bad)


@pytest.mark.parametrize("n", [1, 7, 19, 20, 21, 60, 100, 333])
def test_threshold_accepts_at_least_95_percent_and_is_the_smallest_such(n):
    scores = torch.randn(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    t = fit_threshold(scores, tpr=0.95)
    assert (scores <= t).double().mean() >= 0.95
    below = scores[scores < t]
    if below.numel():
        assert (scores <= below.max()).double().mean() < 0.95
    assert fit_threshold(torch.arange(20.0)) == 18.0  # 19th smallest of 20: exactly 95 %


def test_at_threshold_by_hand():
    scores = [0.1, 0.2, 0.6, 0.3, 0.9, INF]
    is_ood = [False, False, False, True, True, True]
    dice = [0.9, 0.8, 0.4, 0.7, math.nan, 0.0]
    out = at_threshold(scores, is_ood, threshold=0.5, dice=dice)
    assert out["tpr"] == pytest.approx(2 / 3)
    assert out["fpr"] == pytest.approx(1 / 3)
    assert out["detection_error"] == pytest.approx(0.5 * (1 / 3) + 0.5 * (1 / 3))
    assert out["coverage"] == pytest.approx(0.5)
    assert out["dice_accepted"] == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    assert out["dice_rejected"] == pytest.approx(0.2)  # 0.4 and 0.0; the unknown Dice is left out
    only_id = at_threshold([0.1, 0.9], [False, False], threshold=0.5)
    assert math.isnan(only_id["fpr"]) and only_id["tpr"] == 0.5 and math.isnan(only_id["dice_accepted"])


def test_failure_auroc():
    dice = [0.95, 0.9, 0.85, 0.6, 0.3]
    assert failure_auroc([0.1, 0.2, 0.3, 0.4, INF], dice) == pytest.approx(1.0)
    assert failure_auroc([0.5, 0.4, 0.3, 0.2, 0.1], dice) == pytest.approx(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(failure_auroc([0.1, 0.2, 0.3], [0.9, 0.95, 0.85]))  # no failure: one class


def test_risk_coverage_by_hand():
    coverage, risk = risk_coverage([1.0, 2.0, 3.0, 4.0], [0.9, 0.8, 0.5, 0.7])
    assert coverage.tolist() == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert risk.tolist() == pytest.approx([0.1, 0.15, 1 - 2.2 / 3, 1 - 2.9 / 4])
    area = aurc([1.0, 2.0, 3.0, 4.0], [0.9, 0.8, 0.5, 0.7])
    assert area["aurc"] == pytest.approx((0.1 + 0.15 + (1 - 2.2 / 3) + (1 - 2.9 / 4)) / 4)
    assert area["aurc_optimal"] == pytest.approx((0.1 + 0.15 + 0.2 + (1 - 2.9 / 4)) / 4)  # order 0.9, 0.8, 0.7, 0.5
    assert area["aurc_excess"] == pytest.approx(area["aurc"] - area["aurc_optimal"])


def test_risk_coverage_treats_ties_as_groups():
    scores, dice = [1.0, 1.0, 2.0, 2.0], [1.0, 0.5, 0.8, 0.2]
    coverage, risk = risk_coverage(scores, dice)
    assert coverage.tolist() == pytest.approx([0.5, 1.0])
    assert risk.tolist() == pytest.approx([0.25, 0.375])
    # ties broken at random in expectation: risks 0.25, 0.25, 1 - 2/3, 0.375 at k = 1..4
    assert aurc(scores, dice)["aurc"] == pytest.approx((0.25 + 0.25 + 1 / 3 + 0.375) / 4)
    # a constant score ranks nothing: the area is the risk at full coverage, whatever the order of the inputs
    assert aurc([0.0] * 4, dice)["aurc"] == pytest.approx(1 - 2.5 / 4)
    assert aurc(dice, dice)["aurc_excess"] > 0  # accepts the worst cases first
    assert aurc([-d for d in dice], dice)["aurc_excess"] == pytest.approx(0.0)  # the oracle's order


def test_confidence_from_scores():
    confidence = confidence_from_scores([-1.0, 1.0, 2.5, 3.0, 10.0, INF], [1.0, 2.0, 3.0])
    assert confidence.tolist() == pytest.approx([1.0, 1.0, 1 / 3, 1 / 3, 0.0, 0.0])


def test_case_calibration_error_by_hand():
    out = case_calibration_error([0.95, 0.95, 0.35, 0.35, 0.5], [0.9, 0.8, 0.5, 0.6, math.nan])
    assert float(out["ece"]) == pytest.approx(0.5 * 0.1 + 0.5 * 0.2)
    assert float(out["mce"]) == pytest.approx(0.2)
    assert out["bin_count"].sum() == 4
    with pytest.raises(ValueError, match="confidence must lie in"):
        case_calibration_error([1.5], [0.9])


def test_evaluate_scores_row():
    scores_id, scores_ood = [0.1, 0.2, 0.3, 0.25], [0.5, INF, 0.15]
    dice_id, dice_ood = [0.9, 0.85, 0.7, 0.88], [0.5, math.nan, 0.9]
    reference = [0.1, 0.2, 0.25, 0.3]
    row = evaluate_scores(scores_id, scores_ood, 0.3, dice_id, dice_ood, reference_scores=reference)
    assert row["auroc"] == pytest.approx(detection_metrics(scores_id, scores_ood)["auroc"])
    assert row["tpr_at_threshold"] == 1.0 and row["fpr_at_threshold"] == pytest.approx(1 / 3)
    assert row["coverage"] == pytest.approx(5 / 7)
    assert row["num_with_dice"] == 6 and row["failure_rate"] == pytest.approx(2 / 6)
    known_scores, known_dice = [0.1, 0.2, 0.3, 0.25, 0.5, 0.15], [0.9, 0.85, 0.7, 0.88, 0.5, 0.9]
    assert row["aurc"] == pytest.approx(aurc(known_scores, known_dice)["aurc"])
    assert row["failure_auroc"] == pytest.approx(failure_auroc(known_scores, known_dice))
    expected_ece = case_calibration_error(confidence_from_scores(known_scores, reference), known_dice)["ece"]
    assert row["case_ece"] == pytest.approx(float(expected_ece))
    bare = evaluate_scores(scores_id, scores_ood, 0.3)
    assert bare.keys() == row.keys()
    assert math.isnan(bare["aurc"]) and math.isnan(bare["case_ece"]) and math.isnan(bare["dice_accepted"])
    with pytest.raises(ValueError, match="dice_ood"):
        evaluate_scores(scores_id, scores_ood, 0.3, dice_ood=[0.5])


def test_plot_risk_coverage(tmp_path):
    g = torch.Generator().manual_seed(0)
    dice = torch.rand(40, generator=g)
    scores = {"good": -dice + 0.1 * torch.rand(40, generator=g), "random": torch.rand(40, generator=g)}
    path = plot_risk_coverage(scores, dice, tmp_path / "rc.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileExistsError):
        plot_risk_coverage(scores, dice, tmp_path / "rc.png")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_metrics_on_cuda():
    scores_id = torch.tensor([0.1, 0.2, 0.3], device="cuda")
    scores_ood = torch.tensor([0.4, INF], device="cuda")
    dice = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.1], device="cuda")
    row = evaluate_scores(scores_id, scores_ood, 0.3, dice[:3], dice[3:], reference_scores=scores_id)
    assert row["auroc"] == 1.0 and row["aurc_excess"] == pytest.approx(0.0)
    assert risk_coverage(torch.cat([scores_id, scores_ood]), dice)[1].device.type == "cuda"
