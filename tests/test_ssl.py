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
