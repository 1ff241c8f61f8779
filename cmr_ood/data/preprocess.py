"""Preprocessing, defined once for training and inference, and its inverse.

A volume becomes a batch of 2D slices: (Z, 1, H', W'), intensities normalised per volume (percentile clip,
scaled to [0, 1]), in-plane resampled to ``spacing_mm``, the slice axis kept. Network outputs on that grid
are mapped back to the input's grid by :meth:`Preprocessing.invert`. The in-plane orientation is left as
it is in the file: the network is trained with rotations and flips, so no orientation is assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cmr_ood.data.io import Volume
from cmr_ood.data.labels import most_probable


@dataclass
class SliceGeometry:
    """What :meth:`Preprocessing.invert` needs to map slices back to the input grid."""

    slice_axis: int
    in_plane_shape: tuple[int, int]
    resampled_shape: tuple[int, int]

    @property
    def permutation(self) -> tuple[int, int, int]:
        """Input axes in the order (slice, in-plane 0, in-plane 1)."""
        in_plane = [a for a in range(3) if a != self.slice_axis]
        return (self.slice_axis, *in_plane)


def slice_axis(spacing, shape) -> int:
    """The stacking axis: the one with clearly the largest spacing (short-axis stacks), else the last."""
    spacing = np.asarray(spacing, dtype=float)
    axis = int(np.argmax(spacing))
    others = np.delete(spacing, axis)
    return axis if spacing[axis] > 1.5 * others.max() else 2


def quantiles(values: torch.Tensor, q) -> torch.Tensor:
    """Quantiles of all elements at levels ``q`` (a number or a list; ``torch.quantile``'s linear
    interpolation), found by selection (``torch.kthvalue``) rather than a full sort: several times faster
    on a volume, and free of ``torch.quantile``'s limit of 2^24 elements."""
    flat = values.reshape(-1).float()
    if flat.numel() == 0:
        raise ValueError("quantiles of an empty tensor")
    levels = torch.as_tensor(q, dtype=torch.float64)
    out = []
    for level in levels.reshape(-1).tolist():
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"quantile level {level} is outside [0, 1]")
        position = level * (flat.numel() - 1)
        below = int(position)
        value = torch.kthvalue(flat, below + 1).values
        if position > below:
            above = torch.kthvalue(flat, below + 2).values
            value = value + (above - value) * (position - below)
        out.append(value)
    return torch.stack(out).reshape(levels.shape)


def normalize_intensity(image: torch.Tensor, lower: float, upper: float) -> torch.Tensor:
    """Clip to the [lower, upper] percentiles of the volume and scale to [0, 1]."""
    lo, hi = quantiles(image, [lower / 100.0, upper / 100.0])
    return ((image.float() - lo) / (hi - lo).clamp_min(1e-6)).clamp_(0.0, 1.0)


def resize(slices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear in-plane resize of (N, C, H, W), antialiased when shrinking."""
    if tuple(slices.shape[-2:]) == tuple(size):
        return slices
    shrinking = size[0] < slices.shape[-2] or size[1] < slices.shape[-1]
    return F.interpolate(slices, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


@dataclass
class Preprocessing:
    """The one preprocessing definition shared by training and inference."""

    spacing_mm: float = 1.25
    lower_percentile: float = 1.0
    upper_percentile: float = 99.0

    def geometry(self, volume: Volume) -> SliceGeometry:
        axis = slice_axis(volume.spacing, volume.array.shape[:3])
        in_plane = [a for a in range(3) if a != axis]
        shape = tuple(int(volume.array.shape[a]) for a in in_plane)
        size = tuple(max(1, int(round(shape[i] * volume.spacing[a] / self.spacing_mm))) for i, a in enumerate(in_plane))
        return SliceGeometry(axis, shape, size)

    def to_slices(self, array: np.ndarray | torch.Tensor, geometry: SliceGeometry, device=None) -> torch.Tensor:
        """(X, Y, Z) -> (Z, 1, H, W) on the input's in-plane grid (no resampling)."""
        tensor = torch.as_tensor(np.ascontiguousarray(array) if isinstance(array, np.ndarray) else array, device=device)
        return tensor.permute(*geometry.permutation).unsqueeze(1)

    def __call__(self, volume: Volume, frame: int | None = None, device=None) -> tuple[torch.Tensor, SliceGeometry]:
        """Image slices (Z, 1, H', W') in [0, 1] at ``spacing_mm`` in-plane, and their geometry."""
        array = volume.array if frame is None else volume.array[..., frame]
        geometry = self.geometry(volume)
        slices = self.to_slices(array, geometry, device).float()
        slices = normalize_intensity(slices, self.lower_percentile, self.upper_percentile)
        return resize(slices, geometry.resampled_shape), geometry

    def resample_labels(self, labels: np.ndarray, geometry: SliceGeometry, num_classes: int) -> torch.Tensor:
        """Label map (X, Y, Z) -> (Z, H', W') uint8 on the preprocessed grid (one-hot, bilinear, argmax)."""
        slices = self.to_slices(labels.astype(np.int64), geometry)[:, 0]
        onehot = F.one_hot(slices, num_classes).permute(0, 3, 1, 2).float()
        return most_probable(resize(onehot, geometry.resampled_shape), 1).to(torch.uint8)

    def invert(self, probabilities: torch.Tensor, geometry: SliceGeometry) -> torch.Tensor:
        """(Z, C, H', W') on the preprocessed grid -> (C, X, Y, Z) on the input grid."""
        probs = resize(probabilities.float(), geometry.in_plane_shape)  # (Z, C, H, W)
        stacked = probs.permute(1, 0, 2, 3)  # (C, slice, in-plane 0, in-plane 1)
        inverse = np.argsort(geometry.permutation)
        return stacked.permute(0, *[int(i) + 1 for i in inverse])


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Element k (0..7) of the in-plane rotation/flip group acting on (..., H, W): k % 4 quarter turns, after a
    flip for k >= 4 (the views of test-time augmentation; the network is trained with any orientation)."""
    x = torch.flip(x, dims=(-1,)) if k >= 4 else x
    return torch.rot90(x, k % 4, dims=(-2, -1))


def dihedral_inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    x = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x
