import math

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import save_nifti, synthetic_heart

from cmr_ood.data.augment import BatchAugment
from cmr_ood.data.io import CaseError, Volume, read_nifti, write_like
from cmr_ood.ood.shifts import SEVERITIES, SEVERITY_TABLE, SHIFTS, apply_shift, embed

SPACING = (1.5, 1.5, 8.0)
INTENSITY_SHIFTS = [name for name, shift in SHIFTS.items() if not shift.geometric]


def _affine(spacing=SPACING):
    """A short-axis-like affine: oblique in-plane directions, an origin away from zero."""
    c, s = math.cos(0.4), math.sin(0.4)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.asarray(spacing)
    affine[:3, 3] = (-40.0, 25.0, 110.0)
    return affine


def _pair(shape=(48, 40, 6), seed=0, radius=7.0):
    image, labels = synthetic_heart(shape, radius=radius, seed=seed)
    affine = _affine()
    return Volume(image, SPACING, affine, "heart.nii.gz"), Volume(labels, SPACING, affine.copy(), "heart_gt.nii.gz")


def _nrms(shifted: Volume, original: Volume) -> float:
    """RMS image difference on the original grid (a crop put back, background where it was cut) / std."""
    array = shifted.array
    if array.shape != original.array.shape:
        array = embed(shifted, original, fill=float(original.array.min()))
    return float(np.sqrt(np.mean((array - original.array) ** 2)) / original.array.std())


@pytest.mark.parametrize("name", list(SHIFTS))
def test_every_severity_runs_and_stays_in_the_input_range(name):
    image, labels = _pair()
    for severity in SEVERITIES:
        out, out_labels = apply_shift(image, labels, name, severity, seed=3)
        assert out.array.dtype == np.float32 and out_labels.array.dtype == labels.array.dtype
        assert out.array.shape == out_labels.array.shape
        if name != "fov_crop":
            assert out.array.shape == image.array.shape
        assert out.array.min() >= image.array.min() - 1e-3 and out.array.max() <= image.array.max() + 1e-3
        assert np.all(np.isfinite(out.array))
        assert out.spacing == image.spacing and out.path == image.path
        assert not np.array_equal(out.array, image.array)  # every severity changes the image
    only_image, no_labels = apply_shift(image, None, name, 2, seed=3)
    assert no_labels is None and np.array_equal(only_image.array, apply_shift(image, labels, name, 2, seed=3)[0].array)


@pytest.mark.parametrize("name", list(SHIFTS))
def test_deterministic_for_a_seed_and_varied_by_the_seed_where_random(name):
    image, labels = _pair()
    first = apply_shift(image, labels, name, 3, seed=7)
    again = apply_shift(image, labels, name, 3, seed=7)
    assert np.array_equal(first[0].array, again[0].array) and np.array_equal(first[1].array, again[1].array)
    others = [apply_shift(image, labels, name, 3, seed=s)[0].array for s in range(4)]
    varied = any(o.shape != first[0].array.shape or not np.array_equal(o, first[0].array) for o in others)
    assert varied == SHIFTS[name].random


@pytest.mark.parametrize("name", list(SHIFTS))
def test_image_difference_grows_with_severity(name):
    image, labels = _pair()
    for seed in (0, 1):
        differences = [_nrms(apply_shift(image, labels, name, s, seed=seed)[0], image) for s in SEVERITIES]
        assert all(b > a for a, b in zip(differences, differences[1:])), (seed, differences)


@pytest.mark.parametrize("name", INTENSITY_SHIFTS)
def test_intensity_shifts_keep_the_labels(name):
    image, labels = _pair()
    out, out_labels = apply_shift(image, labels, name, 5, seed=1)
    assert np.array_equal(out_labels.array, labels.array)
    assert not np.shares_memory(out_labels.array, labels.array)
    assert np.array_equal(out.affine, image.affine) and np.array_equal(out_labels.affine, labels.affine)


