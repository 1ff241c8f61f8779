import math
import re
import time

import numpy as np
import pytest
import torch
from helpers import DATA_ROOT, REPO, requires_data, synthetic_heart

from cmr_ood.data.labels import LV, MYO, RV
from cmr_ood.qc.agreement import agreement, bland_altman, plot_bland_altman
from cmr_ood.qc.checks import PlausibilityLimits, QCReport, check_subject, check_volume
from cmr_ood.qc.measurements import find_ed_es, lv_volume_curve, slice_areas, subject_measurements

SPACING = (1.8, 1.8, 8.0)  # a 25.92 ul voxel
SHAPE = (96, 96, 10)


def heart(radius=14.0):
    """A plausible adult heart at SPACING: radius 14 px gives an ED-sized LV, 10 px an ES-sized one."""
    return synthetic_heart(shape=SHAPE, radius=radius)[1]


def failed_checks(report: QCReport) -> set[str]:
    return {name for name, c in report.checks.items() if not c["passed"]}


# ------------------------------------------------------------------------------------ measurements
def test_slice_areas_follow_the_slice_axis_rule():
    labels = np.zeros((10, 10, 4), np.uint8)
    labels[:3, :4, :2] = LV  # 12 pixels on slices 0 and 1
    labels[5:, :, 0] = MYO  # 50 pixels on slice 0
    areas = slice_areas(labels, (2.0, 2.5, 8.0))  # 5 mm^2 pixels; slices along the last axis
    assert areas["LV"].tolist() == [60.0, 60.0, 0.0, 0.0]
    assert areas["MYO"].tolist() == [250.0, 0.0, 0.0, 0.0] and not areas["RV"].any()
    moved = np.moveaxis(labels, 2, 0)  # the stack along the first axis, which has the largest spacing
    assert slice_areas(moved, (8.0, 2.0, 2.5))["LV"].tolist() == [60.0, 60.0, 0.0, 0.0]
    assert slice_areas(torch.from_numpy(labels), (2.0, 2.5, 8.0))["LV"].tolist() == [60.0, 60.0, 0.0, 0.0]


def test_subject_measurements_of_hand_built_ed_and_es():
    ed, es = np.zeros((10, 10, 4), np.uint8), np.zeros((10, 10, 4), np.uint8)
    ed[:5, :4, :2] = LV  # 40 voxels of 20 ul: 0.8 ml
    es[:5, :2, :2] = LV  # 0.4 ml
    ed[:, 8:, :] = RV  # 80 voxels: 1.6 ml
    es[:, 9:, :3] = RV  # 30 voxels: 0.6 ml
    ed[5:, :4, 0] = MYO  # 20 voxels: 0.4 ml, 0.42 g
    m = subject_measurements(ed, es, spacing=(2.0, 2.0, 5.0))
    assert (m.lv_edv_ml, m.lv_esv_ml, m.lv_sv_ml, m.lv_ef_pct) == (0.8, 0.4, 0.4, 50.0)
    assert (m.rv_edv_ml, m.rv_esv_ml, m.rv_sv_ml, m.rv_ef_pct) == (1.6, 0.6, 1.0, 62.5)
    assert m.myo_mass_g == 0.42 and m.ed_frame is None
    assert m.ed_areas_mm2["LV"] == [80.0, 80.0, 0.0, 0.0] and m.es_areas_mm2["LV"] == [40.0, 40.0, 0.0, 0.0]
    assert set(m.scalars()) == set(m.SCALARS) and all(isinstance(v, float) for v in m.scalars().values())
    empty = subject_measurements(np.zeros_like(ed), np.zeros_like(es), spacing=(2.0, 2.0, 5.0))
    assert math.isnan(empty.lv_ef_pct) and empty.as_dict()["lv_ef_pct"] is None


