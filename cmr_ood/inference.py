"""Inference: segment volumes and write per-case outputs and one ``cases.json`` for a run.

A run owns its output folder while it works (:class:`OutputLock`), appends every finished case to
``cases.partial.jsonl`` (flushed to disk case by case) and writes ``cases.json`` at the end. A run that
was killed is resumed with ``resume=True``: the finished cases whose outputs exist are kept, the others
are done again. Reading the next cases (``prefetch``) and finishing the cases the network is done with
(connected components, QC, writing: ``workers``) run in background threads beside the network; the time of
each stage of a case is measured by :mod:`cmr_ood.timing`.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import queue
import socket
import threading
import time
import traceback
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent
from tqdm import tqdm

from cmr_ood.data.io import CaseError, Volume, atomic_write, nifti_stem, read_dicom_series, read_nifti, remove_partial_files, write_like
from cmr_ood.data.labels import STRUCTURES, most_probable
from cmr_ood.data.manifests import discover, load_manifest, path_in_root, read_entry
from cmr_ood.data.preprocess import Preprocessing, SliceGeometry, dihedral, dihedral_inverse
from cmr_ood.networks import load_weights
from cmr_ood.ood.base import CaseOutputs
from cmr_ood.ood.scorer import OODScorer
from cmr_ood.qc.checks import QCReport, check_subject, check_volume
from cmr_ood.qc.classifier import LIKELY_FAILED, QCClassifier
from cmr_ood.qc.groups import GroupClassifier
from cmr_ood.qc.measurements import SubjectMeasurements, measurements, subject_measurements
from cmr_ood.timing import StageTimer, stage

CASES_FILE = "cases.json"
#: The same results as a table, one row per case, for spreadsheets (``cases.json`` holds everything).
TABLE_FILE = "cases.csv"
#: The progress of a run: one JSON line per case started (``{"started": case id, "new_outputs": [...]}``)
#: and per case finished (its record); removed once ``cases.json`` is written.
PROGRESS_FILE = "cases.partial.jsonl"
LOCK_FILE = ".cmr_ood.lock"


class OutputDirError(RuntimeError):
    """The output folder cannot be used: it cannot be created or written, or another run holds it."""


@dataclass
class Postprocessing:
    """Keep the heart, then one piece of each structure: the largest connected component of LV, MYO and
    RV taken together, then the largest component of each structure within it.

    The first step matters on wide fields of view: a false-positive blob elsewhere in the body can be
    larger than a true structure, never larger than the whole heart."""

    keep_largest_component: bool = True

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        if not self.keep_largest_component:
            return labels
        structures = list(STRUCTURES.values())
        heart = KeepLargestConnectedComponent(applied_labels=structures, is_onehot=False, independent=False)(labels[None])[0]
        found = torch.nonzero(heart)
        if not len(found):
            return heart
        # every structure voxel now lies in the heart's bounding box: label the structures there only
        box = tuple(slice(int(a), int(b) + 1) for a, b in zip(found.min(0).values, found.max(0).values))
        each = KeepLargestConnectedComponent(applied_labels=structures, is_onehot=False, independent=True)
        heart[box] = each(heart[box][None])[0]
        return heart


class _AllOutputs(torch.nn.Module):
    """The network as the inferer sees it when every head and some feature maps are wanted: a tuple,
    full-resolution outputs first (MONAI's sliding window reuses its weight map resized for a
    lower-resolution output on the outputs after it)."""

    def __init__(self, network: torch.nn.Module, taps: tuple[str, ...]):
        super().__init__()
        self.network, self.taps = network, tuple(taps)
        self.keys = (*network.heads.keys(), *self.taps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.network.forward_heads(x, self.taps)
        return tuple(out[k] for k in self.keys)


#: The precisions the network can run at in inference ("auto": bfloat16 where the device computes in it natively).
PRECISIONS = ("float32", "bfloat16", "auto")


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (a CUDA GPU from Ampere on, a CPU with AVX512-BF16 or
    AMX): elsewhere bfloat16 is emulated, and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    # torch names these CPU features only privately: without them, assume none
    return device.type == "cpu" and any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


class Segmenter:
    """Network + preprocessing + inferer + postprocessing: a volume in, labels on its own grid out.

    ``views`` > 1 segments each slice also rotated and flipped (the first ``views`` of the 8 elements of the
    dihedral group, the identity first; the network was trained with any orientation) and takes the labels
    from the mean of their probabilities: ``views`` times the network's time. OOD scores always come from the
    identity view alone, the pass the scorer was calibrated on. ``batch_slices``: the most slices of several
    stacks (frames, cases) that :meth:`network_passes` sends through the network in one call (1: one stack a
    call; larger batches pay on a GPU, not on a CPU, where the network is as fast per slice at any batch).
    ``precision="bfloat16"`` runs the network under bfloat16 autocast, ``"auto"`` where :attr:`device` has it natively
    (about twice as fast on such a CPU, with the same labels to within rounding and OOD scores within a tenth
    of their in-distribution spread: benchmarks/inference_precision.py)."""

    def __init__(self, network: torch.nn.Module, inferer, preprocessing: Preprocessing | None = None,
                 postprocessing: Postprocessing | None = None, checkpoint: str | None = None, device="cpu",
                 views: int = 1, batch_slices: int = 1, precision: str = "float32"):
        if not isinstance(views, int) or not 1 <= views <= 8:
            raise ValueError(f"views must be a whole number from 1 (the slices as they are) to 8, not {views!r}")
        if not isinstance(batch_slices, int) or batch_slices < 1:
            raise ValueError(f"batch_slices must be a whole number of slices >= 1, not {batch_slices!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.views, self.batch_slices = views, batch_slices
        self.device = torch.device(device)
        self.checkpoint = checkpoint
        if checkpoint is not None:
            load_weights(network, checkpoint)
        self.network = network.to(self.device).eval()
        self.precision = precision
        self.inferer = inferer
        self.preprocessing = preprocessing or Preprocessing()
        self.postprocessing = postprocessing or Postprocessing()

    @property
    def network_precision(self) -> str:
        """The precision the network runs at on :attr:`device` ("auto" resolved there: a distributed run moves
        the segmenter to its GPU after building it)."""
        if self.precision == "auto":
            return "bfloat16" if native_bfloat16(self.device) else "float32"
        return self.precision

    def _infer(self, slices: torch.Tensor, network: torch.nn.Module | None = None):
        """The inferer over preprocessed ``slices`` with ``network`` (default: the segmentation network), under
        bfloat16 autocast when the network runs in bfloat16 (the sliding window still sums in float32)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.network_precision == "bfloat16"):
            return self.inferer(slices, self.network if network is None else network)

    @torch.no_grad()
    def probabilities(self, volume: Volume, frame: int | None = None) -> torch.Tensor:
        """Class probabilities (C, X, Y, Z) on the input grid of one stack (or one frame of a cine)."""
        with stage("preprocess"):
            slices, geometry = self.preprocessing(volume, frame, self.device)
        with stage("network"):
            probabilities = self._view_mean(slices, torch.softmax(self._infer(slices).float(), dim=1))
        with stage("postprocess"):
            return self.preprocessing.invert(probabilities, geometry)

    @torch.no_grad()
    def _view_mean(self, slices: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
        """The mean of the identity view's class ``probabilities`` of preprocessed ``slices`` and those of the
        other ``views`` (each mapped back to the identity's orientation)."""
        if self.views == 1:
            return probabilities
        total = probabilities.clone()
        for k in range(1, self.views):
            view = torch.softmax(self._infer(dihedral(slices, k)).float(), dim=1)
            total += dihedral_inverse(view, k)
        return total / self.views

    @torch.no_grad()
    def run_network(self, slices: torch.Tensor, taps: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Every head's output (``seg`` logits, proxy heads) and the feature maps ``taps`` of preprocessed
        slices (N, 1, H, W), through the same inferer as segmentation."""
        wrapper = _AllOutputs(self.network, taps)
        outputs = self._infer(slices, wrapper)
        return {k: v.float() for k, v in zip(wrapper.keys, outputs)}

    def outputs(self, volume: Volume, frame: int | None = None, taps: tuple[str, ...] = ()) -> tuple[CaseOutputs, SliceGeometry]:
        """One pass over a stack with everything the OOD detectors read, and the stack's geometry."""
        with stage("preprocess"):
            slices, geometry = self.preprocessing(volume, frame, self.device)
        with stage("network"):
            return self._case_outputs(slices, self.run_network(slices, taps), taps), geometry

    def _case_outputs(self, slices: torch.Tensor, out: dict[str, torch.Tensor], taps: tuple[str, ...]) -> CaseOutputs:
        return CaseOutputs(images=slices, logits=out["seg"], heads={k: v for k, v in out.items() if k != "seg" and k not in taps},
                           features={k: out[k] for k in taps}, forward=lambda x: self.run_network(x, taps), network=self.network)

    @staticmethod
    def raw_labels(probabilities: torch.Tensor) -> np.ndarray:
        """uint8 labels (the most probable class) of class probabilities on the input grid, not postprocessed."""
        with stage("postprocess"):
            return most_probable(probabilities, 0).to(torch.uint8).cpu().numpy()

    def postprocess(self, labels: np.ndarray) -> np.ndarray:
        """The postprocessing of uint8 labels, stack by stack (a cine: frame by frame). Host work: MONAI's
        connected components run on the CPU (without cuCIM), so batch runs do this in worker threads."""
        with stage("postprocess", sync=False):
            stacks = [labels[..., t] for t in range(labels.shape[3])] if labels.ndim == 4 else [labels]
            out = [self.postprocessing(torch.from_numpy(np.ascontiguousarray(x))).numpy() for x in stacks]
            return np.stack(out, axis=-1) if labels.ndim == 4 else out[0]

    def network_pass(self, volume: Volume, scorer: OODScorer | None = None) -> tuple[np.ndarray, dict[str, float] | None, np.ndarray | None]:
        """Everything that needs the network: :meth:`raw_labels` on the input grid ((X, Y, Z), or (X, Y, Z, T) for a
        cine: every frame) and, with a ``scorer``, the OOD scores and the scorer's voxel-wise uncertainty map
        (float32, on the input grid) from the same pass; a cine is scored frame by frame and keeps each
        score's worst frame. Without a scorer, scores and map are None."""
        return self.network_passes([volume], scorer)[0]

    @torch.no_grad()
    def network_passes(self, volumes: list[Volume], scorer: OODScorer | None = None) -> list[tuple]:
        """:meth:`network_pass` of several volumes, their stacks of the same slice size batched together through
        the network (at most :attr:`batch_slices` slices a call): many small cases fill a GPU as one large one.
        The results are those of one volume at a time (up to rounding in the network)."""
        stacks = [(v, t) for v in volumes for t in (range(v.array.shape[3]) if v.is_cine else [None])]
        with stage("preprocess"):
            prepared = [self.preprocessing(v, t, self.device) for v, t in stacks]
        taps = scorer.taps if scorer else ()
        labels, maps, scores = [None] * len(stacks), [None] * len(stacks), [None] * len(stacks)
        for members in self._batches([slices for slices, _ in prepared]):
            batch = torch.cat([prepared[i][0] for i in members])
            with stage("network"):
                out = self.run_network(batch, taps) if scorer else {"seg": self._infer(batch).float()}
                out["probabilities"] = self._view_mean(batch, torch.softmax(out["seg"], dim=1))  # the other views batched too
            split = [torch.split(v, [len(prepared[i][0]) for i in members]) for v in out.values()]
            for i, parts in zip(members, zip(*split)):
                (slices, geometry), stack_out = prepared[i], dict(zip(out, parts))
                with stage("postprocess"):
                    labels[i] = self.raw_labels(self.preprocessing.invert(stack_out.pop("probabilities"), geometry))
                if scorer is not None:
                    with stage("ood"):
                        case = self._case_outputs(slices, stack_out, taps)
                        maps[i] = self.preprocessing.invert(scorer.uncertainty(case)[:, None], geometry)[0].cpu().numpy().astype(np.float32)
                        scores[i] = scorer.score(case)
        results, first = [], 0
        for v in volumes:
            frames = slice(first, first := first + (v.array.shape[3] if v.is_cine else 1))
            whole = (lambda parts: np.stack(parts, axis=-1)) if v.is_cine else (lambda parts: parts[0])
            if scorer is None:
                results.append((whole(labels[frames]), None, None))
            else:
                results.append((whole(labels[frames]), _worst_frame(scores[frames]), whole(maps[frames])))
        return results

    def _batches(self, stacks: list[torch.Tensor]) -> list[list[int]]:
        """The stacks (their indices) that go through the network together: the same slice size, at most
        :attr:`batch_slices` slices in all (a larger stack alone)."""
        batches, by_size = [], {}
        for i, slices in enumerate(stacks):
            members, count = by_size.get(slices.shape[1:], ([], 0))
            if members and count + len(slices) > self.batch_slices:
                batches.append(members)
                members, count = [], 0
            by_size[slices.shape[1:]] = (members + [i], count + len(slices))
        return batches + [members for members, _ in by_size.values()]

    def segment(self, volume: Volume) -> np.ndarray:
        """uint8 canonical labels on the input grid: (X, Y, Z), or (X, Y, Z, T) for a cine (every frame)."""
        return self.postprocess(self.network_pass(volume)[0])

    def segment_and_score(self, volume: Volume, scorer: OODScorer) -> tuple[np.ndarray, dict[str, float], np.ndarray]:
        """Labels, OOD scores and the scorer's uncertainty map from one network pass per stack (:meth:`network_pass`)."""
        labels, scores, uncertainty = self.network_pass(volume, scorer)
        return self.postprocess(labels), scores, uncertainty


def _worst_frame(frame_scores: list[dict[str, float]]) -> dict[str, float]:
    """Each score's largest value over the frames of a cine (a NaN frame never wins)."""
    worst = {}
    for scores in frame_scores:
        for name, value in scores.items():
            worst[name] = max(worst.get(name, -math.inf), value)
    return worst


def case_id(case: dict) -> str:
    """What identifies a case, and its record, within a run: its image, and the DICOM series or the frame
    of a cine that it names."""
    parts = [str(case["image"])]
    if case.get("series_uid"):
        parts.append(f"series={case['series_uid']}")
    if case.get("frame_index") is not None:
        parts.append(f"frame={case['frame_index']}")
    return "|".join(parts)


def _manifest_case(entry, root: Path) -> dict:
    if not isinstance(entry, dict) or not entry.get("image"):
        return {"image": str(entry), "relative": "", "error": "manifest entry names no 'image'"}
    try:
        image = path_in_root(entry["image"], root)
    except CaseError as e:
        return {**entry, "image": str(entry["image"]), "relative": "", "error": e.problem}
    return {**entry, "image": str(image), "relative": os.path.relpath(image, root)}


def _cases(dataset_dir=None, manifest=None, data_root=None) -> list[dict]:
    """The cases of a run, in order: every image and DICOM series under ``dataset_dir`` (each series of a
    folder is a case), or every entry of a manifest (paths inside ``data_root``, by default the manifest's
    folder). ``image`` is the path to read, ``relative`` where the outputs go under the output folder; a
    case that cannot be run (its path leaves the data root, it repeats an earlier case) carries ``error``."""
    if manifest is not None:
        root = Path(data_root) if data_root else Path(manifest).parent
        cases = [_manifest_case(e, root) for e in load_manifest(manifest)["training"]]
    else:
        cases = discover(dataset_dir)
        for c in cases:
            c["relative"] = os.path.relpath(c["image"], dataset_dir)
    series_per_folder = Counter(c["image"] for c in cases if "dicom_files" in c)
    seen = set()
    for c in cases:
        c["several_series"] = series_per_folder[c["image"]] > 1
        if case_id(c) in seen and "error" not in c:
            c["error"] = "repeats an earlier case of this run (same image, series and frame)"
        seen.add(case_id(c))
    return cases


def output_paths(case: dict, output_dir: Path, scored: bool) -> dict[str, Path]:
    """``<output_dir>/<input's relative folder>/<input name>_seg.nii.gz`` (and ``_uncertainty.nii.gz`` when
    scored). A DICOM series is named after its folder, plus the end of its UID where the folder holds
    several series or a manifest names the series; one frame of a cine, after the frame."""
    rel = Path(case["relative"])
    dicom = "dicom_files" in case or case.get("series_uid")
    name = rel.name if dicom else nifti_stem(rel)
    if case.get("several_series") or (case.get("series_uid") and "dicom_files" not in case):
        name += f"_{case['series_uid'][-8:]}"
    if case.get("frame_index") is not None:
        name += f"_frame{int(case['frame_index']):02d}"
    paths = {"segmentation": output_dir / rel.parent / f"{name}_seg.nii.gz"}
    if scored:
        paths["uncertainty"] = output_dir / rel.parent / f"{name}_uncertainty.nii.gz"
    return paths


def read_case(case: dict) -> Volume:
    if "dicom_files" in case:
        return read_dicom_series(case["dicom_files"], case["image"])
    return read_entry(case, labels=False)[0]


def _json_score(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no infinity; null = no heart found


def _record(case: dict, **fields) -> dict:
    record = {"image": case["image"], **{k: case[k] for k in ("subject", "phase", "series_uid", "frame_index") if case.get(k) is not None}}
    return {**record, "status": "ok", "error": None, "outputs": {}, "measurements": None, **fields}


def _function(m) -> dict:
    return {k: v for k, v in m.as_dict().items() if not k.endswith("_areas_mm2")}


def doubts(record: dict) -> list[str]:
    """Why a segmented volume should not be trusted beyond its plausibility checks: its OOD flag, and a QC
    classifier that finds a failure more likely than not. A subject's function inherits them from its volumes."""
    reasons = []
    if record.get("ood_flag"):
        score = record.get("default_score")
        reasons.append("no heart found" if score is None else
                       f"flagged as out of distribution ({record.get('default_detector', 'default score')} {score:.2f})")
    probability = (record.get("qc") or {}).get("failure_probability")
    if probability is not None and probability >= LIKELY_FAILED:
        reasons.append(f"segmentation likely failed (QC classifier: failure probability {probability:.2f})")
    return reasons


def add_subject_results(records: list[dict], group_classifier: GroupClassifier | None = None) -> None:
    """Where a run holds both the ED and the ES volume of a subject (manifest entries with ``subject`` and
    ``phase``), give both records the subject's ``cardiac_function`` (EDV, ESV, SV, EF of both ventricles,
    myocardial mass) and ``subject_qc``: the anatomy of both phases, the function checks (ED above ES, EF in
    range) and the :func:`doubts` of either volume, so that a function computed from an untrusted segmentation
    does not pass. With a ``group_classifier``, every record with a cardiac function (these, and cines) also
    gets its ``group_estimate``."""
    pairs: dict[str, dict[str, dict]] = {}
    for r in records:
        if r["status"] == "ok" and r.get("subject") and r.get("phase") in ("ED", "ES") and r.get("frame_index") is None:
            pairs.setdefault(str(r["subject"]), {})[r["phase"]] = r
    for pair in pairs.values():
        if len(pair) != 2:
            continue
        try:
            ed, es = (read_nifti(pair[phase]["outputs"]["segmentation"], dtype=np.uint8) for phase in ("ED", "ES"))
            if ed.array.shape != es.array.shape:
                raise ValueError(f"the ED and ES images differ in shape ({ed.array.shape} and {es.array.shape})")
            m = subject_measurements(ed.array, es.array, spacing=ed.spacing)
            failed = check_subject(ed.array, es.array, spacing=ed.spacing).failed
            failed += [f"{phase}: {reason}" for phase in ("ED", "ES") for reason in doubts(pair[phase])]
            results = {"cardiac_function": _function(m), "subject_qc": {"passed": not failed, "failed": failed}}
        except (CaseError, ValueError) as e:  # the volumes themselves are fine: only the subject's results are missing
            results = {"cardiac_function": None, "subject_qc": {"passed": False, "failed": [f"no subject-level results: {e}"]}}
        for record in pair.values():
            record.update(results)
    if group_classifier is not None:
        for r in records:
            if r.get("cardiac_function"):
                r["group_estimate"] = group_classifier.predict_one(r["cardiac_function"])


def table_row(record: dict) -> dict:
    """A record as one flat row of ``cases.csv``: the case, its verdicts, the volume's measurements (a cine's
    per-frame curves stay in ``cases.json``) and, where known, the subject's cardiac function and verdict."""
    qc, outputs = record.get("qc") or {}, record.get("outputs") or {}
    measured = {k: v for k, v in (record.get("measurements") or {}).items() if not isinstance(v, list)}
    function, verdict = record.get("cardiac_function") or {}, record.get("subject_qc") or {}
    return {
        "image": record.get("image"), "subject": record.get("subject"), "phase": record.get("phase"),
        "frame_index": record.get("frame_index"), "status": record.get("status"), "error": record.get("error"),
        "ood_flag": record.get("ood_flag"), "default_detector": record.get("default_detector"),
        "default_score": record.get("default_score"), "qc_passed": qc.get("passed"),
        "failure_probability": qc.get("failure_probability"), "qc_failed": "; ".join(qc.get("failed") or []),
        **{k: measured.get(k) for k in ("lv_volume_ml", "rv_volume_ml", "myo_volume_ml", "myo_mass_g")},
        **{k: function.get(k) for k in SubjectMeasurements.SCALARS if k != "myo_mass_g"},
        "ed_myo_mass_g": function.get("myo_mass_g"),
        "subject_qc_passed": verdict.get("passed"), "subject_qc_failed": "; ".join(verdict.get("failed") or []),
        "group_estimate": (record.get("group_estimate") or {}).get("group"),
        "segmentation": outputs.get("segmentation"), "uncertainty": outputs.get("uncertainty"),
    }


def write_results(output_dir: Path, records: list[dict]) -> None:
    """``cases.json`` (every record in full) and ``cases.csv`` (:func:`table_row` of each), each written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table_row({})))
    writer.writeheader()
    writer.writerows(table_row(r) for r in records)
    atomic_write(output_dir / TABLE_FILE, lambda tmp: Path(tmp).write_text(buffer.getvalue(), encoding="utf-8"), overwrite=True)
    atomic_write(output_dir / CASES_FILE, lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1) + "\n"), overwrite=True)


def _quality(labels: np.ndarray, spacing, per_frame: dict) -> tuple[dict, dict | None, QCReport | None]:
    """The QC verdict of a segmentation (and a stack's full report, which the QC classifier reads); for a cine,
    its cardiac function: the LV and RV volume curves (ml per frame), the ED and ES frames (largest and smallest
    LV volume), EDV, ESV, SV and EF of both ventricles and the myocardial mass at ED."""
    if labels.ndim == 3:
        qc = check_volume(labels, spacing)
        return {"passed": qc.passed, "failed": qc.failed}, None, qc
    try:
        m = subject_measurements(labels, spacing=spacing)
    except ValueError as e:  # no LV in any frame: no ED or ES
        return {"passed": False, "failed": [str(e)]}, None, None
    qc = check_subject(labels[..., m.ed_frame], labels[..., m.es_frame], spacing=spacing)
    function = _function(m)
    function.update(lv_volume_curve_ml=per_frame["lv_volume_ml"], rv_volume_curve_ml=per_frame["rv_volume_ml"])
    return {"passed": qc.passed, "failed": qc.failed}, function, None


def failure_probability(classifier: QCClassifier, stacks: list[QCReport], scores: dict) -> float | None:
    """The QC classifier's probability that a segmentation failed, from the checks of its stacks (a cine: its ED
    and ES frames; the larger probability) and its OOD scores; None without stacks."""
    if not stacks:
        return None
    return round(max(classifier.predict_one(report.features(), scores) for report in stacks), 4)


def _check_outputs(case: dict, paths: dict[str, Path], overwrite: bool) -> None:
    """Refuse an invalid case of :func:`_cases`, and outputs that exist and may not be overwritten."""
    if "error" in case:
        raise CaseError(case["image"], case["error"])
    for path in paths.values():
        if path.exists() and not overwrite:
            raise CaseError(case["image"], f"output {path} exists already (not overwritten; set overwrite to replace it)")


def _host_part(segmenter: Segmenter, case: dict, volume: Volume, network_outputs: tuple, scorer: OODScorer | None,
               qc_classifier: QCClassifier | None) -> tuple[dict, dict[str, np.ndarray]]:
    """The record of a read case and its output arrays by kind (in the order they are written), before
    anything is written, from its :meth:`Segmenter.network_pass`: postprocessing, the OOD flag, measurements
    and QC. No network here: batch runs do this in worker threads while the network goes on."""
    raw_labels, scores, uncertainty = network_outputs
    record, arrays = _record(case), {}
    if scores is not None:
        default, flagged = scorer.decide(scores)
        record.update(scores={k: _json_score(v) for k, v in scores.items()}, default_score=_json_score(default),
                      default_detector=scorer.default, ood_flag=flagged)
        arrays["uncertainty"] = uncertainty
    labels = arrays["segmentation"] = segmenter.postprocess(raw_labels)
    with stage("qc", sync=False):
        per_frame = measurements(labels, volume.spacing)
        qc, function, report = _quality(labels, volume.spacing, per_frame)
        record.update(shape=list(volume.array.shape), spacing_mm=[round(s, 4) for s in volume.spacing], measurements=per_frame, qc=qc)
        if volume.is_cine:
            record["cardiac_function"] = function
        if scores is not None and qc_classifier is not None:
            stacks = [report] if report else [check_volume(labels[..., function[k]], volume.spacing)
                                              for k in ("ed_frame", "es_frame")] if function else []
            qc["failure_probability"] = failure_probability(qc_classifier, stacks, scores)
        if volume.is_cine and function:  # a cine is its own subject: its function is as trusted as its segmentation
            failed = qc["failed"] + doubts(record)
            record["subject_qc"] = {"passed": not failed, "failed": failed}
    return record, arrays


def quantised(values: np.ndarray) -> tuple[np.ndarray, float]:
    """A non-negative voxel map as uint8 levels and the NIfTI slope that maps them back (to within half a level,
    1/510 of its maximum): an ACDC map is 12 times smaller than as float32, and several times faster to write
    (gzip of noisy floats is slow). A map with negative or non-finite values is kept as float32 (slope 1)."""
    top = float(values.max()) if values.size else 0.0
    if not (np.isfinite(values).all() and values.min() >= 0 and top > 0):
        return values.astype(np.float32), 1.0
    slope = top / 255
    return np.round(values / slope).astype(np.uint8), slope


def _write_outputs(record: dict, arrays: dict[str, np.ndarray], volume: Volume, paths: dict[str, Path], overwrite: bool) -> None:
    """Write a case's outputs (each atomically; the uncertainty map :func:`quantised`) and name them in its record."""
    with stage("write", sync=False):
        for kind, array in arrays.items():
            array, slope = quantised(array) if kind == "uncertainty" else (array, 1.0)
            record["outputs"][kind] = write_like(array, volume, paths[kind], overwrite, slope=slope)


def segment_case(segmenter: Segmenter, case: dict, output_dir: Path, overwrite: bool, scorer: OODScorer | None = None,
                 qc_classifier: QCClassifier | None = None, timer: StageTimer | None = None) -> dict:
    """Segment (and score) one case of :func:`_cases`, write its outputs and return its record; a problem
    with the case raises :class:`CaseError`. With a scorer and a QC classifier, the record's ``qc`` also holds
    the classifier's ``failure_probability``. ``timer`` is charged the case's seconds per stage."""
    with (timer or StageTimer()).activate():
        paths = output_paths(case, Path(output_dir), scorer is not None)
        _check_outputs(case, paths, overwrite)
        with stage("read", sync=False):
            volume = read_case(case)
        record, arrays = _host_part(segmenter, case, volume, segmenter.network_pass(volume, scorer), scorer, qc_classifier)
        _write_outputs(record, arrays, volume, paths, overwrite)
    return record


# ------------------------------------------------------------------------------ the output folder
class OutputLock:
    """Exclusive use of an output folder by one run: a lock file created with ``O_EXCL`` holding the
    owner's PID and host. A lock left by a dead process of this host (a killed run) is taken over; one
    held by a live process, or by another host (whose processes cannot be checked), is not."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_FILE
        self.owner = {"pid": os.getpid(), "host": socket.gethostname()}

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_json(self.path)
                if self._is_stale(holder) and self._take_over(holder):
                    continue
                raise OutputDirError(self._in_use(holder)) from None
            except OSError as e:
                raise OutputDirError(f"{self.path.parent}: the output folder is not writable ({e.strerror})") from None
            with os.fdopen(fd, "w") as f:
                json.dump({**self.owner, "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
                f.flush()
                os.fsync(f.fileno())
            return
        raise OutputDirError(self._in_use(_read_json(self.path)))

    def release(self) -> None:
        holder = _read_json(self.path)
        if holder and {k: holder.get(k) for k in self.owner} == self.owner:
            self.path.unlink()

    def _is_stale(self, holder: dict | None) -> bool:
        if not holder or holder.get("host") != self.owner["host"] or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def _take_over(self, holder: dict) -> bool:
        """Move the stale lock aside and check it is the one judged stale: between reading and moving it,
        another run may have taken it over already (then it is put back)."""
        aside = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True
        if _read_json(aside) == holder:
            aside.unlink()
            return True
        try:
            os.link(aside, self.path)
        except FileExistsError:
            pass
        aside.unlink()
        return False

    def _in_use(self, holder: dict | None) -> str:
        who = (f"PID {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}" if holder
               else "its lock file cannot be read")
        return (f"{self.path.parent}: the output folder is in use by another run ({who}); wait for it to end, choose "
                f"another output_dir, or delete {self.path} if no run is using the folder")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _prepare_output_dir(output_dir: Path) -> bool:
    """Create the output folder and check it can be used, before any work; returns whether it was created."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"{output_dir}: exists and is not a folder: cannot be the output folder")
    created = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"{output_dir}: the output folder cannot be created ({e.strerror or e})") from None
    if not os.access(output_dir, os.R_OK | os.W_OK | os.X_OK):
        raise OutputDirError(f"{output_dir}: the output folder is not readable and writable by this user")
    return created


class _Progress:
    """The progress file of a run: JSON lines, each flushed to disk before the run goes on."""

    def __init__(self, path: Path, append: bool):
        if append and path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with open(path, "a") as f:  # a line cut short by a kill: end it, so the next one stays readable
                f.write("\n")
        self.file = open(path, "a" if append else "w")
        self._lock = threading.Lock()  # the workers append side by side

    def append(self, entry: dict) -> None:
        line = json.dumps(entry) + "\n"
        with self._lock:
            self.file.write(line)
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


def _previous_run(output_dir: Path, scored: bool) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """What an earlier run into ``output_dir`` left: the records (by case id) of its finished cases whose
    outputs all exist and were scored as this run scores (from its progress file, else its ``cases.json``),
    and the outputs that the cases it started but did not keep had begun to write."""
    done, started = {}, {}
    progress, cases_file = output_dir / PROGRESS_FILE, output_dir / CASES_FILE
    if progress.exists():
        for line in progress.read_text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # the line a kill cut short
                continue
            if "started" in entry:
                started[entry["started"]] = entry.get("new_outputs", [])
            elif "status" in entry:
                done[case_id(entry)] = entry
    elif cases_file.exists():
        done = {case_id(r): r for r in json.loads(cases_file.read_text())}
    kept = {cid: r for cid, r in done.items()
            if r["status"] == "ok" and r["outputs"] and all(Path(p).exists() for p in r["outputs"].values())
            and ("scores" in r) == scored}
    return kept, {cid: paths for cid, paths in started.items() if cid not in kept}


def _remove_leftovers(paths: list[str], output_dir: Path) -> None:
    """Outputs an interrupted case had begun to write (only ever inside the output folder)."""
    for path in map(Path, paths):
        if path.resolve().is_relative_to(output_dir) and path.exists():
            path.unlink()


def check_states(segmenter: Segmenter, scorer: OODScorer | None, qc_classifier: QCClassifier | None) -> QCClassifier | None:
    """The OOD state holds for the weights it was fitted for only: refuse others. Returns the QC classifier where it
    can be used: with a scorer whose state it was fitted on; else the run goes on without failure probabilities
    (segmentations, scores and flags stay valid), with a warning saying why."""
    if scorer is None:
        return None
    scorer.check_model(segmenter.checkpoint)
    if qc_classifier is not None and not qc_classifier.fitted_on(scorer):
        warnings.warn(f"the QC classifier was fitted on the scores of another OOD state than {scorer.state_path}: no failure "
                      "probabilities in this run (refit it with benchmarks/qc_classifier.py --save after calibrating)", stacklevel=2)
        return None
    return qc_classifier


def _error_record(case: dict, error: Exception) -> dict:
    """The record of a case that failed: a :class:`CaseError` says what is wrong with the case; anything else
    is reported with its type and where it happened."""
    if isinstance(error, CaseError):
        return _record(case, status="error", error=error.problem)
    return _record(case, status="error", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc(limit=3))


def _run_case(segmenter: Segmenter, case: dict, output_dir: Path, overwrite: bool, scorer: OODScorer | None,
              qc_classifier: QCClassifier | None = None) -> dict:
    try:
        return segment_case(segmenter, case, output_dir, overwrite, scorer, qc_classifier)
    except Exception as e:  # one broken case must not stop the batch; the record says what happened
        return _error_record(case, e)


# ------------------------------------------------------------------------------ the batch pipeline
#: Cases read ahead of the network (each by its own thread), by default.
DEFAULT_PREFETCH = 4
#: Threads that finish cases beside the network (connected components, QC, writing), by default: half the
#: cores, at most 8 (the other half feeds the network).
DEFAULT_WORKERS = max(1, min(8, (os.cpu_count() or 2) // 2))
TIMING_MODES = (None, "wall", "sync")


@dataclass
class _Job:
    """One case of a run on its way through reading, the network and finishing (each stage may run in its own
    thread; a job is only ever in one of them)."""

    index: int  # in the run's cases: where its record goes
    case: dict
    timer: StageTimer
    volume: Volume | None = None
    network: tuple | None = None  # its Segmenter.network_pass, waiting for the host part
    record: dict | None = None  # set once the case has failed, or is finished
    paths: dict[str, Path] | None = None  # where its outputs go, once it has outputs to write
    new_outputs: list[str] | None = None  # outputs that did not exist when the case began (None: it never began)

    @property
    def pending_paths(self) -> list[Path]:
        return list(self.paths.values()) if self.paths else []


def _read_job(job: _Job) -> _Job:
    """Read a job's volume; a case that cannot be read gets its error record (its output check comes first)."""
    if "error" not in job.case:
        with job.timer.activate(), stage("read", sync=False):
            try:
                job.volume = read_case(job.case)
            except Exception as e:
                job.record = _error_record(job.case, e)
    return job


def _network_jobs(jobs: list[_Job], segmenter: Segmenter, output_dir: Path, overwrite: bool, scorer) -> None:
    """Check read jobs' outputs, then run the network passes of those that may go on, together (or give a job
    its error record)."""
    ready = []
    for job in jobs:
        paths = output_paths(job.case, output_dir, scorer is not None)
        if "error" not in job.case:
            job.new_outputs = [str(p) for p in paths.values() if not p.exists()]
        with job.timer.activate():
            try:
                _check_outputs(job.case, paths, overwrite)
            except Exception as e:
                job.record = _error_record(job.case, e)
        if job.record is None:
            job.paths = paths
            ready.append(job)
    if ready:
        _network_passes(ready, segmenter, scorer)
    for job in jobs:
        if job.network is None:
            job.volume = None  # nothing to write: free it now


def _network_passes(jobs: list[_Job], segmenter: Segmenter, scorer) -> None:
    """Give each job its network pass, all in one :meth:`Segmenter.network_passes` (the seconds shared among the
    cases by their slices); if that fails, one job at a time, so that only the cases at fault get error records."""
    timer = StageTimer(synchronize=jobs[0].timer.synchronize)
    try:
        with timer.activate():
            passes = segmenter.network_passes([job.volume for job in jobs], scorer)
    except Exception as e:
        if len(jobs) > 1:
            for job in jobs:
                _network_passes([job], segmenter, scorer)
        else:
            jobs[0].timer.add(timer)
            jobs[0].record = _error_record(jobs[0].case, e)
        return
    slices = [math.prod(job.volume.array.shape[2:]) for job in jobs]
    for job, network, count in zip(jobs, passes, slices):
        job.network = network
        job.timer.add(timer, count / sum(slices))


def _batches(jobs, batch_slices: int, output_paths_of):
    """Consecutive jobs in groups of at most ``batch_slices`` slices (a larger case alone) for the network;
    a case that shares an output path with an earlier case of its group starts the next group, so that it
    sees that case's output as in a sequential run."""
    group, slices, paths = [], 0, set()
    for job in jobs:
        count = math.prod(job.volume.array.shape[2:]) if job.volume is not None else 0
        own = set(output_paths_of(job.case))
        if group and (slices + count > batch_slices or own & paths):
            yield group
            group, slices, paths = [], 0, set()
        group.append(job)
        slices, paths = slices + count, paths | own
    if group:
        yield group


def _finish_job(job: _Job, segmenter: Segmenter, scorer, qc_classifier, overwrite: bool, progress: _Progress, records: list,
                timing: str | None) -> None:
    """The host part of a job that went through the network, its outputs written, then its record appended to
    the progress file: a record is only ever appended once its outputs are on disk. A failure here makes the
    case an error record."""
    if job.new_outputs is not None:
        progress.append({"started": case_id(job.case), "new_outputs": job.new_outputs})
    if job.network is not None:
        with job.timer.activate():
            try:
                job.record, arrays = _host_part(segmenter, job.case, job.volume, job.network, scorer, qc_classifier)
                _write_outputs(job.record, arrays, job.volume, job.paths, overwrite)
            except Exception as e:
                job.record = _error_record(job.case, e)
        job.network = job.volume = None
    if timing is not None:
        job.record["seconds"] = job.timer.rounded()
    progress.append(job.record)
    records[job.index] = job.record


class _Reader:
    """The jobs of a run with their volumes read, in order, at most ``depth`` cases ahead of the consumer, by
    ``depth`` background threads (reading overlaps the network, and the reads overlap each other: zlib and
    file reads release the GIL); ``depth`` 0 reads in the consumer's thread, case by case."""

    def __init__(self, jobs: list[_Job], depth: int):
        self.jobs, self.depth = jobs, depth
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="cmr_ood-reader") if depth else None

    def __iter__(self):
        if not self.depth:
            yield from map(_read_job, self.jobs)
            return
        waiting = iter(self.jobs)
        ahead = deque(self._pool.submit(_read_job, job) for job in itertools.islice(waiting, self.depth))
        while ahead:
            job = ahead.popleft().result()
            if (following := next(waiting, None)) is not None:
                ahead.append(self._pool.submit(_read_job, following))
            yield job

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _Finishers:
    """Finish jobs (:func:`_finish_job`) in ``workers`` background threads, started in the order they come (and
    finished in any), with at most ``workers`` more waiting; 0 workers finishes each job at once in the
    caller's thread. The threads are not daemons: they stop only between two jobs, so a file is never left
    half-written."""

    def __init__(self, finish, workers: int):
        self.finish = finish
        self.error: BaseException | None = None
        self._pending: Counter = Counter()  # output paths of the jobs not finished yet
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(workers, 1))
        self._threads = [threading.Thread(target=self._run, name=f"cmr_ood-worker-{i}") for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.error is None:
            try:
                job = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if job is None:
                return
            try:
                self.finish(job)
            except BaseException as e:  # the progress file cannot be written: the run cannot go on
                self.error = e
                return
            finally:
                with self._changed:
                    self._pending.subtract(job.pending_paths)
                    self._changed.notify_all()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _alive(self) -> bool:
        return self.error is None and all(t.is_alive() for t in self._threads)

    def settle(self, paths) -> None:
        """Wait until no earlier job still has to write one of ``paths`` (two cases of a run with the same
        output name): the later case then sees the earlier one's output, as in a sequential run."""
        if self._threads:
            with self._changed:
                self._changed.wait_for(lambda: not any(self._pending[p] > 0 for p in paths) or not self._alive())
            self._check()

    def submit(self, job: _Job) -> None:
        self._check()
        if not self._threads:
            self.finish(job)
            return
        with self._changed:
            self._pending.update(job.pending_paths)
        while True:
            try:
                self._queue.put(job, timeout=0.1)
                return
            except queue.Full:
                if not self._alive():
                    self._check()
                    raise RuntimeError("the workers that finish the cases stopped")

    def close(self) -> None:
        """Finish every job submitted, then stop."""
        told = 0
        while told < len(self._threads) and self.error is None:
            try:
                self._queue.put(None, timeout=0.1)
                told += 1
            except queue.Full:
                continue
        for thread in self._threads:
            thread.join()
        self._check()

    def stop(self) -> None:
        """Stop after the jobs in hand (an interrupted run): the jobs still waiting are dropped, their cases
        are left to a resumed run."""
        self._stop.set()
        for thread in self._threads:
            thread.join()


def run_batch(segmenter: Segmenter, output_dir: str | os.PathLike, dataset_dir: str | None = None,
              manifest: str | None = None, data_root: str | None = None, overwrite: bool = False,
              scorer: OODScorer | None = None, resume: bool = False, qc_classifier: QCClassifier | None = None,
              prefetch: int = DEFAULT_PREFETCH, workers: int = DEFAULT_WORKERS, timing: str | None = None,
              group_classifier: GroupClassifier | None = None) -> list[dict]:
    """Segment every case of ``dataset_dir`` (NIfTI files, DICOM series) or of a manifest; with a fitted
    ``scorer``, also score each case, flag it, and write its uncertainty map; with a ``qc_classifier`` too, give
    each record the probability that its segmentation failed (``qc.failure_probability``).

    A case that fails gets a record with ``status: error`` and the message; the others go on. Outputs
    are written to temporary names and renamed; nothing that exists is overwritten unless ``overwrite``.
    The output folder is checked and locked before any work (:class:`OutputLock`: a second run into it
    fails at once). ``resume`` finishes a run that was killed (or redoes the failed cases of a finished
    one): cases recorded as done whose outputs exist are kept, the outputs the interrupted case had begun
    and any temporary file are removed, and the rest is done again.

    This thread runs the network; ``prefetch`` cases are read ahead by as many background threads, and ``workers``
    background threads finish the cases that went through the network (connected components, measurements,
    QC, writing), so that the host work overlaps the network. ``prefetch=0, workers=0`` runs every step of a
    case one after the other in this thread. The records and files are the same either way (the progress
    file's lines may come in another order).
    ``timing`` gives each record its ``seconds`` per stage (:mod:`cmr_ood.timing`): ``"wall"`` by the host
    clock, ``"sync"`` waiting for the GPU at each stage boundary (exact per stage, slower); None: no timings.
    """
    if (dataset_dir is None) == (manifest is None):
        raise ValueError("give exactly one of dataset_dir and manifest")
    if not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be a whole number of cases >= 0 (0: no overlap), not {prefetch!r}")
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be a whole number of threads >= 0 (0: finish each case in this thread), not {workers!r}")
    if timing not in TIMING_MODES:
        raise ValueError(f"timing must be one of {TIMING_MODES}, not {timing!r}")
    output_dir = Path(output_dir).resolve()
    created = _prepare_output_dir(output_dir)
    try:
        with OutputLock(output_dir):
            return _run_locked(segmenter, output_dir, dataset_dir, manifest, data_root, overwrite, scorer, resume, qc_classifier,
                               prefetch, workers, timing, group_classifier)
    finally:
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()  # a run refused before any work leaves nothing behind


def _run_locked(segmenter, output_dir: Path, dataset_dir, manifest, data_root, overwrite: bool, scorer, resume: bool,
                qc_classifier, prefetch: int, workers: int, timing: str | None, group_classifier: GroupClassifier | None) -> list[dict]:
    cases_file, progress_file = output_dir / CASES_FILE, output_dir / PROGRESS_FILE
    if not (resume or overwrite):
        if cases_file.exists():
            raise FileExistsError(f"{cases_file} exists already: choose another output_dir, set resume to redo its failed "
                                  "cases, or overwrite to replace its results")
        if progress_file.exists():
            raise FileExistsError(f"{progress_file} exists already: a run into {output_dir} was interrupted; set resume to "
                                  "finish it, or overwrite to start again")
    qc_classifier = check_states(segmenter, scorer, qc_classifier)
    cases = _cases(dataset_dir, manifest, data_root)
    kept, leftovers = _previous_run(output_dir, scorer is not None) if resume else ({}, {})
    if resume or overwrite:  # under the lock, temporary files can only be a killed run's
        remove_partial_files(output_dir)
    records: list[dict | None] = [kept.get(case_id(c)) for c in cases]
    jobs = [_Job(i, c, StageTimer(synchronize=timing == "sync")) for i, c in enumerate(cases) if records[i] is None]
    progress = _Progress(progress_file, append=resume)
    reader = _Reader(jobs, prefetch)
    finishers = _Finishers(lambda job: _finish_job(job, segmenter, scorer, qc_classifier, overwrite, progress, records, timing), workers)
    try:
        with tqdm(total=len(cases), initial=len(cases) - len(jobs), desc="segmenting", unit="case") as bar:
            for group in _batches(reader, segmenter.batch_slices, lambda case: output_paths(case, output_dir, scorer is not None).values()):
                for job in group:
                    _remove_leftovers(leftovers.get(case_id(job.case), []), output_dir)
                    finishers.settle(output_paths(job.case, output_dir, scorer is not None).values())
                _network_jobs(group, segmenter, output_dir, overwrite, scorer)
                for job in group:
                    finishers.submit(job)
                bar.update(len(group))
        finishers.close()
    finally:
        reader.stop()
        finishers.stop()  # after an interruption: the cases in hand are finished, no new one starts
        progress.close()
    add_subject_results(records, group_classifier)
    write_results(output_dir, records)
    progress_file.unlink()
    failed = sum(r["status"] != "ok" for r in records)
    flagged = f", {sum(bool(r.get('ood_flag')) for r in records)} flagged as out of distribution" if scorer else ""
    resumed = f" ({len(cases) - len(jobs)} kept from the earlier run)" if resume else ""
    print(f"{len(records) - failed} of {len(records)} cases segmented{resumed}{flagged}; results in {cases_file}")
    return records