@pytest.mark.parametrize("name", list(SHIFTS))
def test_inputs_are_not_modified(name):
    image, labels = _pair()
    image_before, labels_before, affine_before = image.array.copy(), labels.array.copy(), image.affine.copy()
    for severity in (1, 5):
        out, out_labels = apply_shift(image, labels, name, severity)
        out.array[:] = 0  # the outputs own their memory
        out_labels.array[:] = 0
    assert np.array_equal(image.array, image_before) and np.array_equal(labels.array, labels_before)
    assert np.array_equal(image.affine, affine_before)


@pytest.mark.parametrize("spacing, axes", [(SPACING, (0, 1, 2)), ((8.0, 1.25, 1.25), (2, 0, 1))])
def test_crop_keeps_world_coordinates_of_the_kept_voxels(spacing, axes):
    image, labels = synthetic_heart((44, 36, 5))
    image, labels = image.transpose(axes), labels.transpose(axes)
    affine = _affine(spacing)
    source = Volume(image, spacing, affine, "heart.nii.gz")
    source_labels = Volume(labels, spacing, affine.copy(), "heart_gt.nii.gz")
    slice_axis = int(np.argmax(spacing))
    for severity in SEVERITIES:
        out, out_labels = apply_shift(source, source_labels, "fov_crop", severity, seed=2)
        assert out.array.shape == out_labels.array.shape
        assert out.array.shape[slice_axis] == image.shape[slice_axis]  # only in-plane axes are cropped
        fraction = SEVERITY_TABLE["fov_crop"]["keep"][severity - 1]
        for axis in range(3):
            if axis != slice_axis:
                assert abs(out.array.shape[axis] - fraction * image.shape[axis]) <= 1
        np.testing.assert_allclose(out.affine[:3, :3], affine[:3, :3])
        offset = np.round(np.linalg.solve(affine, out.affine[:, 3])[:3]).astype(int)
        assert offset[slice_axis] == 0 and np.all(offset >= 0)
        for index in [(0, 0, 0), tuple(s - 1 for s in out.array.shape), (1, 2, 3)]:  # same voxel, same world point
            kept = tuple(np.asarray(index) + offset)
            np.testing.assert_allclose(out.affine @ (*index, 1), affine @ (*kept, 1), atol=1e-9)
            assert out.array[index] == image[kept] and out_labels.array[index] == labels[kept]
        back = embed(out_labels, source_labels)
        assert np.array_equal(back[back > 0], labels[back > 0])


@pytest.mark.parametrize("acdc_header", [False, True])
def test_cropped_volume_written_with_its_header_reads_back_on_its_grid(tmp_path, acdc_header):
    image, _ = synthetic_heart((40, 36, 4))
    source = read_nifti(save_nifti(tmp_path / "in.nii.gz", image, spacing=SPACING, acdc_header=acdc_header))
    out, _ = apply_shift(source, None, "fov_crop", 4, seed=5)
    assert out.header is not None and out.header is not source.header
    written = read_nifti(write_like(out.array, out, tmp_path / "out.nii.gz"))
    assert written.array.shape == out.array.shape
    np.testing.assert_allclose(written.affine, out.affine, atol=1e-4)
    np.testing.assert_allclose(written.spacing, SPACING, rtol=1e-6)
    np.testing.assert_allclose(source.header.get_sform(), read_nifti(tmp_path / "in.nii.gz").header.get_sform())


def test_rotation_keeps_label_areas_and_the_image_label_pairing():
    image, labels = _pair(shape=(56, 56, 5), radius=8.0)
    counts = np.bincount(labels.array.ravel(), minlength=4)
    for severity in SEVERITIES:
        out, out_labels = apply_shift(image, labels, "rotation", severity, seed=4)
        rotated = np.bincount(out_labels.array.ravel(), minlength=4)
        np.testing.assert_allclose(rotated[1:], counts[1:], rtol=0.05)
        assert set(np.unique(out_labels.array)) <= {0, 1, 2, 3}
        # The image moved with the labels: blood pools bright (~300), myocardium dark (~60).
        assert out.array[out_labels.array == 1].mean() > 250 and out.array[out_labels.array == 3].mean() > 220
        assert out.array[out_labels.array == 2].mean() < 120
    degrees = SEVERITY_TABLE["rotation"]["degrees"][-1]
    out, out_labels = apply_shift(image, labels, "rotation", 5, seed=4)
    assert not np.array_equal(out_labels.array, labels.array) and degrees == 90.0
    turned = [np.rot90(labels.array, k, axes=(0, 1)) for k in (1, 3)]
    assert max(np.mean(out_labels.array == t) for t in turned) > 0.98  # a quarter turn, either sense


