import gzip

import nibabel as nib
import numpy as np
import pytest
from helpers import save_dicom_series, save_nifti, synthetic_heart

from cmr_ood.data.io import CaseError, atomic_write, dicom_series, read_image, read_nifti, write_like


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
    with pytest.raises(CaseError, match="missing or duplicate slices"):
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
