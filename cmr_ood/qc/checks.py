"""Plausibility quality control of a segmentation: the downstream clinical analysis as the check
(Ruijsink et al. 2020, semiQCSeg; DESIGN.md, method 5).

A segmentation passes when its anatomy is plausible (the myocardium surrounds the LV cavity, the RV lies
against the myocardium, one piece per structure, LV on a contiguous run of slices) and its clinical
measurements are physiological (volumes, ejection fractions, myocardial mass, ED above ES). Every check
returns its measured value and its limit, so that a :class:`QCReport` can also feed a learned classifier
(:meth:`QCReport.features`).

    report = check_volume(labels, spacing)          # one 3D label map (X, Y, Z)
    report = check_subject(ed, es, spacing=spacing)  # an ED/ES pair; or check_subject(cine, spacing=...)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from cmr_ood.data.labels import LV, MYO, RV, STRUCTURES
from cmr_ood.qc.measurements import SubjectMeasurements, as_label_tensor, slices_first, subject_measurements, volumes


@dataclass(frozen=True)
class PlausibilityLimits:
    """Limits of the checks. Ranges are (low, high), inclusive.

    Volume, EF and mass ranges are generous on purpose: they reach far beyond the adult reference values
    of healthy hearts (Kawel-Boehm et al., "Reference ranges for CMR in adults and children: 2020 update",
    JCMR 22:87, 2020) so that dilated, hypertrophic, infarcted and abnormal-RV hearts pass (every ACDC
    ground truth does: LV EDV 49-374 ml, LV EF 10-82 %, RV EF 2-86 %, mass 34-272 g) and only segmentations
    that no heart could produce fail. Shape limits were set with the same margin over ACDC's ground truth
    (myocardial cover of the LV boundary >= 86 % on every slice, RV within 2 mm of the myocardium, at most
    4 % of a structure outside its largest piece, no LV slice gaps).
    """

    min_lv_ring_fraction: float = 0.75  # of the LV cavity boundary touching myocardium, on its worst slice
    max_rv_gap_mm: float = 10.0  # RV to myocardium, nearest voxels
    max_outside_largest_component: float = 0.05  # fraction of a structure outside its largest 3D piece
    max_lv_slice_gaps: int = 0  # slices without LV between the first and last LV slice
    # one label map of unknown phase
    lv_volume_ml: tuple[float, float] = (10.0, 500.0)
    rv_volume_ml: tuple[float, float] = (5.0, 450.0)
    myo_mass_g: tuple[float, float] = (25.0, 400.0)
    # a subject (ED and ES)
    lv_edv_ml: tuple[float, float] = (30.0, 500.0)
    lv_esv_ml: tuple[float, float] = (10.0, 450.0)
    rv_edv_ml: tuple[float, float] = (30.0, 450.0)
    rv_esv_ml: tuple[float, float] = (5.0, 400.0)
    lv_ef_pct: tuple[float, float] = (5.0, 90.0)
    rv_ef_pct: tuple[float, float] = (0.0, 90.0)  # the lower end is the ED-above-ES check
    min_stroke_volume_ml: float = 0.0  # ED volume above ES volume, LV and RV


@dataclass(frozen=True)
class Check:
    """One check's verdict: ``reason`` says what was found (why it failed, or what passed)."""

    name: str
    passed: bool
    value: float
    limit: float | tuple[float, float]
    reason: str


def _check(name: str, passed: bool, value, limit, reason: str) -> Check:
    return Check(name, bool(passed), float(value), limit, reason)


def _range_check(name: str, what: str, value: float, limits: tuple[float, float], unit: str) -> Check:
    low, high = limits
    passed = math.isfinite(value) and low <= value <= high
    verdict = "within" if passed else "outside"
    return _check(name, passed, value, tuple(limits), f"{what} {value:.1f} {unit} {verdict} {low:g}-{high:g} {unit}")


