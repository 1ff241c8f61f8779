"""The learned QC classifier: cross-validated AUROC for failed segmentations, against single-score baselines.

Cases: every subject of the held-out ACDC fold (the shipped model never trained on them), ED and ES as
they are, and the ED volume under every shift of the suite at the chosen severities (``--shift_phases``).
Each case is segmented and scored by the bundle (``cmr_ood.ood.evaluate.score_cases``: kept in
``OUT/scores.jsonl``, a stopped run resumes). A case failed when its mean Dice is below 0.8 or its LV
volume is off by more than 15 % (:func:`cmr_ood.qc.classifier.failed`). The classifier is evaluated out
of fold, with folds by subject, over several seeds of the fold assignment, its L2 weight chosen by an
inner cross-validation on the training folds only; ``--save`` then fits it on every case and writes it
for the bundle (``models/qc_classifier.pt``).

    python benchmarks/qc_classifier.py --out qc_study --severities 4
    python benchmarks/qc_classifier.py --out qc_study --severities 4 --save bundles/cmr_seg_ood/models/qc_classifier.pt
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from cmr_ood.data.manifests import default_data_root, load_manifest, ood_split
from cmr_ood.ood.evaluate import score_cases
from cmr_ood.ood.metrics import detection_metrics
from cmr_ood.ood.scorer import file_digest
from cmr_ood.qc.classifier import QCClassifier, choose_l2, cross_validate, default_features, failed, feature_matrix

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "cmr_seg_ood"


def auroc(scores, failures) -> float:
    scores = torch.as_tensor(scores, dtype=torch.float64)
    failures = torch.as_tensor(failures)
    return detection_metrics(scores[~failures], scores[failures])["auroc"]


def plot_roc(curves: dict[str, torch.Tensor], failures: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchmetrics.functional.classification import binary_roc

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for name, scores in curves.items():
        finite = torch.nan_to_num(scores.double(), posinf=1e30, neginf=-1e30)
        fpr, tpr, _ = binary_roc(torch.argsort(torch.argsort(finite)).double() / max(len(finite) - 1, 1), failures.long())
        ax.plot(fpr, tpr, label=f"{name} ({auroc(scores, failures):.3f})")
    ax.plot([0, 1], [0, 1], color="gray", linewidth=0.8, linestyle="--")
    ax.set(xlabel="false positive rate (good segmentations flagged)", ylabel="true positive rate (failures caught)",
           title="Failed segmentations, held-out ACDC + shifts")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data_root", default=None)
    ap.add_argument("--severities", type=int, nargs="+", default=[4])
    ap.add_argument("--shift_phases", nargs="+", default=["ED"], help="phases whose volumes are shifted (unshifted: ED and ES)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the assignment of subjects to folds")
    ap.add_argument("--no_scoring", action="store_true", help="use the cases already in OUT/scores.jsonl")
    ap.add_argument("--save", default=None, help="fit on every case and write the classifier here")
    ap.add_argument("--plot", default=None, help="ROC figure (default OUT/qc_roc.png)")
    args = ap.parse_args(argv)
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "inference.json"), str(BUNDLE / "configs" / "evaluate_ood.json")])
    parser.update({"bundle_root": str(BUNDLE)})
    scorer = parser.get_parsed_content("ood")
    if args.no_scoring:
        import json

        rows = [json.loads(line) for line in (Path(args.out) / "scores.jsonl").read_text().splitlines() if line.strip()]
    else:
        manifest, segmenter = load_manifest(parser["manifest"]), parser.get_parsed_content("segmenter")
        where = dict(data_root=str(Path(args.data_root) if args.data_root else default_data_root()),
                     subjects=ood_split(manifest, "calibration") + ood_split(manifest, "test"))
        rows = score_cases(segmenter, scorer, parser["manifest"], args.out, shifts=[], severities=[], **where)
        rows += score_cases(segmenter, scorer, parser["manifest"], args.out, shifts=parser["shifts"], severities=args.severities,
                            phases=args.shift_phases, **where)
    rows = list({r["case"]: r for r in rows}.values())  # both calls return the unshifted volumes of --shift_phases
    rows = [r for r in rows if "qc" in r and r.get("volumes_true")]
    failures = torch.tensor([failed(r) for r in rows])
    print(f"{len(rows)} cases ({sum(r['kind'] == 'id' for r in rows)} unshifted) of "
          f"{len({r['case'].split('|')[0].split('/')[-2] for r in rows})} subjects; {int(failures.sum())} failed segmentations")

    everything = default_features(rows)
    qc_only = [f for f in everything if f.startswith("qc:")]
    scores_only = [f for f in everything if f.startswith("score:")]
    variants = {"classifier: checks + measurements + OOD scores": everything, "classifier: checks + measurements": qc_only,
                "classifier: OOD scores": scores_only}
    print("| predictor | AUROC (out of fold) |\n|---|---|")
    curves = {}
    for name, features in variants.items():
        values = [auroc(cross_validate(rows, features, args.folds, seed), failures) for seed in args.seeds]
        spread = f" +- {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        print(f"| {name} | {statistics.mean(values):.3f}{spread} (seeds {args.seeds}) |")
        curves[name.split(": ")[1]] = cross_validate(rows, features, args.folds, args.seeds[0])
    rule = torch.tensor([sum(1 - v for k, v in r["qc"].items() if k.startswith("pass/")) for r in rows])
    baselines = {"plausibility checks failed (count)": rule,
                 "entropy_fg": feature_matrix(rows, ["score:entropy_fg"])[:, 0],
                 f"default OOD score ({scorer.default})": torch.tensor([r["scores"][scorer.default] for r in rows])}
    for name, values in baselines.items():
        print(f"| {name} | {auroc(values, failures):.3f} (no fitting) |")
    curves["entropy_fg"] = baselines["entropy_fg"]
    curves["checks failed"] = rule.double()
    plot = Path(args.plot or Path(args.out) / "qc_roc.png")
    plot_roc(curves, failures, plot)
    print(f"ROC curves: {plot.resolve()}")
    if args.save:
        l2 = choose_l2(rows, everything, args.folds, args.seeds[0])
        clf = QCClassifier(everything, l2, ood_state_digest=file_digest(scorer.state_path)).fit(rows)
        print(f"L2 weight chosen by cross-validation on all cases: {l2:g}")
        print("strongest evidence (weight of the standardised feature, + = toward failure):")
        for feature, weight in clf.evidence()[:8]:
            print(f"  {weight:+.2f}  {feature}")
        print(f"classifier fitted on all {len(rows)} cases: {clf.save(args.save)}")


if __name__ == "__main__":
    main()
