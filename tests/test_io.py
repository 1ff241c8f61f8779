import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from helpers import DATA_ROOT, requires_data, save_dicom_series, save_nifti, synthetic_heart

from cmr_ood.data import io
from cmr_ood.data.io import CaseError, atomic_write, dicom_series, read_image, read_nifti, remove_partial_files, write_like
from cmr_ood.data.manifests import read_entry


def test_acdc_header_pitfall_spacing_comes_from_pixdim(tmp_path):
    image, _ = synthetic_heart()
    path = save_nifti(tmp_path / "case.nii.gz", image, spacing=(1.5625, 1.5625, 10.0), acdc_header=True)
    assert np.allclose(np.linalg.norm(nib.load(path).affine[:3, :3], axis=0), 1.0)  # what nibabel's affine says
    volume = read_nifti(path)
    assert volume.spacing == pytest.approx((1.5625, 1.5625, 10.0))
    assert np.linalg.norm(volume.affine[:3, :3], axis=0) == pytest.approx([1.5625, 1.5625, 10.0])
    assert volume.voxel_volume_ml == pytest.approx(1.5625 * 1.5625 * 10.0 / 1000)


def test_output_keeps_the_input_header(tmp_path):
    image, labels = synthetic_heart()
    path = save_nifti(tmp_path / "case.nii.gz", image, spacing=(1.3, 1.4, 9.0), acdc_header=True)
    volume = read_nifti(path)
    out = write_like(labels, volume, tmp_path / "out" / "case_seg.nii.gz")
    written, original = nib.load(out), nib.load(path)
    assert written.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(written.dataobj), labels)
    assert written.header.get_zooms() == original.header.get_zooms()
    assert np.allclose(written.affine, original.affine)
    assert written.header["sform_code"] == original.header["sform_code"] and written.header["qform_code"] == 0


def test_dicom_series_geometry(tmp_path):
    image, _ = synthetic_heart()
    save_dicom_series(tmp_path / "series", image, spacing=(1.2, 1.2, 8.0))
    series = dicom_series(tmp_path / "series")
    assert len(series) == 1 and len(next(iter(series.values()))) == image.shape[2]
    volume = read_image(tmp_path / "series")
    assert volume.array.shape == image.shape
    assert volume.spacing == pytest.approx((1.2, 1.2, 8.0))
    assert np.array_equal(volume.array, image.astype(np.int16).astype(np.float32))
    assert np.allclose(volume.affine[:3, :3], np.diag([-1.2, -1.2, 8.0]))  # LPS -> RAS


def test_oblique_dicom_series_keeps_its_world_geometry(tmp_path):
    image, _ = synthetic_heart(shape=(40, 36, 5))
    a, b = np.deg2rad(35.0), np.deg2rad(-20.0)  # a double-oblique plane, as short-axis planes are
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    direction = rz @ rx
    origin = np.array([-80.0, 25.0, 140.0])
    save_dicom_series(tmp_path / "sa", image, spacing=(1.3, 1.3, 8.0), direction=direction, origin=origin)
    volume = read_image(tmp_path / "sa")
    assert volume.spacing == pytest.approx((1.3, 1.3, 8.0))
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    expected = np.eye(4)
    expected[:3, :3] = lps_to_ras @ direction @ np.diag([1.3, 1.3, 8.0])
    expected[:3, 3] = lps_to_ras @ origin
    assert np.allclose(volume.affine, expected, atol=1e-3)
    assert np.array_equal(volume.array, image.astype(np.int16).astype(np.float32))


def test_dicom_missing_slice_is_refused(tmp_path):
    image, _ = synthetic_heart()
    save_dicom_series(tmp_path / "series", image, skip=(3,))
    with pytest.raises(CaseError, match=r"missing slices: 1 \(slice gaps \[8.0, 8.0, 16.0, 8.0\] mm"):
        read_image(tmp_path / "series")


