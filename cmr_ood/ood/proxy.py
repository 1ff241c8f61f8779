"""Self-supervised scores (Gonzalez & Mukhopadhyay 2021): the error of a proxy task that the network
learnt beside segmentation, measured at test time without labels. A familiar input is reconstructed
(masked image modelling) and placed in its stack (slice position) well; an unfamiliar one is not."""

from __future__ import annotations

import torch

from cmr_ood.ood.base import CaseOutputs, Detector
from cmr_ood.ssl import MaskedImageModelling, SlicePosition


class PositionError(Detector):
    """Squared error of the slice-position head against each slice's relative position in its stack.

    Stacks are not stored in the same direction everywhere (base to apex in ACDC, the reverse elsewhere),
    so the error is taken for both directions and the smaller one is kept: the score judges the image,
    not the file's slice order. Needs the ``position`` head."""

    name = "position"

    def voxel_map(self, case: CaseOutputs) -> torch.Tensor:
        if "position" not in case.heads:
            raise ValueError("the network has no 'position' head: the slice-position error needs one")
        prediction, target = case.heads["position"], case.positions
        forward = SlicePosition.error_map(prediction, target)[:, 0]
        backward = SlicePosition.error_map(prediction, 1.0 - target)[:, 0]
        return forward if forward.mean() <= backward.mean() else backward


class ReconstructionError(Detector):
    """Masked image modelling error: the slices are seen under complementary masks (each hiding the
    training share of patches; all masks of a case in one batched pass) and each pixel's squared error is
    averaged over the masks that hid it. Needs the ``mim`` head; costs K more passes (K = 4 for the usual
    75% masking)."""

    name = "mim"

    def __init__(self, patch_size: int = 32, mask_ratio: float = 0.75, seed: int = 0):
        self.task = MaskedImageModelling(patch_size=patch_size, mask_ratio=mask_ratio)
        self.seed = seed

    def voxel_map(self, case: CaseOutputs) -> torch.Tensor:
        if "mim" not in case.heads or case.forward is None:
            raise ValueError("the reconstruction error needs the network's 'mim' head and a forward function")
        generator = torch.Generator(device=case.images.device).manual_seed(self.seed)
        masks = self.task.complementary_masks(case.images, generator)  # (K, Z, 1, H, W)
        k = masks.shape[0]
        masked = self.task.corrupt(case.images.repeat(k, 1, 1, 1), masks.flatten(0, 1))
        reconstruction = case.forward(masked)["mim"].view(k, *case.images.shape)
        error = self.task.error_map(reconstruction, case.images.expand_as(reconstruction))
        hidden = masks.float()
        return ((error * hidden).sum(0) / hidden.sum(0).clamp_min(1.0))[:, 0]


class MapProduct(Detector):
    """Voxel-wise product of several detectors' maps, e.g. the proxy-task error times an uncertainty map
    (Gonzalez & Mukhopadhyay combine the two): high only where the input is unfamiliar AND the
    prediction uncertain. Case scores aggregate the product like any map."""

    def __init__(self, parts: list[Detector]):
        if len(parts) < 2:
            raise ValueError("a map product needs at least two detectors")
        self.parts = list(parts)
        self.name = "*".join(p.name for p in self.parts)
        self.taps = tuple(t for p in self.parts for t in p.taps)

    def voxel_map(self, case: CaseOutputs) -> torch.Tensor:
        maps = [case.map_of(p) for p in self.parts]
        if any(m is None for m in maps):
            raise ValueError(f"{self.name}: every part needs a voxel map")
        out = maps[0].float()
        for m in maps[1:]:
            out = out * m.float()
        return out
