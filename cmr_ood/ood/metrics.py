"""Case-level evaluation of an OOD score (higher = more OOD), as in DESIGN.md "Evaluation".

Conventions: in-distribution (ID) cases are the positives for the true positive rate, and a case is
accepted when ``score <= threshold``. So TPR = fraction of ID cases accepted, FPR = fraction of OOD (or
shifted) cases accepted. Scores may be +inf (e.g. no heart found: maximally OOD); NaN is an error.
Dice values may be NaN where the ground truth is unknown; such cases are left out of the Dice-based metrics.

torchmetrics' binary curve metrics apply a sigmoid to predictions outside [0, 1], which would merge large
scores into ties and turns +inf into 1; the scores are therefore passed to them as dense ranks scaled to
[0, 1], which keeps their order and their ties exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_roc

from cmr_ood.data.io import atomic_write
from cmr_ood.ood.calibration import bin_sums, summarize_bins


def _vector(values, name: str, allow_nan: bool = False, device: torch.device | None = None) -> Tensor:
    """``values`` (tensor, array or sequence) as a non-empty 1-D float64 tensor; NaN only where allowed."""
    vector = torch.as_tensor(values, dtype=torch.float64, device=device).reshape(-1)
    if vector.numel() == 0:
        raise ValueError(f"{name} is empty")
    if not allow_nan and torch.isnan(vector).any():
        raise ValueError(f"{name} contains NaN ({int(torch.isnan(vector).sum())} of {vector.numel()} values)")
    return vector


def _same_length(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.numel() != b.numel():
        raise ValueError(f"{name_a} ({a.numel()} values) and {name_b} ({b.numel()} values) differ in length")


def _dense_ranks(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Ascending and descending dense ranks of ``scores`` scaled to [0, 1] (equal scores, equal ranks)."""
    distinct, inverse = torch.unique(scores, sorted=True, return_inverse=True)
    top = max(distinct.numel() - 1, 1)
    return inverse.double() / top, (top - inverse).double() / top


def fit_threshold(scores_id_validation, tpr: float = 0.95) -> float:
    """Threshold that accepts (score <= t) at least a fraction ``tpr`` of the ID validation cases.

    Rule: t is the k-th smallest of the n validation scores with k = ceil(tpr * n), i.e. the lower empirical
    quantile (numpy's "inverted_cdf" method). It is the smallest threshold among the validation scores that
    accepts >= tpr of them; with ties at t more than k cases are accepted.
    """
    scores = _vector(scores_id_validation, "scores_id_validation")
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must lie in (0, 1], got {tpr}")
    k = max(1, math.ceil(tpr * scores.numel() - 1e-9))  # the tolerance keeps e.g. 0.95 * 20 at 19
    return float(torch.kthvalue(scores, k).values)


def detection_metrics(scores_id, scores_ood, tpr: float = 0.95) -> dict[str, float]:
    """AUROC (OOD positive), AUPR-in (ID positive, scored by -score), AUPR-out (OOD positive), FPR at
    ``tpr`` TPR (key ``fpr95`` for 0.95: fraction of OOD cases accepted by :func:`fit_threshold` fitted on
    these ID scores) and detection error (min over thresholds of 0.5 (1 - TPR) + 0.5 FPR)."""
    scores_id = _vector(scores_id, "scores_id")
    scores_ood = _vector(scores_ood, "scores_ood", device=scores_id.device)
    is_ood = torch.cat([torch.zeros_like(scores_id), torch.ones_like(scores_ood)]).long()
    ascending, descending = _dense_ranks(torch.cat([scores_id, scores_ood]))
    # ROC of "accept when score <= t" over all t, ID positive: fpr = OOD accepted, tpr = ID accepted
    fpr_accept, tpr_accept, _ = binary_roc(descending, 1 - is_ood)
    threshold = fit_threshold(scores_id, tpr)
    return {
        "auroc": float(binary_auroc(ascending, is_ood)),
        "aupr_in": float(binary_average_precision(descending, 1 - is_ood)),
        "aupr_out": float(binary_average_precision(ascending, is_ood)),
        f"fpr{100 * tpr:g}": float((scores_ood <= threshold).double().mean()),
        "detection_error": float((0.5 * (1 - tpr_accept) + 0.5 * fpr_accept).min()),
    }


