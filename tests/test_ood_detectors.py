"""OOD detectors, the scorer and its state, on hand-built outputs and a tiny network."""

import math

import numpy as np
import pytest
import torch
from conftest import TINY_NET
from helpers import synthetic_heart
from monai.inferers import SlidingWindowInferer

from cmr_ood.data.io import Volume
from cmr_ood.data.labels import NUM_CLASSES
from cmr_ood.data.preprocess import dihedral, dihedral_inverse
from cmr_ood.inference import Segmenter
from cmr_ood.networks import CMRUNet
from cmr_ood.ood import (
    CaseOutputs,
    Mahalanobis,
    MapProduct,
    MCDropout,
    OODScorer,
    PositionError,
    ReconstructionError,
    SoftDiceGap,
    SoftmaxScore,
    SpectralSignature,
    TestTimeAugmentation,
    aggregate,
    singular_values,
    spectral_signature,
)
from cmr_ood.ood.features import ledoit_wolf


def case_from_logits(logits, **kw):
    z, _, h, w = logits.shape
    return CaseOutputs(images=torch.rand(z, 1, h, w), logits=logits, heads=kw.pop("heads", {}), features=kw.pop("features", {}), **kw)


def test_aggregation_scores_an_empty_foreground_as_maximally_ood():
    voxel_map = torch.arange(24, dtype=torch.float).view(2, 3, 4)
    fg = torch.zeros(2, 3, 4, dtype=torch.bool)
    fg[0, 0, :2] = True
    scores = aggregate(voxel_map, fg)
    assert scores["image"] == pytest.approx(11.5) and scores["fg"] == pytest.approx(0.5)
    assert scores["p95"] == pytest.approx(float(torch.quantile(voxel_map.flatten(), 0.95)))
    assert aggregate(voxel_map, torch.zeros_like(fg))["fg"] == math.inf


