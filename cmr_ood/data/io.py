"""Reading and writing volumes: the one place where geometry is read from headers.

Every reader returns a :class:`Volume` whose ``spacing`` is the true voxel size in mm. NIfTI headers can
disagree with themselves: ACDC's sform has unit spacing (qform_code 0) while pixdim holds the real
spacing, so ``img.affine`` alone is wrong by a factor of about 2 in-plane and 10 through-plane. The rule
here: pixdim is the spacing; where the affine's column norms disagree with it, the affine is rebuilt from
its directions and pixdim. Outputs are written with the input's own header, so they stay consistent with
what the user gave.

Geometry that cannot be trusted is refused, never guessed: a NIfTI header whose qform and sform disagree,
a non-invertible affine, a DICOM series whose slices differ in orientation or pixel spacing, step off
their normal, or leave gaps (missing slices, uneven spacing). Sizes are checked from the headers
before any voxel is read.
"""

from __future__ import annotations

import math
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
#: Largest image read, in voxels over all frames, checked from the header before any voxel is read:
#: 2**28 voxels is 1 GiB as float32, above any cardiac cine (512 x 428 px, 20 slices, 50 frames: 219 M).
MAX_VOXELS = 1 << 28
#: Unit direction vectors (qform against sform, the orientations of the slices of a DICOM series) must
#: agree within this (about 0.06 degrees); below it, the determinant of an affine's unit axes is degenerate.
ORIENTATION_TOLERANCE = 1e-3
#: qform and sform origins must agree within this (mm).
ORIGIN_TOLERANCE_MM = 0.1
#: DICOM slice gaps must be multiples of the series' slice step within this fraction of it.
SLICE_GAP_TOLERANCE = 0.02
#: Largest angle (degrees) between the step from one DICOM slice to the next and the slices' normal.
MAX_SLICE_STEP_ANGLE_DEG = 0.5
NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: In the name of every temporary file of :func:`atomic_write` (``.<name>.<random>.part<suffix>``).
PARTIAL_MARKER = ".part"


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


def _check_shape(path, shape) -> tuple[int, ...]:
    """The shape of a 3D stack or 4D cine (a single-frame 4D image as 3D), from a header or an array."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4 and shape[3] == 1:  # a 4D file holding a single frame is a 3D stack
        shape = shape[:3]
    if len(shape) == 2:
        raise CaseError(path, f"2D image (shape {shape}): expected a 3D short-axis stack or a 4D cine")
    if len(shape) not in (3, 4):
        raise CaseError(path, f"{len(shape)}D image (shape {shape}): expected a 3D short-axis stack or a 4D cine")
    if any(s == 0 for s in shape):
        raise CaseError(path, f"empty image: a dimension has size 0 (shape {shape})")
    check_size(path, shape)
    return shape


def check_size(path, shape) -> None:
    """Refuse an image of more than :data:`MAX_VOXELS` voxels (checked before its voxels are read)."""
    count = math.prod(int(s) for s in shape)
    if count > MAX_VOXELS:
        raise CaseError(path, f"image too large: {count:,} voxels (shape {tuple(int(s) for s in shape)}), above the limit of "
                              f"{MAX_VOXELS:,} voxels (cmr_ood.data.io.MAX_VOXELS): crop it or split it into stacks")


def _check_array(path, array: np.ndarray) -> np.ndarray:
    array = array.reshape(_check_shape(path, array.shape))
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise CaseError(path, f"unsupported voxel type {array.dtype}")
    if np.issubdtype(array.dtype, np.floating):
        bad = ~np.isfinite(array)
        if bad.any():
            raise CaseError(path, f"{int(bad.sum())} voxels are NaN or infinite")
    return array


def _directions(matrix: np.ndarray) -> np.ndarray:
    """The columns of a 3x3 matrix as unit vectors (zero columns stay zero)."""
    norms = np.linalg.norm(matrix, axis=0)
    return matrix / np.where(norms == 0, 1.0, norms)


def _degrees(cosine) -> float:
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def check_affine(path, affine, what: str = "voxel-to-world affine") -> None:
    """Refuse a geometry that maps no voxel grid into space: non-finite, or degenerate (not invertible).

    Sheared affines are accepted: slices that step off their normal (a tilted stack) are real
    acquisitions, and an image that is not a short-axis stack must reach the model to be flagged."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise CaseError(path, f"{what} holds NaN or infinite values")
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if (norms == 0).any():
        raise CaseError(path, f"{what} is degenerate (not invertible): voxel axis {int(np.argmin(norms))} has no direction")
    directions = _directions(affine[:3, :3])
    if abs(np.linalg.det(directions)) < ORIENTATION_TOLERANCE:
        raise CaseError(path, f"{what} is degenerate (not invertible): its voxel axes are linearly dependent")