def _truncated(tmp_path):
    good = save_nifti(tmp_path / "good.nii.gz", synthetic_heart()[0])
    data = open(good, "rb").read()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    return path


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _nan(tmp_path):
    image = synthetic_heart()[0]
    image[3, 3, 1] = np.nan
    return save_nifti(tmp_path / "nan.nii.gz", image)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _write(p / "text.nii.gz", gzip.compress(b"hello, not an image" * 50)), "cannot be read"),
        (lambda p: _write(p / "plain.nii", b"not an image"), "cannot be read"),
        (_truncated, "truncated or corrupt"),
        (lambda p: save_nifti(p / "flat.nii.gz", np.zeros((20, 20), np.float32), spacing=(1, 1)), "2D image"),
        (_nan, "NaN or infinite"),
        (lambda p: save_nifti(p / "empty.nii.gz", np.zeros((20, 0, 4), np.float32)), "size 0"),
        (lambda p: save_nifti(p / "huge_spacing.nii.gz", np.zeros((8, 8, 4), np.float32), spacing=(1, 500, 8), acdc_header=True),
         r"absurd voxel spacing \(1, 500, 8\) mm"),
        (lambda p: save_nifti(p / "five_d.nii.gz", np.zeros((4, 4, 4, 2, 2), np.float32)), "5D image"),
        (lambda p: p / "missing.nii.gz", "not found"),
    ],
)
def test_bad_input_gets_a_clear_error_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(CaseError, match=message) as err:
        read_image(path)
    assert str(path) in str(err.value)


def test_single_frame_4d_is_a_stack_and_cine_is_kept(tmp_path):
    image, _ = synthetic_heart()
    assert read_image(save_nifti(tmp_path / "one.nii.gz", image[..., None])).array.ndim == 3
    cine = read_image(save_nifti(tmp_path / "cine.nii.gz", np.stack([image] * 3, -1)))
    assert cine.is_cine and cine.array.shape == (*image.shape, 3)


