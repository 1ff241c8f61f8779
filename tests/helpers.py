"""Small synthetic short-axis volumes and files for the fast tests."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from cmr_ood.data.manifests import default_data_root

DATA_ROOT = default_data_root()
requires_data = pytest.mark.skipif(
    not (DATA_ROOT / "acdc" / "training").is_dir(),
    reason=f"real data not found at {DATA_ROOT} (set CMR_OOD_DATA or place ../shared/data beside the repository)",
)
REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "cmr_seg_ood"


def synthetic_heart(shape=(48, 40, 6), centre=None, radius=7.0, seed=0, canonical=True):
    """Image and labels of a cartoon short-axis stack: LV disk, myocardial ring, RV crescent beside it.

    Labels are canonical (1 LV, 2 MYO, 3 RV), or ACDC values (1 RV, 2 MYO, 3 LV) with ``canonical=False``.
    """
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    cx, cy = centre or (shape[0] / 2, shape[1] / 2)
    labels = np.zeros(shape, np.uint8)
    for z in range(shape[2]):
        r = radius * (1.0 - 0.5 * z / max(1, shape[2] - 1))  # base to apex
        d = np.hypot(x - cx, y - cy)
        rv = np.hypot(x - cx, y - (cy - 1.9 * r)) < 1.3 * r
        labels[..., z][rv & (d >= r + 2.5)] = 3
        labels[..., z][d < r + 2.5] = 2
        labels[..., z][d < r] = 1
    intensity = np.array([80.0, 300.0, 60.0, 280.0])
    image = intensity[labels] + rng.normal(0, 10, shape)
    if not canonical:
        labels = np.array([0, 3, 2, 1], np.uint8)[labels]
    return image.astype(np.float32), labels


def save_nifti(path, array, spacing=(1.5, 1.5, 8.0), acdc_header=False, dtype=None):
    """A NIfTI file; ``acdc_header`` reproduces ACDC's header (unit-spacing sform, qform_code 0, true pixdim)."""
    array = np.asarray(array if dtype is None else array.astype(dtype))
    if acdc_header:
        img = nib.Nifti1Image(array, np.diag([-1.0, -1.0, 1.0, 1.0]))
        img.header.set_zooms(tuple(spacing) + (1.0,) * (array.ndim - 3))
        img.header.set_sform(np.diag([-1.0, -1.0, 1.0, 1.0]), code=2)
        img.header.set_qform(None, code=0)
    else:
        affine = np.diag((list(spacing) + [1.0] * 3)[:3] + [1.0])
        img = nib.Nifti1Image(array, affine)
        if array.ndim >= 3:
            img.header.set_zooms(tuple(spacing)[: min(3, array.ndim)] + (1.0,) * (array.ndim - 3))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return str(path)


def save_dicom_series(folder, array, spacing=(1.2, 1.2, 8.0), series_uid="1.2.826.0.1.3680043.2.1125.1", skip=(),
                      direction=None, origin=(0.0, 0.0, 0.0), prefix="slice"):
    """Write a (x, y, z) volume as one DICOM file per slice (``<prefix>NNN.dcm``), or a (x, y, z, t) cine as one file per slice and
    phase in one series (trigger times 40 ms apart; instance numbers slice by slice, as some scanners number
    them); ``direction`` columns are the LPS directions of the row, column and slice axes (identity: axial)."""
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=float)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    frames = array.shape[3] if array.ndim == 4 else 1
    for z in range(array.shape[2]):
        if z in skip:
            continue
        for t in range(frames):
            plane = array[:, :, z, t] if array.ndim == 4 else array[:, :, z]
            image = sitk.GetImageFromArray(plane.T.astype(np.int16)[None])  # (1, y, x)
            image.SetSpacing((spacing[0], spacing[1], spacing[2]))
            position = np.asarray(origin) + z * spacing[2] * direction[:, 2]
            image.SetOrigin(tuple(position))
            image.SetDirection(tuple(direction.ravel()))
            row, col = direction[:, 0], direction[:, 1]
            number = z * frames + t + 1
            tags = {
                "0008|0060": "MR",
                "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
                "0020|000e": series_uid,
                "0020|0013": str(number),
                "0020|0032": "\\".join(f"{v:.6f}" for v in position),
                "0020|0037": "\\".join(f"{v:.6f}" for v in (*row, *col)),
                "0028|0030": f"{spacing[1]}\\{spacing[0]}",
                "0018|0050": str(spacing[2]),
                "0008|0018": f"{series_uid}.{number}",
            }
            if array.ndim == 4:
                tags["0018|1060"] = f"{40.0 * t:.1f}"
            for tag, value in tags.items():
                image.SetMetaData(tag, value)
            writer.SetFileName(str(folder / (f"{prefix}{z:03d}.dcm" if array.ndim == 3 else f"{prefix}{z:03d}_phase{t:02d}.dcm")))
            writer.Execute(image)
    return folder


def leftover_temporaries(folder) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if ".part" in f]
