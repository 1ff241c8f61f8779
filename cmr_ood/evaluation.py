"""Segmentation evaluation against a manifest's labels: Dice and HD95 per structure and phase,
clinical measurements and their errors (``configs/evaluate.json`` in the bundle)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from tqdm import tqdm

from cmr_ood.data.io import atomic_write
from cmr_ood.data.labels import STRUCTURES, one_hot
from cmr_ood.data.manifests import default_data_root, load_manifest, read_entry, select
from cmr_ood.inference import Segmenter
from cmr_ood.qc.measurements import ejection_fraction, volumes

#: In-plane rotations and flips (the dihedral group) that a scanner may apply to a short-axis stack.
ORIENTATIONS = ("identity", "rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270")


def reorient(volume, orientation: str):
    """The volume as another scanner might store it: rotated/flipped in-plane (axes 0 and 1)."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation '{orientation}'; one of {ORIENTATIONS}")
    array = volume.array
    if orientation.startswith("flip"):
        array = array[::-1]
    turns = int(orientation.rsplit("rot", 1)[1]) // 90 if "rot" in orientation else 0
    volume.array = np.ascontiguousarray(np.rot90(array, k=turns, axes=(0, 1)))
    if turns % 2:
        volume.spacing = (volume.spacing[1], volume.spacing[0], *volume.spacing[2:])
    return volume


def structure_dice(pred: np.ndarray, truth: np.ndarray) -> torch.Tensor:
    """3D Dice per structure (LV, MYO, RV); NaN where a structure is absent from the ground truth."""
    return compute_dice(one_hot(pred), one_hot(truth), include_background=False, ignore_empty=True)[0]


def structure_metrics(pred: np.ndarray, truth: np.ndarray, spacing) -> dict[str, float]:
    """3D Dice and HD95 (mm) per structure; NaN where a structure is absent from the ground truth."""
    p, t = one_hot(pred), one_hot(truth)
    dice = structure_dice(pred, truth)
    hd95 = compute_hausdorff_distance(p, t, include_background=False, percentile=95, spacing=list(spacing))[0]
    out = {}
    for name, label in STRUCTURES.items():
        out[f"dice_{name}"] = float(dice[label - 1])
        out[f"hd95_{name}"] = float(hd95[label - 1])
    return out


def summarize(rows: list[dict]) -> dict:
    """Mean and sd of every metric overall and per phase; EF errors per subject with both phases."""
    metric_keys = [k for k in rows[0] if k.startswith(("dice_", "hd95_"))] if rows else []
    summary = {"num_volumes": len(rows)}
    for phase in (None, "ED", "ES"):
        subset = [r for r in rows if phase is None or r.get("phase") == phase]
        if not subset:
            continue
        block = {}
        for k in metric_keys:
            values = np.array([r[k] for r in subset], dtype=float)
            finite = values[np.isfinite(values)]
            block[k] = {"mean": round(float(finite.mean()), 4) if len(finite) else None,
                        "sd": round(float(finite.std()), 4) if len(finite) else None, "n": int(len(finite))}
        dice_means = [block[f"dice_{s}"]["mean"] for s in STRUCTURES if block[f"dice_{s}"]["mean"] is not None]
        block["dice_mean"] = round(float(np.mean(dice_means)), 4) if dice_means else None
        summary[phase or "all"] = block
    by_subject = {}
    for r in rows:
        by_subject.setdefault(r["subject"], {})[r.get("phase")] = r
    ef_errors = []
    for phases in by_subject.values():
        if "ED" in phases and "ES" in phases:
            ef_pred = ejection_fraction(phases["ED"]["pred_lv_volume_ml"], phases["ES"]["pred_lv_volume_ml"])
            ef_true = ejection_fraction(phases["ED"]["true_lv_volume_ml"], phases["ES"]["true_lv_volume_ml"])
            if ef_pred is not None and ef_true is not None:
                ef_errors.append(ef_pred - ef_true)
    if ef_errors:
        e = np.array(ef_errors)
        summary["lv_ef_error_pct"] = {"mean_abs": round(float(np.abs(e).mean()), 2), "bias": round(float(e.mean()), 2),
                                      "max_abs": round(float(np.abs(e).max()), 2), "n": len(e)}
    for key in ("lv_volume_ml", "rv_volume_ml", "myo_mass_g"):
        diffs = np.array([r[f"pred_{key}"] - r[f"true_{key}"] for r in rows])
        if len(diffs):
            summary[f"{key}_error"] = {"mean_abs": round(float(np.abs(diffs).mean()), 2), "bias": round(float(diffs.mean()), 2)}
    return summary


def evaluate(segmenter: Segmenter, manifest: str, output_dir: str, data_root: str | None = None,
             folds: list[int] | None = None, subjects: list[str] | None = None, orientation: str = "identity",
             overwrite: bool = False) -> dict:
    """Segment the labelled entries of ``manifest`` (optionally some folds or subjects) and compare.

    ``orientation`` rotates/flips every image and its labels in-plane first (robustness to the way
    other scanners store slices). Writes ``metrics.csv`` (one row per volume) and ``summary.json``.
    """
    data_root = Path(data_root) if data_root else default_data_root()
    entries = [e for e in select(load_manifest(manifest), folds=folds, subjects=subjects) if e.get("label")]
    if not entries:
        raise ValueError(f"{manifest}: no labelled entries for folds={folds} subjects={subjects}")
    rows = []
    for entry in tqdm(entries, desc="evaluating", unit="vol"):
        image, labels = (reorient(v, orientation) for v in read_entry(entry, data_root))
        pred = segmenter.segment(image)
        row = {"image": entry["image"], "subject": entry["subject"], "phase": entry.get("phase"), "group": entry.get("group")}
        row.update(structure_metrics(pred, labels.array, image.spacing))
        row.update({f"pred_{k}": v for k, v in volumes(pred, image.spacing).items()})
        row.update({f"true_{k}": v for k, v in volumes(labels.array, image.spacing).items()})
        rows.append(row)
    summary = summarize(rows)
    summary.update(manifest=str(manifest), folds=folds, subjects=subjects, orientation=orientation)
    output_dir = Path(output_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(output_dir / "metrics.csv", lambda tmp: Path(tmp).write_text(buffer.getvalue()), overwrite)
    atomic_write(output_dir / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1) + "\n"), overwrite)
    overall = summary["all"]
    print("mean Dice " + ", ".join(f"{s} {overall[f'dice_{s}']['mean']}" for s in STRUCTURES) + f"; mean {overall['dice_mean']}")
    print(f"results in {output_dir.resolve()}")
    return summary
