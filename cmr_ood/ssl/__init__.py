"""Self-supervised proxy tasks: each one's targets or corruption, and its loss."""

from cmr_ood.ssl.mim import MaskedImageModelling

__all__ = ["MaskedImageModelling"]
