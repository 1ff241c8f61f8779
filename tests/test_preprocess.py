import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import save_nifti, synthetic_heart

from cmr_ood.data.io import read_nifti
from cmr_ood.data.preprocess import Preprocessing, normalize_intensity, quantiles, slice_axis


def _dice(a, b, label):
    return 2 * np.sum((a == label) & (b == label)) / (np.sum(a == label) + np.sum(b == label))


def test_slice_axis_is_the_coarse_axis_else_the_last():
    assert slice_axis((1.5, 1.5, 10.0), (10, 10, 8)) == 2
    assert slice_axis((8.0, 1.2, 1.2), (8, 10, 10)) == 0
    assert slice_axis((1.0, 1.0, 1.0), (10, 10, 10)) == 2


def test_normalization_is_robust_and_in_unit_range():
    x = torch.linspace(0, 1000, 10000)
    x[0] = 1e9  # one hot voxel does not squash the rest
    y = normalize_intensity(x, 1.0, 99.0)
    assert y.min() == 0 and y.max() == 1
    assert 0.4 < float(y[5000]) < 0.6


def test_quantiles_match_torch_quantile_by_selection():
    x = torch.randn(7, 13, 11) ** 3
    levels = [0.0, 0.005, 0.5, 0.95, 0.995, 1.0]
    assert torch.allclose(quantiles(x, levels), torch.quantile(x.reshape(-1), torch.tensor(levels)), rtol=1e-6, atol=1e-6)
    assert quantiles(x, 0.95).shape == () and float(quantiles(torch.tensor([3.0]), 0.3)) == 3.0
    assert float(quantiles(torch.arange(5.0), 0.9)) == pytest.approx(3.6)  # between the 4th and 5th values
    with pytest.raises(ValueError, match="empty"):
        quantiles(torch.zeros(0), 0.5)
    with pytest.raises(ValueError, match="outside"):
        quantiles(x, 1.5)


@pytest.mark.parametrize("spacing, axes", [((1.5625, 1.5625, 10.0), (0, 1, 2)), ((0.8, 1.1, 8.0), (0, 1, 2)), ((1.4, 1.4, 9.0), (2, 0, 1))])
def test_resample_and_invert_round_trip(tmp_path, spacing, axes):
    image, labels = synthetic_heart(shape=(64, 56, 5), radius=10)
    image, labels = image.transpose(axes), labels.transpose(axes)
    spacing = tuple(np.asarray(spacing)[list(axes)])
    volume = read_nifti(save_nifti(tmp_path / "v.nii.gz", image, spacing=spacing, acdc_header=True))
    pre = Preprocessing(spacing_mm=1.25)
    slices, geometry = pre(volume)
    assert slices.shape[0] == 5 and slices.min() >= 0 and slices.max() <= 1
    in_plane = [a for a in range(3) if a != geometry.slice_axis]
    for i, a in enumerate(in_plane):  # true spacing (from pixdim), not the header's unit affine
        assert abs(slices.shape[2 + i] - image.shape[a] * spacing[a] / 1.25) <= 1
    resampled = pre.resample_labels(labels, geometry, 4)
    probs = F.one_hot(resampled.long(), 4).permute(0, 3, 1, 2).float()
    back = pre.invert(probs, geometry).argmax(0).numpy()
    assert back.shape == labels.shape
    for label in (1, 2, 3):
        assert _dice(back, labels, label) > 0.9


def test_cine_frames_are_preprocessed_one_at_a_time(tmp_path):
    image, _ = synthetic_heart()
    volume = read_nifti(save_nifti(tmp_path / "cine.nii.gz", np.stack([image, image * 2], -1)))
    a, _ = Preprocessing()(volume, frame=0)
    b, _ = Preprocessing()(volume, frame=1)
    assert torch.allclose(a, b, atol=1e-5)  # per-volume normalisation removes the global scale
