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

    def complementary_masks(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Masks for test time: (K, B, 1, H, W) with K = round(1 / (1 - mask_ratio)); the patches of each
        image are dealt into K groups at random and mask k hides every patch outside group k, so each mask
        hides the training share of patches and every pixel is hidden by K - 1 of the masks."""
        b, _, h, w = images.shape
        p = self.patch_size
        k = max(2, round(1.0 / (1.0 - self.mask_ratio)))
        grid_h, grid_w = math.ceil(h / p), math.ceil(w / p)
        device = generator.device if generator is not None else images.device
        group = torch.rand(b, grid_h * grid_w, generator=generator, device=device).argsort(dim=1).argsort(dim=1).to(images.device) % k
        hidden = group[None] != torch.arange(k, device=images.device).view(k, 1, 1)  # (K, B, patches)
        patches = hidden.view(k, b, 1, grid_h, grid_w)
        return patches.repeat_interleave(p, dim=3).repeat_interleave(p, dim=4)[..., :h, :w]
