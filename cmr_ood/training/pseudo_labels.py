"""Quality-aware pseudo-labels for semi-supervised training (Ruijsink et al. 2020, semiQCSeg; DESIGN.md, method 5).

A model trained on the labelled subjects segments the ED and ES volumes of unlabelled subjects; a subject's
pair becomes a pseudo-label only if it passes the gate:

  ``none``     every subject that could be read and segmented (plain pseudo-labelling)
  ``qc``       its quality control passes (:func:`cmr_ood.qc.checks.check_subject`: anatomy of both frames,
               volumes, ejection fractions, myocardial mass, ED above ES)
  ``qc+ood``   it passes QC and the model's OOD scorer flags neither frame

:func:`pseudo_label` writes the kept pairs as NIfTI on the image grid (``labels/``), a derived manifest
(``manifest.json``, the source manifest's format) and a log (``pseudo_labels.json``: every subject's verdict,
the reasons of the rejected ones, QC measurements and OOD scores). Training on the derived manifest
(``--data.manifest``) sees the labelled subjects' real labels and the kept pseudo-labels; SliceDataModule counts
pseudo-labelled entries as labelled even under a ``low_label`` subset, so the low-label recipe runs unchanged.

    log = pseudo_label("runs/x/model.pt", recipe["model"]["network"], "data_manifests/acdc.json", unlabelled,
                       "runs/x/pseudo", gate="qc", labelled=subset, train_folds=[1, 2, 3, 4])
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from monai.utils.module import locate
from tqdm import tqdm

from cmr_ood.data.io import CaseError, Volume, write_like
from cmr_ood.data.manifests import default_data_root, load_manifest, read_entry, select, write_json
from cmr_ood.inference import Segmenter
from cmr_ood.ood.calibrate import calibrate
from cmr_ood.ood.scorer import OODScorer, file_digest
from cmr_ood.qc.checks import PlausibilityLimits, check_subject

GATES = ("none", "qc", "qc+ood")
PHASES = ("ED", "ES")
INFERENCE_CONFIG = Path(__file__).resolve().parents[2] / "bundles" / "cmr_seg_ood" / "configs" / "inference.json"
MANIFEST_FILE = "manifest.json"
LOG_FILE = "pseudo_labels.json"
LABELS_DIR = "labels"


def build_network(network) -> torch.nn.Module:
    """A network module as it is, or built from a training recipe's ``{class_path, init_args}``."""
    if isinstance(network, torch.nn.Module):
        return network
    if not isinstance(network, dict) or "class_path" not in network:
        raise ValueError(f"network: give a torch module or a config {{'class_path': ..., 'init_args': {{...}}}}, not {network!r}")
    return locate(network["class_path"])(**dict(network.get("init_args") or {}))


def bundle_segmenter(checkpoint, network, device="cpu", config=INFERENCE_CONFIG) -> Segmenter:
    """``checkpoint``'s weights in ``network`` with the bundle's preprocessing, inferer and postprocessing, so
    that pseudo-labels are made exactly as the bundle segments."""
    parser = ConfigParser()
    parser.read_config(str(config))
    parts = {key: parser.get_parsed_content(key) for key in ("inferer", "preprocessing", "postprocessing")}
    return Segmenter(build_network(network), checkpoint=str(checkpoint), device=device, **parts)


def gate_scorer(config=INFERENCE_CONFIG) -> OODScorer:
    """An unfitted scorer for the bundle's default OOD score: the single-pass detectors that score needs (and
    the one behind the uncertainty map), nothing that needs a proxy head the network might lack."""
    parser = ConfigParser()
    parser.read_config(str(config))
    default, combinations, ood = parser["ood_default"], parser["ood_combinations"], parser["ood"]
    combination = {default: combinations[default]} if default in combinations else {}
    needed = set(combination[default]["scores"]) if combination else {default}
    detectors = [d for d in parser.get_parsed_content("ood_single_pass")
                 if d.name == ood["uncertainty_map"] or needed & set(d.score_names)]
    return OODScorer(detectors, combination, default=default, uncertainty_map=ood["uncertainty_map"], tpr=ood["tpr"])


