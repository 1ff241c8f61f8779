"""Self-supervised proxy tasks: each one's targets or corruption, and its loss."""

from cmr_ood.ssl.contrastive import DINO, ContrastiveTask, PositionalContrastiveLearning, SimCLR, nt_xent
from cmr_ood.ssl.mim import MaskedImageModelling
from cmr_ood.ssl.positions import LongAxisPosition, SlicePosition, long_axis_positions, relative_slice_positions

__all__ = ["MaskedImageModelling", "SlicePosition", "relative_slice_positions"]
__all__ += ["ContrastiveTask", "DINO", "PositionalContrastiveLearning", "SimCLR", "nt_xent"]
__all__ += ["LongAxisPosition", "long_axis_positions"]
