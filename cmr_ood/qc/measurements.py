"""Clinical measurements from a canonical segmentation and its voxel spacing.

Per volume: blood-pool volumes, myocardial mass and per-slice areas. Per subject: LV and RV end-diastolic
and end-systolic volumes, stroke volumes, ejection fractions and the myocardial mass at end-diastole, from
an ED/ES pair of label maps or from a cine whose ED and ES frames are found on the LV volume curve.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from cmr_ood.data.labels import LV, MYO, RV, STRUCTURES
from cmr_ood.data.preprocess import slice_axis

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


def as_label_tensor(labels) -> torch.Tensor:
    """A label map (numpy or torch, any integer or float dtype) as a tensor on its own device."""
    labels = torch.as_tensor(np.ascontiguousarray(labels) if isinstance(labels, np.ndarray) else labels)
    return labels if labels.dtype in (torch.uint8, torch.int64) else labels.long()


def slices_first(labels, spacing) -> tuple[torch.Tensor, tuple[float, float], float]:
    """A 3D label map (X, Y, Z) with its stacking axis (:func:`~cmr_ood.data.preprocess.slice_axis`) moved
    first, (S, H, W); with the in-plane spacing of (H, W) and the slice spacing (mm)."""
    labels = as_label_tensor(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected a 3D label map (X, Y, Z), got shape {tuple(labels.shape)}")
    spacing = tuple(float(s) for s in spacing[:3])
    axis = slice_axis(spacing, tuple(labels.shape))
    in_plane = tuple(spacing[a] for a in range(3) if a != axis)
    return labels.movedim(axis, 0), in_plane, spacing[axis]


def slice_areas(labels, spacing) -> dict[str, np.ndarray]:
    """Area (mm^2) of each structure (``LV``, ``MYO``, ``RV``) on every slice along the stacking axis."""
    stack, in_plane, _ = slices_first(labels, spacing)
    pixel_mm2 = in_plane[0] * in_plane[1]
    return {name: (stack == label).sum((1, 2)).cpu().numpy() * pixel_mm2 for name, label in STRUCTURES.items()}


def lv_volume_curve(cine, spacing) -> np.ndarray:
    """LV blood-pool volume (ml) of every frame of a cine label map (X, Y, Z, T)."""
    cine = as_label_tensor(cine)
    if cine.ndim != 4:
        raise ValueError(f"expected a cine label map (X, Y, Z, T), got shape {tuple(cine.shape)}")
    voxel_ml = float(np.prod(np.asarray(spacing[:3], dtype=np.float64))) / 1000.0
    return (cine == LV).sum((0, 1, 2)).cpu().numpy() * voxel_ml


def find_ed_es(cine, spacing) -> tuple[int, int]:
    """End-diastolic and end-systolic frame indices of a cine: the largest and smallest LV volume."""
    curve = lv_volume_curve(cine, spacing)
    if not curve.any():
        raise ValueError("no LV in any frame of the cine: ED and ES cannot be found")
    return int(np.argmax(curve)), int(np.argmin(curve))


@dataclass
class SubjectMeasurements:
    """Clinical measurements of one subject (volumes in ml, mass in g, EF in %, areas in mm^2).

    EF is NaN where the EDV is zero. ``ed_frame``/``es_frame`` are set when found on a cine."""

    lv_edv_ml: float
    lv_esv_ml: float
    lv_sv_ml: float
    lv_ef_pct: float
    rv_edv_ml: float
    rv_esv_ml: float
    rv_sv_ml: float
    rv_ef_pct: float
    myo_mass_g: float
    ed_frame: int | None = None
    es_frame: int | None = None
    ed_areas_mm2: dict[str, list[float]] = field(default_factory=dict, repr=False)
    es_areas_mm2: dict[str, list[float]] = field(default_factory=dict, repr=False)

    #: The scalar measurements compared against ground truth and used as quality-control features.
    SCALARS = ("lv_edv_ml", "lv_esv_ml", "lv_sv_ml", "lv_ef_pct", "rv_edv_ml", "rv_esv_ml", "rv_sv_ml", "rv_ef_pct",
               "myo_mass_g")

    def scalars(self) -> dict[str, float]:
        """The scalar measurements as a flat dict of floats."""
        return {name: float(getattr(self, name)) for name in self.SCALARS}

    def as_dict(self) -> dict:
        """Everything, JSON-ready (NaN EF as None)."""
        out = asdict(self)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def _ef(edv: float, esv: float) -> float:
    ef = ejection_fraction(edv, esv)
    return math.nan if ef is None else ef


def subject_measurements(ed, es=None, *, spacing) -> SubjectMeasurements:
    """Measurements of one subject from its ED and ES label maps (X, Y, Z), or from a cine label map
    (X, Y, Z, T) given alone, whose ED and ES frames are found with :func:`find_ed_es`."""
    ed_frame = es_frame = None
    if es is None:
        cine = as_label_tensor(ed)
        ed_frame, es_frame = find_ed_es(cine, spacing)
        ed, es = cine[..., ed_frame], cine[..., es_frame]
    ed, es = as_label_tensor(ed), as_label_tensor(es)
    if ed.shape != es.shape or ed.ndim != 3:
        raise ValueError(f"ED and ES label maps must be 3D and of one shape, got {tuple(ed.shape)} and {tuple(es.shape)}")
    at_ed, at_es = volumes(ed.cpu().numpy(), spacing), volumes(es.cpu().numpy(), spacing)
    lv_edv, lv_esv = float(at_ed["lv_volume_ml"]), float(at_es["lv_volume_ml"])
    rv_edv, rv_esv = float(at_ed["rv_volume_ml"]), float(at_es["rv_volume_ml"])
    return SubjectMeasurements(
        lv_edv_ml=lv_edv, lv_esv_ml=lv_esv, lv_sv_ml=round(lv_edv - lv_esv, 2), lv_ef_pct=_ef(lv_edv, lv_esv),
        rv_edv_ml=rv_edv, rv_esv_ml=rv_esv, rv_sv_ml=round(rv_edv - rv_esv, 2), rv_ef_pct=_ef(rv_edv, rv_esv),
        myo_mass_g=float(at_ed["myo_mass_g"]), ed_frame=ed_frame, es_frame=es_frame,
        ed_areas_mm2={k: np.round(v, 2).tolist() for k, v in slice_areas(ed, spacing).items()},
        es_areas_mm2={k: np.round(v, 2).tolist() for k, v in slice_areas(es, spacing).items()},
    )
