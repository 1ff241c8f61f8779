"""Datasets on disk -> MONAI datalists (JSON), with folds and low-label subsets.

Paths in a manifest are relative to a data root (``../shared/data`` or ``$CMR_OOD_DATA``); each entry is
one volume: ``image`` (and ``label`` where known), ``subject``, ``phase``, ``dataset`` and what is known of
it. ``python -m cmr_ood.data.manifests acdc`` writes ``data_manifests/acdc.json``.

An entry's label may live elsewhere than its image (pseudo-labels written by
:mod:`cmr_ood.training.pseudo_labels`): ``label_root`` names the folder its ``label`` path is relative to
(default: the data root), ``label_map`` the label values' map (default: the entry's ``dataset``'s), and
``pseudo_label: true`` marks a label that a model made.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

from cmr_ood.data.io import CaseError, atomic_write, dicom_series, is_nifti, nifti_stem, read_image
from cmr_ood.data.labels import LABEL_MAPS, read_labels

LOW_LABEL_SIZES = (5, 10, 25, 50)
LOW_LABEL_SEEDS = (0, 1, 2)
#: Name endings of files that are labels or outputs, not images to segment.
NON_IMAGE_ENDINGS = ("_gt", "_seg", "_label", "_labels", "_uncertainty")
#: Suffixes of files beside images that are not DICOM (ACDC's Info.cfg, notes, tables): no series is looked for.
NOT_DICOM = frozenset((".cfg", ".txt", ".csv", ".json", ".md", ".yaml", ".yml", ".xml", ".png", ".jpg", ".jpeg", ".pdf"))


def default_data_root() -> Path:
    """``$CMR_OOD_DATA``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("CMR_OOD_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


# ---------------------------------------------------------------------------------------------- ACDC
def read_info_cfg(path: Path) -> dict:
    info = {}
    for line in Path(path).read_text().splitlines():
        if ":" in line:
            key, value = (s.strip() for s in line.split(":", 1))
            info[key] = value
    for key in ("ED", "ES", "NbFrame"):
        if key not in info:
            raise CaseError(path, f"Info.cfg has no '{key}' entry")
    return info


def acdc_entries(root: Path, data_root: Path) -> list[dict]:
    """One entry per ED/ES volume of an ACDC-layout folder (``patientNNN/Info.cfg``, ``_frameXX[_gt].nii.gz``)."""
    entries = []
    subjects = sorted(p for p in Path(root).iterdir() if p.is_dir() and (p / "Info.cfg").exists())
    if not subjects:
        raise CaseError(root, "no ACDC subject folders (patientNNN/Info.cfg) found")
    for subject_dir in subjects:
        info = read_info_cfg(subject_dir / "Info.cfg")
        for phase in ("ED", "ES"):
            frame = int(info[phase])
            image = subject_dir / f"{subject_dir.name}_frame{frame:02d}.nii.gz"
            label = subject_dir / f"{subject_dir.name}_frame{frame:02d}_gt.nii.gz"
            if not image.exists():
                raise CaseError(image, f"{phase} frame named in {subject_dir / 'Info.cfg'} is missing")
            header = nib.load(str(image)).header
            entry = {
                "image": os.path.relpath(image, data_root),
                "subject": subject_dir.name,
                "phase": phase,
                "frame": frame,
                "dataset": "acdc",
                "group": info.get("Group"),
                "height_cm": float(info["Height"]) if "Height" in info else None,
                "weight_kg": float(info["Weight"]) if "Weight" in info else None,
                "nb_frames": int(info["NbFrame"]),
                "vendor": "Siemens",
                "centre": "Dijon",
                "shape": [int(s) for s in header.get_data_shape()[:3]],
                "spacing": [round(float(z), 4) for z in header.get_zooms()[:3]],
            }
            if label.exists():
                entry["label"] = os.path.relpath(label, data_root)
            entries.append(entry)
    return entries


# ---------------------------------------------------------------------------------------------- M&Ms
_CSV_ALIASES = {
    "subject": ("external code", "subject_code", "subject", "code", "id"),
    "vendor": ("vendorname", "vendor", "tomographs manufacturer", "manufacturer"),
    "centre": ("centre", "center", "centre_id", "hospital"),
    "group": ("pathology", "disease", "group"),
    "ED": ("ed",),
    "ES": ("es",),
}


def _csv_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise CaseError(csv_path, "CSV has no rows")
    columns = {c.strip().lower(): c for c in rows[0] if c}
    resolved = {key: next((columns[a] for a in aliases if a in columns), None) for key, aliases in _CSV_ALIASES.items()}
    if resolved["subject"] is None:
        raise CaseError(csv_path, f"CSV has no subject column (one of {_CSV_ALIASES['subject']})")
    return [{k: (row[c].strip() if c and row.get(c) is not None else None) for k, c in resolved.items()} for row in rows]


def mnms_entries(root: Path, csv_path: Path, data_root: Path) -> list[dict]:
    """M&Ms layouts: M&Ms-2 (``CODE/CODE_SA_ED[_gt].nii.gz``) or M&Ms-1 (``CODE/CODE_sa[_gt].nii.gz`` 4D,
    ED/ES frame indices from the CSV). Vendor and centre come from the CSV."""
    files = {p.name.lower(): p for p in Path(root).rglob("*.nii*")}
    entries = []
    for row in _csv_rows(csv_path):
        code = row["subject"]
        common = {"subject": code, "dataset": "mnms", "vendor": row["vendor"], "centre": row["centre"], "group": row["group"]}
        for phase in ("ED", "ES"):
            image = files.get(f"{code}_sa_{phase}.nii.gz".lower())
            label = files.get(f"{code}_sa_{phase}_gt.nii.gz".lower())
            frame_index = None
            if image is None and f"{code}_sa.nii.gz".lower() in files and row[phase] not in (None, ""):
                image, label = files[f"{code}_sa.nii.gz".lower()], files.get(f"{code}_sa_gt.nii.gz".lower())
                frame_index = int(row[phase])
            if image is None:
                continue
            entry = {"image": os.path.relpath(image, data_root), **common, "phase": phase}
            if frame_index is not None:
                entry["frame_index"] = frame_index
            if label is not None:
                entry["label"] = os.path.relpath(label, data_root)
            entries.append(entry)
    if not entries:
        raise CaseError(root, f"no M&Ms short-axis volumes found for the subjects in {csv_path}")
    return entries


# ------------------------------------------------------------------------------- folders of images
def _is_label_or_output(path: Path) -> bool:
    return nifti_stem(path).lower().endswith(NON_IMAGE_ENDINGS)


_PHASE_NAME = re.compile(r"(?P<subject>.+)[_-](?P<phase>ED|ES)", re.IGNORECASE)
_FRAME_NAME = re.compile(r"(?P<subject>.+)_frame(?P<frame>\d+)")


def phase_from_name(path: Path) -> dict:
    """``subject`` and ``phase`` of a NIfTI stack from its name, where it says: ``<subject>_ED`` or ``_ES``
    (M&Ms and many exports), or ACDC's ``<subject>_frameNN`` beside an ``Info.cfg`` that names that frame
    ED or ES; else nothing. An unreadable ``Info.cfg`` says nothing either."""
    stem = nifti_stem(path)
    named = _PHASE_NAME.fullmatch(stem)
    if named:
        return {"subject": named["subject"], "phase": named["phase"].upper()}
    framed, info = _FRAME_NAME.fullmatch(stem), path.parent / "Info.cfg"
    if not framed or not info.is_file():
        return {}
    try:
        frames = read_info_cfg(info)
    except (CaseError, OSError, UnicodeDecodeError):
        return {}
    phase = next((p for p in ("ED", "ES") if frames[p].isdigit() and int(frames[p]) == int(framed["frame"])), None)
    return {"subject": framed["subject"], "phase": phase} if phase else {}


def discover(dataset_dir: str | os.PathLike) -> list[dict]:
    """Every case under ``dataset_dir``: NIfTI files (labels and outputs skipped) and DICOM series.

    An entry's ``image`` is absolute. A DICOM series is ``{"image": folder, "dicom_files": [...]}``;
    a file that is neither NIfTI nor part of a readable series (but looks like it meant to be DICOM)
    gets an entry with ``error`` set, so that a batch run can report it. A NIfTI stack whose name gives its
    subject and phase (:func:`phase_from_name`) carries them, unless another stack gives the same pair (then
    neither does: which two belong together is not clear).
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise CaseError(dataset_dir, "dataset folder not found")
    entries = []
    for folder, dirnames, filenames in os.walk(dataset_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder = Path(folder)
        names = sorted(n for n in filenames if not n.startswith("."))
        in_series = set()
        others = [n for n in names if not is_nifti(n) and Path(n).suffix.lower() not in NOT_DICOM]
        if others:
            for uid, files in dicom_series(folder).items():
                in_series.update(os.path.basename(f) for f in files)
                entries.append({"image": str(folder), "dicom_files": files, "series_uid": uid})
        for name in names:
            path = folder / name
            if is_nifti(name):
                if not _is_label_or_output(path):
                    entries.append({"image": str(path)})
            elif name not in in_series and (path.suffix.lower() in (".dcm", ".ima", "")):
                entries.append({"image": str(path), "error": "not a NIfTI file or a readable DICOM image"})
    named = {id(e): phase_from_name(Path(e["image"])) for e in entries if "error" not in e and "dicom_files" not in e}
    repeated = Counter(tuple(n.values()) for n in named.values() if n)
    for e in entries:
        if named.get(id(e)) and repeated[tuple(named[id(e)].values())] == 1:
            e.update(named[id(e)])
    return entries


def folder_entries(dataset_dir: Path, data_root: Path, label_map: str = "canonical") -> list[dict]:
    """Manifest entries for a plain folder of NIfTI volumes (``NAME.nii.gz`` with optional ``NAME_gt.nii.gz``);
    subject and phase as :func:`discover` finds them, else the subject is the name.

    ``label_map`` names the labels' values (a key of ``cmr_ood.data.labels.LABEL_MAPS``)."""
    if label_map not in LABEL_MAPS:
        raise ValueError(f"unknown label map '{label_map}'; known: {sorted(LABEL_MAPS)}")
    entries = []
    for e in discover(dataset_dir):
        if "error" in e or "dicom_files" in e:
            continue
        image = Path(e["image"])
        entry = {"image": os.path.relpath(image, data_root), "subject": e.get("subject", nifti_stem(image)),
                 **({"phase": e["phase"]} if "phase" in e else {}), "dataset": label_map}
        label = image.with_name(nifti_stem(image) + "_gt.nii.gz")
        if label.exists():
            entry["label"] = os.path.relpath(label, data_root)
        entries.append(entry)
    return entries


# ------------------------------------------------------------------------------- folds and subsets
def duplicate_units(entries: list[dict], data_root: Path) -> list[list[str]]:
    """Subjects grouped so that subjects with voxel-identical images share a unit (and so a fold)."""
    owner = {}
    parent = {}

    def find(s):
        while parent[s] != s:
            s = parent[s]
        return s

    for e in entries:
        parent.setdefault(e["subject"], e["subject"])
        data = np.asanyarray(nib.load(str(Path(data_root) / e["image"])).dataobj)
        digest = hashlib.sha1(np.ascontiguousarray(data).tobytes()).hexdigest()
        if digest in owner:
            parent[find(e["subject"])] = find(owner[digest])
        else:
            owner[digest] = e["subject"]
    units = defaultdict(list)
    for s in parent:
        units[find(s)].append(s)
    return sorted(sorted(u) for u in units.values())


def stratified_folds(units: list[list[str]], group_of: dict, num_folds: int, seed: int) -> dict[str, int]:
    """Fold per subject: units shuffled within each group, each to the fold with fewest of that group."""
    rng = random.Random(seed)
    by_group = defaultdict(list)
    for unit in units:
        by_group[group_of[unit[0]]].append(unit)
    fold_of = {}
    fold_sizes = [0] * num_folds
    for group in sorted(by_group, key=str):
        group_units = by_group[group]
        rng.shuffle(group_units)
        in_group = [0] * num_folds
        for unit in sorted(group_units, key=len, reverse=True):  # place duplicate pairs first
            fold = min(range(num_folds), key=lambda k: (in_group[k], fold_sizes[k], rng.random()))
            for s in unit:
                fold_of[s] = fold
            in_group[fold] += len(unit)
            fold_sizes[fold] += len(unit)
    return fold_of


def low_label_subsets(subjects: list[str], group_of: dict, sizes, seed: int) -> dict[str, list[str]]:
    """Nested subsets (5 within 10 within 25 ...), stratified by group: groups taken in turn."""
    rng = random.Random(seed)
    by_group = defaultdict(list)
    for s in sorted(subjects):
        by_group[group_of[s]].append(s)
    groups = sorted(by_group, key=str)
    rng.shuffle(groups)
    for g in groups:
        rng.shuffle(by_group[g])
    order = []
    for i in range(max(len(v) for v in by_group.values())):
        order += [by_group[g][i] for g in groups if i < len(by_group[g])]
    return {str(n): sorted(order[:n]) for n in sizes if n <= len(order)}


def build_acdc_manifest(data_root: Path, num_folds: int = 5, test_fold: int = 0, seed: int = 0) -> dict:
    entries = acdc_entries(Path(data_root) / "acdc" / "training", data_root)
    group_of = {e["subject"]: e["group"] for e in entries}
    units = duplicate_units([e for e in entries if e["phase"] == "ED"], data_root)
    fold_of = stratified_folds(units, group_of, num_folds, seed)
    for e in entries:
        e["fold"] = fold_of[e["subject"]]
    train_subjects = sorted({s for s, f in fold_of.items() if f != test_fold})
    # the held-out fold in two halves for post-hoc OOD detection: one to calibrate on, one to test on
    half_of = stratified_folds([u for u in units if fold_of[u[0]] == test_fold], group_of, 2, seed)
    return {
        "name": "ACDC training set",
        "description": (
            "ACDC (MICCAI 2017) training set, one entry per ED/ES volume; paths relative to the data root "
            "(../shared/data or $CMR_OOD_DATA). Labels are the files' ACDC values (1 RV, 2 MYO, 3 LV); "
            "readers map them onto the canonical map. Folds stratified by group; subjects with "
            "voxel-identical images share a fold. 'test_fold' is the held-out split; low-label subsets are "
            "drawn from the other folds, nested and stratified by group. 'ood_split' halves the held-out fold "
            "(stratified by group): OOD detectors are calibrated on one half and tested on the other."
        ),
        "reference": "Bernard et al., IEEE TMI 37(11):2514-2525, 2018, doi:10.1109/TMI.2018.2837502",
        "seed": seed,
        "num_folds": num_folds,
        "test_fold": test_fold,
        "duplicate_subjects": [u for u in units if len(u) > 1],
        "low_label": {f"seed{s}": low_label_subsets(train_subjects, group_of, LOW_LABEL_SIZES, s) for s in LOW_LABEL_SEEDS},
        "ood_split": {name: sorted(s for s, h in half_of.items() if h == i) for i, name in enumerate(("calibration", "test"))},
        "training": entries,
    }


def load_manifest(path: str | os.PathLike) -> dict:
    with open(path) as f:
        manifest = json.load(f)
    if "training" not in manifest:
        raise CaseError(path, "manifest has no 'training' list")
    return manifest


def path_in_root(path: str | os.PathLike, data_root: str | os.PathLike) -> Path:
    """``data_root / path``, refused where it lies outside the data root (``../`` climbing out of it, or an
    absolute path elsewhere). The check is on the path as written (symbolic links inside the data root are
    the data owner's choice and are followed when reading)."""
    root = Path(os.path.abspath(data_root))
    full = Path(os.path.normpath(root / path))
    if full != root and root not in full.parents:
        raise CaseError(path, f"manifest path lies outside the data root {root}: paths must stay inside it")
    return full


def read_entry(entry: dict, data_root: str | os.PathLike | None = None, labels: bool = True):
    """Image and canonical labels (None without a label, or with ``labels=False``) of a manifest entry;
    one frame of a 4D file where the entry names it (``frame_index``); one series of a DICOM folder where
    it names one (``series_uid``). With a ``data_root``, the entry's paths must lie inside it
    (:func:`path_in_root`); without one, they are read as they are. A ``label_root`` in the entry takes the
    data root's place for its label (which must then lie inside that folder)."""
    def locate(key, root=data_root):
        return path_in_root(entry[key], root) if root is not None else Path(entry[key])

    image = read_image(locate("image"), series_uid=entry.get("series_uid"))
    label = None
    if labels and entry.get("label"):
        label_map = entry.get("label_map") or entry.get("dataset", "canonical")
        label = read_labels(str(locate("label", entry.get("label_root") or data_root)), label_map, image)
    frame = entry.get("frame_index")
    if frame is not None:
        frames = image.array.shape[3] if image.is_cine else 0
        if not 0 <= int(frame) < frames:
            raise CaseError(image.path, f"the manifest names frame_index {frame}, but the image has "
                                        f"{f'{frames} frames' if frames else 'no frames (a 3D stack)'}")
        for volume in (image, label):
            if volume is not None:
                volume.array = volume.array[..., frame]
    return image, label


def ood_split(manifest: dict, half: str) -> list[str]:
    """Subjects of one half (``calibration`` or ``test``) of the held-out fold, for OOD detection."""
    if half not in manifest.get("ood_split", {}):
        raise ValueError(f"the manifest has no '{half}' half in 'ood_split': name the subjects instead")
    return list(manifest["ood_split"][half])


def select(manifest: dict, folds=None, subjects=None, phases=None) -> list[dict]:
    """Entries of a manifest restricted to folds, subjects and/or phases."""
    out = manifest["training"]
    if folds is not None:
        out = [e for e in out if e.get("fold") in set(folds)]
    if subjects is not None:
        out = [e for e in out if e["subject"] in set(subjects)]
    if phases is not None:
        out = [e for e in out if e.get("phase") in set(phases)]
    return out


def write_json(obj, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"), overwrite=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a dataset manifest (MONAI datalist JSON).")
    sub = parser.add_subparsers(dest="layout", required=True)
    p = sub.add_parser("acdc", help="ACDC training set with folds and low-label subsets")
    p.add_argument("--data-root", type=Path, default=None, help="folder holding acdc/training (default: $CMR_OOD_DATA or ../shared/data)")
    p.add_argument("--out", type=Path, default=Path("data_manifests/acdc.json"))
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("mnms", help="M&Ms-1 or M&Ms-2 layout with its information CSV")
    p.add_argument("folder", type=Path)
    p.add_argument("--csv", type=Path, required=True)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("folder", help="a plain folder of NIfTI volumes (NAME.nii.gz, optional NAME_gt.nii.gz)")
    p.add_argument("folder", type=Path)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--label-map", choices=sorted(LABEL_MAPS), default="canonical", help="what the label values mean")
    args = parser.parse_args(argv)
    if args.layout == "acdc":
        manifest = build_acdc_manifest(args.data_root or default_data_root(), seed=args.seed)
    elif args.layout == "mnms":
        manifest = {"name": "M&Ms", "training": mnms_entries(args.folder, args.csv, args.data_root)}
    else:
        manifest = {"name": str(args.folder), "training": folder_entries(args.folder, args.data_root, args.label_map)}
    write_json(manifest, args.out)
    print(f"wrote {args.out}: {len(manifest['training'])} volumes")


if __name__ == "__main__":
    main()
