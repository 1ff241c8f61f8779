"""Batch inference under bad input and faults: several DICOM series, manifests leaving their data root,
unusable output folders, concurrent and killed runs, cine function, determinism, unsafe pickles."""

import csv
import json
import math
import multiprocessing
import os
import signal
import socket
import subprocess

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_NET
from helpers import save_dicom_series, save_nifti, synthetic_heart
from monai.inferers import SimpleInferer, SlidingWindowInferer

from cmr_ood.data.io import Volume, is_partial_file, write_like
from cmr_ood.data.labels import LV, MYO, NUM_CLASSES, RV
from cmr_ood.inference import (
    CASES_FILE,
    LOCK_FILE,
    PROGRESS_FILE,
    TABLE_FILE,
    OutputDirError,
    OutputLock,
    Segmenter,
    _cases,
    add_subject_results,
    doubts,
    quantised,
    run_batch,
    segment_case,
)
from cmr_ood.networks import CMRUNet, load_weights
from cmr_ood.ood import Mahalanobis, OODScorer, PositionError, SoftmaxScore
from cmr_ood.qc.checks import check_volume
from cmr_ood.qc.classifier import QCClassifier
from cmr_ood.qc.groups import FEATURES, GROUPS, GroupClassifier
from cmr_ood.qc.measurements import MYOCARDIAL_DENSITY

pytestmark = pytest.mark.usefixtures("one_thread")


def stray_temporaries(folder) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if is_partial_file(f)]


def tiny_segmenter(seed=0) -> Segmenter:
    torch.manual_seed(seed)
    network = CMRUNet(heads={"mim": 1, "position": 1}, **TINY_NET)
    return Segmenter(network, SlidingWindowInferer(roi_size=[48, 48], sw_batch_size=8, overlap=0.25, mode="gaussian"))


def small_cases(folder, count=5):
    for i in range(count):
        save_nifti(folder / f"case{i}.nii.gz", synthetic_heart(shape=(40, 36, 3), seed=i)[0])
    return folder


# ------------------------------------------------------------------------------------- bad input
def test_each_series_of_a_dicom_folder_is_its_own_case(tmp_path):
    image = synthetic_heart(shape=(40, 36, 3))[0]
    study = tmp_path / "data" / "study"
    for uid in ("1.2.3.4.100", "1.2.3.4.200"):
        for f in save_dicom_series(tmp_path / uid, image, series_uid=uid).iterdir():
            study.mkdir(parents=True, exist_ok=True)
            f.rename(study / f"{uid}_{f.name}")
    records = run_batch(tiny_segmenter(), tmp_path / "out", dataset_dir=tmp_path / "data")
    assert [(r["status"], r["series_uid"]) for r in records] == [("ok", "1.2.3.4.100"), ("ok", "1.2.3.4.200")]
    names = [os.path.relpath(r["outputs"]["segmentation"], tmp_path / "out") for r in records]
    assert names == ["study_.3.4.100_seg.nii.gz", "study_.3.4.200_seg.nii.gz"]  # the folder, and the end of the UID


def test_manifest_entries_outside_the_data_root_are_refused_and_the_rest_run(tmp_path):
    root = tmp_path / "root"
    for name in ("a", "sub/b"):
        save_nifti(root / f"{name}.nii.gz", synthetic_heart(shape=(40, 36, 3))[0])
    outside = save_nifti(tmp_path / "secret.nii.gz", synthetic_heart(shape=(40, 36, 3))[0])
    entries = ["a.nii.gz", "../secret.nii.gz", outside, str(root / "sub" / "b.nii.gz"), "sub/../a.nii.gz"]
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"training": [{"image": e} for e in entries] + [{"subject": "no image"}]}))
    records = run_batch(tiny_segmenter(), tmp_path / "out", manifest=manifest)
    assert [r["status"] for r in records] == ["ok", "error", "error", "ok", "error", "error"]
    for r in records[1:3]:
        assert r["error"] == f"manifest path lies outside the data root {root}: paths must stay inside it"
    assert "repeats an earlier case" in records[4]["error"] and "names no 'image'" in records[5]["error"]
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*_seg.nii.gz"))
    assert written == ["out/a_seg.nii.gz", "out/sub/b_seg.nii.gz"]  # an absolute entry's output stays in the output folder


