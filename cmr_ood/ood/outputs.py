"""Scores from the network's outputs alone: one pass, no fitted statistics (the temperature is fitted by
the scorer and shared through :attr:`CaseOutputs.temperature`)."""

from __future__ import annotations

import math

import torch

from cmr_ood.data.labels import most_probable
from cmr_ood.ood.base import CaseOutputs, Detector


def max_softmax(probabilities: torch.Tensor) -> torch.Tensor:
    """1 - max softmax probability (Hendrycks & Gimpel), (N, C, ...) -> (N, ...)."""
    return 1.0 - probabilities.amax(1)


def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Predictive entropy divided by log C, in [0, 1]."""
    c = probabilities.shape[1]
    return (-(probabilities * probabilities.clamp_min(1e-12).log()).sum(1) / math.log(c)).clamp(0.0, 1.0)  # rounding


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Free energy -T logsumexp(logits / T) (Liu et al. 2020): low on confident, familiar inputs."""
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=1)


def kl_to_uniform(probabilities: torch.Tensor) -> torch.Tensor:
    """-KL(uniform || p): 0 for a uniform prediction, very negative for a peaked one.

    KL(p || uniform) would be log C minus the entropy, the same ranking as :func:`entropy`; the reverse
    divergence weighs the smallest class probabilities, so it ranks differently."""
    c = probabilities.shape[1]
    return math.log(c) + probabilities.clamp_min(1e-12).log().mean(1)


class SoftmaxScore(Detector):
    """Voxel-wise score from the (temperature-scaled) outputs: ``msp``, ``entropy``, ``energy`` or
    ``kl_uniform``."""

    KINDS = ("msp", "entropy", "energy", "kl_uniform")

    def __init__(self, kind: str = "entropy"):
        if kind not in self.KINDS:
            raise ValueError(f"unknown output score '{kind}'; one of {self.KINDS}")
        self.kind = self.name = kind

    def voxel_map(self, case: CaseOutputs) -> torch.Tensor:
        if self.kind == "energy":
            return energy(case.logits, case.temperature)
        fn = {"msp": max_softmax, "entropy": entropy, "kl_uniform": kl_to_uniform}[self.kind]
        return fn(case.probabilities)


def soft_dice_gap(probabilities: torch.Tensor) -> float:
    """1 - the Dice between the prediction (argmax) and the probabilities themselves, averaged over the
    foreground classes: the Dice the model expects to lose if its probabilities are right.

    Unlike a mean entropy over the foreground, each structure counts the same whatever its size, as in
    the Dice that defines a failed segmentation, so an uncertain rim around a small RV or a structure
    the model nearly lost weighs as much as the whole LV. A structure predicted nowhere scores 0, and a
    stack with no heart at all +inf (nothing to trust)."""
    predicted = torch.nn.functional.one_hot(most_probable(probabilities, 1), probabilities.shape[1]).movedim(-1, 1)[:, 1:]
    p = probabilities[:, 1:]
    dims = [d for d in range(p.ndim) if d != 1]
    found, overlap = predicted.sum(dims), (p * predicted).sum(dims)
    if not found.any():
        return math.inf
    dice = torch.where(found > 0, 2.0 * overlap / (p.sum(dims) + found), 0.0)  # one pass over all structures
    return float(1.0 - dice.mean())


class SoftDiceGap(Detector):
    """Case score ``soft_dice_gap`` (:func:`soft_dice_gap` of the temperature-scaled probabilities)."""

    name = "soft_dice_gap"

    @property
    def score_names(self) -> list[str]:
        return [self.name]

    def case_scores(self, case: CaseOutputs) -> dict[str, float]:
        return {self.name: soft_dice_gap(case.probabilities)}
