"""Picture of the shift suite: one real ACDC mid-ventricular slice under every shift and severity.

Each shift is applied to the whole stack (as in the evaluation), then the mid-ventricular slice is shown
after the network's own intensity normalisation (what the model sees): local artefacts in a window around
the heart, the bias field and the geometric shifts over the whole field of view. Cropped stacks are put back
in the original frame through their affines (black outside), so a wrong affine would show as a misplaced
crop; the geometric rows carry the shifted labels' outlines (LV red, myocardium green, RV blue).

    python benchmarks/shift_suite_figure.py                       # patient001 ED, writes the bundle's picture
    python benchmarks/shift_suite_figure.py --subject patient042 --phase ES --out /tmp/shifts.png
"""

from __future__ import annotations

import argparse
import io
from dataclasses import replace
from pathlib import Path

import matplotlib
import matplotlib.colors

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from cmr_ood.data.io import atomic_write  # noqa: E402
from cmr_ood.data.manifests import default_data_root, load_manifest, read_entry, select  # noqa: E402
from cmr_ood.data.preprocess import Preprocessing, normalize_intensity  # noqa: E402
from cmr_ood.ood.shifts import SEVERITIES, SEVERITY_TABLE, SHIFTS, apply_shift, embed  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bundles" / "cmr_seg_ood" / "docs" / "shift_suite.png"
#: Rows shown over the whole field of view: geometric shifts, and the bias field (a variation across the
#: field of view that a window around the heart hides). The others are local: a window shows them finer.
WHOLE_VIEW = {"fov_crop", "rotation", "bias_field"}
LABEL_COLOURS = {2: "tab:green", 1: "tab:red", 3: "tab:blue"}  # MYO first: its inner outline is the LV's


def mid_ventricular_slice(labels: np.ndarray) -> int:
    """The middle of the slices that hold LV blood pool (canonical label 1)."""
    slices = np.flatnonzero((labels == 1).any(axis=(0, 1)))
    if slices.size == 0:
        raise ValueError("the label volume has no LV blood pool (label 1): no mid-ventricular slice")
    return int(slices[slices.size // 2])


def as_seen(array: np.ndarray) -> np.ndarray:
    """The stack after the preprocessing's intensity normalisation (percentile clip, [0, 1])."""
    pre = Preprocessing()
    return normalize_intensity(torch.from_numpy(array), pre.lower_percentile, pre.upper_percentile).numpy()


def heart_window(labels_slice: np.ndarray, fraction: float = 0.55) -> tuple[slice, slice]:
    """A square window of ``fraction`` of the shorter in-plane axis around the LV centroid (inside the image)."""
    size = int(fraction * min(labels_slice.shape))
    window = []
    for axis, n in enumerate(labels_slice.shape):
        centre = np.flatnonzero((labels_slice == 1).any(axis=1 - axis)).mean()
        start = int(np.clip(round(centre - size / 2), 0, n - size))
        window.append(slice(start, start + size))
    return tuple(window)


def tile_title(name: str, severity: int, in_distribution: bool) -> str:
    values = "/".join(f"{values[severity - 1]:g}" for values in SEVERITY_TABLE[name].values())
    return f"{severity}: {values}" + (" (in dist.)" if in_distribution else "")


def draw(image, labels, seed: int) -> plt.Figure:
    """Rows: shifts; columns: the original and severities 1-5. Local artefacts are shown in a window around
    the heart at about the native resolution (fine detail stays visible), the others over the whole field
    of view; geometric shifts with the shifted labels' outlines."""
    z = mid_ventricular_slice(labels.array)
    window = heart_window(labels.array[..., z])
    columns = len(SEVERITIES) + 1
    fig, axes = plt.subplots(len(SHIFTS), columns, figsize=(1.45 * columns, 1.55 * len(SHIFTS)))
    original = as_seen(image.array)[..., z]
    for row, (name, shift) in enumerate(SHIFTS.items()):
        tiles = [(original, labels.array[..., z], "original")]
        for severity in SEVERITIES:
            shifted, shifted_labels = apply_shift(image, labels, name, severity, seed=seed)
            seen, outline = as_seen(shifted.array), shifted_labels.array
            if shifted.array.shape != image.array.shape:  # a crop: back into the original frame
                seen, outline = embed(replace(shifted, array=seen), image), embed(shifted_labels, labels)
            tiles.append((seen[..., z], outline[..., z], tile_title(name, severity, severity in shift.in_distribution)))
        for col, (tile, outline, title) in enumerate(tiles):
            ax = axes[row, col]
            if name not in WHOLE_VIEW:
                tile = tile[window]
            ax.imshow(tile.T, cmap="gray", vmin=0.0, vmax=1.0, origin="lower", interpolation="antialiased")
            if shift.geometric:
                for value, colour in LABEL_COLOURS.items():
                    if (outline == value).any():
                        ax.contour((outline == value).T.astype(float), levels=[0.5], colors=colour, linewidths=0.9)
            ax.set_title(title, fontsize=7, pad=2)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(f"{name}\n({'/'.join(SEVERITY_TABLE[name])})", fontsize=7)
    fig.suptitle(f"shift suite on {Path(image.path).name}, slice {z}, seed {seed}, after the network's intensity normalisation\n"
                 "bias field, crop and rotation: whole field of view; other rows: window around the heart", fontsize=8)
    fig.tight_layout(pad=0.3, h_pad=0.5, w_pad=0.2, rect=(0, 0, 1, 0.975))
    return fig


def save_png(fig: plt.Figure, path: Path, dpi: int, greys: int = 125) -> str:
    """PNG with a fixed palette (``greys`` grey levels and the outline colours, no dithering): a fraction
    of RGBA's size, and the thin outlines keep their colours."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    levels = np.linspace(0, 255, greys).round().astype(int)
    colours = [tuple(int(round(255 * c)) for c in matplotlib.colors.to_rgb(name)) for name in LABEL_COLOURS.values()]
    entries = [(v, v, v) for v in levels] + colours
    palette = Image.new("P", (1, 1))
    palette.putpalette([c for rgb in entries + entries[-1:] * (256 - len(entries)) for c in rgb])
    picture = Image.open(buffer).convert("RGB").quantize(palette=palette, dither=Image.Dither.NONE)
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG", optimize=True), overwrite=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=REPO / "data_manifests" / "acdc.json")
    parser.add_argument("--data-root", type=Path, default=None, help="default: $CMR_OOD_DATA or ../shared/data")
    parser.add_argument("--subject", default="patient001")
    parser.add_argument("--phase", default="ED", choices=("ED", "ES"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dpi", type=int, default=85)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    entries = select(load_manifest(args.manifest), subjects=[args.subject], phases=[args.phase])
    if not entries:
        raise SystemExit(f"{args.manifest}: no entry for {args.subject} {args.phase}")
    image, labels = read_entry(entries[0], args.data_root or default_data_root())
    if labels is None:
        raise SystemExit(f"{args.manifest}: {args.subject} {args.phase} has no labels (needed to find the mid-ventricular slice)")
    path = save_png(draw(image, labels, args.seed), args.out, args.dpi)
    print(f"{path} ({Path(path).stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
