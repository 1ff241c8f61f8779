"""Scores from the network's outputs alone: one pass, no fitted statistics (the temperature is fitted by
the scorer and shared through :attr:`CaseOutputs.temperature`)."""

from __future__ import annotations

import math

import torch

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