def test_output_scores_on_known_probabilities():
    uniform = case_from_logits(torch.zeros(1, 4, 2, 2))
    peaked = case_from_logits(torch.tensor([8.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2).clone())
    for kind, at_uniform in (("entropy", 1.0), ("msp", 0.75), ("kl_uniform", 0.0)):
        detector = SoftmaxScore(kind)
        assert detector.voxel_map(uniform) == pytest.approx(torch.full((1, 2, 2), at_uniform), abs=1e-5)
        assert (detector.voxel_map(peaked) < at_uniform - 0.1).all()  # a confident prediction scores lower
    assert SoftmaxScore("energy").voxel_map(uniform) == pytest.approx(torch.full((1, 2, 2), -math.log(4)), abs=1e-5)
    hot = case_from_logits(peaked.logits, temperature=4.0)
    assert (SoftmaxScore("entropy").voxel_map(hot) > SoftmaxScore("entropy").voxel_map(peaked)).all()
    with pytest.raises(ValueError, match="unknown output score"):
        SoftmaxScore("confidence")


def heart_logits(lv: slice, myo: slice, rv: slice, sharp: float = 20.0) -> torch.Tensor:
    """Confident logits (1, 4, 1, 40): background, then LV, MYO and RV on the given columns."""
    logits = torch.zeros(1, 4, 1, 40)
    logits[0, 0] = sharp
    for c, cols in ((1, lv), (2, myo), (3, rv)):
        logits[0, 0, 0, cols] = 0.0
        logits[0, c, 0, cols] = sharp
    return logits


def test_soft_dice_gap_weighs_every_structure_alike_whatever_its_size():
    confident = case_from_logits(heart_logits(slice(0, 20), slice(20, 30), slice(30, 34)))
    assert SoftDiceGap().case_scores(confident)["soft_dice_gap"] == pytest.approx(0.0, abs=1e-6)

    def with_one_uncertain_voxel(cols, c):
        logits = heart_logits(slice(0, 20), slice(20, 30), slice(30, 34))
        logits[0, :, 0, cols] = 0.0
        logits[0, c, 0, cols] = 0.5  # still predicted as class c, barely
        return SoftDiceGap().case_scores(case_from_logits(logits))["soft_dice_gap"]

    # one doubtful voxel costs more in the 4-voxel RV than in the 20-voxel LV; entropy over the foreground
    # would weigh both the same
    assert with_one_uncertain_voxel(33, 3) > 1.5 * with_one_uncertain_voxel(19, 1) > 0
    lost_rv = case_from_logits(heart_logits(slice(0, 20), slice(20, 30), slice(0, 0)))
    assert SoftDiceGap().case_scores(lost_rv)["soft_dice_gap"] == pytest.approx(1 / 3, abs=1e-4)
    no_heart = case_from_logits(heart_logits(slice(0, 0), slice(0, 0), slice(0, 0)))
    assert SoftDiceGap().case_scores(no_heart)["soft_dice_gap"] == math.inf


def test_dihedral_inverse_undoes_every_element():
    x = torch.rand(2, 3, 5, 7)
    for k in range(8):
        assert torch.equal(dihedral_inverse(dihedral(x, k), k), x)
    assert len({dihedral(x[..., :5], k).flatten().tolist().__str__() for k in range(8)}) == 8


def pointwise_case(images, gamma_sensitive=True):
    """A 'network' that maps each pixel's intensity to logits: equivariant to any rotation or flip."""
    def forward(x):
        logits = torch.cat([1 - x, x, x**2, 0.5 * x], dim=1) * 5
        return {"seg": logits}
    return CaseOutputs(images=images, logits=forward(images)["seg"], heads={}, features={}, forward=forward)


def test_test_time_augmentation_vanishes_for_an_equivariant_model_and_maps_back():
    images = torch.rand(3, 1, 12, 9)
    case = pointwise_case(images)
    assert TestTimeAugmentation(samples=8, gamma=1.0).voxel_map(case).abs().max() < 1e-10
    varied = TestTimeAugmentation(samples=8, gamma=0.5).voxel_map(case)
    assert varied.shape == (3, 12, 9) and varied.max() > 1e-4
    with pytest.raises(ValueError, match="2 to 8"):
        TestTimeAugmentation(samples=9)


def tiny_segmenter(seed=0):
    torch.manual_seed(seed)
    net = CMRUNet(heads={"mim": 1, "position": 1}, **TINY_NET)
    return Segmenter(net, SlidingWindowInferer(roi_size=[32, 32], sw_batch_size=8, overlap=0.25, mode="gaussian"))


def volume(seed, shape=(40, 36, 4)):
    image, labels = synthetic_heart(shape=shape, seed=seed)
    return Volume(image.astype(np.float32), (1.5, 1.5, 8.0), np.diag([1.5, 1.5, 8.0, 1.0]), f"case{seed}"), labels


def test_network_outputs_match_plain_segmentation_and_carry_heads_and_taps():
    segmenter = tiny_segmenter()
    v, _ = volume(0)
    case, geometry = segmenter.outputs(v, taps=("enc2", "enc1"))
    probs = segmenter.preprocessing.invert(torch.softmax(case.logits, 1), geometry)
    assert torch.allclose(probs, segmenter.probabilities(v), atol=1e-5)
    z, _, h, w = case.images.shape
    assert case.heads["mim"].shape == (z, 1, h, w) and case.heads["position"].shape == (z, 1, h, w)
    assert case.features["enc2"].shape[1] == TINY_NET["channels"][2] and case.features["enc1"].shape[-1] < w


def test_mc_dropout_is_reproducible_and_leaves_the_network_as_it_was():
    segmenter = tiny_segmenter()
    case, _ = segmenter.outputs(volume(1)[0])
    detector = MCDropout(samples=4, p=0.3, layers=("enc2", "dec1"))
    first, second = detector.voxel_map(case), detector.voxel_map(case)
    assert torch.equal(first, second) and first.max() > 0
    assert all(not segmenter.network.layer(n)._forward_hooks for n in segmenter.network.layer_names)
    again, _ = segmenter.outputs(volume(1)[0])
    assert torch.equal(again.logits, case.logits)  # no dropout left behind


def test_reconstruction_error_counts_each_pixel_under_the_masks_that_hid_it():
    images = torch.rand(2, 1, 40, 40)
    # a 'reconstruction' that returns its masked input: the error is the image squared where hidden
    case = CaseOutputs(images=images, logits=torch.zeros(2, 4, 40, 40), heads={"mim": images}, features={},
                       forward=lambda x: {"mim": x})
    error = ReconstructionError(patch_size=8).voxel_map(case)
    assert torch.allclose(error, images[:, 0] ** 2, atol=1e-6)


def test_position_error_is_blind_to_the_direction_of_the_stack():
    images = torch.rand(5, 1, 6, 6)
    positions = torch.linspace(0, 1, 5).view(5, 1, 1, 1).expand(5, 1, 6, 6)
    for prediction in (positions, 1 - positions):
        case = case_from_logits(torch.zeros(5, 4, 6, 6), heads={"position": prediction.clone()})
        case.images = images
        assert PositionError().voxel_map(case).abs().max() < 1e-10
    shuffled = case_from_logits(torch.zeros(5, 4, 6, 6), heads={"position": positions[[2, 0, 4, 1, 3]].clone()})
    assert PositionError().voxel_map(shuffled).mean() > 0.05


def test_map_product_multiplies_its_parts_maps():
    logits = torch.randn(2, 4, 5, 5)
    heads = {"position": torch.rand(2, 1, 5, 5)}
    case = case_from_logits(logits, heads=heads)
    product = MapProduct([SoftmaxScore("entropy"), PositionError()]).voxel_map(case)
    expected = SoftmaxScore("entropy").voxel_map(case) * PositionError().voxel_map(case)
    assert torch.allclose(product, expected)


def test_ledoit_wolf_shrinks_towards_identity_when_samples_are_few():
    g = torch.Generator().manual_seed(0)
    many = torch.randn(5000, 4, generator=g) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    mean, cov, shrinkage = ledoit_wolf(many)
    assert shrinkage < 0.05 and torch.allclose(torch.diag(cov).float(), torch.tensor([1.0, 4.0, 9.0, 16.0]), rtol=0.1)
    few = torch.randn(10, 50, generator=g)
    _, cov_few, shrink_few = ledoit_wolf(few)
    assert shrink_few > 0.5 and torch.linalg.eigvalsh(cov_few).min() > 0  # invertible with n < p


def features_case(features):
    return case_from_logits(torch.zeros(features.shape[0], 4, 4, 4), features={"enc4": features})


def test_mahalanobis_and_spectral_rank_shifted_features_higher():
    g = torch.Generator().manual_seed(1)
    fit = [features_case(torch.randn(6, 8, 3, 3, generator=g).abs()) for _ in range(12)]
    inside = features_case(torch.randn(6, 8, 3, 3, generator=g).abs())
    outside = features_case(torch.randn(6, 8, 3, 3, generator=g).abs() * torch.linspace(0.1, 4, 8).view(1, 8, 1, 1))
    for detector in (Mahalanobis("enc4"), SpectralSignature("enc4")):
        detector.fit(fit)
        (score_in,), (score_out,) = detector.case_scores(inside).values(), detector.case_scores(outside).values()
        assert score_out > score_in, detector.name
    spectral = SpectralSignature("enc4").fit(fit)
    assert spectral.case_scores(fit[3])["spectral_enc4"] == pytest.approx(0.0, abs=1e-6)
    assert math.isfinite(spectral.threshold)


def test_singular_value_methods_agree():
    x = torch.randn(3, 16, 200, dtype=torch.float64)
    reference = torch.linalg.svdvals(x.transpose(1, 2)).float()
    for method in ("gram", "svd", "loop"):
        assert torch.allclose(singular_values(x, method), reference, rtol=1e-3, atol=1e-4), method
    signature = spectral_signature(torch.randn(4, 16, 5, 5))
    assert signature.shape == (16,) and torch.linalg.norm(signature) == pytest.approx(1.0, abs=1e-5)
    small = torch.randn(1, 16, 3, 3)  # 9 positions, 16 channels: a small crop
    for method in ("gram", "svd", "loop"):
        assert spectral_signature(small, method).shape == (16,), method


def fitted_scorer(tmp_path=None):
    segmenter = tiny_segmenter()
    entropy, position = SoftmaxScore("entropy"), PositionError()
    detectors = [entropy, SoftmaxScore("msp"), position, MapProduct([entropy, position]), Mahalanobis("enc2"), SpectralSignature("enc2")]
    scorer = OODScorer(detectors, combinations={"both": {"rule": "zsum", "scores": ["entropy_fg", "position_fg"]}}, default="both")
    fit = (segmenter.outputs(volume(s)[0], taps=scorer.taps)[0] for s in range(4))
    validation = []
    for s in range(10, 16):
        v, labels = volume(s)
        case, geometry = segmenter.outputs(v, taps=scorer.taps)
        validation.append((case, segmenter.preprocessing.resample_labels(labels, geometry, NUM_CLASSES)))
    return segmenter, scorer.fit(fit, validation), detectors


def test_scorer_fits_thresholds_on_validation_and_reloads_its_state(tmp_path):
    segmenter, scorer, detectors = fitted_scorer()
    for name, values in scorer.validation_scores.items():
        accepted = np.mean([v <= scorer.thresholds[name] for v in values])
        assert accepted >= 0.95, name
    case, _ = segmenter.outputs(volume(42)[0], taps=scorer.taps)
    scores = scorer.score(case)
    mean_e, sd_e = scorer.standardisation["entropy_fg"]
    mean_p, sd_p = scorer.standardisation["position_fg"]
    assert scores["both"] == pytest.approx((scores["entropy_fg"] - mean_e) / sd_e + (scores["position_fg"] - mean_p) / sd_p)
    scorer.combinations["weighted"] = {"rule": "zsum", "scores": ["entropy_fg", "position_fg"], "weights": [1.0, 0.25]}
    assert scorer.combine(scores)["weighted"] == pytest.approx((scores["entropy_fg"] - mean_e) / sd_e
                                                               + 0.25 * (scores["position_fg"] - mean_p) / sd_p)
    scorer.combinations["capped"] = {"rule": "zsum", "scores": ["entropy_fg", "position_fg"], "weights": [1.0, 0.5], "clip": [None, -50.0]}
    assert scorer.combine(scores)["capped"] == pytest.approx((scores["entropy_fg"] - mean_e) / sd_e - 25.0)
    assert scorer.combine({**scores, "position_fg": math.inf})["capped"] == pytest.approx((scores["entropy_fg"] - mean_e) / sd_e - 25.0)
    del scorer.combinations["weighted"], scorer.combinations["capped"]
    path = scorer.save(tmp_path / "state.pt")
    fresh = [SoftmaxScore("entropy"), SoftmaxScore("msp"), PositionError(), Mahalanobis("enc2"), SpectralSignature("enc2")]
    fresh.insert(3, MapProduct([fresh[0], fresh[2]]))
    reloaded = OODScorer(fresh, combinations=scorer.combinations, default="both", state=path)
    again, _ = segmenter.outputs(volume(42)[0], taps=scorer.taps)
    assert reloaded.score(again) == pytest.approx(scores)
    assert reloaded.temperature.temperature == scorer.temperature.temperature


def test_scorer_refuses_to_score_unfitted_or_for_other_weights(tmp_path):
    scorer = OODScorer([SoftmaxScore("entropy")], state=str(tmp_path / "missing.pt"))
    with pytest.raises(RuntimeError, match="not calibrated.*missing.pt"):
        scorer.score(case_from_logits(torch.zeros(1, 4, 2, 2)))
    _, fitted, _ = fitted_scorer()
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"some weights")
    fitted.model_digest = "0" * 64
    with pytest.raises(ValueError, match="fitted for other weights"):
        fitted.check_model(weights)
    with pytest.raises(ValueError, match="uncertainty_map"):
        OODScorer([SoftmaxScore("msp")], uncertainty_map="entropy")
    for bad in ({"rule": "zmax", "scores": ["entropy_fg"], "weights": [1.0]}, {"rule": "zsum", "scores": ["entropy_fg"], "weights": [1, 2]},
                {"rule": "zsum", "scores": ["entropy_fg"], "weights": [0.0]}):
        with pytest.raises(ValueError, match="weights go with rule 'zsum'"):
            OODScorer([SoftmaxScore("entropy")], combinations={"bad": bad})
    with pytest.raises(ValueError, match="clip goes with rule 'zsum'"):
        OODScorer([SoftmaxScore("entropy")], combinations={"bad": {"rule": "zsum", "scores": ["entropy_fg"], "clip": [1.0, 2.0]}})


