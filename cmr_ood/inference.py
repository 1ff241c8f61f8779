"""Inference: segment volumes and write per-case outputs and one ``cases.json`` for a run."""

from __future__ import annotations

import json
import os
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent
from tqdm import tqdm

from cmr_ood.data.io import CaseError, Volume, atomic_write, nifti_stem, read_dicom_series, write_like
from cmr_ood.data.labels import STRUCTURES
from cmr_ood.data.manifests import discover, load_manifest, read_entry
from cmr_ood.data.preprocess import Preprocessing
from cmr_ood.networks import load_weights
from cmr_ood.qc.measurements import measurements

CASES_FILE = "cases.json"


@dataclass
class Postprocessing:
    """Keep the heart, then one piece of each structure: the largest connected component of LV, MYO and
    RV taken together, then the largest component of each structure within it.

    The first step matters on wide fields of view: a false-positive blob elsewhere in the body can be
    larger than a true structure, never larger than the whole heart."""

    keep_largest_component: bool = True

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        if not self.keep_largest_component:
            return labels
        structures = list(STRUCTURES.values())
        heart = KeepLargestConnectedComponent(applied_labels=structures, is_onehot=False, independent=False)
        each = KeepLargestConnectedComponent(applied_labels=structures, is_onehot=False, independent=True)
        return each(heart(labels[None]))[0]


class Segmenter:
    """Network + preprocessing + inferer + postprocessing: a volume in, labels on its own grid out."""

    def __init__(self, network: torch.nn.Module, inferer, preprocessing: Preprocessing | None = None,
                 postprocessing: Postprocessing | None = None, checkpoint: str | None = None, device="cpu"):
        self.device = torch.device(device)
        if checkpoint is not None:
            load_weights(network, checkpoint)
        self.network = network.to(self.device).eval()
        self.inferer = inferer
        self.preprocessing = preprocessing or Preprocessing()
        self.postprocessing = postprocessing or Postprocessing()

    @torch.no_grad()
    def probabilities(self, volume: Volume, frame: int | None = None) -> torch.Tensor:
        """Class probabilities (C, X, Y, Z) on the input grid of one stack (or one frame of a cine)."""
        slices, geometry = self.preprocessing(volume, frame, self.device)
        logits = self.inferer(slices, self.network)
        return self.preprocessing.invert(torch.softmax(logits.float(), dim=1), geometry)

    def segment(self, volume: Volume) -> np.ndarray:
        """uint8 canonical labels on the input grid: (X, Y, Z), or (X, Y, Z, T) for a cine (every frame)."""
        frames = range(volume.array.shape[3]) if volume.is_cine else [None]
        out = [self.postprocessing(self.probabilities(volume, t).argmax(0)).cpu().numpy().astype(np.uint8) for t in frames]
        return np.stack(out, axis=-1) if volume.is_cine else out[0]


def _cases(dataset_dir=None, manifest=None, data_root=None) -> list[dict]:
    if manifest is not None:
        root = Path(data_root) if data_root else Path(manifest).parent
        return [{**e, "image": str(root / e["image"]), "relative": e["image"]} for e in load_manifest(manifest)["training"]]
    entries = discover(dataset_dir)
    for e in entries:
        e["relative"] = os.path.relpath(e["image"], dataset_dir)
    return entries


def _output_path(case: dict, output_dir: Path) -> Path:
    """``<output_dir>/<input's relative folder>/<input name>_seg.nii.gz``; a DICOM series is named after
    its folder (and the end of its UID where a folder holds several series)."""
    rel = Path(case["relative"])
    name = nifti_stem(rel)
    if "dicom_files" in case:
        name = Path(case["image"]).name + (f"_{case['series_uid'][-8:]}" if case.get("several_series") else "")
    return output_dir / rel.parent / f"{name}_seg.nii.gz"


def _read(case: dict) -> Volume:
    if "dicom_files" in case:
        return read_dicom_series(case["dicom_files"], case["image"])
    return read_entry(case, labels=False)[0]


def segment_case(segmenter: Segmenter, case: dict, output_dir: Path, overwrite: bool) -> dict:
    record = {"image": case["image"], "status": "ok", "error": None, "outputs": {}, "measurements": None}
    if "error" in case:
        raise CaseError(case["image"], case["error"])
    seg_path = _output_path(case, output_dir)
    if seg_path.exists() and not overwrite:
        raise CaseError(case["image"], f"output {seg_path} exists already (not overwritten; set overwrite to replace it)")
    volume = _read(case)
    labels = segmenter.segment(volume)
    record["outputs"]["segmentation"] = write_like(labels, volume, seg_path, overwrite)
    record.update(shape=list(volume.array.shape), spacing_mm=[round(s, 4) for s in volume.spacing],
                  measurements=measurements(labels, volume.spacing))
    return record


def run_batch(segmenter: Segmenter, output_dir: str | os.PathLike, dataset_dir: str | None = None,
              manifest: str | None = None, data_root: str | None = None, overwrite: bool = False) -> list[dict]:
    """Segment every case of ``dataset_dir`` (NIfTI files, DICOM series) or of a manifest.

    A case that fails gets a record with ``status: error`` and the message; the others go on. Outputs
    are written to temporary names and renamed; nothing that exists is overwritten unless ``overwrite``.
    """
    if (dataset_dir is None) == (manifest is None):
        raise ValueError("give exactly one of dataset_dir and manifest")
    output_dir = Path(output_dir).resolve()
    cases_file = output_dir / CASES_FILE
    if cases_file.exists() and not overwrite:
        raise FileExistsError(f"{cases_file} exists already: choose another output_dir, or set overwrite to replace its results")
    cases = _cases(dataset_dir, manifest, data_root)
    series_per_folder = Counter(c["image"] for c in cases if "dicom_files" in c)
    for c in cases:
        c["several_series"] = series_per_folder[c["image"]] > 1
    records = []
    for case in tqdm(cases, desc="segmenting", unit="case"):
        try:
            records.append(segment_case(segmenter, case, output_dir, overwrite))
        except CaseError as e:
            records.append({"image": case["image"], "status": "error", "error": e.problem, "outputs": {}, "measurements": None})
        except Exception as e:  # one broken case must not stop the batch; the record says what happened
            records.append({"image": case["image"], "status": "error", "error": f"{type(e).__name__}: {e}", "outputs": {},
                            "measurements": None, "traceback": traceback.format_exc(limit=3)})
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(cases_file, lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1) + "\n"), overwrite=True)
    failed = sum(r["status"] != "ok" for r in records)
    print(f"{len(records) - failed} of {len(records)} cases segmented; results in {cases_file.resolve()}")
    return records