def at_threshold(scores, is_ood, threshold: float, dice=None) -> dict[str, float]:
    """Decision at a fitted threshold (accept when score <= threshold): TPR (ID accepted), FPR (OOD
    accepted), detection error 0.5 (1 - TPR) + 0.5 FPR, coverage (fraction of all cases accepted), and the
    mean Dice of the accepted and of the rejected cases (over cases with known Dice). NaN where undefined
    (no ID or no OOD cases, no accepted or rejected case with a Dice)."""
    scores = _vector(scores, "scores")
    is_ood = torch.as_tensor(is_ood, device=scores.device).reshape(-1).bool()
    _same_length(scores, is_ood, "scores", "is_ood")
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    accepted = scores <= threshold
    tpr = _mean(accepted[~is_ood].double())
    fpr = _mean(accepted[is_ood].double())
    out = {"threshold": float(threshold), "tpr": tpr, "fpr": fpr, "detection_error": 0.5 * (1 - tpr) + 0.5 * fpr,
           "coverage": _mean(accepted.double()), "dice_accepted": math.nan, "dice_rejected": math.nan}
    if dice is not None:
        dice = _vector(dice, "dice", allow_nan=True, device=scores.device)
        _same_length(scores, dice, "scores", "dice")
        known = ~torch.isnan(dice)
        out["dice_accepted"] = _mean(dice[accepted & known])
        out["dice_rejected"] = _mean(dice[~accepted & known])
    return out


def _mean(values: Tensor) -> float:
    return float(values.mean()) if values.numel() else math.nan


def _known_dice(scores, dice) -> tuple[Tensor, Tensor]:
    """Scores and Dice of the cases whose Dice is known (not NaN); ValueError if there are none."""
    scores = _vector(scores, "scores")
    dice = _vector(dice, "dice", allow_nan=True, device=scores.device)
    _same_length(scores, dice, "scores", "dice")
    known = ~torch.isnan(dice)
    if not known.any():
        raise ValueError("no case has a known Dice")
    return scores[known], dice[known]


def failure_auroc(scores, dice, failure_dice: float = 0.8) -> float:
    """AUROC of the score for detecting silent failures (Dice < ``failure_dice``) among cases with known
    Dice. NaN (no warning) when only one class is present: all cases fail or none does."""
    scores, dice = _known_dice(scores, dice)
    failed = (dice < failure_dice).long()
    if failed.min() == failed.max():
        return math.nan
    return float(binary_auroc(_dense_ranks(scores)[0], failed))


def _group_statistics(scores: Tensor, dice: Tensor) -> tuple[Tensor, Tensor]:
    """Cases grouped by equal score in increasing order: per group the count and the sum of Dice."""
    _, group = torch.unique(scores, sorted=True, return_inverse=True)
    groups = int(group.max()) + 1
    counts = torch.zeros(groups, dtype=torch.float64, device=scores.device).index_add_(0, group, torch.ones_like(dice))
    sums = torch.zeros(groups, dtype=torch.float64, device=scores.device).index_add_(0, group, dice)
    return counts, sums


def risk_coverage(scores, dice) -> tuple[Tensor, Tensor]:
    """Risk-coverage curve: cases with known Dice are accepted in order of increasing score, cases with
    equal scores together (one point per distinct score). Returns (coverage, risk) with risk = 1 - mean Dice
    of the accepted cases."""
    scores, dice = _known_dice(scores, dice)
    counts, sums = _group_statistics(scores, dice)
    accepted = counts.cumsum(0)
    return accepted / dice.numel(), 1 - sums.cumsum(0) / accepted


def _area_under_risk_coverage(scores: Tensor, dice: Tensor) -> float:
    """Mean selective risk over the coverages k / n, k = 1..n, with ties in the score broken at random (in
    expectation, exactly): within a group of equal scores each accepted case adds the group's mean Dice.
    Without ties this is the usual discrete AURC; a constant score gets 1 - mean Dice."""
    counts, sums = _group_statistics(scores, dice)
    ends = counts.cumsum(0)
    k = torch.arange(1, dice.numel() + 1, dtype=torch.float64, device=dice.device)
    group = torch.searchsorted(ends, k)  # the group that the k-th accepted case comes from
    before = ends[group] - counts[group]
    expected_sum = (sums.cumsum(0) - sums)[group] + (k - before) * sums[group] / counts[group]
    return float((1 - expected_sum / k).mean())


def aurc(scores, dice) -> dict[str, float]:
    """Area under the risk-coverage curve of the score (``aurc``), of the oracle that accepts cases in order
    of decreasing true Dice (``aurc_optimal``), and the difference (``aurc_excess`` >= 0; lower is better)."""
    scores, dice = _known_dice(scores, dice)
    area, optimal = _area_under_risk_coverage(scores, dice), _area_under_risk_coverage(-dice, dice)
    return {"aurc": area, "aurc_optimal": optimal, "aurc_excess": area - optimal}


def confidence_from_scores(scores, reference_scores) -> Tensor:
    """Per-case confidence in [0, 1] from any OOD score: the fraction of the reference (ID validation)
    scores that are >= the case's score. A case scored like typical ID cases gets a high confidence, one
    scored above every reference case gets 0; it is one minus the empirical CDF of the reference scores
    just below the score, so it is monotone (decreasing) in the score and needs no fitted scale."""
    scores = _vector(scores, "scores")
    reference = torch.sort(_vector(reference_scores, "reference_scores", device=scores.device)).values
    below = torch.searchsorted(reference, scores, side="left")  # reference scores strictly below each score
    return 1 - below.double() / reference.numel()


