"""Inference: segment volumes and write per-case outputs and one ``cases.json`` for a run."""

from __future__ import annotations

import json
import math
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
from cmr_ood.data.preprocess import Preprocessing, SliceGeometry
from cmr_ood.networks import load_weights
from cmr_ood.ood.base import CaseOutputs
from cmr_ood.ood.scorer import OODScorer
from cmr_ood.qc.checks import check_subject, check_volume
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


class _AllOutputs(torch.nn.Module):
    """The network as the inferer sees it when every head and some feature maps are wanted: a tuple,
    full-resolution outputs first (MONAI's sliding window reuses its weight map resized for a
    lower-resolution output on the outputs after it)."""

    def __init__(self, network: torch.nn.Module, taps: tuple[str, ...]):
        super().__init__()
        self.network, self.taps = network, tuple(taps)
        self.keys = (*network.heads.keys(), *self.taps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.network.forward_heads(x, self.taps)
        return tuple(out[k] for k in self.keys)


class Segmenter:
    """Network + preprocessing + inferer + postprocessing: a volume in, labels on its own grid out."""

    def __init__(self, network: torch.nn.Module, inferer, preprocessing: Preprocessing | None = None,
                 postprocessing: Postprocessing | None = None, checkpoint: str | None = None, device="cpu"):
        self.device = torch.device(device)
        self.checkpoint = checkpoint
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

    @torch.no_grad()
    def run_network(self, slices: torch.Tensor, taps: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Every head's output (``seg`` logits, proxy heads) and the feature maps ``taps`` of preprocessed
        slices (N, 1, H, W), through the same inferer as segmentation."""
        wrapper = _AllOutputs(self.network, taps)
        outputs = self.inferer(slices, wrapper)
        return {k: v.float() for k, v in zip(wrapper.keys, outputs)}

    def outputs(self, volume: Volume, frame: int | None = None, taps: tuple[str, ...] = ()) -> tuple[CaseOutputs, SliceGeometry]:
        """One pass over a stack with everything the OOD detectors read, and the stack's geometry."""
        slices, geometry = self.preprocessing(volume, frame, self.device)
        out = self.run_network(slices, taps)
        case = CaseOutputs(images=slices, logits=out.pop("seg"), heads={k: out.pop(k) for k in list(out) if k not in taps},
                           features=out, forward=lambda x: self.run_network(x, taps), network=self.network)
        return case, geometry

    def labels(self, probabilities: torch.Tensor) -> np.ndarray:
        """Postprocessed uint8 labels from class probabilities on the input grid."""
        return self.postprocessing(probabilities.argmax(0)).cpu().numpy().astype(np.uint8)

    def segment(self, volume: Volume) -> np.ndarray:
        """uint8 canonical labels on the input grid: (X, Y, Z), or (X, Y, Z, T) for a cine (every frame)."""
        frames = range(volume.array.shape[3]) if volume.is_cine else [None]
        out = [self.labels(self.probabilities(volume, t)) for t in frames]
        return np.stack(out, axis=-1) if volume.is_cine else out[0]

    def segment_and_score(self, volume: Volume, scorer: OODScorer) -> tuple[np.ndarray, dict[str, float], np.ndarray]:
        """Labels, OOD scores and the scorer's voxel-wise uncertainty map (float32, on the input grid), from
        one network pass per stack. A cine is scored frame by frame and keeps each score's worst frame."""
        frames = range(volume.array.shape[3]) if volume.is_cine else [None]
        labels, maps, scores = [], [], {}
        for t in frames:
            case, geometry = self.outputs(volume, t, scorer.taps)
            labels.append(self.labels(self.preprocessing.invert(torch.softmax(case.logits, dim=1), geometry)))
            maps.append(self.preprocessing.invert(scorer.uncertainty(case)[:, None], geometry)[0].cpu().numpy().astype(np.float32))
            for name, value in scorer.score(case).items():
                scores[name] = max(scores.get(name, -math.inf), value)
        if volume.is_cine:
            return np.stack(labels, axis=-1), scores, np.stack(maps, axis=-1)
        return labels[0], scores, maps[0]


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


def read_case(case: dict) -> Volume:
    if "dicom_files" in case:
        return read_dicom_series(case["dicom_files"], case["image"])
    return read_entry(case, labels=False)[0]


def _json_score(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no infinity; null = no heart found


def segment_case(segmenter: Segmenter, case: dict, output_dir: Path, overwrite: bool, scorer: OODScorer | None = None) -> dict:
    record = {"image": case["image"], "status": "ok", "error": None, "outputs": {}, "measurements": None}
    if "error" in case:
        raise CaseError(case["image"], case["error"])
    seg_path = _output_path(case, output_dir)
    map_path = seg_path.with_name(seg_path.name.replace("_seg.nii.gz", "_uncertainty.nii.gz"))
    for path in (seg_path, map_path) if scorer else (seg_path,):
        if path.exists() and not overwrite:
            raise CaseError(case["image"], f"output {path} exists already (not overwritten; set overwrite to replace it)")
    volume = read_case(case)
    if scorer is None:
        labels = segmenter.segment(volume)
    else:
        labels, scores, uncertainty = segmenter.segment_and_score(volume, scorer)
        default, flagged = scorer.decide(scores)
        record.update(scores={k: _json_score(v) for k, v in scores.items()}, default_score=_json_score(default),
                      default_detector=scorer.default, ood_flag=flagged)
        record["outputs"]["uncertainty"] = write_like(uncertainty, volume, map_path, overwrite)
    record["outputs"]["segmentation"] = write_like(labels, volume, seg_path, overwrite)
    qc = check_subject(labels, spacing=volume.spacing) if volume.is_cine else check_volume(labels, volume.spacing)
    record.update(shape=list(volume.array.shape), spacing_mm=[round(s, 4) for s in volume.spacing],
                  measurements=measurements(labels, volume.spacing), qc={"passed": qc.passed, "failed": qc.failed})
    return record


def run_batch(segmenter: Segmenter, output_dir: str | os.PathLike, dataset_dir: str | None = None,
              manifest: str | None = None, data_root: str | None = None, overwrite: bool = False,
              scorer: OODScorer | None = None) -> list[dict]:
    """Segment every case of ``dataset_dir`` (NIfTI files, DICOM series) or of a manifest; with a fitted
    ``scorer``, also score each case, flag it, and write its uncertainty map.

    A case that fails gets a record with ``status: error`` and the message; the others go on. Outputs
    are written to temporary names and renamed; nothing that exists is overwritten unless ``overwrite``.
    """
    if (dataset_dir is None) == (manifest is None):
        raise ValueError("give exactly one of dataset_dir and manifest")
    output_dir = Path(output_dir).resolve()
    cases_file = output_dir / CASES_FILE
    if cases_file.exists() and not overwrite:
        raise FileExistsError(f"{cases_file} exists already: choose another output_dir, or set overwrite to replace its results")
    if scorer is not None:
        scorer.check_model(segmenter.checkpoint)
    cases = _cases(dataset_dir, manifest, data_root)
    series_per_folder = Counter(c["image"] for c in cases if "dicom_files" in c)
    for c in cases:
        c["several_series"] = series_per_folder[c["image"]] > 1
    records = []
    for case in tqdm(cases, desc="segmenting", unit="case"):
        try:
            records.append(segment_case(segmenter, case, output_dir, overwrite, scorer))
        except CaseError as e:
            records.append({"image": case["image"], "status": "error", "error": e.problem, "outputs": {}, "measurements": None})
        except Exception as e:  # one broken case must not stop the batch; the record says what happened
            records.append({"image": case["image"], "status": "error", "error": f"{type(e).__name__}: {e}", "outputs": {},
                            "measurements": None, "traceback": traceback.format_exc(limit=3)})
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(cases_file, lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1) + "\n"), overwrite=True)
    failed = sum(r["status"] != "ok" for r in records)
    flagged = f", {sum(bool(r.get('ood_flag')) for r in records)} flagged as out of distribution" if scorer else ""
    print(f"{len(records) - failed} of {len(records)} cases segmented{flagged}; results in {cases_file.resolve()}")
    return records
