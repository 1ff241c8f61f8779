import json

import numpy as np
import pytest
from helpers import DATA_ROOT, REPO, requires_data, save_dicom_series, save_nifti, synthetic_heart

from cmr_ood.data.io import CaseError
from cmr_ood.data.manifests import build_acdc_manifest, discover, folder_entries, mnms_entries, phase_from_name, select

GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")


def fake_acdc(root, per_group=5):
    """ACDC layout with tiny volumes; patient002 and patient007 hold identical images."""
    n = 0
    for group in GROUPS:
        for _ in range(per_group):
            n += 1
            folder = root / "acdc" / "training" / f"patient{n:03d}"
            folder.mkdir(parents=True)
            (folder / "Info.cfg").write_text(f"ED: 1\nES: 5\nGroup: {group}\nHeight: 170.0\nNbFrame: 20\nWeight: 70.0\n")
            seed = 2 if n == 7 else n
            for frame in (1, 5):
                image, labels = synthetic_heart(shape=(12, 10, 3), radius=3, seed=seed * 10 + frame, canonical=False)
                save_nifti(folder / f"patient{n:03d}_frame{frame:02d}.nii.gz", image, acdc_header=True)
                save_nifti(folder / f"patient{n:03d}_frame{frame:02d}_gt.nii.gz", labels, acdc_header=True, dtype=np.uint8)
    return root


def test_acdc_manifest_folds_duplicates_and_low_label_subsets(tmp_path):
    manifest = build_acdc_manifest(fake_acdc(tmp_path), seed=0)
    entries = manifest["training"]
    assert len(entries) == 50 and {e["phase"] for e in entries} == {"ED", "ES"}
    assert all((tmp_path / e["image"]).exists() and (tmp_path / e["label"]).exists() for e in entries)
    assert entries[0]["spacing"] == [1.5, 1.5, 8.0] and entries[0]["group"] == "DCM"
    assert manifest["duplicate_subjects"] == [["patient002", "patient007"]]
    fold = {e["subject"]: e["fold"] for e in entries}
    assert fold["patient002"] == fold["patient007"]
    for k in range(5):  # stratified: each fold has every group but one of the duplicate pair's
        assert len({e["group"] for e in entries if e["fold"] == k}) >= 4
    test_subjects = {s for s, f in fold.items() if f == manifest["test_fold"]}
    for subsets in manifest["low_label"].values():
        assert len(subsets["5"]) == 5 and len({fold[s] for s in subsets["5"]} & {manifest["test_fold"]}) == 0
        assert {e["group"] for e in entries if e["subject"] in subsets["5"]} == set(GROUPS)
        assert set(subsets["5"]) <= set(subsets["10"]) and not set(subsets["10"]) & test_subjects
    assert len(select(manifest, folds=[0], phases=["ED"])) == len([s for s in fold.values() if s == 0])
    assert manifest["low_label"]["seed0"] != manifest["low_label"]["seed1"]
    assert build_acdc_manifest(tmp_path, seed=0) == manifest  # reproducible


