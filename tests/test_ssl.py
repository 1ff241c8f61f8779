import pytest
import torch

from cmr_ood.networks import CMRUNet
from cmr_ood.ssl import MaskedImageModelling


def test_mim_masks_three_quarters_of_whole_32px_patches():
    mim = MaskedImageModelling()
    images = torch.rand(6, 1, 128, 128)
    mask = mim.mask(images, torch.Generator().manual_seed(0))
    assert mask.shape == images.shape and mask.dtype == torch.bool
    assert torch.all(mask.float().mean((1, 2, 3)) == 0.75)  # 12 of 16 patches in every image
    patches = mask.view(6, 1, 4, 32, 4, 32).float().mean((3, 5))
    assert set(patches.unique().tolist()) == {0.0, 1.0}  # each 32x32 patch wholly hidden or visible
    assert not torch.equal(mask[0], mask[1])  # drawn per image
    odd = mim.mask(torch.rand(2, 1, 70, 50))
    assert odd.shape == (2, 1, 70, 50)


def test_mim_loss_counts_hidden_pixels_only():
    mim = MaskedImageModelling()
    images = torch.rand(2, 1, 64, 64)
    mask = mim.mask(images)
    assert torch.all(mim.corrupt(images, mask)[mask] == 0) and torch.equal(mim.corrupt(images, mask)[~mask], images[~mask])
    wrong_where_visible = torch.where(mask, images, images + 1.0)
    assert mim.loss(wrong_where_visible, images, mask) == 0
    wrong_where_hidden = torch.where(mask, images + 0.5, images)
    assert mim.loss(wrong_where_hidden, images, mask) == pytest.approx(0.25)


def test_mim_trains_a_reconstruction_head():
    torch.manual_seed(0)
    net = CMRUNet(channels=(4, 8, 16), num_res_units=1, heads={"mim": 1})
    mim = MaskedImageModelling(patch_size=8)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    images = torch.rand(4, 1, 32, 32).cumsum(-1) / 32  # smooth ramps: predictable from the visible patches
    losses = []
    for step in range(30):
        mask = mim.mask(images, torch.Generator().manual_seed(step))
        loss = mim.loss(net.forward_heads(mim.corrupt(images, mask))["mim"], images, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_plane_distance_on_known_geometry():
    import numpy as np

    from cmr_ood.data.io import Volume
    from cmr_ood.ssl.positions import plane_of, signed_distance_to_plane

    sa_affine = np.diag([1.5, 1.5, 8.0, 1.0])
    sa_affine[:3, 3] = (-30.0, -30.0, -20.0)
    short_axis = Volume(np.zeros((40, 40, 6), np.float32), (1.5, 1.5, 8.0), sa_affine, "sa")
    # a long-axis plane x = 3 mm (its image spans y and z)
    la_affine = np.array([[0, 0, 1.0, 3.0], [1.2, 0, 0, -40.0], [0, 1.2, 0, -60.0], [0, 0, 0, 1]])
    long_axis = Volume(np.zeros((64, 64, 1), np.float32), (1.2, 1.2, 1.0), la_affine, "la")
    point, normal = plane_of(long_axis)
    assert np.allclose(np.abs(normal), (1, 0, 0))
    d = signed_distance_to_plane(short_axis, (point, normal))
    x = -30.0 + 1.5 * np.arange(40)
    assert np.allclose(np.abs(d[:, 7, 3]), np.abs(x - 3.0))  # |distance| = |x - 3| everywhere
    assert np.argmin(np.abs(d[:, 0, 0])) == 22  # x = 3 mm at column 22
    with pytest.raises(ValueError, match="single-slice"):
        plane_of(short_axis)


@pytest.mark.real_data
def test_four_chamber_plane_cuts_both_ventricles_of_the_mnms2_subject(tmp_path):
    import numpy as np
    from helpers import DATA_ROOT, requires_data

    from cmr_ood.data.io import read_image
    from cmr_ood.data.labels import LV, RV, read_labels
    from cmr_ood.ssl.positions import plane_of, plot_intersections, signed_distance_to_plane

    if not (DATA_ROOT / "mnms2_geometry").is_dir():
        pytest.skip(requires_data.kwargs["reason"])
    folder = DATA_ROOT / "mnms2_geometry"
    sa, la = read_image(folder / "001_SA_ED.nii.gz"), read_image(folder / "001_LA_ED.nii.gz")
    labels = read_labels(str(folder / "001_SA_ED_gt.nii.gz"), "mnms", sa).array
    d = signed_distance_to_plane(sa, plane_of(la))
    mid = int(np.argmax((labels == LV).sum((0, 1))))
    for structure in (LV, RV):  # the 4-chamber plane runs through both ventricles: both signs inside each
        inside = d[:, :, mid][labels[:, :, mid] == structure]
        assert inside.min() < 0 < inside.max()
    assert np.abs(d[:, :, mid][labels[:, :, mid] == LV]).min() < 5.0  # within a few mm of the LV
    picture = plot_intersections(sa, {"4-chamber": la}, str(tmp_path / "lines.png"), slices=range(2, 10, 2))
    assert (tmp_path / "lines.png").stat().st_size > 10_000 and picture.endswith("lines.png")
