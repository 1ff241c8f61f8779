"""How well the ACDC disease group can be estimated from the clinical measurements (``cmr_ood.qc.groups``).

The classifier is fitted on the ground-truth measurements of the training folds (1-4, 80 subjects) only.
Its L2 weight is chosen by cross-validation over those folds (leave one fold out). It is then tested on the
held-out fold 0 (20 subjects), twice: on the ground-truth measurements and on the measurements of the
shipped model's segmentations (from ``benchmarks/clinical_agreement.py --out X.json``), which is what the
bundle gives a user. Prints accuracies and the confusion matrix; ``--save`` writes the classifier for the
bundle.

    python benchmarks/clinical_agreement.py --out agreement.json
    python benchmarks/disease_groups.py --predicted agreement.json --save bundles/cmr_seg_ood/models/group_classifier.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from clinical_agreement import subjects_of
from tqdm import tqdm

from cmr_ood.data.manifests import default_data_root, load_manifest, read_entry, select
from cmr_ood.qc.groups import GROUPS, GroupClassifier
from cmr_ood.qc.measurements import subject_measurements

REPO = Path(__file__).resolve().parents[1]
L2_GRID = (0.1, 1.0, 10.0, 100.0)


def true_measurements(manifest: dict, folds, data_root) -> list[tuple[str, int, str, dict]]:
    """(subject, fold, group, measurements from its labels) of every subject of the folds."""
    out = []
    pairs = subjects_of(select(manifest, folds=folds))
    for subject, phases in tqdm(pairs.items(), desc="ground-truth measurements", unit="subject"):
        (ed_image, ed), (_, es) = (read_entry(phases[p], data_root) for p in ("ED", "ES"))
        m = subject_measurements(ed.array, es.array, spacing=ed_image.spacing)
        out.append((subject, phases["ED"]["fold"], phases["ED"]["group"], m.scalars()))
    return out


def accuracy(predicted: list[str], truth: list[str]) -> float:
    return float(np.mean([p == t for p, t in zip(predicted, truth)]))


def confusion(predicted: list[str], truth: list[str]) -> str:
    lines = ["| true \\ estimated | " + " | ".join(GROUPS) + " |", "|---" * (len(GROUPS) + 1) + "|"]
    for g in GROUPS:
        counts = [sum(p == h and t == g for p, t in zip(predicted, truth)) for h in GROUPS]
        lines.append(f"| {g} | " + " | ".join(map(str, counts)) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=str(REPO / "data_manifests" / "acdc.json"))
    ap.add_argument("--data_root", default=None)
    ap.add_argument("--predicted", default=None, help="clinical_agreement.py JSON: the model's measurements on the test fold")
    ap.add_argument("--save", default=None, help="write the classifier fitted on the training folds here")
    args = ap.parse_args(argv)
    manifest = load_manifest(args.manifest)
    data_root = args.data_root or str(default_data_root())
    test_fold = manifest.get("test_fold", 0)
    train_folds = sorted({e["fold"] for e in manifest["training"]} - {test_fold})
    train = true_measurements(manifest, train_folds, data_root)
    test = true_measurements(manifest, [test_fold], data_root)

    cv = {}
    for l2 in L2_GRID:
        hits = []
        for fold in train_folds:
            fit = [r for r in train if r[1] != fold]
            held = [r for r in train if r[1] == fold]
            clf = GroupClassifier(l2).fit([r[3] for r in fit], [r[2] for r in fit])
            hits += [p == r[2] for p, r in zip(clf.predict([r[3] for r in held]), held)]
        cv[l2] = float(np.mean(hits))
    l2 = max(sorted(cv, reverse=True), key=cv.get)  # ties: the stronger regularisation
    print("cross-validated accuracy on the training folds (ground truth), by L2 weight: "
          + ", ".join(f"{k:g}: {v:.3f}" for k, v in cv.items()) + f" -> L2 {l2:g}")
    clf = GroupClassifier(l2).fit([r[3] for r in train], [r[2] for r in train])
    truth = [r[2] for r in test]
    on_truth = clf.predict([r[3] for r in test])
    print(f"\nheld-out fold {test_fold}, ground-truth measurements: accuracy {accuracy(on_truth, truth):.2f} ({len(test)} subjects)")
    print(confusion(on_truth, truth))
    if args.predicted:
        rows = {r["subject"]: r for r in json.loads(Path(args.predicted).read_text())["per_subject"]}
        missing = [r[0] for r in test if r[0] not in rows]
        if missing:
            raise SystemExit(f"{args.predicted}: no predicted measurements for {missing}")
        on_model = clf.predict([rows[r[0]]["predicted"] for r in test])
        passed = [rows[r[0]]["qc_passed"] for r in test]
        print(f"\nheld-out fold {test_fold}, measurements of the model's segmentations: accuracy {accuracy(on_model, truth):.2f}; "
              f"on the {sum(passed)} subjects QC passes: "
              f"{accuracy([p for p, q in zip(on_model, passed) if q], [t for t, q in zip(truth, passed) if q]):.2f}")
        print(confusion(on_model, truth))
    if args.save:
        print(f"\nclassifier fitted on the {len(train)} training-fold subjects: {clf.save(args.save)}")


if __name__ == "__main__":
    main()