def test_ed_and_es_are_found_on_a_synthetic_cine():
    radii = [11.0, 13.0, 14.0, 12.0, 9.0, 8.0, 10.0, 11.0]  # ED at frame 2, ES at frame 5
    cine = np.stack([heart(r) for r in radii], axis=-1)
    curve = lv_volume_curve(cine, SPACING)
    assert curve.shape == (8,) and np.argmax(curve) == 2 and np.argmin(curve) == 5
    assert find_ed_es(cine, SPACING) == (2, 5)
    m = subject_measurements(cine, spacing=SPACING)
    pair = subject_measurements(cine[..., 2], cine[..., 5], spacing=SPACING)
    assert (m.ed_frame, m.es_frame) == (2, 5) and m.scalars() == pair.scalars()
    assert 80 < m.lv_edv_ml < 120 and 20 < m.lv_esv_ml < 40  # an adult-sized heart, as the checks expect
    with pytest.raises(ValueError, match="no LV in any frame"):
        find_ed_es(np.zeros((4, 4, 2, 3), np.uint8), SPACING)


# ------------------------------------------------------------------------------------------ checks
def test_a_plausible_heart_passes_every_check():
    ed, es = heart(14.0), heart(10.0)
    report = check_volume(ed, SPACING)
    assert report.passed and report.failed == [], report.failed
    assert {"lv_ring", "rv_beside_lv", "lv_components", "myo_components", "rv_components", "lv_coverage",
            "lv_volume", "rv_volume", "myo_mass"} == set(report.checks)
    assert report.checks["lv_ring"]["value"] == 1.0 and report.checks["rv_beside_lv"]["value"] <= 1.8
    subject = check_subject(ed, es, spacing=SPACING)
    assert subject.passed, subject.failed
    expected = {"ED/lv_ring", "ES/lv_coverage", "lv_ef", "rv_ef", "lv_ed_above_es", "rv_ed_above_es", "myo_mass"}
    assert expected <= set(subject.checks)
    features = subject.features()
    assert features["lv_ef_pct"] == subject.measurements["lv_ef_pct"] and features["pass/lv_ef"] == 1.0
    assert all(isinstance(v, float) for v in features.values())
    assert check_subject(np.stack([es, ed, es], -1), spacing=SPACING).measurements == subject.measurements


def _ring_with_gap():
    labels = heart()
    x, y = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    sector = x - SHAPE[0] / 2 > 0.5 * np.abs(y - SHAPE[1] / 2)  # a 127-degree wedge cut out of the ring
    labels[..., 3][sector & (labels[..., 3] == MYO)] = 0
    return labels


def _rv_far_away():
    labels = heart()
    labels[labels == RV] = 0
    labels[:12, 80:, 2:8] = RV  # about 50 mm from the myocardium
    return labels


def _two_lv_pieces():
    labels = heart()
    labels[80:92, 80:92, 2:6] = LV  # a second LV, a third the size of the first
    return labels


def _missing_middle_slice():
    labels = heart()
    labels[..., 4] = 0
    return labels


@pytest.mark.parametrize("broken, check, reason", [
    (_ring_with_gap, "lv_ring", r"myocardium covers only \d+% of the LV cavity boundary on slice 3"),
    (_rv_far_away, "rv_beside_lv", r"RV lies \d+\.\d mm away from the myocardium"),
    (_two_lv_pieces, "lv_components", r"LV in 2 separate pieces"),
    (_missing_middle_slice, "lv_coverage", r"LV missing on slice\(s\) \[4\] between slices 0 and 9"),
])
def test_each_broken_anatomy_fails_its_check_with_the_reason(broken, check, reason):
    report = check_volume(broken(), SPACING)
    assert not report.passed and not report.checks[check]["passed"]
    assert any(re.search(reason, r) for r in report.failed), report.failed
    assert report.checks[check]["reason"] in report.failed
    assert check_volume(heart(), SPACING).checks[check]["passed"]  # the same check on the intact heart


def test_missing_rv_fails_with_a_reason_and_nan_value():
    labels = heart()
    labels[labels == RV] = 0
    report = check_volume(labels, SPACING)
    assert report.checks["rv_beside_lv"]["reason"] == "no RV to place the RV against"
    assert math.isnan(report.checks["rv_beside_lv"]["value"]) and report.as_dict()["checks"]["rv_beside_lv"]["value"] is None
    assert {"rv_beside_lv", "rv_components", "rv_volume"} == failed_checks(report)


