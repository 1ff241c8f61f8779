"""Post-hoc out-of-distribution detection: detectors (fit on in-distribution data, then score; higher =
more OOD), their combination and thresholds (:class:`OODScorer`), calibration, the shift suite and the
evaluation protocol.

Where each method lives: output scores (max softmax, entropy, energy, KL to uniform) in ``outputs``;
MC dropout and test-time augmentation in ``sampling``; Mahalanobis and the spectral signature in
``features``; self-supervised proxy-task errors and their product with an uncertainty map in ``proxy``;
temperature scaling, ECE/MCE and reliability diagrams in ``calibration``; detection and silent-failure
metrics in ``metrics``; synthetic shifts in ``shifts``."""

from cmr_ood.ood.base import AGGREGATIONS, CaseOutputs, Detector, aggregate
from cmr_ood.ood.features import Mahalanobis, SpectralSignature, singular_values, spectral_signature
from cmr_ood.ood.outputs import SoftDiceGap, SoftmaxScore
from cmr_ood.ood.proxy import MapProduct, PositionError, ReconstructionError
from cmr_ood.ood.sampling import MCDropout, TestTimeAugmentation
from cmr_ood.ood.scorer import OODScorer

__all__ = [
    "AGGREGATIONS", "CaseOutputs", "Detector", "aggregate", "Mahalanobis", "SpectralSignature", "singular_values",
    "spectral_signature", "SoftDiceGap", "SoftmaxScore", "MapProduct", "PositionError", "ReconstructionError", "MCDropout",
    "TestTimeAugmentation", "OODScorer",
]
