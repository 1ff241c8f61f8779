"""The bundle's commands end to end (``python -m monai.bundle run``), on CPU, with a tiny network."""

import gzip
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_NET
from helpers import BUNDLE, leftover_temporaries, save_dicom_series, save_nifti, synthetic_heart

from cmr_ood.networks import CMRUNet

CONFIGS = BUNDLE / "configs"


def bundle_run(*config_files, cwd=None, **overrides):
    args = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(BUNDLE),
            "--config_file", json.dumps([str(CONFIGS / f) for f in config_files]) if len(config_files) > 1 else str(CONFIGS / config_files[0])]
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)


def tiny(checkpoint, ood_state=None):
    overrides = {"checkpoint": str(checkpoint), "network_def#channels": TINY_NET["channels"],
                 "network_def#num_res_units": TINY_NET["num_res_units"], "inferer#roi_size": [32, 32]}
    return {**overrides, "ood_state": str(ood_state)} if ood_state else {**overrides, "score_ood": "False"}  # fire reads Python literals


@pytest.fixture(scope="module")
def tiny_calibration(tmp_path_factory, synthetic_dataset, tiny_checkpoint):
    """The tiny network's OOD scorer fitted by configs/calibrate.json on the synthetic manifest."""
    root, manifest = synthetic_dataset
    state = tmp_path_factory.mktemp("ood") / "ood_state.pt"
    result = bundle_run("inference.json", "calibrate.json", manifest=str(manifest), data_root=str(root), fit_folds=[1, 2],
                        validation_subjects=["subject0", "subject3"], ood_state=str(state),
                        **{k: v for k, v in tiny(tiny_checkpoint).items() if k != "score_ood"})
    assert result.returncode == 0, result.stderr[-3000:]
    return state, result


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory, tiny_checkpoint, tiny_calibration):
    data = tmp_path_factory.mktemp("inputs")
    image, labels = synthetic_heart(shape=(48, 44, 5))
    save_nifti(data / "acdc_like.nii.gz", image, spacing=(1.5625, 1.5625, 10.0), acdc_header=True)
    save_nifti(data / "acdc_like_gt.nii.gz", labels, dtype=np.uint8)  # a label file: skipped
    save_nifti(data / "site2" / "plain.nii", image.transpose(2, 0, 1), spacing=(8.0, 1.2, 1.2))
    save_dicom_series(data / "dicom" / "study1", image)
    save_nifti(data / "cine.nii.gz", np.stack([image, image * 0.9, image * 1.1], -1))
    (data / "junk.nii.gz").write_bytes(gzip.compress(b"not an image at all" * 40))
    good = (data / "acdc_like.nii.gz").read_bytes()
    (data / "truncated.nii.gz").write_bytes(good[: len(good) // 3])
    save_nifti(data / "flat.nii.gz", image[..., 0], spacing=(1.5, 1.5))
    bad = image.copy()
    bad[1, 1, 1] = np.inf
    save_nifti(data / "infinite.nii.gz", bad)
    (data / "broken.dcm").write_bytes(b"\x00" * 300)
    (data / "README.txt").write_text("not a case")
    out = tmp_path_factory.mktemp("outputs") / "run"
    result = bundle_run("inference.json", dataset_dir=str(data), output_dir=str(out), **tiny(tiny_checkpoint, tiny_calibration[0]))
    return data, out, result


def test_batch_segments_good_cases_and_reports_bad_ones(batch_run):
    data, out, result = batch_run
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["image"].replace(str(data) + "/", ""): r for r in json.loads((out / "cases.json").read_text())}
    assert set(records) == {"acdc_like.nii.gz", "site2/plain.nii", "dicom/study1", "cine.nii.gz", "junk.nii.gz",
                            "truncated.nii.gz", "flat.nii.gz", "infinite.nii.gz", "broken.dcm"}
    ok = {k for k, r in records.items() if r["status"] == "ok"}
    assert ok == {"acdc_like.nii.gz", "site2/plain.nii", "dicom/study1", "cine.nii.gz"}
    expected_errors = {"junk.nii.gz": "cannot be read", "truncated.nii.gz": "truncated or corrupt", "flat.nii.gz": "2D image",
                       "infinite.nii.gz": "NaN or infinite", "broken.dcm": "not a NIfTI file or a readable DICOM"}
    for name, message in expected_errors.items():
        assert message in records[name]["error"] and records[name]["outputs"] == {}
    assert set(records["acdc_like.nii.gz"]["measurements"]) == {"lv_volume_ml", "rv_volume_ml", "myo_volume_ml", "myo_mass_g"}
    assert len(records["cine.nii.gz"]["measurements"]["lv_volume_ml"]) == 3
    assert leftover_temporaries(out) == []


def test_outputs_are_on_the_input_grid_with_the_input_header(batch_run):
    data, out, _ = batch_run
    pairs = [("acdc_like.nii.gz", "acdc_like_seg.nii.gz"), ("site2/plain.nii", "site2/plain_seg.nii.gz"), ("cine.nii.gz", "cine_seg.nii.gz")]
    for name, seg in pairs:
        source, written = nib.load(data / name), nib.load(out / seg)
        assert written.shape == source.shape and written.get_data_dtype() == np.uint8
        assert written.header.get_zooms() == source.header.get_zooms()
        assert np.allclose(written.affine, source.affine)
        assert set(np.unique(np.asanyarray(written.dataobj))) <= {0, 1, 2, 3}
    dicom_seg = nib.load(out / "dicom" / "study1_seg.nii.gz")
    assert dicom_seg.shape == (48, 44, 5) and np.allclose(np.abs(np.diag(dicom_seg.affine))[:3], (1.2, 1.2, 8.0))


def test_rerun_into_the_same_output_is_refused_and_leaves_results(batch_run, tiny_checkpoint):
    data, out, _ = batch_run
    before = (out / "cases.json").read_text()
    result = bundle_run("inference.json", dataset_dir=str(data), output_dir=str(out), **tiny(tiny_checkpoint))
    assert result.returncode != 0 and "exists already" in result.stderr
    assert (out / "cases.json").read_text() == before


def test_manifest_input_and_evaluation(synthetic_dataset, tiny_checkpoint, tmp_path):
    root, manifest = synthetic_dataset
    result = bundle_run("inference.json", manifest=str(manifest), data_root=str(root), output_dir=str(tmp_path / "m"),
                        **tiny(tiny_checkpoint))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads((tmp_path / "m" / "cases.json").read_text())) == 12
    result = bundle_run("inference.json", "evaluate.json", manifest=str(manifest), data_root=str(root), folds=[0],
                        output_dir=str(tmp_path / "eval"), **tiny(tiny_checkpoint))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and "dice_LV" in rows[0] and "hd95_RV" in rows[0]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["num_volumes"] == 4 and set(summary) >= {"all", "ED", "ES", "lv_ef_error_pct"}