def _check_qform_sform(path, header) -> None:
    """Where a header sets both qform and sform, they must describe the same orientation and origin
    (their scales may differ: pixdim is the spacing, see the module docstring)."""
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if not (qcode and scode):
        return
    check_affine(path, sform, "the header's sform")
    q, s = _directions(qform[:3, :3]), _directions(sform[:3, :3])
    if np.sign(np.linalg.det(q)) != np.sign(np.linalg.det(s)):
        raise CaseError(path, "the header's qform and sform disagree on handedness (one is left-handed, the other "
                              "right-handed): the orientation is mislabelled")
    if np.abs(q - s).max() > ORIENTATION_TOLERANCE:
        worst = max(_degrees(c) for c in (q * s).sum(0))
        raise CaseError(path, f"the header's qform and sform disagree on the voxel axes' directions (by up to {worst:.1f} "
                              "degrees): the orientation is ambiguous")
    shift = float(np.linalg.norm(qform[:3, 3] - sform[:3, 3]))
    if shift > ORIGIN_TOLERANCE_MM:
        raise CaseError(path, f"the header's qform and sform disagree on the origin (by {shift:.2f} mm): the position is ambiguous")


def read_nifti(path: str | os.PathLike, dtype=np.float32) -> Volume:
    """A NIfTI volume; its shape, size and geometry are checked from the header before its voxels are read."""
    path = str(path)
    try:
        img = nib.load(path)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise CaseError(path, f"not a NIfTI image ({type(img).__name__})")
        shape = _check_shape(path, img.header.get_data_shape())
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        _check_spacing(path, zooms)
        _check_qform_sform(path, img.header)
        affine = affine_with_spacing(img.affine, zooms)
        check_affine(path, affine)
        array = np.asanyarray(img.dataobj).reshape(shape)
    except CaseError:
        raise
    except FileNotFoundError:
        raise CaseError(path, "file not found") from None
    except (EOFError, zlib.error, OSError) as e:  # gzip/zlib raise these on truncated or corrupt files
        raise CaseError(path, f"truncated or corrupt file ({e})") from None
    except Exception as e:  # nibabel raises several types for files that are not images
        raise CaseError(path, f"cannot be read as a NIfTI image ({type(e).__name__}: {e})") from None
    array = _check_array(path, array)
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
    """DICOM series directly inside ``folder``: series UID -> its files in slice order. Series of one slice
    position each (one series per slice, as some scanners store a short-axis cine) that together form one
    regular stack are joined into one entry, keyed by their UIDs joined with ``+``."""
    reader = _sitk().ImageSeriesReader()
    series = {}
    for uid in reader.GetGDCMSeriesIDs(str(folder)) or ():
        files = list(reader.GetGDCMSeriesFileNames(str(folder), uid))
        if files:
            series[uid] = files
    return _join_slice_series(series, str(folder)) if len(series) > 1 else series