# ----------------------------------------------------------------------------------------- anatomy
def _around(stack: torch.Tensor, mask: torch.Tensor, margin: int) -> torch.Tensor:
    """The in-plane bounding box of ``mask`` (S, H, W) in ``stack`` grown by ``margin`` pixels: the
    neighbourhood operations below only need the region around a structure."""
    rows, cols = torch.nonzero(mask.any(2).any(0)).flatten(), torch.nonzero(mask.any(1).any(0)).flatten()
    if rows.numel() == 0:
        return stack
    r0, r1 = max(int(rows[0]) - margin, 0), int(rows[-1]) + margin + 1
    c0, c1 = max(int(cols[0]) - margin, 0), int(cols[-1]) + margin + 1
    return stack[:, r0:r1, c0:c1]


def _binary(stack: torch.Tensor, label: int) -> torch.Tensor:
    """(S, 1, H + 2, W + 2) float mask of one label, zero-padded so that outside the image is 'not it'."""
    return F.pad((stack == label)[:, None].float(), (1, 1, 1, 1))


def myocardium_surrounds_lv(labels, spacing, min_fraction: float = PlausibilityLimits.min_lv_ring_fraction) -> Check:
    """Fraction of the LV cavity boundary (8-neighbourhood) touching myocardium, on the worst slice with LV.

    A myocardial ring with a gap, or an LV cavity lying against the RV or background, lowers it."""
    stack, _, _ = slices_first(labels, spacing)
    stack = _around(stack, stack == LV, margin=1)
    lv, myo = _binary(stack, LV), _binary(stack, MYO)
    boundary = lv > -F.max_pool2d(-lv, 3, 1, 1)  # LV pixels with a non-LV neighbour (erosion by 3x3)
    touching = boundary & (F.max_pool2d(myo, 3, 1, 1) > 0)
    per_slice_boundary = boundary.sum((1, 2, 3))
    with_lv = torch.nonzero(per_slice_boundary > 0).flatten()
    if with_lv.numel() == 0:
        return _check("lv_ring", False, math.nan, min_fraction, "no LV cavity to check the myocardium around")
    fractions = touching.sum((1, 2, 3))[with_lv].double() / per_slice_boundary[with_lv].double()
    worst = int(torch.argmin(fractions))
    value = float(fractions[worst])
    if value >= min_fraction:
        return _check("lv_ring", True, value, min_fraction, f"myocardium covers >= {value:.0%} of the LV boundary on every slice")
    reason = f"myocardium covers only {value:.0%} of the LV cavity boundary on slice {int(with_lv[worst])}"
    return _check("lv_ring", False, value, min_fraction, f"{reason} (limit {min_fraction:.0%})")


def rv_beside_lv(labels, spacing, max_gap_mm: float = PlausibilityLimits.max_rv_gap_mm) -> Check:
    """Distance (mm) from the RV to the nearest myocardial voxel: the RV lies against the septum."""
    labels = as_label_tensor(labels).cpu().numpy()
    rv, myo = labels == RV, labels == MYO
    if not rv.any() or not myo.any():
        missing = " and ".join(n for n, m in (("RV", rv), ("myocardium", myo)) if not m.any())
        return _check("rv_beside_lv", False, math.nan, max_gap_mm, f"no {missing} to place the RV against")
    # every RV and myocardial voxel lies in their joint bounding box, so the nearest pair does too
    box = ndi.find_objects((rv | myo).astype(np.uint8))[0]
    distance = ndi.distance_transform_edt(~myo[box], sampling=[float(s) for s in spacing[:3]])
    gap = float(distance[rv[box]].min())
    if gap <= max_gap_mm:
        return _check("rv_beside_lv", True, gap, max_gap_mm, f"RV lies {gap:.1f} mm from the myocardium")
    return _check("rv_beside_lv", False, gap, max_gap_mm,
                  f"RV lies {gap:.1f} mm away from the myocardium (limit {max_gap_mm:g} mm)")


