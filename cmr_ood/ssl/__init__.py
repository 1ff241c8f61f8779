"""Self-supervised proxy tasks: each one's targets or corruption, and its loss."""

from cmr_ood.ssl.mim import MaskedImageModelling
from cmr_ood.ssl.positions import SlicePosition, relative_slice_positions

__all__ = ["MaskedImageModelling", "SlicePosition", "relative_slice_positions"]
