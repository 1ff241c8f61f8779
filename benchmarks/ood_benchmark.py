"""The OOD benchmark: every score against every shift and severity, far-OOD images and silent failures.

Runs the bundle's ``configs/evaluate_ood.json`` (the scorer fitted by ``configs/calibrate.json``; cases:
the test half of the held-out ACDC fold, the shift suite, ../shared/data/ood_dev), prints the tables
(AUROC per score x shift@severity, FPR at 95% TPR, silent failures) and draws AUROC against severity
for a few scores. Scored cases are kept in ``OUT/scores.jsonl``: a stopped run resumes.

    python benchmarks/ood_benchmark.py --out ood_benchmark                       # single-pass scores
    python benchmarks/ood_benchmark.py --out ood_dev --split calibration --severities 3 5  # to choose the default
    python benchmarks/ood_benchmark.py --out ood_sampling --all_detectors --severities 5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from monai.bundle import ConfigParser

from cmr_ood.data.manifests import default_data_root, load_manifest, ood_split
from cmr_ood.ood.evaluate import SCORES_FILE, evaluate_ood

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cmr_seg_ood"


def mean_dice_by_group(rows: list[dict]) -> dict[str, float]:
    """Mean Dice of the shifted cases of each ``shift@severity`` group that has labels."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        if r.get("shift") and r.get("dice") is not None:
            groups.setdefault(f"{r['shift']}@{r['severity']}", []).append(r["dice"])
    return {g: sum(v) / len(v) for g, v in groups.items()}


def plot_severity(summary: dict, scores: list[str], path: Path, dice: dict[str, float] | None = None) -> None:
    """AUROC of ``scores`` against each shift by severity; with ``dice``, the shifted cases' mean Dice too
    (where detection is hard, it shows whether that matters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in summary["scores"][scores[0]] if "@" in g and not g.endswith("@all")]
    shifts = sorted({g.split("@")[0] for g in groups})
    cols = min(3, len(shifts))
    rows = -(-len(shifts) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.ravel()[len(shifts):]:
        ax.axis("off")
    for ax, shift in zip(axes.ravel(), shifts):
        severities = sorted(int(g.split("@")[1]) for g in groups if g.startswith(shift + "@"))
        for name in scores:
            ax.plot(severities, [summary["scores"][name][f"{shift}@{s}"]["auroc"] for s in severities], "o-", label=name)
        if dice:
            ax.plot(severities, [dice.get(f"{shift}@{s}", float("nan")) for s in severities], "s:", color="gray",
                    label="mean Dice of the shifted cases")
        ax.axhline(0.5, color="gray", linewidth=0.8, linestyle="--")
        ax.set(title=shift, ylim=(0, 1.02), xlabel="severity", ylabel="AUROC; Dice (grey)" if dice else "AUROC", xticks=severities)
    axes.ravel()[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data_root", default=None)
    ap.add_argument("--split", choices=("test", "calibration"), default="test",
                    help="which half of the held-out fold: 'calibration' serves to choose the default score, 'test' to report")
    ap.add_argument("--severities", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--shifts", nargs="+", default=None, help="default: the whole suite")
    ap.add_argument("--phases", nargs="+", default=None, help="e.g. ED (default: both)")
    ap.add_argument("--all_detectors", action="store_true", help="also the sampling ones (MC dropout, TTA, reconstruction)")
    ap.add_argument("--ood_state", default=str(BUNDLE / "models" / "ood_state.pt"))
    ap.add_argument("--plot", nargs="+", default=None, help="scores to draw (default: the bundle's default and entropy_fg)")
    args = ap.parse_args(argv)
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "inference.json"), str(BUNDLE / "configs" / "evaluate_ood.json")])
    parser.update({"bundle_root": str(BUNDLE), "ood_state": args.ood_state})
    if args.all_detectors:
        parser["ood_detectors"] = "$@ood_single_pass + @ood_sampling"
    data_root = Path(args.data_root) if args.data_root else default_data_root()
    scorer = parser.get_parsed_content("ood")
    plot = args.plot or list(dict.fromkeys([scorer.default, "entropy_fg"]))
    subjects = ood_split(load_manifest(parser["manifest"]), args.split)
    summary = evaluate_ood(parser.get_parsed_content("segmenter"), scorer, manifest=parser["manifest"], output_dir=args.out,
                           data_root=str(data_root), subjects=subjects, shifts=args.shifts or parser["shifts"], severities=args.severities,
                           far_ood_dir=str(data_root / "ood_dev"), phases=args.phases, plot_scores=plot)
    rows = [json.loads(line) for line in (Path(args.out) / SCORES_FILE).read_text().splitlines() if line.strip()]
    shown = [r for r in rows if r.get("severity") in args.severities and (not args.shifts or r.get("shift") in args.shifts)]
    plot_severity(summary, plot, Path(args.out) / "auroc_by_severity.png", mean_dice_by_group(shown))
    print(f"AUROC by severity: {Path(args.out).resolve() / 'auroc_by_severity.png'}")
    print(json.dumps({name: summary["scores"][name].get("far_ood", {}).get("auroc") for name in plot}))


if __name__ == "__main__":
    main()