def one_component(labels, structure: str, max_outside: float = PlausibilityLimits.max_outside_largest_component) -> Check:
    """Fraction of a structure (``LV``, ``MYO``, ``RV``) outside its largest 3D connected component
    (26-connectivity). Stray specks are tolerated up to ``max_outside``; a second real piece is not."""
    name = f"{structure.lower()}_components"
    mask = as_label_tensor(labels).cpu().numpy() == STRUCTURES[structure]
    if not mask.any():
        return _check(name, False, math.nan, max_outside, f"no {structure} in the segmentation")
    box = ndi.find_objects(mask.astype(np.uint8))[0]  # label only where the structure is
    components, count = ndi.label(mask[box], structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(components.ravel())[1:]
    outside = 1.0 - sizes.max() / sizes.sum()
    if outside <= max_outside:
        return _check(name, True, outside, max_outside, f"{structure} in {count} piece(s), {outside:.1%} outside the largest")
    return _check(name, False, outside, max_outside,
                  f"{structure} in {count} separate pieces: {outside:.0%} of it outside the largest (limit {max_outside:.0%})")


def lv_coverage(labels, spacing, max_gaps: int = PlausibilityLimits.max_lv_slice_gaps) -> Check:
    """Slices without LV between the first and the last slice with LV (base to apex without gaps)."""
    stack, _, _ = slices_first(labels, spacing)
    present = torch.nonzero((stack == LV).any(2).any(1)).flatten().cpu().numpy()
    if present.size == 0:
        return _check("lv_coverage", False, math.nan, max_gaps, "no LV on any slice")
    first, last = int(present[0]), int(present[-1])
    missing = sorted(set(range(first, last + 1)) - set(present.tolist()))
    if len(missing) <= max_gaps:
        return _check("lv_coverage", True, len(missing), max_gaps, f"LV on slices {first}-{last} without gaps")
    return _check("lv_coverage", False, len(missing), max_gaps,
                  f"LV missing on slice(s) {missing} between slices {first} and {last}")


def anatomy_checks(labels, spacing, limits: PlausibilityLimits = PlausibilityLimits()) -> list[Check]:
    """The shape checks of one 3D label map."""
    return [
        myocardium_surrounds_lv(labels, spacing, limits.min_lv_ring_fraction),
        rv_beside_lv(labels, spacing, limits.max_rv_gap_mm),
        *(one_component(labels, s, limits.max_outside_largest_component) for s in STRUCTURES),
        lv_coverage(labels, spacing, limits.max_lv_slice_gaps),
    ]


# ------------------------------------------------------------------------------------ measurements
def volume_checks(labels, spacing, limits: PlausibilityLimits = PlausibilityLimits()) -> list[Check]:
    """Volumes and myocardial mass of one label map of unknown phase in their (phase-agnostic) ranges."""
    v = volumes(as_label_tensor(labels).cpu().numpy(), spacing)
    return [
        _range_check("lv_volume", "LV volume", float(v["lv_volume_ml"]), limits.lv_volume_ml, "ml"),
        _range_check("rv_volume", "RV volume", float(v["rv_volume_ml"]), limits.rv_volume_ml, "ml"),
        _range_check("myo_mass", "myocardial mass", float(v["myo_mass_g"]), limits.myo_mass_g, "g"),
    ]


def ed_above_es(m: SubjectMeasurements, limits: PlausibilityLimits = PlausibilityLimits()) -> list[Check]:
    """End-diastolic volume above end-systolic volume (a positive stroke volume), LV and RV."""
    out = []
    for side in ("lv", "rv"):
        edv, esv = getattr(m, f"{side}_edv_ml"), getattr(m, f"{side}_esv_ml")
        sv = edv - esv
        name, what = f"{side}_ed_above_es", side.upper()
        if sv > limits.min_stroke_volume_ml:
            out.append(_check(name, True, sv, limits.min_stroke_volume_ml, f"{what} stroke volume {sv:.1f} ml"))
        else:
            out.append(_check(name, False, sv, limits.min_stroke_volume_ml,
                              f"{what} ES volume {esv:.1f} ml is not below its ED volume {edv:.1f} ml"))
    return out


def function_checks(m: SubjectMeasurements, limits: PlausibilityLimits = PlausibilityLimits()) -> list[Check]:
    """Subject-level measurements in their physiological ranges, and ED above ES."""
    return [
        _range_check("lv_edv", "LV EDV", m.lv_edv_ml, limits.lv_edv_ml, "ml"),
        _range_check("lv_esv", "LV ESV", m.lv_esv_ml, limits.lv_esv_ml, "ml"),
        _range_check("rv_edv", "RV EDV", m.rv_edv_ml, limits.rv_edv_ml, "ml"),
        _range_check("rv_esv", "RV ESV", m.rv_esv_ml, limits.rv_esv_ml, "ml"),
        _range_check("lv_ef", "LV EF", m.lv_ef_pct, limits.lv_ef_pct, "%"),
        _range_check("rv_ef", "RV EF", m.rv_ef_pct, limits.rv_ef_pct, "%"),
        _range_check("myo_mass", "myocardial mass at ED", m.myo_mass_g, limits.myo_mass_g, "g"),
        *ed_above_es(m, limits),
    ]


# ------------------------------------------------------------------------------------------ report
@dataclass
class QCReport:
    """The verdict of every check (name -> {passed, value, limit, reason}) and the measurements checked.

    ``passed`` is True when every check passed; ``failed`` holds the failed checks' reasons."""

    checks: dict[str, dict]
    measurements: dict[str, float] = field(default_factory=dict)
    passed: bool = field(init=False)
    failed: list[str] = field(init=False)

    def __post_init__(self):
        self.failed = [c["reason"] for c in self.checks.values() if not c["passed"]]
        self.passed = not self.failed

    @classmethod
    def from_checks(cls, checks: list[Check], measurements: dict[str, float] | None = None) -> QCReport:
        entries = {}
        for c in checks:
            if c.name in entries:
                raise ValueError(f"two checks named '{c.name}'")
            entries[c.name] = {"passed": c.passed, "value": c.value, "limit": c.limit, "reason": c.reason}
        return cls(entries, dict(measurements or {}))

    def features(self) -> dict[str, float]:
        """A flat numeric dict for a learned quality classifier: every check's value (``check/NAME``,
        NaN where it could not be measured), its pass flag (``pass/NAME``) and every measurement."""
        out = {f"check/{name}": float(c["value"]) for name, c in self.checks.items()}
        out.update({f"pass/{name}": float(c["passed"]) for name, c in self.checks.items()})
        out.update({k: float(v) for k, v in self.measurements.items()})
        return out

    def as_dict(self) -> dict:
        """JSON-ready (NaN values as None)."""
        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v
        out = asdict(self)
        out["checks"] = {n: {k: clean(v) for k, v in c.items()} for n, c in out["checks"].items()}
        out["measurements"] = {k: clean(v) for k, v in out["measurements"].items()}
        return out


def _prefixed(checks: list[Check], phase: str) -> list[Check]:
    return [Check(f"{phase}/{c.name}", c.passed, c.value, c.limit, f"{phase}: {c.reason}") for c in checks]


def check_volume(labels, spacing, limits: PlausibilityLimits = PlausibilityLimits()) -> QCReport:
    """Quality control of one 3D label map (X, Y, Z) of unknown phase: anatomy and volume ranges."""
    labels = as_label_tensor(labels)
    measured = {k: float(v) for k, v in volumes(labels.cpu().numpy(), spacing).items()}
    return QCReport.from_checks(anatomy_checks(labels, spacing, limits) + volume_checks(labels, spacing, limits), measured)


def check_subject(ed, es=None, *, spacing, limits: PlausibilityLimits = PlausibilityLimits()) -> QCReport:
    """Quality control of one subject: the anatomy of its ED and ES label maps (checks named ``ED/...`` and
    ``ES/...``) and its clinical measurements. A cine label map (X, Y, Z, T) given alone has its ED and ES
    frames found on the LV volume curve."""
    if es is None:
        cine = as_label_tensor(ed)
        m = subject_measurements(cine, spacing=spacing)
        ed, es = cine[..., m.ed_frame], cine[..., m.es_frame]
    else:
        m = subject_measurements(ed, es, spacing=spacing)
    checks = _prefixed(anatomy_checks(ed, spacing, limits), "ED") + _prefixed(anatomy_checks(es, spacing, limits), "ES")
    return QCReport.from_checks(checks + function_checks(m, limits), m.scalars())
