"""Anatomical position prediction (Bai et al. 2019).

Short-axis only (:class:`SlicePosition`): every pixel of a slice regresses the slice's relative position
along the stack, 0 at the first slice and 1 at the last. ACDC stacks run from base to apex (199 of its
200 ED/ES volumes have the larger LV cross-sections in their first third), so there 0 is the base.

From long-axis views: where the view planes cut a short-axis stack. Everything is in world coordinates
(mm), from the affines that :mod:`cmr_ood.data.io` reads, so it holds for any scanner orientation. A
long-axis image (one slice) defines a plane; every short-axis voxel gets its signed distance to that
plane, and the zero line on each short-axis slice is the intersection line. Two such planes (or one and
a plane constructed through the LV long axis) tile every slice into a 3 x 3 grid around the LV long axis:
the 10-class position map (:func:`long_axis_positions`) that :class:`LongAxisPosition` learns to predict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

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


Plane = tuple[np.ndarray, np.ndarray]  # point and unit normal, world mm

#: Number of classes of the long-axis position map: background and the 3 x 3 tiles.
POSITION_CLASSES = 10
#: Two views closer than this to parallel (degrees) cannot span a grid.
MIN_VIEW_ANGLE_DEG = 20.0


def _named_plane(name: str, view: Volume | Plane) -> Plane:
    """The plane of a long-axis image, or a given (point, normal) made unit."""
    if isinstance(view, Volume):
        return plane_of(view)
    point, normal = (np.asarray(v, dtype=np.float64).reshape(3) for v in view)
    length = np.linalg.norm(normal)
    if not np.isfinite(length) or length == 0 or not np.all(np.isfinite(point)):
        raise ValueError(f"{name}: a plane needs a finite point and a non-zero normal, got {point}, {normal}")
    return point, normal / length


def _label(name: str, view: Volume | Plane) -> str:
    return f"{name} ({view.path})" if isinstance(view, Volume) else name


def _slice_normal(volume: Volume) -> np.ndarray:
    """Unit normal of the slices of a stack, turned towards the feet (world -z), i.e. from base towards apex."""
    axes = volume.affine[:3, :3]
    normal = np.cross(axes[:, 0], axes[:, 1])
    normal = normal / np.linalg.norm(normal)
    # RAS and LPS share +z (superior), so this holds for either world convention; the apex is below the base.
    return -normal if normal[2] > 0 else normal


def position_grid_planes(short_axis: Volume, views: Mapping[str, Volume | Plane],
                         axis_point=None) -> tuple[Plane, Plane]:
    """The two oriented planes whose bands tile the short-axis slices of :func:`long_axis_positions`.

    ``views`` maps a name (e.g. "4Ch", "2Ch", "3Ch") to a single-slice long-axis image or to a plane
    (point, normal) in world mm. Every view must cut the short-axis slices (not lie parallel to them).

    - Two or more views: the pair closest to perpendicular spans the grid (2Ch with 4Ch where both exist;
      the 3Ch lies between them), because a near-parallel pair would squeeze the grid into thin wedges.
    - One view (e.g. an M&Ms-2 subject with a 4Ch image only): the second plane is constructed as the
      plane perpendicular to the view that contains the stack normal and passes through ``axis_point``
      (world mm). Short-axis stacks are prescribed perpendicular to the LV long axis and the standard 2Ch
      plane contains that axis at right angles to the 4Ch, so this is the 2Ch plane as it is planned. The
      geometry alone cannot say where along the view's line the LV axis lies, so ``axis_point`` must be
      given (e.g. the LV centroid of a predicted segmentation); without it this is a ValueError rather
      than a guess. ``axis_point`` is not used when two or more views are given.

    Orientation (so that the classes mean the same anatomy whatever the voxel order of the images and
    the order of ``views``): the first plane is the one of the pair with the more vertical normal (the
    4Ch, whose plane is near axial-oblique), its normal turned towards the head (world +z); the second
    normal is turned so that (first normal x second normal) points from base to apex along the stack
    normal, i.e. the two normals and the base-apex axis form a right-handed frame.
    """
    if not views:
        raise ValueError(f"{short_axis.path}: anatomical positions need at least one long-axis view")
    slice_normal = _slice_normal(short_axis)
    planes = {}
    for name, view in views.items():
        plane = _named_plane(name, view)
        if abs(float(plane[1] @ slice_normal)) > np.cos(np.deg2rad(MIN_VIEW_ANGLE_DEG)):
            raise ValueError(f"{_label(name, view)}: the view plane is (nearly) parallel to the short-axis slices of "
                             f"{short_axis.path}; a long-axis view must cut them")
        planes[name] = plane
    names = list(planes)
    if len(names) == 1:
        if axis_point is None:
            raise ValueError(f"{_label(names[0], views[names[0]])}: only one long-axis view; pass axis_point (world mm, "
                             "e.g. the LV centre) to construct the second plane through the LV long axis")
        first = planes[names[0]]
        normal = np.cross(first[1], slice_normal)
        second = (np.asarray(axis_point, dtype=np.float64).reshape(3), normal / np.linalg.norm(normal))
    else:
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        a, b = min(pairs, key=lambda pair: abs(float(planes[pair[0]][1] @ planes[pair[1]][1])))
        angle = np.rad2deg(np.arccos(min(1.0, abs(float(planes[a][1] @ planes[b][1])))))
        if angle < MIN_VIEW_ANGLE_DEG:
            raise ValueError(f"{_label(a, views[a])} and {_label(b, views[b])}: the view planes are {angle:.1f} degrees "
                             f"apart (< {MIN_VIEW_ANGLE_DEG:g}); they cannot span a position grid")
        first, second = planes[a], planes[b]
        if abs(second[1][2]) > abs(first[1][2]):
            first, second = second, first
    first = (first[0], -first[1] if first[1][2] < 0 else first[1])
    if np.cross(first[1], second[1]) @ slice_normal < 0:
        second = (second[0], -second[1])
    return first, second


def _signed_distances(volume: Volume, planes, device=None) -> torch.Tensor:
    """Signed distances (mm) of every voxel centre of ``volume`` to each plane: (P, X, Y, Z), on ``device``."""
    normals = np.stack([normal for _, normal in planes])
    coefficients = torch.as_tensor(normals @ volume.affine[:3, :3], dtype=torch.float32, device=device)
    offsets = torch.as_tensor([normal @ (volume.affine[:3, 3] - point) for point, normal in planes],
                              dtype=torch.float32, device=device)
    i, j, k = (torch.arange(n, dtype=torch.float32, device=device) for n in volume.array.shape[:3])
    return (coefficients[:, 0, None, None, None] * i[:, None, None] + coefficients[:, 1, None, None, None] * j[:, None]
            + coefficients[:, 2, None, None, None] * k + offsets[:, None, None, None])


def long_axis_positions(short_axis: Volume, views: Mapping[str, Volume | Plane], band_mm: float = 20.0,
                        radius_mm: float = 80.0, axis_point=None, device=None) -> torch.Tensor:
    """The 10-class anatomical position map (Bai et al. 2019) of every voxel of a short-axis stack.

    Positions come only from where the long-axis view planes cut the short-axis slices, in world mm from
    the affines, so they need no manual labels and hold for any scanner orientation. Nine tiles in a
    3 x 3 grid centred where the view lines cross, plus background; the exact tiling is defined here, with
    its sizes as parameters: the two planes of :func:`position_grid_planes` (first ``P1``, second ``P2``),
    each with parallel planes at +-``band_mm``, split every slice into 3 bands across each plane, band
    ``b = 0`` (signed distance < -band_mm), ``1`` (within +-band_mm) or ``2`` (> +band_mm), giving

        class = 1 + 3 * b(P1) + b(P2)      (1..9; 5 is the tile on the LV long axis, where the lines cross)

    inside a radius of ``radius_mm`` around the LV long axis (the planes' line of intersection), and 0
    (background) beyond it. The defaults put the LV cavity of an adult heart at end-diastole (about 40 to
    55 mm across) mostly into tile 5 and reach over the RV free wall. Returns a (X, Y, Z) long tensor on
    ``device``; see :func:`position_grid_planes` for the views, ``axis_point`` and the orientation.
    """
    if not (0 < band_mm < radius_mm):
        raise ValueError(f"{short_axis.path}: need 0 < band_mm < radius_mm, got band_mm={band_mm}, radius_mm={radius_mm}")
    first, second = position_grid_planes(short_axis, views, axis_point)
    s1, s2 = _signed_distances(short_axis, (first, second), device)
    bands = [(s > band_mm).long() - (s < -band_mm).long() + 1 for s in (s1, s2)]
    # squared distance to the line where the planes meet, from the two signed distances and the angle between them
    c = float(first[1] @ second[1])
    axis_distance2 = (s1 * s1 - 2.0 * c * s1 * s2 + s2 * s2) / (1.0 - c * c)
    classes = 1 + 3 * bands[0] + bands[1]
    return torch.where(axis_distance2 <= radius_mm**2, classes, torch.zeros_like(classes))


@dataclass
class LongAxisPosition:
    """The long-axis proxy task: a 10-channel head classifies every pixel into the position map of
    :func:`long_axis_positions`. Its per-pixel cross-entropy needs no manual labels, so at test time it is
    also a voxel-wise OOD signal (higher = less familiar)."""

    channels: int = POSITION_CLASSES

    @staticmethod
    def error_map(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy per pixel: prediction (B, 10, H, W) logits, target (B, H, W) classes -> (B, 1, H, W)."""
        return F.cross_entropy(prediction.float(), target.long(), reduction="none").unsqueeze(1)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(prediction.float(), target.long())


def plot_intersections(short_axis: Volume, long_axis: Mapping[str, Volume | Plane], path: str, slices=None,
                       positions=None, alpha: float = 0.35, labels=None, box=None, panel_inches: float = 3.2,
                       dpi: int = 80) -> str:
    """A picture of the long-axis planes' lines over short-axis slices (for a person to check).

    ``long_axis`` maps names to long-axis images or planes (point, normal). ``positions``, a (X, Y, Z) class
    map such as :func:`long_axis_positions` returns, is overlaid semi-transparently (background left clear),
    with each tile's class number at its centre. ``labels``, a (X, Y, Z) label map in canonical values (the
    ground truth or a prediction), adds the outlines of LV, MYO and RV so a person can see what the lines
    cross. ``box`` (x0, x1, y0, y1), in voxels, zooms every panel onto that window (default: the whole slice);
    ``panel_inches`` and ``dpi`` set the size of each panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    slices = list(range(short_axis.array.shape[2])) if slices is None else list(slices)
    distances = {name: signed_distance_to_plane(short_axis, _named_plane(name, v)) for name, v in long_axis.items()}
    colours = dict(zip(long_axis, ["#ff3b30", "#34c759", "#0a84ff", "#ffcc00"]))
    maps = {}
    for what, array in (("position map", positions), ("label map", labels)):
        if array is not None:
            array = array.cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
            if array.shape != short_axis.array.shape[:3]:
                raise ValueError(f"{short_axis.path}: {what} shape {array.shape} does not match the stack "
                                 f"{short_axis.array.shape[:3]}")
        maps[what] = array
    positions, labels = maps["position map"], maps["label map"]
    tiles = ListedColormap(plt.get_cmap("tab10").colors[:POSITION_CLASSES - 1])
    outlines = {"LV": (1, "#ffea00"), "MYO": (2, "#a0a0a0"), "RV": (3, "#00e5ff")}  # canonical label values
    cols = min(4, len(slices))
    rows = -(-len(slices) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel_inches * cols, panel_inches * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, z in zip(axes.ravel(), slices):
        ax.imshow(short_axis.array[:, :, z].T, cmap="gray", origin="lower", interpolation="nearest")
        if positions is not None:
            tile = positions[:, :, z].T
            ax.imshow(np.ma.masked_equal(tile, 0), cmap=tiles, vmin=0.5, vmax=POSITION_CLASSES - 0.5, alpha=alpha,
                      origin="lower", interpolation="nearest")
            for label in np.unique(tile[tile > 0]):
                ys, xs = np.nonzero(tile == label)
                ax.text(xs.mean(), ys.mean(), str(label), color="white", fontsize=7, ha="center", va="center")
        if labels is not None:
            for value, colour in outlines.values():
                if (labels[:, :, z] == value).any():
                    ax.contour((labels[:, :, z] == value).T.astype(np.float32), levels=[0.5], colors=[colour],
                               linewidths=0.8)
        for name, d in distances.items():
            if d[:, :, z].min() < 0 < d[:, :, z].max():
                ax.contour(d[:, :, z].T, levels=[0.0], colors=[colours[name]], linewidths=1.2)
        if box is not None:
            ax.set_xlim(box[0], box[1])
            ax.set_ylim(box[2], box[3])
        ax.set_title(f"slice {z}", fontsize=9)
    handles = [plt.Line2D([], [], color=colours[n], label=n) for n in long_axis]
    if labels is not None:
        handles += [plt.Line2D([], [], color=colour, lw=0.8, label=name) for name, (_, colour) in outlines.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
