"""The learned QC classifier on synthetic scored cases with a known relation between features and failure."""

import math

import pytest
import torch

from cmr_ood.ood.metrics import detection_metrics
from cmr_ood.qc import classifier as qc_classifier
from cmr_ood.qc.classifier import QCClassifier, cross_validate, default_features, failed, subject_of


def _rows(n=120, seed=0):
    """Cases of 12 subjects: failure is driven by a 'ring' check value and an OOD score, plus a noise feature."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        bad = i % 3 == 0
        ring = float(torch.normal(0.7 if bad else 0.95, 0.08, (1,), generator=g))
        entropy = float(torch.normal(0.4 if bad else 0.2, 0.08, (1,), generator=g))
        noise = float(torch.randn(1, generator=g))
        true_lv = 150.0
        rows.append({"case": f"acdc/training/patient{i % 12:03d}/patient{i % 12:03d}_frame01.nii.gz|noise|{i}",
                     "dice": 0.6 if bad else 0.9, "volumes_true": {"lv_volume_ml": true_lv},
                     "qc": {"check/ring": ring, "pass/ring": float(ring > 0.75), "noise": noise, "lv_volume_ml": true_lv},
                     "scores": {"entropy_fg": entropy, "mahalanobis_bottleneck": noise}})
    return rows


def test_failed_uses_dice_and_the_relative_lv_volume_error():
    row = {"dice": 0.9, "qc": {"lv_volume_ml": 100.0}, "volumes_true": {"lv_volume_ml": 100.0}}
    assert not failed(row)
    assert failed({**row, "dice": 0.79})
    assert failed({**row, "qc": {"lv_volume_ml": 116.0}})      # 16 % too large
    assert not failed({**row, "qc": {"lv_volume_ml": 86.0}})   # 14 % too small
    with pytest.raises(ValueError, match="no Dice"):
        failed({**row, "dice": None, "case": "x"})


def test_classifier_learns_the_failure_signal_and_ignores_noise():
    rows = _rows()
    features = default_features(rows, scores=("entropy_fg", "mahalanobis_bottleneck"))
    assert features[-2:] == ["score:entropy_fg", "score:mahalanobis_bottleneck"]
    clf = QCClassifier(features).fit(_rows(seed=1))
    p = clf.predict(rows)
    y = torch.tensor([failed(r) for r in rows])
    assert detection_metrics(p[~y], p[y])["auroc"] > 0.95
    weights = dict(clf.evidence())
    assert weights["qc:check/ring"] < 0 < weights["score:entropy_fg"]  # low ring cover, high entropy: failure
    assert abs(weights["qc:noise"]) < abs(weights["qc:check/ring"]) / 3


def test_missing_and_infinite_values_give_finite_probabilities(tmp_path):
    rows = _rows()
    features = default_features(rows, scores=("entropy_fg",))
    clf = QCClassifier(features).fit(rows)
    odd = {"qc": {**rows[0]["qc"], "check/ring": math.nan}, "scores": {"entropy_fg": None}}  # None: no heart found
    p = clf.predict_one(odd["qc"], odd["scores"])
    assert 0.5 < p <= 1.0  # maximally uncertain output pushes toward failure
    clf.save(tmp_path / "qc.pt")
    again = QCClassifier.load(tmp_path / "qc.pt")
    assert torch.equal(again.predict(rows), clf.predict(rows))
    with pytest.raises(KeyError, match="no feature 'score:entropy_fg'"):
        clf.predict([{"case": "c", "qc": rows[0]["qc"], "scores": {}}])


def test_cross_validation_never_predicts_a_subject_it_was_fitted_on(monkeypatch):
    rows = _rows()
    features = default_features(rows, scores=("entropy_fg",))
    fitted_on, real_fit, real_predict = [], QCClassifier.fit, QCClassifier.predict

    def fit(self, train, targets=None):
        fitted_on.append({subject_of(r) for r in train})
        return real_fit(self, train, targets)

    def predict(self, test):
        assert not fitted_on[-1] & {subject_of(r) for r in test}
        return real_predict(self, test)

    monkeypatch.setattr(qc_classifier.QCClassifier, "fit", fit)
    monkeypatch.setattr(qc_classifier.QCClassifier, "predict", predict)
    oof = cross_validate(rows, features, folds=4, seed=3, l2=1.0)
    assert len(fitted_on) == 4 and not torch.isnan(oof).any()
    y = torch.tensor([failed(r) for r in rows])
    assert detection_metrics(oof[~y], oof[y])["auroc"] > 0.9
    with pytest.raises(ValueError, match="cannot make 20 folds"):
        cross_validate(rows, features, folds=20)


def test_the_nested_choice_of_l2_sees_only_the_training_folds(monkeypatch):
    rows = _rows()
    features = default_features(rows, scores=("entropy_fg", "mahalanobis_bottleneck"))
    seen, real_choose = [], qc_classifier.choose_l2

    def choose(train, *args, **kwargs):
        seen.append({subject_of(r) for r in train})
        return real_choose(train, *args, **kwargs)

    monkeypatch.setattr(qc_classifier, "choose_l2", choose)
    oof = cross_validate(rows, features, folds=4, seed=3)
    subjects = {subject_of(r) for r in rows}
    assert len(seen) == 4 and all(len(s) == 9 for s in seen)  # 12 subjects: each choice without its 3 held-out ones
    assert set.union(*(subjects - s for s in seen)) == subjects
    y = torch.tensor([failed(r) for r in rows])
    assert detection_metrics(oof[~y], oof[y])["auroc"] > 0.9
    assert real_choose(rows, features, folds=4) in qc_classifier.L2_GRID
