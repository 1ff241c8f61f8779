"""Anatomical position prediction (Bai et al. 2019).

Short-axis only (:class:`SlicePosition`): every pixel of a slice regresses the slice's relative position
along the stack, 0 at the first slice and 1 at the last. ACDC stacks run from base to apex (199 of its
200 ED/ES volumes have the larger LV cross-sections in their first third), so there 0 is the base.

From long-axis views: where the view planes cut a short-axis stack. Everything is in world coordinates
(mm), from the affines that :mod:`cmr_ood.data.io` reads, so it holds for any scanner orientation. A
long-axis image (one slice) defines a plane; every short-axis voxel gets its signed distance to that
plane, and the zero line on each short-axis slice is the intersection line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cmr_ood.data.io import Volume


def relative_slice_positions(volume: torch.Tensor) -> torch.Tensor:
    """Position of each slice in its stack, 0 (first) to 1 (last), for slices stored stack after stack in
    order (as the slice cache holds them); ``volume`` gives each slice's stack id. A one-slice stack gets 0.5."""
    volume = volume.long()
    starts = torch.ones_like(volume, dtype=torch.bool)
    starts[1:] = volume[1:] != volume[:-1]
    run = torch.cumsum(starts.long(), 0) - 1
    counts = torch.bincount(run)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(volume), device=volume.device) - first[run]
    size = counts[run]
    return torch.where(size > 1, rank.float() / (size - 1).clamp_min(1).float(), torch.full_like(rank, 0.5, dtype=torch.float))


@dataclass
class SlicePosition:
    """The short-axis-only proxy task: a one-channel head predicts, at every pixel, its slice's relative
    position. The error map needs no labels, so at test time it is also a voxel-wise signal of familiarity."""

    channels: int = 1

    @staticmethod
    def error_map(prediction: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Squared error per pixel: prediction (B, 1, H, W), target position (B,)."""
        return (prediction.float() - position.float().view(-1, 1, 1, 1)) ** 2

    def loss(self, prediction: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return self.error_map(prediction, position).mean()


def plane_of(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Point and unit normal (world, mm) of the plane of a single-slice image."""
    if volume.array.shape[2] != 1:
        raise ValueError(f"{volume.path}: a long-axis view plane needs a single-slice image, got {volume.array.shape[2]} slices")
    axes = volume.affine[:3, :3]
    normal = np.cross(axes[:, 0], axes[:, 1])
    return volume.affine[:3, 3].copy(), normal / np.linalg.norm(normal)


def signed_distance_to_plane(volume: Volume, plane: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Signed distance (mm) of every voxel centre of ``volume`` (X, Y, Z) to ``plane``."""
    point, normal = plane
    # distance is affine in the voxel indices: d(i, j, k) = normal . (A [i j k 1] - point)
    coefficients = normal @ volume.affine[:3, :3]
    offset = float(normal @ (volume.affine[:3, 3] - point))
    i, j, k = (np.arange(n, dtype=np.float64) for n in volume.array.shape[:3])
    return (coefficients[0] * i[:, None, None] + coefficients[1] * j[None, :, None] + coefficients[2] * k[None, None, :]
            + offset)


def plot_intersections(short_axis: Volume, long_axis: dict[str, Volume], path: str, slices=None) -> str:
    """A picture of the long-axis planes' lines over short-axis slices (for a person to check)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slices = list(range(short_axis.array.shape[2])) if slices is None else list(slices)
    distances = {name: signed_distance_to_plane(short_axis, plane_of(v)) for name, v in long_axis.items()}
    colours = dict(zip(long_axis, ["#ff3b30", "#34c759", "#0a84ff", "#ffcc00"]))
    cols = min(4, len(slices))
    rows = -(-len(slices) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, z in zip(axes.ravel(), slices):
        ax.imshow(short_axis.array[:, :, z].T, cmap="gray", origin="lower")
        for name, d in distances.items():
            if d[:, :, z].min() < 0 < d[:, :, z].max():
                ax.contour(d[:, :, z].T, levels=[0.0], colors=[colours[name]], linewidths=1.2)
        ax.set_title(f"slice {z}", fontsize=9)
    handles = [plt.Line2D([], [], color=colours[n], label=n) for n in long_axis]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
