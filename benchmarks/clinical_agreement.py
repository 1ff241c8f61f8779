"""Clinical measurements of the shipped bundle's segmentations against the ground truth on the held-out
ACDC fold, and the plausibility quality control of the predictions (DESIGN.md, method 5).

Segments every ED and ES volume of the fold with the bundle's segmenter (``configs/inference.json``),
computes LV/RV EDV, ESV, EF and myocardial mass per subject from the prediction and from the ground truth,
and prints the Bland-Altman bias, 95 % limits of agreement and the mean absolute error per measurement;
then the QC verdict of every prediction (which subjects fail and why), how the EF error differs between
the subjects QC passes and those it flags, and the QC verdicts of the ground truth (false alarms).
The same split for the bundle's subject verdict with the trust flag (``subject_qc``: the checks, and no
volume of the pair flagged by the shipped OOD state), over the fold and over its test half alone (the
state's threshold was fitted on the calibration half's volumes). The QC classifier's part of the verdict
is left out: it was fitted on these volumes. Writes a Bland-Altman figure and a JSON of all figures.

    python benchmarks/clinical_agreement.py --out clinical_agreement.json   # about 5 minutes on a CPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
from monai.bundle import ConfigParser

from cmr_ood.data.io import atomic_write
from cmr_ood.data.manifests import default_data_root, load_manifest, ood_split, read_entry, select
from cmr_ood.inference import doubts
from cmr_ood.qc.agreement import CLINICAL_MEASUREMENTS, agreement, plot_bland_altman
from cmr_ood.qc.checks import check_subject
from cmr_ood.qc.measurements import subject_measurements

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "cmr_seg_ood"
#: Measurements in the table and the JSON (the figure shows CLINICAL_MEASUREMENTS).
REPORTED = ("lv_edv_ml", "lv_esv_ml", "lv_sv_ml", "lv_ef_pct", "rv_edv_ml", "rv_esv_ml", "rv_ef_pct", "myo_mass_g")


def build_segmenter_and_scorer(bundle: Path, test_time_views: int | None = None):
    """The bundle's segmenter and OOD scorer (with its shipped state), exactly as its inference config defines them
    (``test_time_views``: instead of the config's default for this device)."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    if test_time_views is not None:
        parser["test_time_views"] = test_time_views
    return parser.get_parsed_content("segmenter"), parser.get_parsed_content("ood")


def ef_error_by_verdict(rows: list[dict], passed_key: str, ef_error: dict[str, float]) -> dict:
    """LV EF mean absolute error of the subjects whose ``passed_key`` verdict passes and of those it flags."""
    split = {}
    for verdict, group in (("passed", [r for r in rows if r[passed_key]]), ("flagged", [r for r in rows if not r[passed_key]])):
        errors = [ef_error[r["subject"]] for r in group]
        split[verdict] = {"n": len(group), "lv_ef_mae": round(float(np.mean(errors)), 2) if errors else None,
                          "worst": max(errors, default=None), "subjects": [r["subject"] for r in group]}
        if errors:
            print(f"  LV EF MAE of the {verdict} subjects: {np.mean(errors):.2f} % (n={len(errors)}, worst {max(errors):.1f})")
    return split


def subjects_of(entries: list[dict]) -> dict[str, dict[str, dict]]:
    """subject -> phase -> manifest entry, for the subjects with a labelled ED and ES."""
    pairs = {}
    for e in entries:
        if e.get("label"):
            pairs.setdefault(e["subject"], {})[e["phase"]] = e
    return {s: p for s, p in sorted(pairs.items()) if {"ED", "ES"} <= set(p)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default=str(REPO / "data_manifests" / "acdc.json"))
    parser.add_argument("--data-root", default=str(default_data_root()))
    parser.add_argument("--fold", type=int, default=0, help="the held-out fold (the manifest's test_fold)")
    parser.add_argument("--subjects", nargs="*", default=None, help="only these subjects of the fold")
    parser.add_argument("--bundle", default=str(BUNDLE))
    parser.add_argument("--figure", default=str(BUNDLE / "docs" / "bland_altman.png"))
    parser.add_argument("--out", required=True, help="JSON of the figures")
    parser.add_argument("--test_time_views", type=int, default=None, help="instead of the bundle's default for this device")
    args = parser.parse_args()

    manifest = load_manifest(args.manifest)
    pairs = subjects_of(select(manifest, folds=[args.fold], subjects=args.subjects))
    if not pairs:
        raise SystemExit(f"{args.manifest}: no subject with labelled ED and ES in fold {args.fold}")
    segmenter, scorer = build_segmenter_and_scorer(Path(args.bundle), args.test_time_views)
    test_half = set(ood_split(manifest, "test")) if args.fold == manifest.get("test_fold") else set()
    rows, seconds = [], 0.0
    for i, (subject, phases) in enumerate(pairs.items(), 1):
        (ed_image, ed_true), (es_image, es_true) = (read_entry(phases[p], args.data_root) for p in ("ED", "ES"))
        if not np.allclose(ed_image.spacing, es_image.spacing):
            raise SystemExit(f"{subject}: ED spacing {ed_image.spacing} differs from ES spacing {es_image.spacing}")
        spacing = ed_image.spacing
        start = time.perf_counter()
        (ed_pred, ed_scores, _), (es_pred, es_scores, _) = (segmenter.segment_and_score(v, scorer) for v in (ed_image, es_image))
        seconds += time.perf_counter() - start
        qc = check_subject(ed_pred, es_pred, spacing=spacing)
        flags = {}
        for phase, scores in (("ED", ed_scores), ("ES", es_scores)):
            default, flagged = scorer.decide(scores)
            flags[phase] = {"ood_flag": flagged, "default_score": None if math.isinf(default) else default, "default_detector": scorer.default}
        untrusted = [f"{phase}: {reason}" for phase in ("ED", "ES") for reason in doubts(flags[phase])]
        rows.append({
            "subject": subject, "group": phases["ED"].get("group"), "test_half": subject in test_half,
            "predicted": subject_measurements(ed_pred, es_pred, spacing=spacing).scalars(),
            "reference": subject_measurements(ed_true.array, es_true.array, spacing=spacing).scalars(),
            "qc_passed": qc.passed, "qc_failed": qc.failed,
            "default_scores": {phase: flags[phase]["default_score"] for phase in flags},
            "subject_qc_passed": qc.passed and not untrusted, "subject_qc_failed": qc.failed + untrusted,
            "reference_qc_failed": check_subject(ed_true.array, es_true.array, spacing=spacing).failed,
        })
        print(f"[{i}/{len(pairs)}] {subject}: LV EF {rows[-1]['predicted']['lv_ef_pct']:.1f} "
              f"(true {rows[-1]['reference']['lv_ef_pct']:.1f}), QC {'pass' if qc.passed else 'FAIL'}"
              f"{'; ' + '; '.join(untrusted) if untrusted else ''}", flush=True)

    predicted, reference = [r["predicted"] for r in rows], [r["reference"] for r in rows]
    table = agreement(predicted, reference, keys=REPORTED)
    print(f"\n{len(rows)} subjects of fold {args.fold} ({2 * len(rows)} volumes, {seconds:.0f} s of segmentation)")
    print(f"{'measurement':<14}{'bias':>9}{'sd':>8}{'LoA low':>10}{'LoA high':>10}{'MAE':>8}")
    for key, a in table.items():
        print(f"{key:<14}{a.bias:>9.2f}{a.sd:>8.2f}{a.lower:>10.2f}{a.upper:>10.2f}{a.mae:>8.2f}")

    flagged = [r for r in rows if not r["qc_passed"]]
    print(f"\nQC of the predictions: {len(rows) - len(flagged)} pass, {len(flagged)} flagged")
    for r in flagged:
        print(f"  {r['subject']} ({r['group']}): " + "; ".join(r["qc_failed"]))
    ef_error = {r["subject"]: abs(r["predicted"]["lv_ef_pct"] - r["reference"]["lv_ef_pct"]) for r in rows}
    by_verdict = ef_error_by_verdict(rows, "qc_passed", ef_error)
    trusted = [r for r in rows if r["subject_qc_passed"]]
    print(f"\nSubject verdict with the trust flag (checks, and neither volume flagged as out of distribution): "
          f"{len(trusted)} pass, {len(rows) - len(trusted)} flagged")
    for r in rows:
        if not r["subject_qc_passed"]:
            print(f"  {r['subject']} ({r['group']}): " + "; ".join(r["subject_qc_failed"]))
    by_subject_verdict = {"fold": ef_error_by_verdict(rows, "subject_qc_passed", ef_error)}
    if test_half:
        print(f"  test half only ({len(test_half)} subjects; the threshold was fitted on the other half's volumes):")
        by_subject_verdict["test_half"] = ef_error_by_verdict([r for r in rows if r["test_half"]], "subject_qc_passed", ef_error)
    false_alarms = [r["subject"] for r in rows if r["reference_qc_failed"]]
    print(f"QC of the ground truth: {len(rows) - len(false_alarms)} pass, {len(false_alarms)} flagged {false_alarms}")

    names = [r["subject"].replace("patient", "p") for r in rows]
    plot_bland_altman(predicted, reference, args.figure, keys=tuple(CLINICAL_MEASUREMENTS), names=names,
                      flagged=[not r["subject_qc_passed"] for r in rows],
                      title=f"Bundle segmentation vs ground truth, ACDC held-out fold {args.fold} ({len(rows)} subjects)")
    print(f"wrote {os.path.abspath(args.figure)} ({os.path.getsize(args.figure) / 1024:.0f} KB)")

    result = {
        "manifest": args.manifest, "fold": args.fold, "bundle": args.bundle, "subjects": len(rows),
        "segmentation_seconds": round(seconds, 1),
        "agreement": {k: a.as_dict() for k, a in table.items()},
        "qc": {"flagged": {r["subject"]: r["qc_failed"] for r in flagged}, "lv_ef_error_by_verdict": by_verdict,
               "lv_ef_error_by_subject_verdict": by_subject_verdict,
               "ground_truth_flagged": {r["subject"]: r["reference_qc_failed"] for r in rows if r["reference_qc_failed"]}},
        "per_subject": rows,
    }
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"), overwrite=True)
    print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
