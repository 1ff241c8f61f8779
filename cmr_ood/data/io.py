"""Reading and writing volumes: the one place where geometry is read from headers.

Every reader returns a :class:`Volume` whose ``spacing`` is the true voxel size in mm. NIfTI headers can
disagree with themselves: ACDC's sform has unit spacing (qform_code 0) while pixdim holds the real
spacing, so ``img.affine`` alone is wrong by a factor of about 2 in-plane and 10 through-plane. The rule
here: pixdim is the spacing; where the affine's column norms disagree with it, the affine is rebuilt from
its directions and pixdim. Outputs are written with the input's own header, so they stay consistent with
what the user gave.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

#: Largest plausible voxel size (mm); beyond it the header is treated as absurd. Generous on purpose:
#: thick slabs (50+ mm) exist, and a non-cardiac image must reach the model to be flagged, not refused.
MAX_SPACING_MM = 100.0
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class CaseError(ValueError):
    """A problem with one input case; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class Volume:
    """A 3D stack (X, Y, Z) or a 4D cine (X, Y, Z, T) in the voxel order of its file."""

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray  # voxel -> world (RAS, mm), consistent with ``spacing``
    path: str
    header: nib.Nifti1Header | None = field(default=None, repr=False)  # the input's header, for outputs

    @property
    def is_cine(self) -> bool:
        return self.array.ndim == 4

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | os.PathLike) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def affine_with_spacing(affine: np.ndarray, spacing) -> np.ndarray:
    """The affine with its column directions kept and its column lengths set to ``spacing``."""
    affine = np.asarray(affine, dtype=np.float64).copy()
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    norms[norms == 0] = 1.0
    affine[:3, :3] = affine[:3, :3] / norms * np.asarray(spacing, dtype=np.float64)
    return affine


def _check_spacing(path, spacing) -> None:
    sp = np.asarray(spacing, dtype=np.float64)
    if not np.all(np.isfinite(sp)) or np.any(sp <= 0) or np.any(sp > MAX_SPACING_MM):
        shown = ", ".join(f"{v:g}" for v in sp)
        raise CaseError(path, f"absurd voxel spacing ({shown}) mm (expected 0 < spacing <= {MAX_SPACING_MM:g})")


