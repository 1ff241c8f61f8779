"""Tests on the real data in ../shared/data (or $CMR_OOD_DATA); skipped without it."""

import json

import nibabel as nib
import numpy as np
import pytest
from helpers import BUNDLE, DATA_ROOT, requires_data
from test_bundle import CONFIGS, bundle_run

from cmr_ood.data.io import read_image
from cmr_ood.data.manifests import read_entry
from cmr_ood.qc.measurements import subject_measurements

pytestmark = [requires_data, pytest.mark.real_data]
#: Lowest mean Dice (LV, MYO, RV) accepted from the shipped model on the held-out sample cases.
SHIPPED_MODEL_MIN_DICE = 0.88


def test_acdc_spacing_is_read_from_pixdim_not_the_unit_sform():
    path = DATA_ROOT / "acdc/training/patient001/patient001_frame01.nii.gz"
    assert np.allclose(np.linalg.norm(nib.load(path).affine[:3, :3], axis=0), 1.0)
    volume = read_image(path)
    assert volume.spacing == pytest.approx((1.5625, 1.5625, 10.0))
    image, labels = read_entry({"image": "acdc/training/patient001/patient001_frame01.nii.gz",
                                "label": "acdc/training/patient001/patient001_frame01_gt.nii.gz", "dataset": "acdc"}, DATA_ROOT)
    lv_ml = (labels.array == 1).sum() * image.voxel_volume_ml
    assert 200 < lv_ml < 400  # patient001 is a dilated LV at end-diastole; unit spacing would give ~12 ml


def test_shipped_model_on_held_out_sample_cases(tmp_path):
    result = bundle_run("inference.json", "evaluate.json", output_dir=str(tmp_path / "eval"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["num_volumes"] == 4
    assert summary["all"]["dice_mean"] >= SHIPPED_MODEL_MIN_DICE, summary["all"]


def test_main_job_and_far_ood_images_run_through_the_bundle(tmp_path):
    result = bundle_run("inference.json", cwd=tmp_path)  # the README's main job, default output folder
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads((tmp_path / "cmr_ood_output" / "cases.json").read_text())
    assert len(records) == 5 and all(r["status"] == "ok" for r in records)
    heart = [r for r in records if "patient" in r["image"]]
    assert all(40 < r["measurements"]["myo_mass_g"] < 300 for r in heart)  # plausible masses, true spacing
    # the shipped OOD state: held-out heart stacks accepted, the abdominal slice flagged
    assert not any(r["ood_flag"] for r in heart) and all(r["ood_flag"] for r in records if r not in heart)
    default = json.loads((CONFIGS / "inference.json").read_text())["ood_default"]
    assert all(r["default_detector"] == default and r["outputs"]["uncertainty"] for r in records)
    # the shipped QC classifier: the abdominal slice is far likelier a failed segmentation than any heart stack
    abdomen = [r["qc"]["failure_probability"] for r in records if r not in heart]
    assert max(r["qc"]["failure_probability"] for r in heart) < 0.5 < min(abdomen)
    assert (tmp_path / "cmr_ood_output" / "report" / "index.html").exists()
    # the sample subjects' ED and ES are paired from their Info.cfg: LV EF close to the one of their labels
    sample = json.loads((BUNDLE / "sample_data" / "manifest.json").read_text())["training"]
    for subject in ("patient002", "patient082"):
        pair = {e["phase"]: read_entry(e, BUNDLE / "sample_data")[1] for e in sample if e["subject"] == subject}
        truth = subject_measurements(pair["ED"].array, pair["ES"].array, spacing=pair["ED"].spacing)
        found = [r for r in heart if r.get("subject") == subject]
        assert sorted(r["phase"] for r in found) == ["ED", "ES"] and found[0]["cardiac_function"] == found[1]["cardiac_function"]
        assert abs(found[0]["cardiac_function"]["lv_ef_pct"] - truth.lv_ef_pct) < 5, (subject, truth.lv_ef_pct)
    result = bundle_run("inference.json", dataset_dir=str(DATA_ROOT / "ood_dev"), output_dir=str(tmp_path / "ood"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads((tmp_path / "ood" / "cases.json").read_text())
    assert len(records) == 5 and all(r["status"] == "ok" for r in records), records
    assert all(r["ood_flag"] for r in records), [(r["image"], r["default_score"]) for r in records]  # brain, prostate, abdomen