def case_calibration_error(confidence, dice, bins: int = 10) -> dict[str, Tensor]:
    """Case-level calibration: ECE (count-weighted mean |mean confidence - mean Dice| over equal-width
    confidence bins) and MCE (the largest such gap), with the per-bin data, over cases with known Dice."""
    confidence, dice = _known_dice(confidence, dice)
    if confidence.min() < 0 or confidence.max() > 1:
        raise ValueError(f"confidence must lie in [0, 1], got [{float(confidence.min())}, {float(confidence.max())}]")
    return summarize_bins(bin_sums(confidence, dice, bins))


def evaluate_scores(scores_id, scores_ood, threshold: float, dice_id=None, dice_ood=None, reference_scores=None,
                    tpr: float = 0.95, failure_dice: float = 0.8, bins: int = 10) -> dict[str, float]:
    """Every case-level figure for one score, as one flat dict (a table row).

    ``scores_id``/``scores_ood``: ID test cases and OOD or shifted cases; ``threshold``: fitted on ID
    validation scores (:func:`fit_threshold`); ``dice_id``/``dice_ood``: their Dice where known (NaN or
    None where not); ``reference_scores``: the ID validation scores, for :func:`confidence_from_scores`.
    Silent-failure and calibration figures pool ID and OOD cases with known Dice; figures that cannot be
    computed (no Dice, no reference scores) are NaN so that every row has the same keys.
    """
    scores_id = _vector(scores_id, "scores_id")
    scores_ood = _vector(scores_ood, "scores_ood", device=scores_id.device)
    scores = torch.cat([scores_id, scores_ood])
    is_ood = torch.cat([torch.zeros_like(scores_id), torch.ones_like(scores_ood)]).bool()
    dice = torch.cat([_optional_dice(dice_id, scores_id, "dice_id"), _optional_dice(dice_ood, scores_ood, "dice_ood")])

    row = {"num_id": scores_id.numel(), "num_ood": scores_ood.numel(), **detection_metrics(scores_id, scores_ood, tpr)}
    decision = at_threshold(scores, is_ood, threshold, dice)
    row.update({"threshold": decision["threshold"], "tpr_at_threshold": decision["tpr"], "fpr_at_threshold": decision["fpr"],
                "detection_error_at_threshold": decision["detection_error"], "coverage": decision["coverage"],
                "dice_accepted": decision["dice_accepted"], "dice_rejected": decision["dice_rejected"]})

    known = ~torch.isnan(dice)
    row.update({"num_with_dice": int(known.sum()), "failure_rate": _mean((dice[known] < failure_dice).double()),
                "failure_auroc": math.nan, "aurc": math.nan, "aurc_optimal": math.nan, "aurc_excess": math.nan,
                "case_ece": math.nan, "case_mce": math.nan})
    if known.any():
        row["failure_auroc"] = failure_auroc(scores, dice, failure_dice)
        row.update(aurc(scores, dice))
        if reference_scores is not None:
            calibration = case_calibration_error(confidence_from_scores(scores, reference_scores), dice, bins)
            row.update({"case_ece": float(calibration["ece"]), "case_mce": float(calibration["mce"])})
    return row


def _optional_dice(dice, scores: Tensor, name: str) -> Tensor:
    if dice is None:
        return torch.full_like(scores, math.nan)
    dice = _vector(dice, name, allow_nan=True, device=scores.device)
    _same_length(scores, dice, "its scores", name)
    return dice


def plot_risk_coverage(scores_by_name: Mapping[str, object], dice, path: str | Path, title: str = "Risk-coverage",
                       overwrite: bool = False) -> str:
    """Risk-coverage curves of several scores over the same cases in one PNG, with the oracle (accept by
    decreasing true Dice) for reference; the legend gives each AURC."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not scores_by_name:
        raise ValueError("no scores to plot")
    dice = _vector(dice, "dice", allow_nan=True)
    curves = {name: _vector(scores, f"scores '{name}'", device=dice.device) for name, scores in scores_by_name.items()}
    for name, scores in curves.items():
        _same_length(scores, dice, f"scores '{name}'", "dice")
    known = ~torch.isnan(dice)
    if not known.any():
        raise ValueError("no case has a known Dice")
    curves = {name: scores[known] for name, scores in curves.items()}
    dice = dice[known]
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for name, scores, style in [*((name, scores, {}) for name, scores in curves.items()),
                                ("oracle", -dice, {"linestyle": "--", "color": "gray"})]:
        coverage, risk = risk_coverage(scores, dice)
        area = aurc(scores, dice)["aurc"]
        ax.plot(coverage.cpu().numpy(), risk.cpu().numpy(), marker=".", markersize=3, label=f"{name} (AURC {area:.4f})", **style)
    ax.set(xlim=(0, 1), ylim=(0, None), xlabel="coverage (fraction of cases accepted)", ylabel="risk (1 - mean Dice of accepted)",
           title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), overwrite=overwrite)
    finally:
        plt.close(fig)
