"""OOD evaluation (the bundle's ``configs/evaluate_ood.json``): score in-distribution test cases, the same
cases under the shift suite, and far-OOD images; then tabulate every score's detection and silent-failure
figures (:func:`cmr_ood.ood.metrics.evaluate_scores`).

Cases: the test half of the held-out ACDC fold (``ood_split`` in the manifest; the scorer was calibrated
on the other half), each under every shift at the chosen severities, and every image of a far-OOD folder.
Each scored case (its scores, Dice, the plausibility-check features of its segmentation and, where labels
exist, the true volumes) is appended to ``scores.jsonl`` as soon as it is done, so an interrupted run resumes
where it stopped; the summary, table and plots are written at the end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cmr_ood.data.io import atomic_write
from cmr_ood.data.manifests import default_data_root, discover, load_manifest, ood_split, read_entry, select
from cmr_ood.evaluation import structure_dice
from cmr_ood.inference import Segmenter, read_case
from cmr_ood.ood.metrics import evaluate_scores, plot_risk_coverage
from cmr_ood.ood.scorer import OODScorer
from cmr_ood.ood.shifts import SHIFTS, apply_shift
from cmr_ood.qc.checks import check_volume
from cmr_ood.qc.measurements import volumes

SCORES_FILE = "scores.jsonl"


def mean_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean 3D Dice over the structures present in the ground truth (NaN if none is)."""
    dice = structure_dice(pred, truth)
    return float(torch.nanmean(dice)) if not torch.isnan(dice).all() else math.nan


def shift_suite_cases(manifest: str, data_root: Path, subjects, shifts, severities, far_ood_dir, phases):
    """(case id, kind, shift, severity, loader) for every case; loaders read and shift lazily."""
    content = load_manifest(manifest)
    subjects = ood_split(content, "test") if subjects is None else subjects
    entries = [e for e in select(content, subjects=subjects, phases=phases) if e.get("label")]
    for entry in entries:
        yield entry["image"], "id", None, 0, lambda e=entry: read_entry(e, data_root)
    for name in shifts:
        if name not in SHIFTS:
            raise ValueError(f"unknown shift '{name}'; known shifts: {', '.join(SHIFTS)}")
        for severity in severities:
            for i, entry in enumerate(entries):
                load = lambda e=entry, n=name, s=severity, seed=i: apply_shift(*read_entry(e, data_root), n, s, seed)  # noqa: E731
                yield f"{entry['image']}|{name}|{severity}", "shift", name, severity, load
    if far_ood_dir:
        for case in discover(far_ood_dir):
            yield case["image"], "far", "far_ood", 0, lambda c=case: (read_case(c), None)


def score_cases(segmenter: Segmenter, scorer: OODScorer, manifest: str, output_dir: str, data_root: str | None = None,
                subjects: list[str] | None = None, shifts=tuple(SHIFTS), severities=(1, 3, 5), far_ood_dir: str | None = None,
                phases: list[str] | None = None) -> list[dict]:
    """Score every case (resuming from ``scores.jsonl``) and return the rows."""
    scorer.check_model(segmenter.checkpoint)
    data_root = Path(data_root) if data_root else default_data_root()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / SCORES_FILE
    cases = list(shift_suite_cases(manifest, data_root, subjects, shifts, severities, far_ood_dir, phases))
    wanted = {c[0] for c in cases}
    earlier = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    rows = [r for r in earlier if r["case"] in wanted]  # a resumed run may have asked for more cases before
    for r in rows:  # combinations are functions of the stored scores: recomputed, so new ones need no rerun
        if "scores" in r:
            r["scores"].update(scorer.combine(r["scores"]))
    done = {r["case"] for r in rows}
    todo = [c for c in cases if c[0] not in done]
    with log.open("a") as f:
        for case_id, kind, shift, severity, load in tqdm(todo, desc="scoring cases", unit="case"):
            row = {"case": case_id, "kind": kind, "shift": shift, "severity": severity}
            try:
                image, labels = load()
                pred, scores, _ = segmenter.segment_and_score(image, scorer)
                row.update(dice=mean_dice(pred, labels.array) if labels is not None else None, scores=scores,
                           qc=check_volume(pred, image.spacing).features())
                if labels is not None:  # the clinical error of the case, for quality-control studies
                    row["volumes_true"] = volumes(labels.array, labels.spacing)
            except Exception as e:  # a case that cannot be read or scored is recorded, the run goes on
                row.update(error=f"{type(e).__name__}: {e}")
            f.write(json.dumps(row, allow_nan=True) + "\n")
            f.flush()
            rows.append(row)
    return rows