def test_atomic_write_never_leaves_half_files_or_overwrites(tmp_path):
    target = tmp_path / "out.txt"

    def failing(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert list(tmp_path.iterdir()) == []
    atomic_write(target, lambda tmp: open(tmp, "w").write("first"))
    assert target.stat().st_mode & 0o044 == 0o044  # readable by others, like any file the user writes
    with pytest.raises(FileExistsError, match="exists already"):
        atomic_write(target, lambda tmp: open(tmp, "w").write("second"))
    assert target.read_text() == "first"


# ------------------------------------------------------------------------------------- hardening
def write_slices(folder, slices, series_uid="1.2.826.0.1.3680043.2.1125.7"):
    """A DICOM series slice by slice: ``slices`` are (2D array (x, y), LPS position, row and column
    directions, (x, y) pixel spacing), so that positions, orientations and spacings can disagree."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i, (array, position, row, col, spacing) in enumerate(slices):
        image = sitk.GetImageFromArray(np.asarray(array).T.astype(np.int16)[None])
        image.SetSpacing((spacing[0], spacing[1], 8.0))
        image.SetOrigin(tuple(float(v) for v in position))
        image.SetDirection(tuple(np.column_stack([row, col, np.cross(row, col)]).ravel()))
        for tag, value in {"0008|0060": "MR", "0020|000d": "1.2.826.0.1.3680043.2.1125.9", "0020|000e": series_uid,
                           "0020|0013": str(i + 1), "0008|0018": f"{series_uid}.{i + 1}",
                           "0020|0037": "\\".join(f"{v:.6f}" for v in (*row, *col)),
                           "0028|0030": f"{spacing[1]}\\{spacing[0]}"}.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{i:03d}.dcm"))
        writer.Execute(image)
    return folder


def stack(positions_mm, rows=None, spacings=None):
    """Slices along z at ``positions_mm``, axial unless ``rows`` gives each slice's row direction."""
    image = synthetic_heart(shape=(24, 20, len(positions_mm)))[0]
    rows = rows or [(1.0, 0.0, 0.0)] * len(positions_mm)
    spacings = spacings or [(1.2, 1.2)] * len(positions_mm)
    return [(image[..., i], (0.0, 0.0, z), np.asarray(r), np.array([0.0, 1.0, 0.0]), s)
            for i, (z, r, s) in enumerate(zip(positions_mm, rows, spacings))]


def test_a_regular_hand_written_series_is_read(tmp_path):
    volume = read_image(write_slices(tmp_path / "s", stack([0, 8, 16, 24, 32])))
    assert volume.array.shape == (24, 20, 5) and volume.spacing == pytest.approx((1.2, 1.2, 8.0))


tilted = (np.cos(0.3), 0.0, np.sin(0.3))  # rotated about the column direction: still orthonormal


@pytest.mark.parametrize("slices, message", [
    (stack([0, 8, 16, 27, 35]), r"inconsistent slice spacing within the series \(slice gaps \[8.0, 8.0, 11.0, 8.0\] mm\)"),
    (stack([0, 8, 24, 32, 56]), r"missing slices: 3 \(slice gaps \[8.0, 16.0, 8.0, 24.0\] mm where the series steps by 8.00 mm\)"),
    (stack([0, 8, 8, 16]), "duplicate slices: 2 images at 8.00 mm along the slice normal, 1 at others: neither one stack nor a cine"),
    (stack([0, 8, 16, 24], rows=[(1.0, 0.0, 0.0)] * 3 + [tilted]), "slices of different orientations"),
    (stack([0, 8, 16], spacings=[(1.2, 1.2), (1.2, 1.2), (1.4, 1.4)]), r"inconsistent pixel spacing between slices"),
])
def test_irregular_dicom_series_are_refused(tmp_path, slices, message):
    folder = write_slices(tmp_path / "series", slices)
    with pytest.raises(CaseError, match=message) as err:
        read_image(folder)
    assert str(folder) in str(err.value)


def test_a_dicom_cine_series_is_read_as_4d_with_phases_in_trigger_time_order(tmp_path):
    image = np.stack([synthetic_heart(shape=(24, 20, 5), radius=4 + t)[0] for t in range(3)], axis=-1)
    folder = save_dicom_series(tmp_path / "cine", image, spacing=(1.3, 1.3, 9.0))
    volume = read_image(folder)
    assert volume.is_cine and volume.array.shape == (24, 20, 5, 3) and volume.spacing == pytest.approx((1.3, 1.3, 9.0))
    assert np.array_equal(volume.array, image.astype(np.int16))  # frames in time order, slices in space order
    assert volume.affine == pytest.approx(read_image(save_dicom_series(tmp_path / "stack", image[..., 0], spacing=(1.3, 1.3, 9.0))).affine)
    # a slice imaged at fewer phases than the others: neither a stack nor a cine
    (folder / "slice002_phase01.dcm").unlink()
    with pytest.raises(CaseError, match="duplicate slices: 3 images at .* 2 at others"):
        read_image(folder)


def test_one_series_per_slice_is_joined_into_one_cine_and_other_series_stay_apart(tmp_path):
    image = np.stack([synthetic_heart(shape=(24, 20, 4), radius=4 + t)[0] for t in range(3)], axis=-1)
    folder = tmp_path / "study"
    for z in range(4):  # one series per slice position, each with every phase (as some scanners store a cine)
        save_dicom_series(folder, image[:, :, z:z + 1], spacing=(1.3, 1.3, 9.0), origin=(0.0, 0.0, 9.0 * z),
                          series_uid=f"1.2.3.{10 + z}", prefix=f"s{z}_")
    rotated = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # another view: not joined
    save_dicom_series(folder, image[..., 0], spacing=(1.3, 1.3, 9.0), series_uid="1.2.3.99", direction=rotated, prefix="la")
    series = dicom_series(folder)
    assert sorted(series) == ["1.2.3.10+1.2.3.11+1.2.3.12+1.2.3.13", "1.2.3.99"]
    volume = read_image(folder, series_uid="1.2.3.10+1.2.3.11+1.2.3.12+1.2.3.13")
    assert volume.is_cine and volume.array.shape == (24, 20, 4, 3) and volume.spacing == pytest.approx((1.3, 1.3, 9.0))
    assert np.array_equal(volume.array, image.astype(np.int16))
    # a slice series missing from the middle of the stack: no stack to join, each series is a case of its own
    for f in folder.glob("s2_*"):
        f.unlink()
    assert sorted(dicom_series(folder)) == ["1.2.3.10", "1.2.3.11", "1.2.3.13", "1.2.3.99"]


def test_an_enhanced_multiframe_mr_file_is_refused_with_what_to_do(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((5, 20, 24), np.uint16))
    image.SetMetaData("0008|0016", "1.2.840.10008.5.1.4.1.1.4.1")  # Enhanced MR Image Storage
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(tmp_path / "cine.dcm"))
    writer.Execute(image)
    with pytest.raises(CaseError, match=r"cine.dcm is an enhanced multi-frame MR DICOM \(5 frames in one file\).*dcm2niix"):
        read_image(tmp_path / "cine.dcm")


