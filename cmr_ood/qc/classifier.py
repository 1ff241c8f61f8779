"""A learned quality-control classifier: the probability that a segmentation failed, from its plausibility
checks and measurements (:meth:`cmr_ood.qc.checks.QCReport.features`) and the case's OOD scores.

A segmentation *failed* when its mean Dice is below 0.8 or its LV blood-pool volume is off by more than
15 % (an end-systolic volume 15 % off moves a normal ejection fraction by about 5 points). The classifier is an
L2-regularised logistic regression on robustly standardised features: few parameters, so that it holds
on scanners it was not fitted on, and its weights say which evidence it uses.

    clf = QCClassifier(features=default_features(rows)).fit(rows)
    p = clf.predict(rows)                                 # failure probabilities
    oof = cross_validate(rows, features, folds=5, seed=0)  # out-of-fold probabilities, folds by subject, nested L2 choice
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchmetrics.functional.classification import binary_auroc

from cmr_ood.data.io import atomic_write
from cmr_ood.ood.scorer import file_digest
from cmr_ood.qc.linear import fit_logistic, robust_scaling, standardise

#: A segmentation with a mean Dice below this failed.
FAILURE_DICE = 0.8
#: A segmentation whose LV blood-pool volume is off by more than this fraction of the true volume failed.
FAILURE_LV_ERROR = 0.15
#: A failure probability from which a segmentation is taken as more likely failed than not.
LIKELY_FAILED = 0.5
#: The L2 weights that :func:`choose_l2` tries (on the case-averaged loss: 0.1 is mild, 100 strong shrinkage).
L2_GRID = (0.1, 1.0, 10.0, 100.0)
#: The OOD scores the classifier reads by default: a foreground output score and the feature distances.
DEFAULT_SCORES = ("entropy_fg", "kl_uniform_fg", "soft_dice_gap", "mahalanobis_bottleneck", "mahalanobis_enc2", "spectral_bottleneck", "position_fg")


def failed(row: dict, dice_threshold: float = FAILURE_DICE, lv_error: float = FAILURE_LV_ERROR) -> bool:
    """Whether a scored case (a row of ``scores.jsonl``, with ``dice``, ``qc`` and ``volumes_true``) failed."""
    dice = row.get("dice")
    if dice is None or (isinstance(dice, float) and math.isnan(dice)):
        raise ValueError(f"case {row.get('case')}: no Dice (no ground truth), so no failure label")
    true = row["volumes_true"]["lv_volume_ml"]
    return dice < dice_threshold or abs(row["qc"]["lv_volume_ml"] - true) > lv_error * true


def subject_of(row: dict) -> str:
    """The subject of a scored case (its image's folder), to keep a subject's cases in one fold."""
    return Path(row["case"].split("|")[0]).parent.name


def default_features(rows: list[dict], scores: tuple[str, ...] = DEFAULT_SCORES) -> list[str]:
    """Every plausibility-check value and flag and every measurement (``qc:`` names), and the OOD scores in
    ``scores`` (``score:`` names) that the rows have."""
    qc = sorted(rows[0]["qc"])
    have = [s for s in scores if s in rows[0].get("scores", {})]
    return [f"qc:{k}" for k in qc] + [f"score:{s}" for s in have]


def _value(row: dict, name: str) -> float:
    source, key = name.split(":", 1)
    table = row["qc"] if source == "qc" else row["scores"]
    if key not in table:
        raise KeyError(f"case {row.get('case')}: no feature '{name}'")
    value = table[key]
    return math.inf if value is None else float(value)  # a null score is "no heart found": maximally OOD


def feature_matrix(rows: list[dict], features: list[str]) -> torch.Tensor:
    """(cases, features) float64, raw (NaN where a check could not be measured, inf for no heart found)."""
    return torch.tensor([[_value(r, f) for f in features] for r in rows], dtype=torch.float64)


@dataclass
class QCClassifier:
    """L2-regularised logistic regression on features standardised with the median and the interquartile
    range of the cases it was fitted on; missing values (NaN) sit at the median, infinities at the clip."""

    features: list[str]
    l2: float = 1.0
    #: SHA-256 of the OOD state whose scores it was fitted on (the state also names the model's weights).
    ood_state_digest: str | None = None
    centre: torch.Tensor = field(default=None, repr=False)
    scale: torch.Tensor = field(default=None, repr=False)
    weights: torch.Tensor = field(default=None, repr=False)
    bias: torch.Tensor = field(default=None, repr=False)

    def fit(self, rows: list[dict], targets: list[bool] | None = None) -> QCClassifier:
        y = torch.tensor([failed(r) for r in rows] if targets is None else targets, dtype=torch.float64)
        if y.min() == y.max():
            raise ValueError("fitting needs failed and good segmentations among the cases")
        x = feature_matrix(rows, self.features)
        self.centre, self.scale = robust_scaling(x)
        self.weights, self.bias = fit_logistic(standardise(x, self.centre, self.scale), y, self.l2)
        return self

    def predict(self, rows: list[dict]) -> torch.Tensor:
        """Failure probability of each case."""
        if self.weights is None:
            raise RuntimeError("the QC classifier is not fitted")
        return torch.sigmoid(standardise(feature_matrix(rows, self.features), self.centre, self.scale) @ self.weights + self.bias)

    def predict_one(self, qc_features: dict[str, float], scores: dict[str, float] | None = None) -> float:
        """Failure probability of one segmentation, from its QC features and its OOD scores."""
        return float(self.predict([{"qc": qc_features, "scores": scores or {}}])[0])

    def evidence(self) -> list[tuple[str, float]]:
        """Features by the weight of their standardised value, largest first (positive: toward failure)."""
        return sorted(zip(self.features, self.weights.tolist()), key=lambda fw: -abs(fw[1]))

    def state_dict(self) -> dict:
        return {"features": list(self.features), "l2": self.l2, "ood_state_digest": self.ood_state_digest, "centre": self.centre,
                "scale": self.scale, "weights": self.weights, "bias": self.bias}

    def fitted_on(self, scorer) -> bool:
        """Whether its features are ``scorer``'s scores: it was fitted on the scores of one OOD state (one model, one
        temperature, one set of detector statistics)."""
        return not (self.ood_state_digest and scorer.state_path) or file_digest(scorer.state_path) == self.ood_state_digest

    def save(self, path: str | Path) -> str:
        return atomic_write(path, lambda tmp: torch.save(self.state_dict(), tmp), overwrite=True)

    @classmethod
    def load(cls, path: str | Path) -> QCClassifier:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls(**state)


def _folds_of_subjects(rows: list[dict], folds: int, seed: int) -> list[int]:
    """The fold of each row: subjects dealt into ``folds`` groups in a seeded order."""
    subjects = sorted({subject_of(r) for r in rows})
    if len(subjects) < folds:
        raise ValueError(f"{len(subjects)} subjects cannot make {folds} folds")
    order = torch.randperm(len(subjects), generator=torch.Generator().manual_seed(seed)).tolist()
    fold_of = {subjects[i]: k % folds for k, i in enumerate(order)}
    return [fold_of[subject_of(r)] for r in rows]


def choose_l2(rows: list[dict], features: list[str], folds: int = 5, seed: int = 0, grid: tuple[float, ...] = L2_GRID) -> float:
    """The L2 weight of the grid whose out-of-fold AUROC (folds by subject) on ``rows`` is highest; ties go to the
    stronger regularisation."""
    failures = torch.tensor([failed(r) for r in rows]).long()
    aurocs = {l2: float(binary_auroc(cross_validate(rows, features, folds, seed, l2), failures)) for l2 in sorted(grid, reverse=True)}
    return max(aurocs, key=aurocs.get)


def cross_validate(rows: list[dict], features: list[str], folds: int = 5, seed: int = 0, l2: float | None = None) -> torch.Tensor:
    """Out-of-fold failure probabilities: subjects are dealt into ``folds`` groups (seeded), and each group's
    cases are predicted by a classifier fitted on the other groups' cases only. Without ``l2``, each fit's L2
    weight is chosen by :func:`choose_l2` on its own training cases (nested: the held-out group plays no part)."""
    fold = _folds_of_subjects(rows, folds, seed)
    out = torch.full((len(rows),), math.nan, dtype=torch.float64)
    for k in range(folds):
        train = [r for r, f in zip(rows, fold) if f != k]
        test = [i for i, f in enumerate(fold) if f == k]
        weight = l2 if l2 is not None else choose_l2(train, features, folds=min(folds, len({subject_of(r) for r in train})), seed=seed)
        out[test] = QCClassifier(features, weight).fit(train).predict([rows[i] for i in test])
    return out