def fit_gate_scorer(segmenter: Segmenter, scorer: OODScorer, manifest, labelled, state, data_root=None) -> dict:
    """Calibrate ``scorer`` for the segmenter's weights on the labelled subjects alone (no held-out data):
    detector statistics from half of them, temperature and thresholds from the other half (every other
    subject, sorted). The model was trained on all of them, so their scores run lower than those of unseen
    in-distribution cases: the thresholds are strict and the gate errs towards rejecting. Writes the state,
    the subset's manifest and the calibration summary beside ``state``; returns the summary."""
    labelled = sorted(set(labelled))
    if len(labelled) < 2:
        raise ValueError(f"fitting the OOD gate needs at least two labelled subjects, got {labelled}")
    content = load_manifest(manifest)
    entries = select(content, subjects=labelled)
    missing = sorted(set(labelled) - {e["subject"] for e in entries if e.get("label")})
    if missing:
        raise ValueError(f"{manifest}: no labelled entries for the labelled subjects {missing}")
    subset = Path(state).parent / "labelled_subjects.json"
    write_json({**content, "training": entries}, subset)
    return calibrate(segmenter, scorer, str(subset), str(state), data_root=data_root, fit_folds=None,
                     validation=labelled[::2], report_dir=str(Path(state).parent), overwrite=True)


def _finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None  # JSON has no NaN or infinity


def judge_subject(segmenter: Segmenter, entries: dict[str, dict], data_root, gate: str, scorer: OODScorer | None = None,
                  limits: PlausibilityLimits = PlausibilityLimits()) -> tuple[dict, dict[str, Volume], dict]:
    """Segment one subject's ED and ES volumes and apply the gate: its log record (``kept``, ``reasons`` for a
    rejection, QC verdict and measurements, OOD scores), its volumes and its labels by phase."""
    missing = [p for p in PHASES if p not in entries]
    if missing:
        return {"kept": False, "reasons": [f"no {' or '.join(missing)} volume in the manifest"]}, {}, {}
    volumes, labels, ood = {}, {}, {}
    for phase in PHASES:
        volumes[phase] = read_entry(entries[phase], data_root, labels=False)[0]
        if gate == "qc+ood":
            labels[phase], scores, _ = segmenter.segment_and_score(volumes[phase], scorer)
            value, flagged = scorer.decide(scores)
            ood[phase] = {"score": _finite(value), "flagged": flagged}
        else:
            labels[phase] = segmenter.segment(volumes[phase])
    record = {"kept": False, "reasons": [], "ood": ood}
    try:
        qc = check_subject(labels["ED"], labels["ES"], spacing=volumes["ED"].spacing, limits=limits)
        record.update(qc_passed=qc.passed, qc_failed=qc.failed, measurements={k: _finite(v) for k, v in qc.measurements.items()})
    except ValueError as e:  # nothing to measure (no LV in either frame)
        record.update(qc_passed=False, qc_failed=[str(e)], measurements={})
    if gate != "none":
        record["reasons"] += record["qc_failed"]
    if gate == "qc+ood":
        threshold = scorer.thresholds[scorer.default]
        record["reasons"] += [f"{phase}: OOD score {scorer.default} {'inf' if v['score'] is None else format(v['score'], '.4g')} "
                              f"above its threshold {threshold:.4g}" for phase, v in ood.items() if v["flagged"]]
    record["kept"] = not record["reasons"]
    return record, volumes, labels