def test_ood_speed_gives_each_detector_its_own_cost(monkeypatch):
    """benchmarks/ood_speed.py: one time per detector, maps recomputed for each (a product pays for its parts)."""
    from helpers import REPO

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from ood_speed import detector_costs

    entropy, position = SoftmaxScore("entropy"), PositionError()
    scorer = OODScorer([entropy, position, MapProduct([entropy, position]), MCDropout(samples=2)])
    computed = []
    original = SoftmaxScore.voxel_map
    monkeypatch.setattr(SoftmaxScore, "voxel_map", lambda self, case: computed.append(self.name) or original(self, case))
    costs = detector_costs(tiny_segmenter(), scorer, [volume(s)[0] for s in (0, 1, 2)])
    assert list(costs) == ["entropy", "position", "entropy*position", "mc_dropout"]
    assert all(math.isfinite(t) and t > 0 for t in costs.values())
    assert computed.count("entropy") == 6  # 3 volumes x (entropy itself, and again inside the product)


def test_test_time_views_average_rotated_and_flipped_slices_and_leave_the_scores_to_the_plain_pass():
    segmenter, scorer, _ = fitted_scorer()
    viewed = Segmenter(segmenter.network, segmenter.inferer, views=3)
    v = volume(7)[0]
    slices, geometry = segmenter.preprocessing(v, None, segmenter.device)
    with torch.no_grad():
        by_hand = [dihedral_inverse(torch.softmax(segmenter.inferer(dihedral(slices, k), segmenter.network), 1), k) for k in range(3)]
    expected = segmenter.preprocessing.invert(torch.stack(by_hand).mean(0), geometry)
    assert torch.allclose(viewed.probabilities(v), expected, atol=1e-6)
    assert not torch.allclose(segmenter.probabilities(v), expected, atol=1e-3)  # a random network is not rotation invariant
    labels, scores, uncertainty = viewed.segment_and_score(v, scorer)
    plain_labels, plain_scores, plain_uncertainty = segmenter.segment_and_score(v, scorer)
    assert np.array_equal(labels, viewed.postprocess(viewed.raw_labels(expected))) and scores == plain_scores
    assert np.array_equal(uncertainty, plain_uncertainty)
    for bad in (0, 9, 2.5):
        with pytest.raises(ValueError, match="views"):
            Segmenter(segmenter.network, segmenter.inferer, views=bad)
