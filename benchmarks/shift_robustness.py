"""Segmentation under the shift suite: mean Dice per shift and severity, several weights side by side.

Every weights file, at every number of test-time views (``--views``), runs through the bundle's segmenter on
the same cases: the test half of the held-out ACDC fold (``--split``), clean and under each shift at each
severity, with the same realisation per case as the OOD benchmark. Prints one table, a column per weights
file and number of views: mean Dice and, in brackets, the share of cases below Dice 0.8.

    python benchmarks/shift_robustness.py --weights old.pt bundles/cmr_seg_ood/models/model.pt --severities 4 5
    python benchmarks/shift_robustness.py --views 1 4 --severities 4 5 --phases ED
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from monai.bundle import ConfigParser
from tqdm import tqdm

from cmr_ood.data.manifests import default_data_root, load_manifest, ood_split
from cmr_ood.ood.evaluate import mean_dice, shift_suite_cases
from cmr_ood.ood.shifts import SHIFTS

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "cmr_seg_ood"


def segmenter_for(weights: str, views: int = 1):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "inference.json"))
    parser.update({"bundle_root": str(BUNDLE), "checkpoint": str(weights), "test_time_views": views})
    return parser.get_parsed_content("segmenter")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", nargs="+", default=[str(BUNDLE / "models" / "model.pt")])
    ap.add_argument("--manifest", default=str(ROOT / "data_manifests" / "acdc.json"))
    ap.add_argument("--data_root", default=None)
    ap.add_argument("--split", choices=("test", "calibration"), default="test")
    ap.add_argument("--shifts", nargs="+", default=list(SHIFTS))
    ap.add_argument("--severities", type=int, nargs="+", default=[3, 5])
    ap.add_argument("--phases", nargs="+", default=None, help="e.g. ED (default: both)")
    ap.add_argument("--views", type=int, nargs="+", default=[1], help="numbers of test-time views, each a column")
    ap.add_argument("--json_out", default=None, help="per-case Dice of every column")
    args = ap.parse_args(argv)
    data_root = Path(args.data_root) if args.data_root else default_data_root()
    dice: dict[str, dict[str, float]] = {}  # column -> case -> Dice
    groups: dict[str, str] = {}  # case -> "clean" or "shift@severity"
    subjects = ood_split(load_manifest(args.manifest), args.split)
    cases = list(shift_suite_cases(args.manifest, data_root, subjects, args.shifts, args.severities, None, args.phases))
    names = {w: Path(w).name if len({Path(v).name for v in args.weights}) == len(args.weights) else w for w in args.weights}
    columns = {(w, v): names[w] + (f" x{v} views" if len(args.views) > 1 else "") for w in args.weights for v in args.views}
    for (weights, views), column in columns.items():
        segmenter = segmenter_for(weights, views)
        dice[column] = {}
        for case_id, _, shift, severity, load in tqdm(cases, desc=column, unit="case"):
            image, labels = load()
            dice[column][case_id] = mean_dice(segmenter.segment(image), labels.array)
            groups[case_id] = "clean" if shift is None else f"{shift}@{severity}"
    print("| cases | n | " + " | ".join(columns.values()) + " |\n|---|---|" + "---|" * len(columns))
    for group in dict.fromkeys(groups.values()):
        ids = [c for c, g in groups.items() if g == group]
        cells = []
        for column in columns.values():
            values = np.array([dice[column][c] for c in ids], dtype=float)
            values = values[~np.isnan(values)]
            cells.append(f"{values.mean():.3f} ({np.mean(values < 0.8):.0%})" if len(values) else "")
        print(f"| {group} | {len(ids)} | " + " | ".join(cells) + " |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"groups": groups, "dice": dice}, allow_nan=True) + "\n")


if __name__ == "__main__":
    main()
