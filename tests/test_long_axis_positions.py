"""Anatomical position maps from long-axis view planes: known geometry, invariances, the proxy loss, real data."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DATA_ROOT, requires_data

from cmr_ood.data.io import Volume
from cmr_ood.ssl import LongAxisPosition, long_axis_positions
from cmr_ood.ssl.positions import plot_intersections, position_grid_planes

SPACING = (1.5, 1.5, 8.0)


def rotation(a: float, b: float, c: float) -> np.ndarray:
    """A rotation from three angles (degrees) about z, y and x."""
    a, b, c = np.deg2rad([a, b, c])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


def oblique_stack(shape=(40, 34, 5), angles=(30.0, -40.0, 25.0), origin=(-71.3, 18.9, 102.4)) -> Volume:
    """An empty short-axis stack with a double-oblique, translated affine."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(*angles) * np.asarray(SPACING)
    affine[:3, 3] = origin
    return Volume(np.zeros(shape, np.float32), SPACING, affine, "sa.nii.gz")


def world(volume: Volume, ijk) -> np.ndarray:
    return volume.affine[:3, :3] @ np.asarray(ijk, dtype=np.float64) + volume.affine[:3, 3]


def long_axis_image(point, row, col, name="la.nii.gz", size=64, spacing=1.7) -> Volume:
    """A single-slice long-axis image whose plane holds ``point`` and the directions ``row`` and ``col``."""
    row, col = np.asarray(row, float) / np.linalg.norm(row), np.asarray(col, float) / np.linalg.norm(col)
    normal = np.cross(row, col)
    affine = np.eye(4)
    affine[:3, :3] = np.stack([row * spacing, col * spacing, normal], axis=1)
    affine[:3, 3] = np.asarray(point, float) - (row + col) * spacing * size / 2
    return Volume(np.zeros((size, size, 1), np.float32), (spacing, spacing, 1.0), affine, name)


def reoriented(volume: Volume, order=(1, 0, 2), flips=(0, 2)) -> Volume:
    """The same stack with its voxel axes permuted and flipped and the affine updated to match."""
    array = np.transpose(volume.array, order)
    affine = volume.affine.copy()
    affine[:, :3] = volume.affine[:, list(order)]
    for axis in flips:
        array = np.flip(array, axis)
        affine[:3, 3] += affine[:3, axis] * (array.shape[axis] - 1)
        affine[:3, axis] *= -1
    return Volume(np.ascontiguousarray(array), tuple(volume.spacing[a] for a in order), affine, volume.path)


def test_grid_classes_on_an_oblique_stack_with_planes_along_its_voxel_axes():
    """Planes through voxel column 20 and row 15 of a rotated stack: the expected tiles follow from the indices."""
    sa = oblique_stack()
    centre = world(sa, (20, 15, 2))
    columns, rows = sa.affine[:3, 0], sa.affine[:3, 1]
    views = {"4Ch": (centre, columns), "2Ch": (centre, rows)}  # planes i = 20 and j = 15
    band, radius = 6.0, 24.0  # 4 voxels either side of each plane, 16 voxels to the rim
    m = long_axis_positions(sa, views, band_mm=band, radius_mm=radius).numpy()
    assert m.shape == sa.array.shape and m.dtype == np.int64
    for z in range(sa.array.shape[2]):  # the grid does not depend on the slice: both planes contain the slice normal
        assert np.all(m[20 - 4:20 + 5, 15 - 4:15 + 5, z] == 5)  # the centre tile, |offset| <= 6 mm
        first = m[[10, 30], 15, z]  # across the first plane only: the band b(P1) is 0 or 2
        second = m[20, [7, 23], z]
        corners = m[[10, 10, 30, 30], [7, 23, 7, 23], z]
        assert sorted(first) == [2, 8] and sorted(second) == [4, 6] and sorted(corners) == [1, 3, 7, 9]
        # orientation: the head side of the first (more vertical) normal is band 2; the first plane here is
        # the one of the pair whose normal has the larger world z
        vertical = "4Ch" if abs(columns[2]) >= abs(rows[2]) else "2Ch"
        step = np.array([10, 0, 0]) if vertical == "4Ch" else np.array([0, 8, 0])
        base = np.array([20, 15, z])
        up, down = (base + step, base - step) if world(sa, base + step)[2] > world(sa, base - step)[2] else (base - step, base + step)
        assert m[tuple(up)] in (7, 8, 9) and m[tuple(down)] in (1, 2, 3)
    assert m[20 + 17, 15, 0] == 0 and m[20 + 16, 15, 0] != 0  # 25.5 mm from the axis is background, 24 mm is not
    assert set(np.unique(m)) == set(range(10))


