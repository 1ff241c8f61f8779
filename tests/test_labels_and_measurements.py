import numpy as np
import pytest
import torch
from helpers import save_nifti, synthetic_heart

from cmr_ood.data.io import CaseError, read_nifti
from cmr_ood.data.labels import LV, MYO, RV, most_probable, read_labels, to_canonical
from cmr_ood.qc.measurements import ejection_fraction, measurements


def test_acdc_labels_are_mapped_to_canonical():
    _, canonical = synthetic_heart()
    _, acdc = synthetic_heart(canonical=False)
    assert np.array_equal(to_canonical(acdc, "acdc"), canonical)
    assert np.array_equal(to_canonical(canonical, "mnms"), canonical)
    assert to_canonical(np.array([[[1, 2, 3]]]), "acdc").tolist() == [[[RV, MYO, LV]]]


def test_labels_outside_the_map_or_wrong_shape_are_refused(tmp_path):
    image, labels = synthetic_heart()
    volume = read_nifti(save_nifti(tmp_path / "img.nii.gz", image))
    bad = labels.copy()
    bad[0, 0, 0] = 7
    path = save_nifti(tmp_path / "bad_gt.nii.gz", bad, dtype=np.uint8)
    with pytest.raises(CaseError, match=r"label values \[7\] are outside") as err:
        read_labels(path, "acdc", volume)
    assert path in str(err.value)
    path = save_nifti(tmp_path / "small_gt.nii.gz", labels[:-2], dtype=np.uint8)
    with pytest.raises(CaseError, match="does not match its image"):
        read_labels(path, "acdc", volume)
    with pytest.raises(CaseError, match="non-integer"):
        to_canonical(np.array([0.5, 1.0]), "acdc")


def test_measurements_from_labels_and_spacing():
    labels = np.zeros((10, 10, 4), np.uint8)
    labels[:5, :4, :2] = LV  # 40 voxels
    labels[5:, :, 0] = MYO  # 50 voxels
    labels[:, :, 3] = RV  # 100 voxels
    m = measurements(labels, (2.0, 2.0, 5.0))  # 20 ul voxels
    assert m == {"lv_volume_ml": 0.8, "rv_volume_ml": 2.0, "myo_volume_ml": 1.0, "myo_mass_g": 1.05}
    cine = measurements(np.stack([labels, np.zeros_like(labels)], -1), (2.0, 2.0, 5.0))
    assert cine["lv_volume_ml"] == [0.8, 0.0]
    assert ejection_fraction(150.0, 60.0) == 60.0 and ejection_fraction(0.0, 0.0) is None


@pytest.mark.parametrize("orientation", ["identity", "rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270"])
def test_reorientations_are_distinct_and_keep_volumes(orientation):
    from cmr_ood.data.io import Volume
    from cmr_ood.evaluation import ORIENTATIONS, reorient

    _, labels = synthetic_heart(shape=(20, 16, 3))
    make = lambda: Volume(labels.copy(), (1.0, 2.0, 8.0), np.eye(4), "x")  # noqa: E731
    moved = reorient(make(), orientation)
    assert measurements(moved.array, moved.spacing) == measurements(labels, (1.0, 2.0, 8.0))
    others = [reorient(make(), o).array for o in ORIENTATIONS if o != orientation]
    assert not any(o.shape == moved.array.shape and np.array_equal(o, moved.array) for o in others)


def test_postprocessing_keeps_the_heart_not_the_largest_blob_of_each_label():
    import torch

    from cmr_ood.inference import Postprocessing

    _, heart = synthetic_heart(shape=(60, 60, 4), centre=(20, 30), radius=6)
    labels = torch.from_numpy(heart.astype(np.int64))
    myo_in_heart = int((labels == MYO).sum())
    labels[44:58, 44:58, :3] = MYO  # a false positive far away: larger than the myocardium, smaller than the heart
    labels[45:47, 5:7, 0] = LV  # a speck
    assert myo_in_heart < 14 * 14 * 3 < int((torch.from_numpy(heart) > 0).sum())
    kept = Postprocessing()(labels)
    assert torch.equal(kept, torch.from_numpy(heart.astype(np.int64)))
    assert torch.equal(Postprocessing(keep_largest_component=False)(labels), labels)


def test_postprocessing_labels_the_structures_within_the_hearts_box_as_on_the_whole_grid():
    import torch
    from monai.transforms import KeepLargestConnectedComponent

    from cmr_ood.inference import Postprocessing

    structures = [LV, MYO, RV]
    for seed in range(5):
        labels = torch.zeros(40, 36, 4, dtype=torch.long)
        labels[6:24, 9:30] = torch.from_numpy(np.random.default_rng(seed).choice(4, (18, 21, 4), p=[0.4, 0.2, 0.2, 0.2]))
        heart = KeepLargestConnectedComponent(applied_labels=structures, is_onehot=False, independent=False)(labels[None])
        expected = KeepLargestConnectedComponent(applied_labels=structures, is_onehot=False, independent=True)(heart)[0]
        assert torch.equal(Postprocessing()(labels), expected)
    assert not Postprocessing()(torch.zeros(8, 8, 2, dtype=torch.long)).any()


def test_most_probable_is_argmax_with_ties_to_the_first():
    torch.manual_seed(0)
    scores = torch.softmax(torch.randn(3, 4, 17, 19), 1)
    scores[0, :, 0, 0] = 0.25  # a four-way tie: the first class wins, as with argmax
    scores[1, 2:, 3, 4] = 2.0  # a tie between the last two
    for dim in range(scores.ndim):
        assert torch.equal(most_probable(scores, dim), scores.argmax(dim))
    assert most_probable(scores, 1)[0, 0, 0] == 0 and most_probable(scores, 1)[1, 3, 4] == 2
