import math

import pytest
import torch
from helpers import synthetic_heart

from cmr_ood.data.augment import BatchAugment
from cmr_ood.networks import CMRUNet, load_weights

TINY = dict(channels=(4, 8, 16), num_res_units=1)


@pytest.mark.parametrize("size", [(32, 32), (37, 50)])
def test_network_shapes_heads_and_taps(size):
    net = CMRUNet(heads={"recon": 1, "position": 10}, **TINY).eval()
    x = torch.rand(2, 1, *size)
    assert net(x).shape == (2, 4, *size)
    out = net.forward_heads(x, taps=("enc2", "dec0"))
    assert out["seg"].shape == (2, 4, *size) and out["recon"].shape == (2, 1, *size) and out["position"].shape == (2, 10, *size)
    assert out["enc2"].shape[1] == 16 and out["dec0"].shape[1] == 4
    assert torch.allclose(out["seg"], net(x))
    with pytest.raises(KeyError, match="unknown layer"):
        net.forward_heads(x, taps=("enc9",))


def test_state_dict_moves_between_plain_and_multi_head_networks(tmp_path):
    plain = CMRUNet(**TINY).eval()
    torch.save(plain.state_dict(), tmp_path / "model.pt")
    multi = load_weights(CMRUNet(heads={"recon": 1}, **TINY), tmp_path / "model.pt", strict=False).eval()
    x = torch.rand(1, 1, 32, 32)
    assert torch.allclose(plain(x), multi(x))
    lightning_style = {"state_dict": {f"network.{k}": v for k, v in plain.state_dict().items()}}
    torch.save(lightning_style, tmp_path / "last.ckpt")
    assert torch.allclose(load_weights(CMRUNet(**TINY), tmp_path / "last.ckpt").eval()(x), plain(x))


def test_dropout_is_optional():
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in CMRUNet(**TINY).modules())
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.2 for m in CMRUNet(dropout=0.2, **TINY).modules())


def test_augmentation_keeps_labels_on_the_anatomy():
    torch.manual_seed(0)
    _, labels = synthetic_heart(shape=(64, 64, 4), radius=10)
    labels = torch.from_numpy(labels).permute(2, 0, 1).long()
    images = (labels.float() / 3.0)[:, None]  # image value encodes the label
    aug = BatchAugment(patch_size=48, noise_prob=0, gamma_prob=0, bias_prob=0, low_resolution_prob=0, contrast=(1, 1), brightness=0)
    out_images, out_labels = aug.spatial(images.repeat(8, 1, 1, 1), labels.repeat(8, 1, 1))
    assert out_images.shape == (32, 1, 48, 48) and out_labels.shape == (32, 48, 48)
    assert set(out_labels.unique().tolist()) <= {0, 1, 2, 3}
    agree = (torch.round(out_images[:, 0] * 3) == out_labels).float().mean()
    assert agree > 0.93  # bilinear image and nearest labels differ only along edges
    full = BatchAugment(patch_size=48)
    x, y = full(images.repeat(8, 1, 1, 1), labels.repeat(8, 1, 1))
    assert x.min() >= 0 and x.max() <= 1 and torch.isfinite(x).all()


def test_augmentation_draws_any_orientation():
    torch.manual_seed(0)
    aug = BatchAugment(patch_size=16, translate=0.0, scale=(1, 1))
    images = torch.zeros(512, 1, 16, 16)
    images[:, :, :, 8:] = 1.0  # right half bright
    out, _ = aug.spatial(images, torch.zeros(512, 16, 16, dtype=torch.long))
    # direction of the bright half after augmentation: spread over the whole circle
    ys, xs = torch.meshgrid(torch.arange(16.0) - 7.5, torch.arange(16.0) - 7.5, indexing="ij")
    angles = torch.atan2((out[:, 0] * ys).sum((1, 2)), (out[:, 0] * xs).sum((1, 2)))
    counts = torch.histc(angles, bins=8, min=-math.pi, max=math.pi)
    assert counts.min() > 20


def test_augmentation_reaches_the_whole_field_of_view():
    """With ``anywhere``, patches also come from the far corners of the canvas, not only around its centre."""
    torch.manual_seed(0)
    canvas = torch.zeros(256, 1, 96, 96)
    for rows in (slice(0, 12), slice(84, 96)):  # the corners, far from the heart-centred middle
        for cols in (slice(0, 12), slice(84, 96)):
            canvas[:, :, rows, cols] = 1.0
    labels = torch.zeros(256, 96, 96, dtype=torch.long)
    heart_only = BatchAugment(patch_size=32, translate=0.3)
    far_too = BatchAugment(patch_size=32, translate=0.3, anywhere=0.5)
    seen = [(aug.spatial(canvas, labels)[0].flatten(1).amax(1) > 0.5).float().mean() for aug in (heart_only, far_too)]
    assert seen[0] == 0 and 0.1 < seen[1] < 0.5


def test_field_of_view_crop_cuts_images_and_labels_to_one_window():
    """A share of the patches keeps a single rectangle of image and labels, zero outside; the rest is untouched."""
    torch.manual_seed(0)
    images, labels = torch.full((200, 1, 40, 40), 0.5), torch.ones(200, 40, 40, dtype=torch.long)
    cropped_images, cropped_labels = BatchAugment(field_of_view_prob=0.5, field_of_view=(0.4, 0.6)).crop_field_of_view(images, labels)
    kept = cropped_labels.flatten(1).float().mean(1)
    assert torch.equal(cropped_images[:, 0] > 0, cropped_labels > 0)
    cut = kept < 1
    assert 0.35 < cut.float().mean() < 0.65
    assert (kept[cut] > 0.35 ** 2).all() and (kept[cut] < 0.65 ** 2).all()
    for mask in cropped_labels[cut] > 0:  # one axis-aligned window: its bounding box is full
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        assert mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