def test_background_is_the_radius_around_the_line_where_non_perpendicular_planes_meet():
    sa = oblique_stack()
    centre = world(sa, (18.3, 16.7, 2.2))
    k = sa.affine[:3, 2] / np.linalg.norm(sa.affine[:3, 2])
    u = np.cross(k, sa.affine[:3, 0])
    e = sa.affine[:3, 0] / np.linalg.norm(sa.affine[:3, 0])
    tilt = 0.2 * k  # the planes' line of intersection is tilted off the slice normal
    n1 = e + tilt
    n2 = np.cos(np.deg2rad(55)) * e + np.sin(np.deg2rad(55)) * u / np.linalg.norm(u) - tilt
    m = long_axis_positions(sa, {"a": (centre, n1), "b": (centre, n2)}, band_mm=5.0, radius_mm=20.0).numpy()
    line = np.cross(n1, n2)
    line /= np.linalg.norm(line)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in sa.array.shape], indexing="ij"), -1).reshape(-1, 3)
    points = ijk @ sa.affine[:3, :3].T + sa.affine[:3, 3]
    distance = np.linalg.norm(np.cross(points - centre, line), axis=1).reshape(sa.array.shape)
    assert np.array_equal(m > 0, distance <= 20.0)
    assert 0.05 < (m > 0).mean() < 0.9


def test_map_follows_the_voxels_whatever_their_order_and_the_order_of_the_views():
    sa = oblique_stack()
    centre = world(sa, (19.4, 14.2, 2.0))
    k = np.cross(sa.affine[:3, 0], sa.affine[:3, 1])
    k /= np.linalg.norm(k)
    e, f = (sa.affine[:3, a] / np.linalg.norm(sa.affine[:3, a]) for a in (0, 1))

    def view(degrees, name, sign=1.0):  # a plane holding the slice normal, its own normal at ``degrees`` in the slice
        normal = np.cos(np.deg2rad(degrees)) * e + np.sin(np.deg2rad(degrees)) * f
        return long_axis_image(centre, np.cross(k, normal), sign * k, name)

    four, two, three = view(12.0, "4ch.nii.gz"), view(97.0, "2ch.nii.gz", -1.0), view(50.0, "3ch.nii.gz")
    reference = long_axis_positions(sa, {"4Ch": four, "2Ch": two, "3Ch": three}, band_mm=7.0, radius_mm=25.0).numpy()
    assert set(np.unique(reference)) == set(range(10))
    # the stack's voxel axes permuted and flipped, the affine updated: the same map, moved with the voxels
    for order, flips in (((1, 0, 2), (0, 2)), ((0, 1, 2), (1,)), ((1, 0, 2), ())):
        moved = reoriented(sa, order, flips)
        expected = np.transpose(reference, order)
        for axis in flips:
            expected = np.flip(expected, axis)
        assert np.array_equal(long_axis_positions(moved, {"4Ch": four, "2Ch": two, "3Ch": three}, band_mm=7.0,
                                                  radius_mm=25.0).numpy(), expected)
    # long-axis images stored with flipped axes (normals reversed) and views listed in another order
    two_flipped = reoriented(two, (1, 0, 2), ())
    four_flipped = reoriented(four, (0, 1, 2), (0,))
    shuffled = {"3Ch": three, "2Ch": two_flipped, "4Ch": four_flipped}
    assert np.array_equal(long_axis_positions(sa, shuffled, band_mm=7.0, radius_mm=25.0).numpy(), reference)
    # the 3Ch lies between the others: the most perpendicular pair (2Ch, 4Ch) spans the grid
    pair = position_grid_planes(sa, {"4Ch": four, "2Ch": two, "3Ch": three})
    assert np.allclose(pair[1][1], position_grid_planes(sa, {"4Ch": four, "2Ch": two})[1][1])


def test_a_single_view_needs_an_axis_point_and_gets_a_perpendicular_plane_through_it():
    sa = oblique_stack()
    k = np.cross(sa.affine[:3, 0], sa.affine[:3, 1])
    k /= np.linalg.norm(k)
    on_view = world(sa, (20, 15, 2))
    four = long_axis_image(on_view, np.cross(k, [0.3, 1.0, 0.4]), k, "4ch.nii.gz")
    with pytest.raises(ValueError, match=r"4ch\.nii\.gz.*axis_point"):
        long_axis_positions(sa, {"4Ch": four})
    axis_point = world(sa, (22.6, 13.1, 3.0))
    first, second = position_grid_planes(sa, {"4Ch": four}, axis_point)
    assert abs(first[1] @ second[1]) < 1e-9 and abs(second[1] @ k) < 1e-9  # perpendicular to the view, holds the normal
    assert abs(second[1] @ (axis_point - second[0])) < 1e-9
    m = long_axis_positions(sa, {"4Ch": four}, band_mm=4.0, radius_mm=30.0, axis_point=axis_point)
    # where the view's line meets the constructed plane, on every slice, is the centre tile
    foot = axis_point - (first[1] @ (axis_point - first[0])) * first[1]
    for z in range(sa.array.shape[2]):
        point = foot + (z - 3.0) * 8.0 * k
        ijk = np.linalg.solve(sa.affine[:3, :3], point - sa.affine[:3, 3])
        assert abs(ijk[2] - z) < 1e-6
        assert m[int(round(ijk[0])), int(round(ijk[1])), z] == 5
    with pytest.raises(ValueError, match="parallel to the short-axis slices"):
        long_axis_positions(sa, {"wrong view": (on_view, k)}, axis_point=axis_point)
    with pytest.raises(ValueError, match="cannot span"):
        long_axis_positions(sa, {"a": four, "b": (on_view, np.cross(four.affine[:3, 0], four.affine[:3, 1]))})