def test_a_tilted_dicom_stack_is_refused(tmp_path):
    slices = stack([0, 8, 16, 24])
    slices = [(a, (0.0, 2.0 * i, z), r, c, s) for i, (a, (_, _, z), r, c, s) in enumerate(slices)]  # steps 14 deg off normal
    with pytest.raises(CaseError, match=r"step off the slice normal by up to 14.0 degrees \(a tilted stack"):
        read_image(write_slices(tmp_path / "tilted", slices))


def test_a_folder_of_several_series_lists_them_and_one_can_be_named(tmp_path):
    folder = tmp_path / "study"
    for uid, z0 in (("1.2.3.100", 0.0), ("1.2.3.200", 500.0)):
        part = write_slices(tmp_path / uid, stack([z0, z0 + 8, z0 + 16]), series_uid=uid)
        folder.mkdir(exist_ok=True)
        for f in part.iterdir():
            f.rename(folder / f"{uid}_{f.name}")
    assert set(dicom_series(folder)) == {"1.2.3.100", "1.2.3.200"}
    with pytest.raises(CaseError, match=r"folder holds 2 DICOM series: 1.2.3.100 \(3 files\); 1.2.3.200 \(3 files\)\. Name one"):
        read_image(folder)
    assert read_image(folder, series_uid="1.2.3.200").affine[2, 3] == pytest.approx(500.0)
    with pytest.raises(CaseError, match="no DICOM series 9.9 here; the folder holds: 1.2.3.100"):
        read_image(folder, series_uid="9.9")


def nifti_with_forms(path, sform, qform, qcode=1, scode=1):
    img = nib.Nifti1Image(np.ones((8, 8, 4), np.float32), None)
    img.header.set_zooms((1.5, 1.5, 8.0))
    img.header.set_sform(sform, code=scode)
    img.header.set_qform(qform, code=qcode)
    nib.save(img, str(path))
    return path


FLIP_Z = np.diag([1.0, 1.0, -1.0, 1.0])
SA = np.diag([1.5, 1.5, 8.0, 1.0])


@pytest.mark.parametrize("sform, qform, scode, message", [
    (SA, SA @ FLIP_Z, 1, "qform and sform disagree on handedness"),
    (SA, np.array([[0, -1.5, 0, 0], [1.5, 0, 0, 0], [0, 0, 8, 0], [0, 0, 0, 1.0]]), 1,
     r"qform and sform disagree on the voxel axes' directions \(by up to 90.0 degrees\)"),
    (SA, SA + np.array([[0, 0, 0, 3.0], [0, 0, 0, 4.0], [0, 0, 0, 0], [0, 0, 0, 0]]), 1, r"disagree on the origin \(by 5.00 mm\)"),
    (np.diag([1.5, 0.0, 8.0, 1.0]), SA, 0, "degenerate \\(not invertible\\): voxel axis 1 has no direction"),
    (np.array([[1.5, 1.5, 0, 0], [1.5, 1.5, 0, 0], [0, 0, 8, 0], [0, 0, 0, 1.0]]), SA, 0, "linearly dependent"),
])
def test_mislabelled_nifti_orientation_is_refused(tmp_path, sform, qform, scode, message):
    path = nifti_with_forms(tmp_path / "case.nii.gz", sform, qform, qcode=1 if scode else 0, scode=1)
    with pytest.raises(CaseError, match=message) as err:
        read_image(path)
    assert str(path) in str(err.value)