def _join_slice_series(series: dict[str, list[str]], folder: str) -> dict[str, list[str]]:
    """:func:`dicom_series`'s joining: single-position series of one study, orientation, image size, pixel
    spacing and number of images are joined when :func:`_series_frames` accepts them as one stack or cine."""
    def key(headers):
        first = headers[0]
        orientation, spacing = _tag_values(first, "0020|0037"), _tag_values(first, "0028|0030")
        positions = [_tag_values(h, "0020|0032") for h in headers]
        if orientation is None or spacing is None or any(p is None for p in positions) or \
                len({tuple(np.round(p, 2)) for p in positions}) != 1:
            return None
        study = first.GetMetaData("0020|000d").strip() if first.HasMetaDataKey("0020|000d") else ""
        return study, tuple(np.round(orientation, 3)), first.GetSize()[:2], tuple(np.round(spacing, 4)), len(headers)

    groups: dict[tuple, list[str]] = {}
    headers = {}
    for uid, files in series.items():
        try:  # the reader lists a stack's files by position: unequal ends rule a series out before reading the rest
            if key([_dicom_header(files[0], folder), _dicom_header(files[-1], folder)]) is None:
                continue
            headers[uid] = [_dicom_header(f, folder) for f in files]
        except CaseError:
            continue
        k = key(headers[uid])
        if k is not None:
            groups.setdefault(k, []).append(uid)
    joined = dict(series)
    for uids in groups.values():
        if len(uids) < 2:
            continue
        files = [f for uid in uids for f in series[uid]]
        every = [h for uid in uids for h in headers[uid]]
        try:
            _series_frames(folder, every)
        except CaseError:  # not one regular stack: the series stay cases of their own
            continue
        normal = np.cross(*np.reshape(_tag_values(every[0], "0020|0037"), (2, 3)))
        order = np.argsort([_tag_values(h, "0020|0032") @ normal for h in every], kind="stable")
        for uid in uids:
            del joined[uid]
        joined["+".join(uids)] = [files[i] for i in order]
    return joined


#: SOP classes of enhanced (multi-frame) MR: one file holds every slice and phase, described per frame.
ENHANCED_MR = ("1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4")


def _dicom_header(file: str, name: str, unreadable: str | None = None):
    """A DICOM file's header (its pixel data is not read); ``unreadable`` replaces the message for a file that
    is not DICOM. Enhanced multi-frame MR is refused: the reader would stack its frames without their
    per-frame positions and phases."""
    reader = _sitk().ImageFileReader()
    reader.SetFileName(str(file))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise CaseError(name, unreadable or f"{file} is not a readable DICOM image") from None
    sop_class = reader.GetMetaData("0008|0016").strip().rstrip("\x00") if reader.HasMetaDataKey("0008|0016") else ""
    if sop_class in ENHANCED_MR and reader.GetSize()[2] > 1:
        raise CaseError(name, f"{file} is an enhanced multi-frame MR DICOM ({reader.GetSize()[2]} frames in one file), which is not "
                              "read: convert it to NIfTI (e.g. with dcm2niix) or export the series as classic single-frame DICOM")
    return reader


def _tag_values(header, tag: str) -> np.ndarray | None:
    """A numeric, backslash-separated DICOM attribute (``"0020|0032"``) as floats; None where absent."""
    if not header.HasMetaDataKey(tag):
        return None
    try:
        return np.array([float(v) for v in header.GetMetaData(tag).strip().split("\\")])
    except ValueError:
        return None


def describe_dicom_series(series: dict[str, list[str]]) -> str:
    """One line per series: UID, number of files and description, for error messages."""
    lines = []
    for uid, files in series.items():
        header = _dicom_header(files[0], files[0])
        description = header.GetMetaData("0008|103e").strip() if header.HasMetaDataKey("0008|103e") else ""
        lines.append(f"{uid} ({len(files)} files{', ' + repr(description) if description else ''})")
    return "; ".join(lines)


def read_dicom_folder(folder: str | os.PathLike, series_uid: str | None = None, dtype=np.float32) -> Volume:
    """The DICOM series of ``folder``: its only one, or the one named by ``series_uid``."""
    folder = str(folder)
    series = dicom_series(folder)
    if not series:
        raise CaseError(folder, "folder holds no DICOM series")
    if series_uid is None and len(series) > 1:
        raise CaseError(folder, f"folder holds {len(series)} DICOM series: {describe_dicom_series(series)}. Name one "
                                "('series_uid' in a manifest entry), or give a batch run the folder: it segments each series as a case")
    if series_uid is not None and series_uid not in series:
        raise CaseError(folder, f"no DICOM series {series_uid} here; the folder holds: {describe_dicom_series(series)}")
    return read_dicom_series(series[series_uid] if series_uid else next(iter(series.values())), folder, dtype)


