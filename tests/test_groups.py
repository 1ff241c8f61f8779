"""The disease-group estimate on synthetic subjects whose groups follow textbook patterns."""

import pytest
import torch

from cmr_ood.qc.groups import FEATURES, GROUPS, GroupClassifier, group_features


def _subjects(n_per_group=12, seed=0):
    """Measurements per group: DCM large LV with low EF, HCM thick myocardium and high EF, MINF low EF with a
    normal-sized LV, RV a large RV, NOR normal; each value jittered by 8 %."""
    g = torch.Generator().manual_seed(seed)
    typical = {  # lv_edv, lv_ef, rv_edv, rv_ef, myo_mass
        "NOR": (150, 62, 150, 55, 120), "DCM": (290, 20, 170, 40, 190), "HCM": (140, 75, 130, 60, 250),
        "MINF": (200, 30, 160, 50, 160), "RV": (150, 60, 280, 30, 120)}
    measurements, groups = [], []
    for group, (lv_edv, lv_ef, rv_edv, rv_ef, mass) in typical.items():
        for _ in range(n_per_group):
            j = (1 + 0.08 * torch.randn(5, generator=g)).tolist()
            lv, rv = lv_edv * j[0], rv_edv * j[2]
            measurements.append({"lv_edv_ml": lv, "lv_esv_ml": lv * (1 - lv_ef * j[1] / 100), "lv_ef_pct": lv_ef * j[1],
                                 "rv_edv_ml": rv, "rv_esv_ml": rv * (1 - rv_ef * j[3] / 100), "rv_ef_pct": rv_ef * j[3],
                                 "myo_mass_g": mass * j[4]})
            groups.append(group)
    return measurements, groups


def test_group_features_add_scale_free_ratios_and_keep_missing_values_missing():
    f = group_features({"lv_edv_ml": 100.0, "rv_edv_ml": 150.0, "myo_mass_g": 80.0, "lv_ef_pct": None})
    assert len(f) == len(FEATURES)
    named = dict(zip(FEATURES, f))
    assert named["rv_lv_edv_ratio"] == pytest.approx(1.5) and named["myo_mass_per_lv_edv"] == pytest.approx(0.8)
    assert named["lv_ef_pct"] != named["lv_ef_pct"]  # NaN
    assert dict(zip(FEATURES, group_features({"lv_edv_ml": 0.0})))["rv_lv_edv_ratio"] != 0  # NaN, not a division error


def test_classifier_separates_the_groups_of_unseen_subjects_and_round_trips(tmp_path):
    clf = GroupClassifier().fit(*_subjects(seed=0))
    measurements, groups = _subjects(seed=1)
    predicted = clf.predict(measurements)
    assert sum(p == t for p, t in zip(predicted, groups)) / len(groups) > 0.9
    one = clf.predict_one(measurements[12])
    assert one["group"] == predicted[12] and set(one["probabilities"]) == set(GROUPS)
    assert max(one["probabilities"], key=one["probabilities"].get) == one["group"]
    assert sum(one["probabilities"].values()) == pytest.approx(1.0, abs=1e-3)
    clf.save(tmp_path / "g.pt")
    assert torch.equal(GroupClassifier.load(tmp_path / "g.pt").probabilities(measurements), clf.probabilities(measurements))
    with pytest.raises(ValueError, match="unknown groups"):
        GroupClassifier().fit(measurements[:2], ["NOR", "ARV"])