def test_scored_cases_carry_scores_a_flag_and_an_uncertainty_map(batch_run, tiny_calibration):
    data, out, _ = batch_run
    state, calibration = tiny_calibration
    summary = json.loads((state.parent / "calibration_summary.json").read_text())
    assert summary["validation_volumes"] == 4 and summary["default"] in summary["thresholds"]
    assert (state.parent / "reliability_after.png").stat().st_size > 1000
    records = {r["image"].replace(str(data) + "/", ""): r for r in json.loads((out / "cases.json").read_text())}
    for name in ("acdc_like.nii.gz", "dicom/study1", "cine.nii.gz"):
        record = records[name]
        assert {"entropy_fg", "position_fg", "spectral_bottleneck", "mahalanobis_bottleneck"} <= set(record["scores"])
        assert record["default_detector"] in record["scores"] and isinstance(record["ood_flag"], bool)
        assert record["default_score"] == record["scores"][record["default_detector"]] or record["default_score"] is None
        uncertainty = nib.load(record["outputs"]["uncertainty"])
        source = nib.load(record["image"]) if name != "dicom/study1" else nib.load(record["outputs"]["segmentation"])
        assert uncertainty.shape == source.shape and uncertainty.get_data_dtype() == np.uint8  # levels, scaled by the slope
        assert np.allclose(uncertainty.affine, source.affine)
        values = np.asanyarray(uncertainty.dataobj)
        assert np.isfinite(values).all() and 0 <= values.min() and values.max() <= 1 + 1e-5  # normalised entropy
    assert "error" in records["junk.nii.gz"] and "scores" not in records["junk.nii.gz"]
    for name in ("acdc_like.nii.gz", "cine.nii.gz"):  # a random tiny network: QC gives a verdict with reasons
        qc = records[name]["qc"]
        assert isinstance(qc["passed"], bool) and qc["passed"] == (qc["failed"] == [])


def test_scoring_with_a_state_fitted_for_other_weights_is_refused(tmp_path, tiny_calibration, synthetic_dataset):
    root, manifest = synthetic_dataset
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.save(CMRUNet(heads={"mim": 1, "position": 1}, **TINY_NET).state_dict(), other)
    result = bundle_run("inference.json", manifest=str(manifest), data_root=str(root), output_dir=str(tmp_path / "o"),
                        **tiny(other, tiny_calibration[0]))
    assert result.returncode != 0 and "fitted for other weights" in result.stderr
    assert not (tmp_path / "o" / "cases.json").exists()


def test_ood_evaluation_scores_shifted_and_far_cases(tmp_path, tiny_calibration, tiny_checkpoint, synthetic_dataset):
    root, manifest = synthetic_dataset
    far = tmp_path / "far"
    save_nifti(far / "noise.nii.gz", np.random.default_rng(0).random((30, 30, 3)).astype(np.float32) * 100, spacing=(1.0, 1.0, 1.0))
    out = tmp_path / "ood_eval"
    result = bundle_run("inference.json", "evaluate_ood.json", manifest=str(manifest), data_root=str(root),
                        test_subjects=["subject1", "subject4"], shifts=["gibbs_ringing", "fov_crop"], severities=[5],
                        far_ood_dir=str(far), output_dir=str(out), **tiny(tiny_checkpoint, tiny_calibration[0]))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 4 + 2 * 4 + 1 and all("scores" in r for r in rows)
    assert all(0 <= r["dice"] <= 1 for r in rows if r["kind"] != "far") and rows[-1]["dice"] is None
    assert all("pass/lv_coverage" in r["qc"] and "lv_volume_ml" in r["qc"] for r in rows)  # QC features of each case
    assert all(r["volumes_true"]["lv_volume_ml"] >= 0 for r in rows if r["kind"] != "far") and "volumes_true" not in rows[-1]
    summary = json.loads((out / "ood_summary.json").read_text())
    block = summary["scores"][summary["default"]]
    assert {"gibbs_ringing@5", "fov_crop@5", "far_ood", "silent_failures"} <= set(block)
    assert 0 <= block["far_ood"]["auroc"] <= 1
    assert "| entropy_fg |" in (out / "ood_tables.md").read_text()
    again = bundle_run("inference.json", "evaluate_ood.json", manifest=str(manifest), data_root=str(root),
                       test_subjects=["subject1", "subject4"], shifts=["gibbs_ringing", "fov_crop"], severities=[5],
                       far_ood_dir=str(far), output_dir=str(out), **tiny(tiny_checkpoint, tiny_calibration[0]))
    assert again.returncode == 0 and len((out / "scores.jsonl").read_text().splitlines()) == len(rows)  # resumed, not redone