def read_dicom_series(files: list[str], name: str | None = None, dtype=np.float32) -> Volume:
    """One DICOM series (its files in slice order): a 3D stack, or a 4D cine where every slice position was
    imaged at the same number of phases (as most scanners store a short-axis cine); size and geometry are
    checked from the headers first."""
    name = name or os.path.dirname(files[0])
    headers = [_dicom_header(f, name) for f in files]
    size = headers[0].GetSize()
    check_size(name, (size[0], size[1], sum(h.GetSize()[2] for h in headers)))
    frames = _series_frames(name, headers)
    volumes = [sitk_to_volume(_read_series_files(files if frame is None else [files[i] for i in frame], name), name, dtype)
               for frame in (frames or [None])]
    if len(volumes) == 1:
        return volumes[0]
    return Volume(np.stack([v.array for v in volumes], axis=-1), volumes[0].spacing, volumes[0].affine, name, None)


def _read_series_files(files: list[str], name: str):
    try:
        reader = _sitk().ImageSeriesReader()
        reader.SetFileNames(list(files))
        return reader.Execute()
    except RuntimeError as e:
        raise CaseError(name, f"DICOM series cannot be read ({str(e).strip().splitlines()[-1]})") from None


def _series_frames(name: str, headers) -> list[list[int]] | None:
    """Check that the slices of a series form one regular stack, imaged once (a stack) or at the same number
    of phases per position (a cine): one orientation (orthonormal), one pixel spacing, positions stepping
    along the slice normal by one slice step (no missing slice). A cine's frames are returned, each as the
    indices of its files in slice order, phases in trigger-time order (else instance number); a stack gives
    None. Where the headers lack positions or orientations, nothing can be checked and the series is read as
    one stack, as the reader orders it."""
    orientations = [_tag_values(h, "0020|0037") for h in headers]
    positions = [_tag_values(h, "0020|0032") for h in headers]
    pixel_spacings = [_tag_values(h, "0028|0030") for h in headers]
    if any(o is None or len(o) != 6 for o in orientations) or any(p is None or len(p) != 3 for p in positions):
        return None
    row, col = orientations[0][:3], orientations[0][3:]
    if max(abs(np.linalg.norm(row) - 1), abs(np.linalg.norm(col) - 1), abs(row @ col)) > ORIENTATION_TOLERANCE:
        raise CaseError(name, f"ImageOrientationPatient {orientations[0].tolist()} is not two orthogonal unit vectors: "
                              "a corrupt or mislabelled orientation")
    differing = [i for i, o in enumerate(orientations) if np.abs(o - orientations[0]).max() > ORIENTATION_TOLERANCE]
    if differing:
        raise CaseError(name, f"slices of different orientations ({len(differing)} of {len(headers)} differ from the first, e.g. "
                              f"{orientations[differing[0]].round(4).tolist()} vs {orientations[0].round(4).tolist()}): not one stack")
    if all(p is not None for p in pixel_spacings):
        shown = sorted({tuple(np.round(p, 4).tolist()) for p in pixel_spacings})
        if any(np.abs(p - pixel_spacings[0]).max() > ORIENTATION_TOLERANCE * pixel_spacings[0].max() for p in pixel_spacings):
            raise CaseError(name, f"inconsistent pixel spacing between slices ({shown} mm): not one stack")
    normal = np.cross(row, col)
    points = np.stack(positions)
    distance = points @ normal
    order = np.argsort(distance, kind="stable")
    gaps = np.diff(distance[order])
    # images at one position (within a small share of the largest gap) are phases of one slice
    breaks = np.flatnonzero(gaps > SLICE_GAP_TOLERANCE * max(gaps.max(initial=0.0), 1e-6)) + 1
    slices = np.split(order, breaks)
    counts = sorted({len(s) for s in slices})
    if len(counts) > 1:
        crowded = max(slices, key=len)
        raise CaseError(name, f"duplicate slices: {len(crowded)} images at {distance[crowded[0]]:.2f} mm along the slice normal, "
                              f"{counts[0]} at others: neither one stack nor a cine with every slice at every phase")
    _check_slice_steps(name, points[[s[0] for s in slices]], normal)
    if counts[0] == 1:
        return None
    trigger = [_tag_values(h, "0018|1060") for h in headers]
    instance = [_tag_values(h, "0020|0013") for h in headers]

    def phase_key(i):
        return (trigger[i][0] if trigger[i] is not None else math.inf, instance[i][0] if instance[i] is not None else math.inf, i)
    by_phase = [sorted(s, key=phase_key) for s in slices]
    return [[int(s[t]) for s in by_phase] for t in range(counts[0])]


