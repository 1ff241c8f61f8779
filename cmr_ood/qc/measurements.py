"""Clinical measurements from a canonical segmentation and its voxel spacing."""

from __future__ import annotations

import numpy as np

from cmr_ood.data.labels import LV, MYO, RV

#: Myocardial tissue density (g/ml), the usual value for mass from volume.
MYOCARDIAL_DENSITY = 1.05


def volumes(labels: np.ndarray, spacing) -> dict[str, float]:
    """LV and RV blood-pool volumes (ml), myocardial volume (ml) and mass (g) of a 3D label map."""
    voxel_ml = float(np.prod(np.asarray(spacing[:3], dtype=np.float64))) / 1000.0
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=4)
    myo_ml = counts[MYO] * voxel_ml
    return {
        "lv_volume_ml": round(counts[LV] * voxel_ml, 2),
        "rv_volume_ml": round(counts[RV] * voxel_ml, 2),
        "myo_volume_ml": round(myo_ml, 2),
        "myo_mass_g": round(myo_ml * MYOCARDIAL_DENSITY, 2),
    }


def measurements(labels: np.ndarray, spacing) -> dict:
    """:func:`volumes` of a 3D stack; for a 4D cine, one list per measurement (a value per frame)."""
    if labels.ndim == 3:
        return volumes(labels, spacing)
    frames = [volumes(labels[..., t], spacing) for t in range(labels.shape[-1])]
    return {key: [f[key] for f in frames] for key in frames[0]}


def ejection_fraction(edv: float, esv: float) -> float | None:
    """Ejection fraction (%) from end-diastolic and end-systolic volumes."""
    return round(100.0 * (edv - esv) / edv, 2) if edv > 0 else None