def test_position_loss_is_cross_entropy_and_smallest_for_the_right_map():
    task = LongAxisPosition()
    assert task.channels == 10
    target = torch.randint(0, 10, (3, 16, 12), generator=torch.Generator().manual_seed(0))
    right = 8.0 * F.one_hot(target, 10).permute(0, 3, 1, 2).float()
    wrong = 8.0 * F.one_hot((target + 1) % 10, 10).permute(0, 3, 1, 2).float()
    errors = task.error_map(right, target)
    assert errors.shape == (3, 1, 16, 12)
    assert task.loss(right, target) < 0.01 < task.loss(torch.zeros_like(right), target) < task.loss(wrong, target)
    assert torch.allclose(task.loss(right, target), errors.mean())
    logits = torch.randn(3, 10, 16, 12, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.allclose(task.loss(logits, target), F.cross_entropy(logits, target))
    task.loss(logits, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    half = torch.where(torch.arange(12) < 6, right, wrong)  # wrong on the right half of every image
    e = task.error_map(half, target)
    assert e[..., 6:].min() > e[..., :6].max()  # a voxel-wise signal: high exactly where the map is wrong


def test_overlay_picture_differs_from_the_plain_one(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    sa = oblique_stack(shape=(40, 34, 2))
    sa.array[:] = np.linspace(0, 1, 40)[:, None, None]
    centre = world(sa, (20, 15, 0))
    views = {"4Ch": (centre, sa.affine[:3, 0]), "2Ch": (centre, sa.affine[:3, 1])}
    m = long_axis_positions(sa, views, band_mm=6.0, radius_mm=20.0)
    plain = plot_intersections(sa, views, str(tmp_path / "plain.png"))
    overlay = plot_intersections(sa, views, str(tmp_path / "overlay.png"), positions=m)
    a, b = matplotlib.pyplot.imread(plain), matplotlib.pyplot.imread(overlay)
    assert a.shape == b.shape and np.abs(a - b).max() > 0.1
    with pytest.raises(ValueError, match="position map shape .* does not match"):
        plot_intersections(sa, views, str(tmp_path / "bad.png"), positions=m[:, :, :1])
    with pytest.raises(ValueError, match="label map shape .* does not match"):
        plot_intersections(sa, views, str(tmp_path / "bad.png"), labels=np.zeros((3, 3, 3)))


@pytest.mark.real_data
@requires_data
def test_mnms2_four_chamber_line_crosses_both_ventricles_and_tiles_them(tmp_path):
    from cmr_ood.data.io import read_image
    from cmr_ood.data.labels import LV, RV, read_labels
    from cmr_ood.ssl.positions import plane_of, signed_distance_to_plane

    folder = DATA_ROOT / "mnms2_geometry"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    sa, la = read_image(folder / "001_SA_ED.nii.gz"), read_image(folder / "001_LA_ED.nii.gz")
    labels = read_labels(str(folder / "001_SA_ED_gt.nii.gz"), "mnms", sa).array
    d = signed_distance_to_plane(sa, plane_of(la))
    both = [z for z in range(labels.shape[2]) if (labels[:, :, z] == LV).any() and (labels[:, :, z] == RV).any()]
    assert len(both) >= 5
    hits = [z for z in both if {LV, RV} <= set(np.unique(labels[:, :, z][np.abs(d[:, :, z]) <= 2.0]))]
    assert len(hits) >= 0.8 * len(both), f"the 4Ch line misses a ventricle on slices {sorted(set(both) - set(hits))}"
    # the map, with the second plane through the LV centre: LV on the axis tile, RV in one side tile of the 4Ch band
    lv = np.argwhere(labels == LV).mean(0)
    m = long_axis_positions(sa, {"4Ch": la}, axis_point=world(sa, lv)).numpy()
    assert (m[labels == LV] == 5).mean() > 0.7
    rv_in_band = m[(labels == RV) & np.isin(m, (4, 5, 6))]
    assert max((rv_in_band == 4).mean(), (rv_in_band == 6).mean()) > 0.8
    assert (m[labels > 0] > 0).mean() > 0.98  # the heart lies inside the grid
