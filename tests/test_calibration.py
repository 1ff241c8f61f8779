"""Voxel-wise calibration (ECE/MCE, reliability diagrams) and temperature scaling."""

import json

import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from cmr_ood.ood.calibration import TemperatureScaling, VoxelCalibration, plot_reliability


def calibrated_sample(voxels, classes=4, scale=2.0, seed=0):
    """Logits and labels drawn from softmax(logits): a perfectly calibrated model by construction."""
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(voxels, classes, generator=g)
    labels = torch.multinomial(logits.softmax(1), 1, generator=g)[:, 0]
    return logits, labels


def as_volume(values, shape=(2, 50, 40, 5)):
    """(V, C) voxel rows as (N, C, H, W, D) or (V,) labels as (N, H, W, D)."""
    if values.ndim == 2:
        return values.reshape(*shape, -1).movedim(-1, 1)
    return values.reshape(shape)


def test_perfectly_calibrated_probabilities_have_ece_near_zero():
    logits, labels = calibrated_sample(200_000)
    metric = VoxelCalibration()
    for chunk in range(10):
        rows = slice(20_000 * chunk, 20_000 * (chunk + 1))
        metric.update(as_volume(logits[rows].softmax(1)), as_volume(labels[rows]))
    out = metric.compute()
    assert float(out["ece"]) < 0.01
    assert out["bin_count"].sum() == 200_000


def test_known_miscalibration_equals_the_hand_computed_value():
    # 1000 voxels at confidence 0.95 with accuracy 0.75 (gap 0.2), 3000 at 0.65 with accuracy 0.55 (gap 0.1)
    probabilities = torch.cat([torch.tensor([[0.95, 0.05]]).repeat(1000, 1), torch.tensor([[0.35, 0.65]]).repeat(3000, 1)])
    labels = torch.cat([(torch.arange(1000) >= 750).long(), (torch.arange(3000) < 1650).long()])
    metric = VoxelCalibration()
    metric.update(probabilities.T[None], labels[None])  # (1, C, V) and (1, V)
    out = metric.compute()
    assert float(out["ece"]) == pytest.approx((1000 * 0.2 + 3000 * 0.1) / 4000)
    assert float(out["mce"]) == pytest.approx(0.2)
    assert out["bin_count"].tolist() == [0, 0, 0, 0, 0, 0, 3000, 0, 0, 1000]
    assert out["bin_accuracy"][9] == pytest.approx(0.75) and torch.isnan(out["bin_accuracy"][0])


def test_agrees_with_torchmetrics_on_random_probabilities():
    g = torch.Generator().manual_seed(3)
    probabilities = (3 * torch.randn(20_000, 4, generator=g)).softmax(1)
    labels = torch.randint(0, 4, (20_000,), generator=g)
    metric = VoxelCalibration()
    metric.update(probabilities.T[None], labels[None])
    out = metric.compute()
    for key, norm in (("ece", "l1"), ("mce", "max")):
        reference = multiclass_calibration_error(probabilities, labels, num_classes=4, n_bins=10, norm=norm)
        assert float(out[key]) == pytest.approx(float(reference), abs=1e-5)


def test_streaming_over_chunks_equals_one_update_and_mask_selects_voxels():
    logits, labels = calibrated_sample(20_000, seed=1)
    probabilities, labels = as_volume(logits.softmax(1)), as_volume(labels)
    mask = probabilities[:, 0] < 0.3  # e.g. "predicted foreground"
    whole, chunked = VoxelCalibration(), VoxelCalibration()
    whole.update(probabilities, labels[:, None], mask=mask)  # labels with a channel dimension
    for n in range(2):
        for z in range(probabilities.shape[-1]):
            chunked.update(probabilities[n:n + 1, ..., z], labels[n:n + 1, ..., z], mask=mask[n:n + 1, ..., z])
    a, b = whole.compute(), chunked.compute()
    assert float(a["bin_count"].sum()) == float(mask.sum())
    for key in ("ece", "mce", "bin_count", "bin_confidence", "bin_accuracy"):
        torch.testing.assert_close(a[key], b[key], equal_nan=True)
    unmasked = VoxelCalibration()
    unmasked.update(probabilities, labels)
    assert float(unmasked.compute()["ece"]) != pytest.approx(float(a["ece"]))


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_bad_inputs():
    metric = VoxelCalibration()
    with pytest.raises(ValueError, match="no values were counted"):
        metric.compute()
    with pytest.raises(ValueError, match="labels of shape"):
        metric.update(torch.rand(2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="mask of shape"):
        metric.update(torch.rand(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), mask=torch.ones(4, 4, dtype=torch.bool))


def test_plot_reliability(tmp_path):
    logits, labels = calibrated_sample(5_000)
    metric = VoxelCalibration()
    metric.update(logits.T[None].softmax(1), labels[None])
    path = plot_reliability(metric.compute(), tmp_path / "reliability.png", title="validation")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileExistsError):
        plot_reliability(metric.compute(), tmp_path / "reliability.png")


def test_temperature_scaling_recovers_a_known_temperature():
    logits, labels = calibrated_sample(60_000)
    scaling = TemperatureScaling().fit(3.0 * logits, labels)
    assert scaling.temperature == pytest.approx(3.0, rel=0.03)
    assert scaling.nll_after < scaling.nll_before
    torch.testing.assert_close(scaling(3.0 * logits), 3.0 * logits / scaling.temperature)
    assert TemperatureScaling().fit(logits, labels).temperature == pytest.approx(1.0, rel=0.03)


def test_temperature_scaling_without_grad_and_on_inference_tensors():
    logits, labels = calibrated_sample(20_000, seed=2)
    expected = TemperatureScaling().fit(3.0 * logits, labels).temperature
    with torch.no_grad():
        assert TemperatureScaling().fit(3.0 * logits, labels).temperature == pytest.approx(expected)
    with torch.inference_mode():
        inference_logits, inference_labels = 3.0 * logits, labels.clone()
        assert TemperatureScaling().fit(inference_logits, inference_labels).temperature == pytest.approx(expected)
    assert inference_logits.is_inference()
    assert TemperatureScaling().fit(inference_logits, inference_labels).temperature == pytest.approx(expected)


def test_temperature_scaling_volumes_subsampling_and_state():
    logits, labels = calibrated_sample(20_000, seed=4)
    volume = TemperatureScaling().fit(as_volume(2.0 * logits), as_volume(labels))
    assert volume.temperature == pytest.approx(TemperatureScaling().fit(2.0 * logits, labels).temperature, rel=1e-4)
    first = TemperatureScaling().fit(2.0 * logits, labels, max_voxels=5_000, seed=7)
    second = TemperatureScaling().fit(2.0 * logits, labels, max_voxels=5_000, seed=7)
    assert first.num_voxels == 5_000 and first.temperature == second.temperature
    restored = TemperatureScaling()
    restored.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert restored.state_dict() == first.state_dict()
    with pytest.raises(ValueError, match="temperature must be a positive"):
        restored.load_state_dict({"temperature": -1.0})
    with pytest.raises(ValueError, match="labels must lie in"):
        TemperatureScaling().fit(logits, labels + 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_calibration_on_cuda():
    logits, labels = calibrated_sample(20_000)
    logits, labels = logits.cuda(), labels.cuda()
    metric = VoxelCalibration().to("cuda")
    metric.update(logits.T[None].softmax(1), labels[None])
    assert float(metric.compute()["ece"]) < 0.03
    assert TemperatureScaling().fit(3.0 * logits, labels).temperature == pytest.approx(3.0, rel=0.05)