def test_mnms_layouts_read_vendor_and_centre(tmp_path):
    image, labels = synthetic_heart(shape=(12, 10, 3), radius=3)
    for code in ("001", "002"):  # M&Ms-2 style
        for phase in ("ED", "ES"):
            save_nifti(tmp_path / "mnms2" / code / f"{code}_SA_{phase}.nii.gz", image)
            save_nifti(tmp_path / "mnms2" / code / f"{code}_SA_{phase}_gt.nii.gz", labels, dtype=np.uint8)
    (tmp_path / "info.csv").write_text("SUBJECT_CODE,DISEASE,VENDOR,CENTRE\n001,NOR,Siemens,1\n002,ARR,Philips,2\n")
    entries = mnms_entries(tmp_path / "mnms2", tmp_path / "info.csv", tmp_path)
    assert len(entries) == 4 and entries[2]["vendor"] == "Philips" and entries[2]["group"] == "ARR"
    cine = np.stack([image] * 4, -1)  # M&Ms-1 style: 4D file, ED/ES frame indices in the CSV
    save_nifti(tmp_path / "mnms1" / "A1B2C3" / "A1B2C3_sa.nii.gz", cine)
    (tmp_path / "m1.csv").write_text("External code,VendorName,Vendor,Centre,ED,ES\nA1B2C3,GE,C,3,0,2\n")
    entries = mnms_entries(tmp_path / "mnms1", tmp_path / "m1.csv", tmp_path)
    assert [(e["phase"], e["frame_index"], e["vendor"]) for e in entries] == [("ED", 0, "GE"), ("ES", 2, "GE")]
    with pytest.raises(CaseError, match="no subject column"):
        (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
        mnms_entries(tmp_path / "mnms2", tmp_path / "bad.csv", tmp_path)


def test_discover_finds_nifti_and_dicom_and_reports_junk(tmp_path):
    image, labels = synthetic_heart()
    save_nifti(tmp_path / "a.nii.gz", image)
    save_nifti(tmp_path / "a_gt.nii.gz", labels, dtype=np.uint8)
    save_nifti(tmp_path / "sub" / "b.nii", image)
    save_dicom_series(tmp_path / "dicom" / "study", image)
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "broken.dcm").write_text("not dicom")
    found = discover(tmp_path)
    images = sorted(e["image"].replace(str(tmp_path), "") for e in found)
    assert images == ["/a.nii.gz", "/broken.dcm", "/dicom/study", "/sub/b.nii"]
    assert [e for e in found if e["image"].endswith("broken.dcm")][0]["error"].startswith("not a NIfTI")
    assert len([e for e in found if "dicom_files" in e][0]["dicom_files"]) == image.shape[2]
    entries = folder_entries(tmp_path, tmp_path, label_map="acdc")
    assert [(e["image"], e.get("label"), e["dataset"]) for e in entries] == [("a.nii.gz", "a_gt.nii.gz", "acdc"), ("sub/b.nii", None, "acdc")]
    with pytest.raises(ValueError, match="unknown label map"):
        folder_entries(tmp_path, tmp_path, label_map="nope")


def test_subject_and_phase_come_from_names_or_acdc_info_cfg(tmp_path):
    image, _ = synthetic_heart(shape=(12, 10, 3), radius=3)
    names = ["mnms/001_SA_ED.nii.gz", "mnms/001_SA_es.nii.gz", "acdc/p1/p1_frame01.nii.gz", "acdc/p1/p1_frame07.nii.gz",
             "acdc/p1/p1_frame03.nii.gz", "bad/p2/p2_frame01.nii.gz", "plain/scan.nii.gz", "twice/a/x_ED.nii.gz", "twice/b/x_ED.nii.gz"]
    for name in names:
        save_nifti(tmp_path / name, image)
    (tmp_path / "acdc" / "p1" / "Info.cfg").write_text("ED: 1\nES: 7\nGroup: NOR\nNbFrame: 20\n")
    (tmp_path / "bad" / "p2" / "Info.cfg").write_text("Group: NOR\n")  # no ED or ES entry: says nothing
    assert phase_from_name(tmp_path / "mnms" / "001_SA_es.nii.gz") == {"subject": "001_SA", "phase": "ES"}
    found = {e["image"].replace(str(tmp_path) + "/", ""): (e.get("subject"), e.get("phase")) for e in discover(tmp_path)}
    assert found == {"mnms/001_SA_ED.nii.gz": ("001_SA", "ED"), "mnms/001_SA_es.nii.gz": ("001_SA", "ES"),
                     "acdc/p1/p1_frame01.nii.gz": ("p1", "ED"), "acdc/p1/p1_frame07.nii.gz": ("p1", "ES"),
                     "acdc/p1/p1_frame03.nii.gz": (None, None), "bad/p2/p2_frame01.nii.gz": (None, None),
                     "plain/scan.nii.gz": (None, None),
                     # two stacks claim the same subject and phase: neither is paired
                     "twice/a/x_ED.nii.gz": (None, None), "twice/b/x_ED.nii.gz": (None, None)}
    entries = {e["image"]: (e["subject"], e.get("phase")) for e in folder_entries(tmp_path, tmp_path)}  # a manifest alike
    assert entries["mnms/001_SA_es.nii.gz"] == ("001_SA", "ES") and entries["plain/scan.nii.gz"] == ("scan", None)


@requires_data
def test_committed_acdc_manifest_is_reproducible_from_the_data():
    committed = json.loads((REPO / "data_manifests" / "acdc.json").read_text())
    assert build_acdc_manifest(DATA_ROOT, seed=committed["seed"]) == committed
    assert len(committed["training"]) == 200
    assert committed["duplicate_subjects"] == [["patient074", "patient076"]]