def test_es_above_ed_and_absurd_volumes_fail_the_subject_checks():
    ed, es = heart(14.0), heart(10.0)
    swapped = check_subject(es, ed, spacing=SPACING)
    assert {"lv_ed_above_es", "rv_ed_above_es", "lv_ef", "rv_ef"} == failed_checks(swapped)
    assert any(r.startswith("LV ES volume") and "is not below its ED volume" in r for r in swapped.failed)
    huge = check_subject(ed, es, spacing=(4.0, 4.0, 20.0))  # 12x the voxel volume: a 500+ ml LV
    assert {"lv_edv", "myo_mass"} <= failed_checks(huge)
    assert any(r.startswith("LV EDV") and "outside 30-500 ml" in r for r in huge.failed)
    tiny = check_volume(ed, (0.5, 0.5, 2.0))
    assert {"lv_volume", "rv_volume", "myo_mass"} <= failed_checks(tiny)
    strict = check_subject(ed, es, spacing=SPACING, limits=PlausibilityLimits(lv_ef_pct=(60.0, 70.0)))
    assert failed_checks(strict) == {"lv_ef"}


def test_checks_are_fast_on_a_full_size_volume():
    labels = synthetic_heart(shape=(256, 256, 20), radius=30)[1]
    check_volume(labels, (1.5, 1.5, 8.0))
    start = time.perf_counter()
    check_volume(labels, (1.5, 1.5, 8.0))
    assert time.perf_counter() - start < 1.0  # about 0.1 s on one free core; generous for a shared machine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_checks_on_cuda_match_the_cpu():
    ed, es = heart(14.0), heart(10.0)
    on_gpu = check_subject(torch.from_numpy(ed).cuda(), torch.from_numpy(es).cuda(), spacing=SPACING)
    assert on_gpu.checks == check_subject(ed, es, spacing=SPACING).checks


@requires_data
def test_acdc_ground_truth_passes_quality_control():
    from cmr_ood.data.manifests import load_manifest, read_entry, select

    entries = select(load_manifest(REPO / "data_manifests" / "acdc.json"), subjects=["patient002", "patient037"])
    pairs = {}
    for e in entries:
        image, labels = read_entry(e, DATA_ROOT)
        pairs.setdefault(e["subject"], {})[e["phase"]] = (labels.array, image.spacing)
    for subject, p in pairs.items():
        report = check_subject(p["ED"][0], p["ES"][0], spacing=p["ED"][1])
        assert report.passed, (subject, report.failed)


# --------------------------------------------------------------------------------------- agreement
def test_bland_altman_on_hand_computed_numbers(tmp_path):
    stats = bland_altman([10.0, 12.0, 9.0, 15.0, float("nan")], [8.0, 12.0, 10.0, 11.0, 5.0])  # differences 2, 0, -1, 4
    sd = math.sqrt((0.75**2 + 1.25**2 + 2.25**2 + 2.75**2) / 3)
    assert stats.n == 4 and stats.bias == pytest.approx(1.25) and stats.sd == pytest.approx(sd)
    assert (stats.lower, stats.upper) == (pytest.approx(1.25 - 1.96 * sd), pytest.approx(1.25 + 1.96 * sd))
    assert stats.mae == pytest.approx(1.75)
    with pytest.raises(ValueError, match="differ in length"):
        bland_altman([1.0, 2.0], [1.0])
    predicted = [{"lv_ef_pct": p, "lv_edv_ml": 100.0 + p} for p in (50.0, 60.0, 40.0)]
    reference = [{"lv_ef_pct": r, "lv_edv_ml": 100.0 + r} for r in (55.0, 60.0, 30.0)]
    table = agreement(predicted, reference, keys=("lv_ef_pct", "lv_edv_ml"))
    assert table["lv_ef_pct"].bias == pytest.approx(5.0 / 3) and table["lv_ef_pct"].mae == pytest.approx(5.0)
    assert table["lv_edv_ml"] == table["lv_ef_pct"]
    path = plot_bland_altman(predicted, reference, tmp_path / "ba.png", keys=("lv_ef_pct", "lv_edv_ml"), names=["a", "b", "c"],
                             flagged=[False, True, False])
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.part*"))
