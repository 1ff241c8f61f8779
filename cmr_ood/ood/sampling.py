"""Sampling-based uncertainty: Monte Carlo dropout and test-time augmentation. Both run the network
several more times, all samples of a case in one batched call, and give the voxel-wise variance of the
class probabilities (mean over classes)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from cmr_ood.data.preprocess import dihedral, dihedral_inverse
from cmr_ood.ood.base import CaseOutputs, Detector


def probability_variance(probabilities: torch.Tensor) -> torch.Tensor:
    """(S, Z, C, H, W) samples -> (Z, H, W): variance over samples, averaged over classes."""
    return probabilities.var(0, unbiased=False).mean(1)


def _needs_network(case: CaseOutputs, who: str) -> None:
    if case.forward is None:
        raise ValueError(f"{who} runs the network again: the case outputs carry no forward function")


@contextlib.contextmanager
def feature_dropout(network: torch.nn.Module, layers: tuple[str, ...], p: float):
    """Channel dropout on the outputs of ``layers`` while the context is open, also in eval mode: MC
    dropout after the fact, for a network trained without dropout layers."""
    handles = [network.layer(name).register_forward_hook(lambda m, i, out: F.dropout2d(out, p, training=True)) for name in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class MCDropout(Detector):
    """Monte Carlo dropout (Gal & Ghahramani): ``samples`` passes with channel dropout ``p`` on the
    feature maps of ``layers`` (deep layers by default, where it perturbs the prediction most)."""

    name = "mc_dropout"

    def __init__(self, samples: int = 8, p: float = 0.2, layers: tuple[str, ...] = ("bottleneck", "dec1"), seed: int = 0):
        self.samples, self.p, self.layers, self.seed = samples, p, tuple(layers), seed

    def voxel_map(self, case: CaseOutputs) -> torch.Tensor:
        _needs_network(case, "MC dropout")
        repeated = case.images.repeat(self.samples, 1, 1, 1)
        devices = [case.images.device] if case.images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), feature_dropout(case.network, self.layers, self.p):
            torch.manual_seed(self.seed)  # the same case gets the same score on every run
            logits = case.forward(repeated)["seg"].float()
        probs = torch.softmax(logits / case.temperature, dim=1)
        return probability_variance(probs.view(self.samples, *case.logits.shape))


class TestTimeAugmentation(Detector):
    """Test-time augmentation: the network sees each slice rotated and flipped (the dihedral group, under
    which a model trained with any orientation should agree with itself, ``samples`` of its 8 elements)
    and, from the second half of the samples on, with a gamma change; outputs are mapped back and their
    variance is the map. All samples of a case go through the network in one call (slices padded to a
    square so that rotated and upright slices stack)."""

    name = "tta"
    __test__ = False  # not a pytest class

    def __init__(self, samples: int = 8, gamma: float = 0.8):
        if not 1 < samples <= 8:
            raise ValueError(f"test-time augmentation takes 2 to 8 samples, got {samples}")
        self.samples, self.gamma = samples, gamma

    def voxel_map(self, case: CaseOutputs) -> torch.Tensor:
        _needs_network(case, "Test-time augmentation")
        z, _, h, w = case.images.shape
        side = max(h, w)
        square = F.pad(case.images, (0, side - w, 0, side - h))
        views = []
        for k in range(self.samples):
            view = dihedral(square, k)
            views.append(view.clamp_min(0).pow(self.gamma) if k >= self.samples // 2 else view)
        logits = case.forward(torch.cat(views))["seg"].float()
        probs = torch.softmax(logits / case.temperature, dim=1).view(self.samples, z, -1, side, side)
        back = torch.stack([dihedral_inverse(probs[k], k) for k in range(self.samples)])
        return probability_variance(back[..., :h, :w])