def summarize(rows: list[dict], scorer: OODScorer, failure_dice: float = 0.8) -> dict:
    """Per score: figures against every shift x severity, far-OOD, all shifted cases, and silent failures
    (ID test + shifted cases with a Dice)."""
    ok = [r for r in rows if "scores" in r]
    ident = [r for r in ok if r["kind"] == "id"]
    if not ident:
        raise ValueError("no in-distribution test case was scored")
    groups = {}
    for r in ok:
        if r["kind"] == "shift":
            groups.setdefault(f"{r['shift']}@{r['severity']}", []).append(r)
            groups.setdefault(f"{r['shift']}@all", []).append(r)
        elif r["kind"] == "far":
            groups.setdefault("far_ood", []).append(r)
    shifted = [r for r in ok if r["kind"] == "shift"]
    summary = {"num_cases": len(rows), "num_errors": len(rows) - len(ok), "default": scorer.default, "scores": {}}
    for name in ident[0]["scores"]:
        def column(rs, key="scores"):
            return [r[key][name] if key == "scores" else (math.nan if r.get("dice") is None else r["dice"]) for r in rs]
        block = {}
        reference = scorer.validation_scores.get(name)
        threshold = scorer.thresholds.get(name, math.nan)
        for group, rs in groups.items():
            block[group] = evaluate_scores(column(ident), column(rs), threshold, column(ident, "dice"), column(rs, "dice"),
                                           reference, failure_dice=failure_dice)
        if shifted:
            block["silent_failures"] = evaluate_scores(column(ident), column(shifted), threshold, column(ident, "dice"),
                                                       column(shifted, "dice"), reference, failure_dice=failure_dice)
        summary["scores"][name] = block
    return summary


def table(summary: dict, metric: str = "auroc", groups: list[str] | None = None, scores: list[str] | None = None) -> str:
    """A markdown table: scores x case groups, one metric."""
    names = scores or list(summary["scores"])
    first = summary["scores"][names[0]]
    groups = groups or [g for g in first if g != "silent_failures"]
    lines = ["| score | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for name in names:
        cells = [summary["scores"][name].get(g, {}).get(metric, math.nan) for g in groups]
        lines.append(f"| {name} | " + " | ".join("" if c is None or math.isnan(c) else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def silent_failure_table(summary: dict, scores: list[str] | None = None) -> str:
    keys = ("failure_auroc", "aurc", "aurc_optimal", "coverage", "dice_accepted", "dice_rejected", "case_ece")
    lines = ["| score | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name in scores or list(summary["scores"]):
        row = summary["scores"][name].get("silent_failures", {})
        lines.append(f"| {name} | " + " | ".join(f"{row.get(k, math.nan):.3f}" for k in keys) + " |")
    return "\n".join(lines)


def evaluate_ood(segmenter: Segmenter, scorer: OODScorer, manifest: str, output_dir: str, data_root: str | None = None,
                 subjects: list[str] | None = None, shifts=tuple(SHIFTS), severities=(1, 3, 5), far_ood_dir: str | None = None,
                 phases: list[str] | None = None, plot_scores: list[str] | None = None) -> dict:
    """Score all cases, then write ``ood_summary.json``, ``ood_tables.md`` and a risk-coverage plot."""
    rows = score_cases(segmenter, scorer, manifest, output_dir, data_root, subjects, shifts, severities, far_ood_dir, phases)
    summary = summarize(rows, scorer)
    out = Path(output_dir)
    atomic_write(out / "ood_summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1) + "\n"), overwrite=True)
    text = "\n\n".join([
        "## AUROC, in-distribution test cases against each group", table(summary, "auroc"),
        "## FPR at 95% TPR", table(summary, "fpr95"),
        "## Silent failures (Dice < 0.8) over in-distribution and shifted cases", silent_failure_table(summary),
    ])
    atomic_write(out / "ood_tables.md", lambda tmp: Path(tmp).write_text(text + "\n"), overwrite=True)
    with_dice = [r for r in rows if "scores" in r and r.get("dice") is not None and not math.isnan(r["dice"])]
    names = plot_scores or [scorer.default]
    if with_dice:
        plot_risk_coverage({n: [r["scores"][n] for r in with_dice] for n in names}, [r["dice"] for r in with_dice],
                           out / "risk_coverage.png", title="ID + shifted test cases", overwrite=True)
    print(text)
    print(f"results in {out.resolve()}")
    return summary