def _check_array(path, array: np.ndarray) -> np.ndarray:
    if array.ndim == 4 and array.shape[3] == 1:  # a 4D file holding a single frame is a 3D stack
        array = array[..., 0]
    if array.ndim == 2:
        raise CaseError(path, f"2D image (shape {array.shape}): expected a 3D short-axis stack or a 4D cine")
    if array.ndim not in (3, 4):
        raise CaseError(path, f"{array.ndim}D image (shape {array.shape}): expected a 3D short-axis stack or a 4D cine")
    if any(s == 0 for s in array.shape):
        raise CaseError(path, f"empty image: a dimension has size 0 (shape {array.shape})")
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise CaseError(path, f"unsupported voxel type {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            raise CaseError(path, f"{int(bad.sum())} voxels are NaN or infinite")
    return array


def read_nifti(path: str | os.PathLike, dtype=np.float32) -> Volume:
    path = str(path)
    try:
        img = nib.load(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise CaseError(path, f"not a NIfTI image ({type(img).__name__})")
        if any(s == 0 for s in img.header.get_data_shape()):
            raise CaseError(path, f"empty image: a dimension has size 0 (shape {img.header.get_data_shape()})")
        array = np.asanyarray(img.dataobj)
    except CaseError:
        raise
    except FileNotFoundError:
        raise CaseError(path, "file not found") from None
    except (EOFError, zlib.error, OSError) as e:  # gzip/zlib raise these on truncated or corrupt files
        raise CaseError(path, f"truncated or corrupt file ({e})") from None
    except Exception as e:  # nibabel raises several types for files that are not images
        raise CaseError(path, f"cannot be read as a NIfTI image ({type(e).__name__}: {e})") from None
    array = _check_array(path, array)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    _check_spacing(path, zooms)
    affine = affine_with_spacing(img.affine, zooms)
    return Volume(array.astype(dtype, copy=False), zooms, affine, path, img.header.copy())


def _sitk():
    """SimpleITK, imported on first use: only DICOM needs it, so training from a prepared slice cache
    runs where it is not installed."""
    import SimpleITK

    return SimpleITK


def _sitk_affine(image) -> np.ndarray:
    """SimpleITK geometry (LPS, index order x, y, z) as a RAS voxel->world affine."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    affine[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def sitk_to_volume(image, path: str, dtype=np.float32) -> Volume:
    if image.GetDimension() != 3:
        raise CaseError(path, f"{image.GetDimension()}D image: expected a 3D short-axis stack")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise CaseError(path, f"{image.GetNumberOfComponentsPerPixel()}-component (colour/vector) image: expected a grey-level image")
    array = _sitk().GetArrayFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    array = _check_array(path, array)
    spacing = tuple(float(s) for s in image.GetSpacing())
    _check_spacing(path, spacing)
    return Volume(np.ascontiguousarray(array.astype(dtype, copy=False)), spacing, _sitk_affine(image), path, None)


def dicom_series(folder: str | os.PathLike) -> dict[str, list[str]]:
    """DICOM series directly inside ``folder``: series UID -> its files in slice order."""
    reader = _sitk().ImageSeriesReader()
    series = {}
    for uid in reader.GetGDCMSeriesIDs(str(folder)) or ():
        files = list(reader.GetGDCMSeriesFileNames(str(folder), uid))
        if files:
            series[uid] = files
    return series


def read_dicom_series(files: list[str], name: str | None = None, dtype=np.float32) -> Volume:
    name = name or os.path.dirname(files[0])
    try:
        reader = _sitk().ImageSeriesReader()
        reader.SetFileNames(list(files))
        reader.MetaDataDictionaryArrayUpdateOn()  # keep each slice's header: no second pass over the files
        image = reader.Execute()
    except RuntimeError as e:
        raise CaseError(name, f"DICOM series cannot be read ({str(e).strip().splitlines()[-1]})") from None
    if len(files) > 2:
        positions = _slice_positions(reader, len(files))
        if positions is not None:
            gaps = np.diff(np.sort(positions))
            if gaps.min() <= 0 or gaps.max() > 1.5 * np.median(gaps):
                raise CaseError(name, f"DICOM series has missing or duplicate slices (slice gaps {np.round(gaps, 2).tolist()} mm)")
    return sitk_to_volume(image, name, dtype)


def _slice_positions(reader, count: int) -> np.ndarray | None:
    """Signed distance of each slice along the stack normal, from the headers a series reader kept."""
    positions = []
    for i in range(count):
        try:
            ipp = np.array([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")])
            iop = np.array([float(v) for v in reader.GetMetaData(i, "0020|0037").split("\\")])
        except (RuntimeError, ValueError):
            return None
        positions.append(float(np.dot(np.cross(iop[:3], iop[3:]), ipp)))
    return np.asarray(positions)


def read_image(path: str | os.PathLike, dtype=np.float32) -> Volume:
    """A NIfTI file, a DICOM file, or a folder holding exactly one DICOM series."""
    path = str(path)
    if is_nifti(path):
        return read_nifti(path, dtype)
    if os.path.isdir(path):
        series = dicom_series(path)
        if not series:
            raise CaseError(path, "folder holds no DICOM series")
        if len(series) > 1:
            raise CaseError(path, f"folder holds {len(series)} DICOM series: name one series")
        return read_dicom_series(next(iter(series.values())), path, dtype)
    if not os.path.exists(path):
        raise CaseError(path, "file not found")
    try:
        image = _sitk().ReadImage(path)
    except RuntimeError:
        raise CaseError(path, "not a NIfTI file or a readable DICOM image") from None
    return sitk_to_volume(image, path, dtype)


def atomic_write(path: str | os.PathLike, write_fn, overwrite: bool = False) -> str:
    """Write through ``write_fn(tmp_path)`` to a temporary name, then rename: never a half-written file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists already (not overwritten; set overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes private files; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return str(path)


def write_like(array: np.ndarray, reference: Volume, path: str | os.PathLike, overwrite: bool = False) -> str:
    """Write ``array`` (on ``reference``'s grid) as NIfTI with the reference's own header and geometry."""
    array = np.asarray(array)
    if array.shape[:3] != reference.array.shape[:3]:
        raise ValueError(f"{path}: array shape {array.shape} does not match the input grid {reference.array.shape}")
    if reference.header is not None:
        header = reference.header.copy()
        header.set_data_dtype(array.dtype)
        header.set_data_shape(array.shape)
        img = nib.Nifti1Image(array, None, header)  # affine None: keep the input's sform/qform as they were
        img.header.set_slope_inter(1, 0)
    else:
        img = nib.Nifti1Image(array, reference.affine)
        img.header.set_data_dtype(array.dtype)
        img.set_qform(reference.affine, code=1)
        img.set_sform(reference.affine, code=1)
    return atomic_write(path, lambda tmp: nib.save(img, tmp), overwrite)
