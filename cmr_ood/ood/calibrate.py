"""Fit a model's OOD scorer on in-distribution data (the bundle's ``configs/calibrate.json``).

Detector statistics come from the network's training folds; temperature, standardisation and thresholds
from the calibration half of the held-out fold (``ood_split`` in the ACDC manifest), so the test half
stays untouched for :mod:`cmr_ood.ood.evaluate`. Writes the fitted state, a reliability diagram before
and after temperature scaling, and a summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cmr_ood.data.io import atomic_write
from cmr_ood.data.labels import NUM_CLASSES
from cmr_ood.data.manifests import default_data_root, load_manifest, ood_split, read_entry, select
from cmr_ood.inference import Segmenter
from cmr_ood.ood.calibration import VoxelCalibration, plot_reliability
from cmr_ood.ood.scorer import OODScorer, file_digest


def calibrate(segmenter: Segmenter, scorer: OODScorer, manifest: str, state: str, data_root: str | None = None,
              fit_folds: list[int] | None = (1, 2, 3, 4), validation: list[str] | None = None,
              report_dir: str | None = None, overwrite: bool = False) -> dict:
    """Fit ``scorer`` and save its state to ``state``; returns (and writes beside it) a summary."""
    state = Path(state)
    if state.exists() and not overwrite:
        raise FileExistsError(f"{state} exists already: set overwrite to replace the fitted OOD state")
    data_root = Path(data_root) if data_root else default_data_root()
    content = load_manifest(manifest)
    subjects = list(validation) if validation is not None else ood_split(content, "calibration")
    val_entries = [e for e in select(content, subjects=subjects) if e.get("label")]
    fit_entries = [e for e in select(content, folds=fit_folds) if e.get("label") and e["subject"] not in set(subjects)]
    if not val_entries:
        raise ValueError(f"{manifest}: no labelled entries for the validation subjects {subjects}")
    start = time.perf_counter()
    taps = scorer.taps
    validation_cases = []
    for entry in tqdm(val_entries, desc="validation cases", unit="vol"):
        image, labels = read_entry(entry, data_root)
        case, geometry = segmenter.outputs(image, taps=taps)
        target = segmenter.preprocessing.resample_labels(labels.array, geometry, NUM_CLASSES).to(case.logits.device)
        validation_cases.append((case, target))

    def fit_cases():
        for entry in tqdm(fit_entries, desc="fitting detectors", unit="vol"):
            yield segmenter.outputs(read_entry(entry, data_root, labels=False)[0], taps=taps)[0]

    scorer.fit(fit_cases(), validation_cases)
    scorer.model_digest = file_digest(segmenter.checkpoint) if segmenter.checkpoint else None
    scorer.save(state, overwrite=True)
    before, after = VoxelCalibration(), VoxelCalibration()
    for case, target in validation_cases:
        before.update(torch.softmax(case.logits, 1), target)
        after.update(torch.softmax(case.logits / scorer.temperature.temperature, 1), target)
    before, after = before.compute(), after.compute()
    summary = {
        "state": str(state), "manifest": str(manifest), "fit_folds": fit_folds, "fit_volumes": len(fit_entries),
        "validation_subjects": subjects, "validation_volumes": len(val_entries),
        "temperature": scorer.temperature.state_dict(),
        "voxel_calibration": {name: {"ece": round(float(r["ece"]), 5), "mce": round(float(r["mce"]), 5)}
                              for name, r in (("before", before), ("after_temperature", after))},
        "thresholds": scorer.thresholds, "default": scorer.default, "seconds": round(time.perf_counter() - start, 1),
    }
    report = Path(report_dir) if report_dir else state.parent
    plot_reliability(before, report / "reliability_before.png", title="validation voxels, T = 1", overwrite=True)
    plot_reliability(after, report / "reliability_after.png", title=f"validation voxels, T = {scorer.temperature.temperature:.2f}",
                     overwrite=True)
    atomic_write(report / "calibration_summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1) + "\n"),
                 overwrite=True)
    print(f"temperature {scorer.temperature.temperature:.3f}; voxel ECE {summary['voxel_calibration']['before']['ece']} -> "
          f"{summary['voxel_calibration']['after_temperature']['ece']}; default '{scorer.default}' threshold "
          f"{scorer.thresholds[scorer.default]:.4g}; state in {state.resolve()}")
    return summary