def pseudo_label(checkpoint, network, manifest, subjects, out_dir, gate: str = "qc", scorer: OODScorer | None = None, *,
                 labelled=(), train_folds=None, data_root=None, device="cpu", overwrite: bool = False,
                 limits: PlausibilityLimits = PlausibilityLimits()) -> dict:
    """Pseudo-label the ED/ES pairs of the unlabelled ``subjects`` with ``checkpoint`` (weights of ``network``:
    a module or a recipe's ``{class_path, init_args}``) and keep those that pass ``gate`` (one of
    :data:`GATES`; ``qc+ood`` needs ``scorer``, fitted for these weights, e.g. by :func:`fit_gate_scorer`).

    Writes under ``out_dir``: the kept labels (canonical values, on each image's grid, named after the model's
    digest so that a training cache never mistakes one model's pseudo-labels for another's), the derived
    manifest (entries of the training folds ``train_folds``, default every entry: the ``labelled`` subjects keep
    their real labels, kept subjects get their pseudo-labels, every other subject is unlabelled; entries of other
    folds are left as they are, for evaluation) and the log, which is returned. A subject that cannot be read
    or segmented is rejected with the error as its reason; the others go on.
    """
    if gate not in GATES:
        raise ValueError(f"unknown gate '{gate}': choose among {GATES}")
    if gate == "qc+ood":
        if scorer is None:
            raise ValueError("gate 'qc+ood' needs a fitted OOD scorer for these weights (see fit_gate_scorer)")
        scorer.check_model(checkpoint)
    out_dir = Path(out_dir).resolve()
    if (out_dir / MANIFEST_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out_dir / MANIFEST_FILE}: exists already (not overwritten; set overwrite to replace it)")
    content = load_manifest(manifest)
    training = select(content, folds=train_folds)
    subjects, labelled = list(dict.fromkeys(subjects)), set(labelled)
    unknown = sorted(set(subjects) - {e["subject"] for e in training})
    if unknown:
        raise ValueError(f"{manifest}: subjects {unknown[:10]} are not in the training folds {train_folds}")
    if labelled & set(subjects):
        raise ValueError(f"subjects {sorted(labelled & set(subjects))[:10]} are both labelled and to be pseudo-labelled")
    data_root = Path(data_root) if data_root else default_data_root()
    segmenter = bundle_segmenter(checkpoint, network, device)
    digest = file_digest(checkpoint)
    start = time.perf_counter()
    records, written = {}, {}
    for subject in tqdm(subjects, desc=f"pseudo-labelling (gate {gate})", unit="subject"):
        entries = {e.get("phase"): e for e in training if e["subject"] == subject}
        try:
            record, volumes, labels = judge_subject(segmenter, entries, data_root, gate, scorer, limits)
        except (CaseError, ValueError) as e:  # one unreadable subject must not stop the others
            record, volumes, labels = {"kept": False, "reasons": [f"{type(e).__name__}: {e}"]}, {}, {}
        if record["kept"]:
            for phase in PHASES:
                relative = f"{LABELS_DIR}/{subject}_{phase}_pseudo-{digest[:12]}.nii.gz"
                write_like(labels[phase].astype("uint8"), volumes[phase], out_dir / relative, overwrite=True)
                written[subject, phase] = relative
        records[subject] = record
    stale = set((out_dir / LABELS_DIR).glob("*_pseudo-*.nii.gz")) - {out_dir / p for p in written.values()}
    for path in stale:  # an earlier run's pseudo-labels in this folder
        path.unlink()

    kept = sorted(s for s, r in records.items() if r["kept"])
    in_training = {e["subject"] for e in training}
    entries = []
    for entry in content["training"]:
        entry = dict(entry)
        key = (entry["subject"], entry.get("phase"))
        if key in written:
            entry.update(label=written[key], label_root=str(out_dir), label_map="canonical", pseudo_label=True)
        elif entry["subject"] in in_training and entry["subject"] not in labelled:
            entry.pop("label", None)
        entries.append(entry)
    source = {"source_manifest": str(manifest), "checkpoint": str(checkpoint), "model_digest": digest, "gate": gate,
              "train_folds": train_folds, "labelled": sorted(labelled), "pseudo_labelled": kept, "log": LOG_FILE}
    derived = {k: v for k, v in content.items() if k != "training"}
    write_json({**derived, "pseudo_labels": source, "training": entries}, out_dir / MANIFEST_FILE)
    log = {**source, "manifest": str(out_dir / MANIFEST_FILE), "subjects_considered": len(subjects), "kept": kept,
           "rejected": {s: r["reasons"] for s, r in records.items() if not r["kept"]},
           "ood_score": scorer.default if gate == "qc+ood" else None,
           "ood_threshold": scorer.thresholds[scorer.default] if gate == "qc+ood" else None,
           "seconds": round(time.perf_counter() - start, 1), "subjects": records}
    write_json(log, out_dir / LOG_FILE)
    print(f"pseudo-labels (gate {gate}): {len(kept)} of {len(subjects)} subjects kept; {out_dir / MANIFEST_FILE}")
    return log