def _check_slice_steps(name: str, points: np.ndarray, normal: np.ndarray) -> None:
    """Slice positions (in slice order) must step along the normal by one regular step: no tilt, no gap."""
    if len(points) < 2:
        return
    steps = np.diff(points, axis=0)
    gaps = steps @ normal
    off_normal = np.linalg.norm(steps - gaps[:, None] * normal, axis=1) / gaps
    if np.degrees(np.arctan(off_normal.max())) > MAX_SLICE_STEP_ANGLE_DEG:
        raise CaseError(name, f"slice positions step off the slice normal by up to {np.degrees(np.arctan(off_normal.max())):.1f} "
                              "degrees (a tilted stack, or a mislabelled orientation): the series reader cannot represent it")
    step = gaps.min()
    multiples = np.round(gaps / step)
    if np.abs(gaps / step - multiples).max() > SLICE_GAP_TOLERANCE:
        raise CaseError(name, f"inconsistent slice spacing within the series (slice gaps {np.round(gaps, 2).tolist()} mm)")
    if multiples.max() > 1:
        raise CaseError(name, f"missing slices: {int((multiples - 1).sum())} (slice gaps {np.round(gaps, 2).tolist()} mm where "
                              f"the series steps by {step:.2f} mm)")


def read_image(path: str | os.PathLike, dtype=np.float32, series_uid: str | None = None) -> Volume:
    """A NIfTI file, a DICOM file, or a folder holding one DICOM series (or several, one named by ``series_uid``)."""
    path = str(path)
    if is_nifti(path):
        return read_nifti(path, dtype)
    if os.path.isdir(path):
        return read_dicom_folder(path, series_uid, dtype)
    if not os.path.exists(path):
        raise CaseError(path, "file not found")
    reader = _dicom_header(path, path, unreadable="not a NIfTI file or a readable DICOM image")
    check_size(path, reader.GetSize())
    try:
        image = reader.Execute()
    except RuntimeError:
        raise CaseError(path, "not a NIfTI file or a readable DICOM image") from None
    return sitk_to_volume(image, path, dtype)


def is_partial_file(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write`'s temporary names."""
    return name.startswith(".") and PARTIAL_MARKER in name


def remove_partial_files(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files a killed writer left under ``folder``; returns their paths."""
    removed = []
    for directory, _, files in os.walk(folder):
        for name in files:
            if is_partial_file(name):
                os.remove(os.path.join(directory, name))
                removed.append(os.path.join(directory, name))
    return removed


def atomic_write(path: str | os.PathLike, write_fn, overwrite: bool = False) -> str:
    """Write through ``write_fn(tmp_path)`` to a temporary name, then rename: never a half-written file."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists already (not overwritten; set overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{PARTIAL_MARKER}{suffix}", dir=path.parent)
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


def write_like(array: np.ndarray, reference: Volume, path: str | os.PathLike, overwrite: bool = False, slope: float = 1.0) -> str:
    """Write ``array`` (on ``reference``'s grid) as NIfTI with the reference's own header and geometry; readers
    get ``array * slope`` (the NIfTI scale factor)."""
    array = np.asarray(array)
    if array.shape[:3] != reference.array.shape[:3]:
        raise ValueError(f"{path}: array shape {array.shape} does not match the input grid {reference.array.shape}")
    if reference.header is not None:
        header = reference.header.copy()
        header.set_data_dtype(array.dtype)
        header.set_data_shape(array.shape)
        img = nib.Nifti1Image(array, None, header)  # affine None: keep the input's sform/qform as they were
    else:
        img = nib.Nifti1Image(array, reference.affine)
        img.header.set_data_dtype(array.dtype)
        img.set_qform(reference.affine, code=1)
        img.set_sform(reference.affine, code=1)
    img.header.set_slope_inter(slope, 0)
    return atomic_write(path, lambda tmp: nib.save(img, tmp), overwrite)
