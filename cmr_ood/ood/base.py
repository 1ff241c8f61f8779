"""What every detector shares: the network's outputs for one case, the Detector interface, and the
aggregation of voxel-wise maps into case scores.

A case is one short-axis stack (or one frame of a cine) seen as a batch of preprocessed slices. The
network runs once per case with the feature taps the detectors ask for (:class:`CaseOutputs`); detectors
that need more passes (sampling, masking) call :attr:`CaseOutputs.forward` again. Every score is oriented
the same way: higher means more likely out of distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Iterable

import torch

from cmr_ood.data.labels import most_probable
from cmr_ood.data.preprocess import quantiles

#: Case scores from a voxel map: mean over the image, mean over the predicted foreground (heart), and a
#: high percentile over the image. A case with no predicted foreground scores +inf on ``fg``: a model that
#: finds no heart cannot be trusted on it.
AGGREGATIONS = ("image", "fg", "p95")


@dataclass
class CaseOutputs:
    """One forward pass of the network over the slices of a case (all on one device).

    ``images`` (Z, 1, H, W) preprocessed slices; ``logits`` (Z, C, H, W) segmentation logits; ``heads``
    the proxy heads' outputs (Z, c, H, W); ``features`` the tapped feature maps (Z, C_l, h, w); ``forward``
    runs the same network and inferer on other slices (returns the same kind of dict: ``seg``, heads,
    taps); ``temperature`` scales the logits for the probability-based scores."""

    images: torch.Tensor
    logits: torch.Tensor
    heads: dict[str, torch.Tensor]
    features: dict[str, torch.Tensor]
    forward: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None
    temperature: float = 1.0
    network: torch.nn.Module | None = field(default=None, repr=False)
    _maps: dict = field(default_factory=dict, repr=False)

    def map_of(self, detector: Detector) -> torch.Tensor | None:
        """``detector``'s voxel map of this case, computed once (combinations reuse their parts' maps)."""
        if detector.name not in self._maps:
            self._maps[detector.name] = detector.voxel_map(self)
        return self._maps[detector.name]

    @cached_property
    def probabilities(self) -> torch.Tensor:
        """Temperature-scaled softmax (Z, C, H, W)."""
        return torch.softmax(self.logits.float() / self.temperature, dim=1)

    @cached_property
    def foreground(self) -> torch.Tensor:
        """Predicted heart (any structure), (Z, H, W) bool."""
        return most_probable(self.logits, 1) > 0

    @cached_property
    def positions(self) -> torch.Tensor:
        """Relative position of each slice in the stack, 0 to 1 (a single slice: 0.5)."""
        z = self.images.shape[0]
        if z == 1:
            return torch.full((1,), 0.5, device=self.images.device)
        return torch.linspace(0.0, 1.0, z, device=self.images.device)


def aggregate(voxel_map: torch.Tensor, foreground: torch.Tensor) -> dict[str, float]:
    """Case scores of a voxel map (Z, H, W) by :data:`AGGREGATIONS`."""
    fg = voxel_map[foreground]
    return {
        "image": float(voxel_map.float().mean()),
        "fg": float(fg.float().mean()) if fg.numel() else math.inf,
        "p95": float(quantiles(voxel_map, 0.95)),
    }


class Detector:
    """Fit on in-distribution cases only, then score; higher = more OOD.

    Subclasses give :meth:`voxel_map` (a (Z, H, W) map on the preprocessed grid) and get case scores
    ``<name>_<aggregation>`` from it, or override :meth:`case_scores` (feature-space scores have no map).
    Detectors with fitted statistics accumulate them case by case (:meth:`update`, then :meth:`finish`),
    so fitting streams over many cases; :meth:`state_dict` holds tensors and numbers only (it is saved
    with the model and loaded with ``torch.load(..., weights_only=True)``)."""

    name: str = "detector"
    taps: tuple[str, ...] = ()  # feature layers the detector reads

    @property
    def needs_fit(self) -> bool:
        return False

    @property
    def score_names(self) -> list[str]:
        return [f"{self.name}_{a}" for a in AGGREGATIONS]

    def update(self, case: CaseOutputs) -> None:
        """Accumulate fitting statistics from one in-distribution case."""

    def finish(self) -> None:
        """Turn the accumulated statistics into the fitted state."""

    def fit(self, cases: Iterable[CaseOutputs]) -> Detector:
        for case in cases:
            self.update(case)
        self.finish()
        return self

    def voxel_map(self, case: CaseOutputs) -> torch.Tensor | None:
        return None

    def case_scores(self, case: CaseOutputs) -> dict[str, float]:
        voxel_map = case.map_of(self)
        if voxel_map is None:
            raise NotImplementedError(f"{type(self).__name__} gives neither a voxel map nor case scores")
        return {f"{self.name}_{k}": v for k, v in aggregate(voxel_map, case.foreground).items()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