def test_mild_severities_lie_inside_the_training_augmentation_and_severe_ones_far_beyond():
    train = BatchAugment()
    gamma_bound = max(-math.log(train.gamma[0]), math.log(train.gamma[1]))
    covered = {  # shift: (parameter, the training augmentation's largest value)
        "bias_field": ("log_std", train.bias_field),
        "rician_noise": ("std", train.noise_std),
        "contrast_gamma": ("log_gamma", gamma_bound),
        "low_resolution": ("factor", train.low_resolution[1]),
    }
    for name, (parameter, bound) in covered.items():
        values = SEVERITY_TABLE[name][parameter]
        inside = SHIFTS[name].in_distribution
        assert all(values[s - 1] <= bound for s in inside), name
        assert all(values[s - 1] > bound for s in SEVERITIES if s not in inside), name
        assert values[-1] >= 2.4 * bound, name
    assert SHIFTS["rotation"].in_distribution == SEVERITIES and math.pi <= train.rotation + 1e-9
    for values in (v for table in SEVERITY_TABLE.values() for v in table.values()):  # monotone in severity
        assert len(values) == len(SEVERITIES) and list(values) in (sorted(values), sorted(values, reverse=True))


def test_clear_errors_for_bad_requests(tmp_path):
    image, labels = _pair()
    with pytest.raises(ValueError, match="unknown shift 'blur'.*bias_field"):
        apply_shift(image, labels, "blur", 1)
    for severity in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match="severity"):
            apply_shift(image, labels, "rician_noise", severity)
    with pytest.raises(ValueError, match="seed"):
        apply_shift(image, labels, "rician_noise", 1, seed=-1)
    cine = Volume(np.zeros((8, 8, 3, 4), np.float32), SPACING, np.eye(4), "cine.nii.gz")
    with pytest.raises(CaseError, match="cine.nii.gz: 4D image"):
        apply_shift(cine, None, "rotation", 1)
    wrong = Volume(labels.array[:, :-1], SPACING, labels.affine, "wrong_gt.nii.gz")
    with pytest.raises(CaseError, match="wrong_gt.nii.gz: label grid"):
        apply_shift(image, wrong, "rotation", 1)
    bad = Volume(np.full((8, 8, 3), np.nan, np.float32), SPACING, np.eye(4), "nan.nii.gz")
    with pytest.raises(CaseError, match="nan.nii.gz: image holds NaN"):
        apply_shift(bad, None, "bias_field", 1)
    other = Volume(image.array, SPACING, image.affine @ np.diag([2.0, 1.0, 1.0, 1.0]), "other.nii.gz")
    with pytest.raises(ValueError, match="not a whole-voxel translation"):
        embed(other, image)


def test_integer_images_come_back_as_float32():
    image, labels = _pair()
    ints = Volume(image.array.round().astype(np.int16), SPACING, image.affine, "int.nii.gz", nib.Nifti1Header())
    out, _ = apply_shift(ints, labels, "low_resolution", 3)
    assert out.array.dtype == np.float32 and out.header is not None and ints.array.dtype == np.int16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_shifts_run_on_cuda_like_on_the_cpu():
    image, labels = _pair()
    for name in SHIFTS:
        cpu, cpu_labels = apply_shift(image, labels, name, 4, seed=1)
        gpu, gpu_labels = apply_shift(image, labels, name, 4, seed=1, device="cuda")
        assert gpu.array.shape == cpu.array.shape and np.array_equal(gpu_labels.array, cpu_labels.array), name
        scale = float(image.array.max() - image.array.min())
        np.testing.assert_allclose(gpu.array, cpu.array, atol=1e-3 * scale, err_msg=name)
