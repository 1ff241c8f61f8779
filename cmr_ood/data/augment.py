"""Batched augmentation on the device that holds the batch (GPU during training).

MONAI's transforms act on one sample at a time on the host; here a whole batch is augmented in a few
tensor operations so that the GPU, not the data loader, bounds training speed. The spatial part draws
any rotation and a flip, so that the network assumes no scanner's orientation; the intensity part
mimics other scanners and protocols (gamma, contrast, bias field, resolution, noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _uniform(n: int, low: float, high: float, device) -> torch.Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def _apply(mask_prob: float, n: int, device) -> torch.Tensor:
    return (torch.rand(n, device=device) < mask_prob).float()


@dataclass
class BatchAugment:
    patch_size: int = 128
    rotation: float = math.pi  # maximum |angle| (radians): pi = any orientation
    flip_prob: float = 0.5
    scale: tuple[float, float] = (0.75, 1.35)
    translate: float = 0.3  # fraction of the canvas, around the heart (the canvas is centred on it)
    # share of patches centred anywhere on the canvas instead: on a canvas as wide as the field of view, the
    # network also learns what is not heart far from it (arms, liver, stomach) and leaves it unlabelled
    anywhere: float = 0.0
    # share of patches cut to a smaller field of view (a random window, sides a fraction of the patch; zero
    # and background outside, as a small acquisition on the padded canvas): a wide-canvas network must not
    # learn that tissue next to the edge of the image is never heart
    field_of_view_prob: float = 0.0
    field_of_view: tuple[float, float] = (0.45, 1.0)
    gamma: tuple[float, float] = (0.6, 1.6)
    gamma_prob: float = 0.5
    contrast: tuple[float, float] = (0.75, 1.25)
    brightness: float = 0.1
    bias_field: float = 0.35  # std of the log field's control points
    bias_prob: float = 0.4
    low_resolution: tuple[float, float] = (1.0, 2.5)
    low_resolution_prob: float = 0.25
    noise_std: float = 0.06
    noise_prob: float = 0.5

    def spatial(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Random rotation, flip, scale and translation, cropped to ``patch_size``, in one resampling."""
        n, _, h, w = images.shape
        dev = images.device
        angle = _uniform(n, -self.rotation, self.rotation, dev)
        scale = torch.exp(_uniform(n, math.log(self.scale[0]), math.log(self.scale[1]), dev))
        flip = 1.0 - 2.0 * _apply(self.flip_prob, n, dev)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 1] = cos * flip * self.patch_size / w, -sin * self.patch_size / w
        theta[:, 1, 0], theta[:, 1, 1] = sin * flip * self.patch_size / h, cos * self.patch_size / h
        near = _uniform(2 * n, -self.translate, self.translate, dev).view(n, 2)
        far = _uniform(2 * n, -1.0, 1.0, dev).view(n, 2)
        theta[:, :, 2] = torch.where(_apply(self.anywhere, n, dev)[:, None] > 0, far, near)
        grid = F.affine_grid(theta, (n, 1, self.patch_size, self.patch_size), align_corners=False)
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return images, labels[:, 0].long()

    def intensity(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        dev = x.device
        per = lambda t: t.view(n, 1, 1, 1)  # noqa: E731
        gamma = torch.exp(_uniform(n, math.log(self.gamma[0]), math.log(self.gamma[1]), dev))
        x = torch.where(per(_apply(self.gamma_prob, n, dev)) > 0, x.clamp_min(0).pow(per(gamma)), x)
        x = x * per(_uniform(n, *self.contrast, dev)) + per(_uniform(n, -self.brightness, self.brightness, dev))
        field = F.interpolate(torch.randn(n, 1, 4, 4, device=dev) * self.bias_field, size=(h, w), mode="bicubic", align_corners=False)
        x = x * torch.exp(field * per(_apply(self.bias_prob, n, dev)))
        factor = float(_uniform(1, *self.low_resolution, "cpu"))
        if factor > 1.01:
            small = F.interpolate(x, scale_factor=1.0 / factor, mode="bilinear", align_corners=False, antialias=True)
            blurred = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
            x = torch.where(per(_apply(self.low_resolution_prob, n, dev)) > 0, blurred, x)
        sigma = per(_uniform(n, 0.0, self.noise_std, dev) * _apply(self.noise_prob, n, dev))
        x = x + torch.randn_like(x) * sigma
        return x.clamp(0.0, 1.0)

    def crop_field_of_view(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero the images and labels outside a random window, in a share ``field_of_view_prob`` of them."""
        if self.field_of_view_prob <= 0:  # no draw either: the random stream of recipes without it is unchanged
            return images, labels
        n, _, h, w = images.shape
        dev = images.device
        side = _uniform(2 * n, *self.field_of_view, dev).view(n, 2)
        start = torch.rand(n, 2, device=dev) * (1.0 - side)
        rows = (torch.arange(h, device=dev) + 0.5) / h
        cols = (torch.arange(w, device=dev) + 0.5) / w
        in_rows = (rows >= start[:, :1]) & (rows < start[:, :1] + side[:, :1])
        in_cols = (cols >= start[:, 1:]) & (cols < start[:, 1:] + side[:, 1:])
        inside = (in_rows[:, :, None] & in_cols[:, None, :]) | (_apply(self.field_of_view_prob, n, dev) == 0)[:, None, None]
        return images * inside[:, None], labels * inside

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, H, W) images in [0, 1] and (B, H, W) labels -> augmented patches of ``patch_size``."""
        images, labels = self.spatial(images, labels)
        return self.crop_field_of_view(self.intensity(images), labels)

    def views(self, images: torch.Tensor, labels: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` independently augmented views of each slice, drawn in one pass: (n, B, 1, P, P) images and
        (n, B, P, P) labels (contrastive tasks compare two views of a slice; n = 1 is the plain call)."""
        b = len(images)
        images, labels = self(images.repeat(n, 1, 1, 1), labels.repeat(n, 1, 1))
        return images.unflatten(0, (n, b)), labels.unflatten(0, (n, b))
