"""Masked image modelling (de Mooij, Pluim, Scannell 2024): hide most square patches of a slice and
reconstruct them. The loss counts the masked pixels only. The reconstruction error needs no labels, so
at test time it is also a self-supervised signal of how familiar an input is."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class MaskedImageModelling:
    patch_size: int = 32
    channels: int = 1  # the reconstruction head's
    mask_ratio: float = 0.75

    def mask(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Boolean (B, 1, H, W), True where hidden: exactly round(ratio * patches) whole patches per image
        (patches at the right and bottom edges may be cut by the image border)."""
        b, _, h, w = images.shape
        p = self.patch_size
        grid_h, grid_w = math.ceil(h / p), math.ceil(w / p)
        count = grid_h * grid_w
        hidden = round(self.mask_ratio * count)
        device = generator.device if generator is not None else images.device
        scores = torch.rand(b, count, generator=generator, device=device).to(images.device)
        ranks = scores.argsort(dim=1).argsort(dim=1)
        patches = (ranks < hidden).view(b, 1, grid_h, grid_w)
        return patches.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)[..., :h, :w]

    @staticmethod
    def corrupt(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The network's input: hidden pixels set to zero (the background value after normalisation)."""
        return images.masked_fill(mask, 0.0)

    @staticmethod
    def error_map(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Squared reconstruction error per pixel."""
        return (reconstruction.float() - images.float()) ** 2

    def loss(self, reconstruction: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the hidden pixels only."""
        weights = mask.float()
        return (self.error_map(reconstruction, images) * weights).sum() / weights.sum().clamp_min(1.0)
