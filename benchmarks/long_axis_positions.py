"""Picture of the long-axis position map of the M&Ms-2 subject (ED): the 4Ch line and the 10-class map over
its short-axis slices, with the ground-truth outlines, for a person to check that the line crosses both
ventricles.

The subject has a 4Ch view only, so the second plane is constructed through the LV centre; here the LV
centre comes from the ground truth, standing in for a predicted segmentation. Prints, per slice, whether
the voxels within 2 mm of the 4Ch plane include LV and RV, and where the LV and RV fall in the map.

    python benchmarks/long_axis_positions.py            # writes bundles/cmr_seg_ood/docs/long_axis_positions.png
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from cmr_ood.data.io import read_image
from cmr_ood.data.labels import LV, RV, read_labels
from cmr_ood.data.manifests import default_data_root
from cmr_ood.ssl.positions import long_axis_positions, plane_of, plot_intersections, position_grid_planes, signed_distance_to_plane

OUTPUT = os.path.join(os.path.dirname(__file__), "..", "bundles", "cmr_seg_ood", "docs", "long_axis_positions.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(default_data_root() / "mnms2_geometry"), help="folder of the M&Ms-2 subject")
    parser.add_argument("--output", default=OUTPUT)
    parser.add_argument("--band-mm", type=float, default=20.0)
    parser.add_argument("--radius-mm", type=float, default=80.0)
    args = parser.parse_args()

    sa = read_image(os.path.join(args.data, "001_SA_ED.nii.gz"))
    la = read_image(os.path.join(args.data, "001_LA_ED.nii.gz"))
    labels = read_labels(os.path.join(args.data, "001_SA_ED_gt.nii.gz"), "mnms", sa).array
    lv_centre = sa.affine[:3, :3] @ np.argwhere(labels == LV).mean(0) + sa.affine[:3, 3]
    positions = long_axis_positions(sa, {"4Ch": la}, args.band_mm, args.radius_mm, axis_point=lv_centre).numpy()
    _, constructed = position_grid_planes(sa, {"4Ch": la}, lv_centre)

    distance = signed_distance_to_plane(sa, plane_of(la))
    heart = [z for z in range(labels.shape[2]) if (labels[:, :, z] > 0).any()]
    for z in heart:
        near = labels[:, :, z][np.abs(distance[:, :, z]) <= 2.0]
        print(f"slice {z:2d}: voxels within 2 mm of the 4Ch plane: LV {int((near == LV).sum()):3d}, RV {int((near == RV).sum()):3d}")
    for name, value in (("LV", LV), ("RV", RV)):
        counts = np.bincount(positions[labels == value], minlength=10)
        print(f"{name} voxels per class 0..9: {counts.tolist()} (most in class {int(np.argmax(counts))})")

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    inside = np.argwhere(positions > 0)  # zoom onto the grid: the heart fills the panels, the file stays small
    box = (inside[:, 0].min() - 5, inside[:, 0].max() + 5, inside[:, 1].min() - 5, inside[:, 1].max() + 5)
    plot_intersections(sa, {"4Ch": la, "constructed (through LV centre)": constructed}, args.output, slices=heart,
                       positions=positions, labels=labels, box=box, panel_inches=2.6)
    print(f"wrote {os.path.abspath(args.output)} ({os.path.getsize(args.output) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