def test_agreeing_forms_and_a_tilted_stack_are_read(tmp_path):
    assert read_image(nifti_with_forms(tmp_path / "ok.nii.gz", SA @ FLIP_Z, SA @ FLIP_Z)).spacing == pytest.approx((1.5, 1.5, 8.0))
    tilted_stack = np.array([[2.0, 0, 30, 0], [0, 2.0, 30, 0], [0, 0, 32, 0], [0, 0, 0, 1]])  # a real DWI's sheared sform
    volume = read_image(nifti_with_forms(tmp_path / "tilted.nii.gz", tilted_stack, SA, qcode=0))
    assert np.allclose(volume.affine[:3, 2] / np.linalg.norm(volume.affine[:3, 2]), np.array([30, 30, 32]) / np.sqrt(2824))


def test_huge_images_are_refused_from_the_header_before_reading(tmp_path, monkeypatch):
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 40, 30))  # 20 G voxels claimed; the file holds the header only
    header.set_data_dtype(np.float32)
    header.set_zooms((1.0, 1.0, 8.0, 1.0))
    path = tmp_path / "huge.nii"
    with open(path, "wb") as f:
        header.write_to(f)
    with pytest.raises(CaseError, match=r"image too large: 20,132,659,200 voxels .* limit of 268,435,456 voxels "
                                        r"\(cmr_ood.data.io.MAX_VOXELS\)"):
        read_image(path)  # reading the voxels first would have failed with 'truncated'
    series = save_dicom_series(tmp_path / "series", synthetic_heart()[0])
    monkeypatch.setattr(io, "MAX_VOXELS", 48 * 40 * 6 - 1)
    with pytest.raises(CaseError, match="image too large: 11,520 voxels"):
        read_image(series)


def test_temporary_files_of_atomic_writes_are_found_and_removed(tmp_path):
    (tmp_path / "a").mkdir()
    stray = tmp_path / "a" / ".case_seg.nii.gz.x1y2.part.nii.gz"
    stray.write_bytes(b"half")
    (tmp_path / "a" / "case_seg.nii.gz").write_bytes(b"whole")
    assert remove_partial_files(tmp_path) == [str(stray)]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["case_seg.nii.gz"]


def test_manifest_paths_must_stay_inside_the_data_root(tmp_path):
    root = tmp_path / "root"
    save_nifti(root / "sub" / "a.nii.gz", synthetic_heart()[0])
    outside = save_nifti(tmp_path / "outside.nii.gz", synthetic_heart()[0])
    assert read_entry({"image": "sub/a.nii.gz"}, root)[0].array.shape == (48, 40, 6)
    assert read_entry({"image": str(root / "sub" / "a.nii.gz")}, root)[0].array.shape == (48, 40, 6)  # absolute, inside
    for escaping in ("../outside.nii.gz", "sub/../../outside.nii.gz", outside):
        with pytest.raises(CaseError, match=f"manifest path lies outside the data root {root}"):
            read_entry({"image": escaping}, root)
    with pytest.raises(CaseError, match="manifest path lies outside"):
        read_entry({"image": "sub/a.nii.gz", "label": "../outside.nii.gz"}, root)
    with pytest.raises(CaseError, match=r"frame_index 2, but the image has no frames \(a 3D stack\)"):
        read_entry({"image": "sub/a.nii.gz", "frame_index": 2}, root)


@requires_data
def test_the_checks_refuse_none_of_the_real_images():
    files = sorted((DATA_ROOT / "ood_dev").iterdir()) + sorted((DATA_ROOT / "mnms2_geometry").glob("*.nii.gz"))
    files += sorted((DATA_ROOT / "acdc" / "training").glob("patient00[1-5]/*.nii.gz"))
    for path in (f for f in files if f.suffix in (".gz", ".dcm")):
        assert read_image(path).array.size > 0, path
