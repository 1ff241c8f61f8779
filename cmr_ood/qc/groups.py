"""An estimate of the ACDC disease group of a subject from its clinical measurements.

The five ACDC groups: NOR (normal), DCM (dilated cardiomyopathy), HCM (hypertrophic cardiomyopathy),
MINF (previous myocardial infarction, reduced LV EF), RV (abnormal right ventricle). The estimate is a
softmax regression (:mod:`cmr_ood.qc.linear`) on the LV and RV volumes and ejection fractions, the
myocardial mass and two scale-free ratios (RV/LV end-diastolic volume, myocardial mass per ml of LV
end-diastolic volume). Its accuracy is measured in ``benchmarks/disease_groups.py``: an aid to review, not a
diagnosis.

    clf = GroupClassifier().fit(measurements, groups)     # dicts of SubjectMeasurements.scalars(), group names
    clf.predict_one(record["cardiac_function"])           # {"group": "DCM", "probabilities": {...}}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cmr_ood.data.io import atomic_write
from cmr_ood.qc.linear import fit_logistic, robust_scaling, standardise

GROUPS = ("NOR", "DCM", "HCM", "MINF", "RV")
MEASUREMENTS = ("lv_edv_ml", "lv_esv_ml", "lv_ef_pct", "rv_edv_ml", "rv_esv_ml", "rv_ef_pct", "myo_mass_g")
FEATURES = (*MEASUREMENTS, "rv_lv_edv_ratio", "myo_mass_per_lv_edv")


def group_features(m: dict) -> list[float]:
    """The classifier's inputs from a subject's measurements (NaN where one is missing)."""
    def get(key):
        value = m.get(key)
        return math.nan if value is None else float(value)

    lv_edv = get("lv_edv_ml")
    ratio = get("rv_edv_ml") / lv_edv if lv_edv > 0 else math.nan
    mass_per_edv = get("myo_mass_g") / lv_edv if lv_edv > 0 else math.nan
    return [get(k) for k in MEASUREMENTS] + [ratio, mass_per_edv]


@dataclass
class GroupClassifier:
    """Softmax regression over :data:`GROUPS` on robustly standardised :data:`FEATURES`."""

    l2: float = 1.0
    centre: torch.Tensor = field(default=None, repr=False)
    scale: torch.Tensor = field(default=None, repr=False)
    weights: torch.Tensor = field(default=None, repr=False)
    bias: torch.Tensor = field(default=None, repr=False)

    def fit(self, measurements: list[dict], groups: list[str]) -> GroupClassifier:
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            raise ValueError(f"unknown groups {unknown}: expected {GROUPS}")
        x = torch.tensor([group_features(m) for m in measurements], dtype=torch.float64)
        y = torch.tensor([GROUPS.index(g) for g in groups])
        self.centre, self.scale = robust_scaling(x)
        self.weights, self.bias = fit_logistic(standardise(x, self.centre, self.scale), y, self.l2, classes=len(GROUPS))
        return self

    def probabilities(self, measurements: list[dict]) -> torch.Tensor:
        """(subjects, groups) probabilities."""
        if self.weights is None:
            raise RuntimeError("the group classifier is not fitted")
        x = torch.tensor([group_features(m) for m in measurements], dtype=torch.float64)
        return torch.softmax(standardise(x, self.centre, self.scale) @ self.weights + self.bias, dim=1)

    def predict(self, measurements: list[dict]) -> list[str]:
        return [GROUPS[i] for i in self.probabilities(measurements).argmax(1).tolist()]

    def predict_one(self, measurements: dict) -> dict:
        """The most probable group of one subject and every group's probability."""
        p = self.probabilities([measurements])[0]
        return {"group": GROUPS[int(p.argmax())], "probabilities": {g: round(float(v), 4) for g, v in zip(GROUPS, p)}}

    def state_dict(self) -> dict:
        return {"l2": self.l2, "centre": self.centre, "scale": self.scale, "weights": self.weights, "bias": self.bias}

    def save(self, path: str | Path) -> str:
        return atomic_write(path, lambda tmp: torch.save(self.state_dict(), tmp), overwrite=True)

    @classmethod
    def load(cls, path: str | Path) -> GroupClassifier:
        return cls(**torch.load(path, map_location="cpu", weights_only=True))