def test_an_unusable_output_folder_is_refused_before_any_work(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    missing_input = tmp_path / "no_such_dataset"  # had the run started, this would be the error
    with pytest.raises(OutputDirError, match=f"{afile}: exists and is not a folder"):
        run_batch(tiny_segmenter(), afile, dataset_dir=missing_input)
    with pytest.raises(OutputDirError, match=f"{afile / 'out'}: the output folder cannot be created"):
        run_batch(tiny_segmenter(), afile / "out", dataset_dir=missing_input)
    if os.geteuid() != 0:  # permissions do not bind root
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OutputDirError, match="not readable and writable"):
            run_batch(tiny_segmenter(), locked, dataset_dir=missing_input)


# ------------------------------------------------------------------------------------- two runs
def test_a_second_run_into_a_held_output_folder_fails_at_start(tmp_path):
    data, out = small_cases(tmp_path / "data", 1), tmp_path / "out"
    out.mkdir()
    with OutputLock(out):
        holder = json.loads((out / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(OutputDirError, match=rf"in use by another run \(PID {os.getpid()} on host {socket.gethostname()}"):
            run_batch(tiny_segmenter(), out, dataset_dir=data)
        assert (out / LOCK_FILE).exists() and not (out / CASES_FILE).exists()
    assert not (out / LOCK_FILE).exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": "another-host"}))
    with pytest.raises(OutputDirError, match="PID .* on host another-host"):  # another host's process cannot be checked
        run_batch(tiny_segmenter(), out, dataset_dir=data)
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert run_batch(tiny_segmenter(), out, dataset_dir=data)[0]["status"] == "ok"  # a dead run's lock is taken over
    assert not (out / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------- killed run
def _run_killed_while_writing(data, out, kill_at):
    """A run that SIGKILLs itself while writing its ``kill_at``-th output (after the temporary file exists)."""
    written = []
    save = nib.save

    def save_then_die(img, path):
        save(img, path)
        written.append(path)
        if len(written) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    nib.save = save_then_die
    run_batch(tiny_segmenter(), out, dataset_dir=data, workers=1)  # one worker: the kill lands at the same case every time


def test_a_killed_run_resumes_where_it_stopped(tmp_path):
    data, out = small_cases(tmp_path / "data", 5), tmp_path / "out"
    child = multiprocessing.get_context("fork").Process(target=_run_killed_while_writing, args=(data, out, 3))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == child.pid  # the killed run's lock is left behind
    assert len(stray_temporaries(out)) == 1 and not (out / CASES_FILE).exists()
    lines = [json.loads(line) for line in (out / PROGRESS_FILE).read_text().splitlines()]
    assert [("started" in x, x.get("status")) for x in lines] == [(True, None), (False, "ok")] * 2 + [(True, None)]
    kept = {p: p.stat().st_mtime_ns for p in out.glob("case[01]_seg.nii.gz")}
    assert len(kept) == 2

    with pytest.raises(FileExistsError, match="was interrupted; set resume to finish it"):
        run_batch(tiny_segmenter(), out, dataset_dir=data)
    segmenter = tiny_segmenter()
    segmented = []
    network_passes = segmenter.network_passes
    segmenter.network_passes = lambda volumes, scorer=None: segmented.extend(v.path for v in volumes) or network_passes(volumes, scorer)
    records = run_batch(segmenter, out, dataset_dir=data, resume=True)

    assert [os.path.basename(p) for p in segmented] == ["case2.nii.gz", "case3.nii.gz", "case4.nii.gz"]
    assert [r["status"] for r in records] == ["ok"] * 5 and records[:2] == [x for x in lines if "status" in x]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished cases were not redone
    assert json.loads((out / CASES_FILE).read_text()) == records
    assert stray_temporaries(out) == [] and not (out / PROGRESS_FILE).exists() and not (out / LOCK_FILE).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([CASES_FILE, TABLE_FILE] + [f"case{i}_seg.nii.gz" for i in range(5)])


def test_resume_keeps_only_finished_cases_with_their_outputs(tmp_path):
    data, out = small_cases(tmp_path / "data", 3), tmp_path / "out"
    first = run_batch(tiny_segmenter(), out, dataset_dir=data)
    os.remove(first[1]["outputs"]["segmentation"])
    save_nifti(data / "case0.nii.gz", np.zeros((4, 4), np.float32))  # now broken, but its finished record is kept
    again = run_batch(tiny_segmenter(), out, dataset_dir=data, resume=True)
    assert again[0] == first[0] and again[1]["status"] == "ok" and os.path.exists(again[1]["outputs"]["segmentation"])


# ------------------------------------------------------------------------------------- 4D cine
class IntensityClasses(torch.nn.Module):
    """A stand-in network labelling each pixel by its normalised intensity (background, MYO, RV, LV at 0,
    1/3, 2/3, 1), so that the segmentation of a synthetic cine is known exactly."""

    def __init__(self):
        super().__init__()
        self.register_buffer("centres", torch.tensor([0.0, 1 / 3, 2 / 3, 1.0])[[0, 3, 1, 2]])  # by label: bg, LV, MYO, RV

    def forward(self, x):
        return -100.0 * (x - self.centres.view(1, -1, 1, 1)) ** 2


def beating_cine(frames=8, shape=(60, 48, 4)):
    """LV disc (radius 12 at frame 0 down to 6 at frames/2), 3-pixel myocardial ring, RV disc beside it
    (radius 9 down to 5); intensities LV 300, RV 200, MYO 100, background 0."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    labels = np.zeros((*shape, frames), np.uint8)
    for t in range(frames):
        beat = np.cos(2 * np.pi * t / frames)
        r_lv, r_rv = 9 + 3 * beat, 7 + 2 * beat
        cx, cy = 20, 24
        frame = np.zeros(shape[:2], np.uint8)
        frame[np.hypot(x - (cx + r_lv + 3 + r_rv - 2), y - cy) < r_rv] = RV
        frame[np.hypot(x - cx, y - cy) < r_lv + 3] = MYO
        frame[np.hypot(x - cx, y - cy) < r_lv] = LV
        labels[..., t] = frame[..., None]
    intensity = np.zeros(4, np.float32)
    intensity[[LV, RV, MYO]] = 300, 200, 100
    return intensity[labels], labels


@pytest.mark.parametrize("stored", ["nifti", "dicom"])
def test_a_beating_cine_gets_its_volume_curves_ed_es_and_function(tmp_path, stored):
    image, truth = beating_cine()
    spacing = (1.25, 1.25, 8.0)  # the preprocessing grid: no resampling, so the segmentation is exact
    if stored == "nifti":
        save_nifti(tmp_path / "data" / "cine.nii.gz", image, spacing=spacing)
    else:  # one series holding every slice at every phase, as most scanners store a cine
        save_dicom_series(tmp_path / "data" / "cine", image, spacing=spacing)
    segmenter = Segmenter(IntensityClasses(), SimpleInferer())
    record = run_batch(segmenter, tmp_path / "out", dataset_dir=tmp_path / "data")[0]
    assert record["status"] == "ok"
    assert np.array_equal(nib.load(record["outputs"]["segmentation"]).get_fdata(), truth)
    voxel_ml = np.prod(spacing) / 1000
    lv, rv = ((truth == s).sum((0, 1, 2)) * voxel_ml for s in (LV, RV))
    function = record["cardiac_function"]
    assert function["lv_volume_curve_ml"] == pytest.approx(lv, abs=0.01)
    assert function["rv_volume_curve_ml"] == pytest.approx(rv, abs=0.01)
    assert (function["ed_frame"], function["es_frame"]) == (0, 4)
    edv, esv = round(lv[0], 2), round(lv[4], 2)
    assert function["lv_edv_ml"] == pytest.approx(edv) and function["lv_esv_ml"] == pytest.approx(esv)
    assert function["lv_sv_ml"] == pytest.approx(edv - esv)
    assert function["lv_ef_pct"] == pytest.approx(100 * (edv - esv) / edv, abs=0.01)
    assert 70 < function["lv_ef_pct"] < 80  # radius 12 -> 6: about 1 - 1/4 of the area
    assert function["rv_ef_pct"] == pytest.approx(100 * (rv[0] - rv[4]) / rv[0], abs=0.01)
    assert function["myo_mass_g"] == pytest.approx((truth[..., 0] == MYO).sum() * voxel_ml * MYOCARDIAL_DENSITY, abs=0.01)
    assert record["subject_qc"] == {"passed": record["qc"]["passed"], "failed": record["qc"]["failed"]}  # not scored: no doubts
    assert isinstance(record["qc"]["passed"], bool)


def test_a_manifest_subject_with_ed_and_es_gets_its_function_and_pair_qc(tmp_path):
    image, truth = beating_cine()
    spacing = (1.25, 1.25, 8.0)
    data = tmp_path / "data"
    for frame, name in ((0, "s1_ed"), (4, "s1_es"), (4, "swapped_ed"), (0, "swapped_es"), (0, "alone_ed")):
        save_nifti(data / f"{name}.nii.gz", image[..., frame], spacing=spacing)
    entries = [{"image": f"{name}.nii.gz", "subject": name.split("_")[0], "phase": name.split("_")[1].upper()}
               for name in ("s1_ed", "s1_es", "swapped_ed", "swapped_es", "alone_ed")]
    (data / "manifest.json").write_text(json.dumps({"training": entries}))
    # a group classifier that always says HCM: shows where estimates go, not how good they are (tests/test_groups.py)
    features = len(FEATURES)
    always_hcm = GroupClassifier(centre=torch.zeros(features, dtype=torch.float64), scale=torch.ones(features, dtype=torch.float64),
                                 weights=torch.zeros(features, len(GROUPS), dtype=torch.float64),
                                 bias=torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0], dtype=torch.float64))
    records = run_batch(Segmenter(IntensityClasses(), SimpleInferer()), tmp_path / "out", manifest=data / "manifest.json",
                        group_classifier=always_hcm)
    ed, es, swapped_ed, swapped_es, alone = records
    assert ed["group_estimate"] == es["group_estimate"] and ed["group_estimate"]["group"] == "HCM"
    assert "group_estimate" not in alone
    assert ed["cardiac_function"] == es["cardiac_function"] and ed["subject_qc"] == es["subject_qc"]
    voxel_ml = np.prod(spacing) / 1000
    edv, esv = ((truth[..., t] == LV).sum() * voxel_ml for t in (0, 4))
    function = ed["cardiac_function"]
    assert function["lv_edv_ml"] == pytest.approx(edv, abs=0.01) and function["lv_esv_ml"] == pytest.approx(esv, abs=0.01)
    assert function["lv_ef_pct"] == pytest.approx(100 * (edv - esv) / edv, abs=0.05)
    assert not any("is not below its ED volume" in reason for reason in ed["subject_qc"]["failed"])
    # ED and ES mislabelled: the subject's QC says so, each volume's own QC cannot
    assert swapped_ed["subject_qc"]["passed"] is False
    assert any("LV ES volume" in reason and "is not below its ED volume" in reason for reason in swapped_ed["subject_qc"]["failed"])
    assert swapped_ed["qc"] == ed["qc"] or swapped_ed["qc"] == es["qc"]
    assert "cardiac_function" not in alone and "subject_qc" not in alone
    # the same results as a table, one row per case
    with open(tmp_path / "out" / "cases.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["subject"], r["phase"], r["status"]) for r in rows] == [(r["subject"], r["phase"], "ok") for r in records]
    assert float(rows[0]["lv_ef_pct"]) == pytest.approx(function["lv_ef_pct"]) and rows[4]["lv_ef_pct"] == ""
    assert float(rows[0]["lv_volume_ml"]) == pytest.approx(ed["measurements"]["lv_volume_ml"])
    assert rows[2]["subject_qc_passed"] == "False" and "is not below its ED volume" in rows[2]["subject_qc_failed"]
    assert rows[0]["group_estimate"] == "HCM" and rows[0]["segmentation"] == ed["outputs"]["segmentation"]
    # an untrusted volume makes its subject's function untrusted: the OOD flag, or a likely failure
    checks = list(ed["subject_qc"]["failed"])
    es.update(ood_flag=True, default_score=2.5, default_detector="zsum")
    ed["qc"]["failure_probability"] = 0.7
    add_subject_results(records)
    assert ed["subject_qc"] == es["subject_qc"] and ed["subject_qc"]["passed"] is False
    assert ed["subject_qc"]["failed"] == checks + ["ED: segmentation likely failed (QC classifier: failure probability 0.70)",
                                                   "ES: flagged as out of distribution (zsum 2.50)"]
    assert doubts({"ood_flag": True, "default_score": None}) == ["no heart found"]
    assert doubts({"ood_flag": False, "qc": {"failure_probability": 0.49}}) == []


# ------------------------------------------------------------------------------------- determinism
def detectors():
    return [SoftmaxScore("entropy"), PositionError(), Mahalanobis("enc2")]


def fitted_scorer_state(folder):
    """An OOD state of the seed-0 tiny segmenter, fitted on synthetic volumes."""
    def volume(seed):
        image, labels = synthetic_heart(shape=(40, 36, 3), seed=seed)
        return Volume(image, (1.5, 1.5, 8.0), np.diag([1.5, 1.5, 8.0, 1.0]), f"v{seed}"), labels

    fitting = tiny_segmenter(seed=0)
    scorer = OODScorer(detectors(), default="entropy_fg")
    validation = []
    for s in (20, 21, 22):
        v, labels = volume(s)
        case, geometry = fitting.outputs(v, taps=scorer.taps)
        validation.append((case, fitting.preprocessing.resample_labels(labels, geometry, NUM_CLASSES)))
    return scorer.fit((fitting.outputs(volume(s)[0], taps=scorer.taps)[0] for s in (30, 31)), validation).save(folder / "s.pt")


def test_same_seed_and_config_give_bit_identical_segmentations_and_scores(tmp_path):
    state = fitted_scorer_state(tmp_path)
    case = _cases(dataset_dir=small_cases(tmp_path / "data", 1))[0]

    def run(name, seed=0):
        record = segment_case(tiny_segmenter(seed), case, tmp_path / name, False, OODScorer(detectors(), default="entropy_fg", state=state))
        return record, [np.asanyarray(nib.load(record["outputs"][k]).dataobj) for k in ("segmentation", "uncertainty")]

    (first, arrays1), (second, arrays2), (other, _) = run("a"), run("b"), run("c", seed=1)
    assert first["scores"] == second["scores"] and first["measurements"] == second["measurements"]
    assert all(np.array_equal(a, b) for a, b in zip(arrays1, arrays2)) and 0 <= arrays1[1].min() and arrays1[1].max() <= 1 + 1e-5
    assert first["scores"] != other["scores"]  # the seed matters (the maps of two random tiny networks are uniform to within a level)


def test_a_flagged_cine_does_not_pass_its_subject_verdict(tmp_path):
    scorer = OODScorer(detectors(), default="entropy_fg", state=fitted_scorer_state(tmp_path))
    scorer.thresholds["entropy_fg"] = -math.inf  # every case flagged
    save_nifti(tmp_path / "data" / "cine.nii.gz", beating_cine()[0], spacing=(1.25, 1.25, 8.0))
    record = run_batch(tiny_segmenter(), tmp_path / "out", dataset_dir=tmp_path / "data", scorer=scorer)[0]
    assert record["ood_flag"] and record["cardiac_function"]
    assert record["subject_qc"]["passed"] is False
    assert record["subject_qc"]["failed"] == record["qc"]["failed"] + [f"flagged as out of distribution (entropy_fg {record['default_score']:.2f})"]


def test_a_qc_classifier_gives_each_record_its_failure_probability(tmp_path):
    state = fitted_scorer_state(tmp_path)
    features = ["qc:lv_volume_ml", "qc:pass/lv_ring", "score:entropy_fg"]
    classifier = QCClassifier(features, centre=torch.tensor([100.0, 1.0, 0.5], dtype=torch.float64),
                              scale=torch.tensor([50.0, 1.0, 0.1], dtype=torch.float64),
                              weights=torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), bias=torch.tensor(-1.0, dtype=torch.float64))
    scorer = OODScorer(detectors(), default="entropy_fg", state=state)
    records = run_batch(tiny_segmenter(), tmp_path / "out", dataset_dir=small_cases(tmp_path / "data", 2), scorer=scorer,
                        qc_classifier=classifier)
    for record in records:
        segmentation = nib.load(record["outputs"]["segmentation"])
        checks = check_volume(np.asanyarray(segmentation.dataobj), segmentation.header.get_zooms()).features()
        z = [(checks["lv_volume_ml"] - 100) / 50, checks["pass/lv_ring"] - 1, (record["scores"]["entropy_fg"] - 0.5) / 0.1]
        z = [min(max(v, -8), 8) for v in z]
        expected = 1 / (1 + math.exp(-(0.5 * z[0] - z[1] + 2 * z[2] - 1)))
        assert record["qc"]["failure_probability"] == pytest.approx(expected, abs=1e-3)
    # fitted on the scores of another OOD state: the run goes on without failure probabilities, and says why
    classifier.ood_state_digest = "b" * 64
    with pytest.warns(UserWarning, match="QC classifier was fitted on the scores of another OOD state"):
        records = run_batch(tiny_segmenter(), tmp_path / "other", dataset_dir=tmp_path / "data", scorer=scorer, qc_classifier=classifier)
    assert all(r["status"] == "ok" and "failure_probability" not in r["qc"] and r["scores"] for r in records)


# ------------------------------------------------------------------------------------- security
class CodeInPickle:
    """Runs ``os.mkdir(marker)`` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_checkpoints_and_ood_states_holding_code_are_refused(tmp_path):
    marker, path = tmp_path / "code_ran", tmp_path / "evil.pt"
    torch.save({"state_dict": CodeInPickle(marker)}, path)
    torch.load(path, weights_only=False)  # the file really runs code when loaded unsafely
    assert marker.is_dir()
    marker.rmdir()
    with pytest.raises(Exception, match="Weights only load failed"):
        load_weights(CMRUNet(**TINY_NET), path)
    with pytest.raises(ValueError, match="not a fitted OOD state"):
        OODScorer([SoftmaxScore("entropy")], state=str(path))
    assert not marker.exists()


def test_the_uncertainty_map_is_stored_as_levels_that_read_back_within_half_a_level(tmp_path):
    rng = np.random.default_rng(0)
    values = (rng.random((20, 16, 3)) * 0.8).astype(np.float32)
    levels, slope = quantised(values)
    assert levels.dtype == np.uint8 and slope == pytest.approx(values.max() / 255)
    volume = Volume(np.zeros(values.shape, np.float32), (1.5, 1.5, 8.0), np.diag([1.5, 1.5, 8.0, 1.0]), "case")
    written = nib.load(write_like(levels, volume, tmp_path / "map.nii.gz", slope=slope))
    assert written.get_data_dtype() == np.uint8
    assert np.abs(np.asanyarray(written.dataobj) - values).max() <= slope / 2 + 1e-6  # the slope is stored as float32
    for kept in (values - 0.5, np.where(values > 0.7, np.inf, values), np.zeros_like(values)):  # negative, infinite, all zero
        array, one = quantised(kept)
        assert array.dtype == np.float32 and one == 1.0 and np.array_equal(array, kept)
