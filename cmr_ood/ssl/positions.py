"""Geometry for anatomical positions (Bai et al. 2019): where long-axis view planes cut a short-axis stack.

Everything is in world coordinates (mm), from the affines that :mod:`cmr_ood.data.io` reads, so it holds
for any scanner orientation. A long-axis image (one slice) defines a plane; every short-axis voxel gets its
signed distance to that plane, and the zero line on each short-axis slice is the intersection line.
"""

from __future__ import annotations

import numpy as np

from cmr_ood.data.io import Volume


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
