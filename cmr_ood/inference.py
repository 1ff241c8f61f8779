"""Inference: segment volumes and write per-case outputs and one ``cases.json`` for a run.

A run owns its output folder while it works (:class:`OutputLock`), appends every finished case to
``cases.partial.jsonl`` (flushed to disk case by case) and writes ``cases.json`` at the end. A run that
was killed is resumed with ``resume=True``: the finished cases whose outputs exist are kept, the others
are done again.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent
from tqdm import tqdm

from cmr_ood.data.io import CaseError, Volume, atomic_write, nifti_stem, read_dicom_series, read_nifti, remove_partial_files, write_like
from cmr_ood.data.labels import STRUCTURES
from cmr_ood.data.manifests import discover, load_manifest, path_in_root, read_entry
from cmr_ood.data.preprocess import Preprocessing, SliceGeometry
from cmr_ood.networks import load_weights
from cmr_ood.ood.base import CaseOutputs
from cmr_ood.ood.scorer import OODScorer
from cmr_ood.qc.checks import check_subject, check_volume
from cmr_ood.qc.classifier import QCClassifier
from cmr_ood.qc.measurements import measurements, subject_measurements

CASES_FILE = "cases.json"
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
        heart = KeepLargestConnectedComponent(applied_labels=structures, is_onehot=False, independent=False)
        each = KeepLargestConnectedComponent(applied_labels=structures, is_onehot=False, independent=True)
        return each(heart(labels[None]))[0]


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


class Segmenter:
    """Network + preprocessing + inferer + postprocessing: a volume in, labels on its own grid out."""

    def __init__(self, network: torch.nn.Module, inferer, preprocessing: Preprocessing | None = None,
                 postprocessing: Postprocessing | None = None, checkpoint: str | None = None, device="cpu"):
        self.device = torch.device(device)
        self.checkpoint = checkpoint
        if checkpoint is not None:
            load_weights(network, checkpoint)
        self.network = network.to(self.device).eval()
        self.inferer = inferer
        self.preprocessing = preprocessing or Preprocessing()
        self.postprocessing = postprocessing or Postprocessing()

    @torch.no_grad()
    def probabilities(self, volume: Volume, frame: int | None = None) -> torch.Tensor:
        """Class probabilities (C, X, Y, Z) on the input grid of one stack (or one frame of a cine)."""
        slices, geometry = self.preprocessing(volume, frame, self.device)
        logits = self.inferer(slices, self.network)
        return self.preprocessing.invert(torch.softmax(logits.float(), dim=1), geometry)

    @torch.no_grad()
    def run_network(self, slices: torch.Tensor, taps: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
        """Every head's output (``seg`` logits, proxy heads) and the feature maps ``taps`` of preprocessed
        slices (N, 1, H, W), through the same inferer as segmentation."""
        wrapper = _AllOutputs(self.network, taps)
        outputs = self.inferer(slices, wrapper)
        return {k: v.float() for k, v in zip(wrapper.keys, outputs)}

    def outputs(self, volume: Volume, frame: int | None = None, taps: tuple[str, ...] = ()) -> tuple[CaseOutputs, SliceGeometry]:
        """One pass over a stack with everything the OOD detectors read, and the stack's geometry."""
        slices, geometry = self.preprocessing(volume, frame, self.device)
        out = self.run_network(slices, taps)
        case = CaseOutputs(images=slices, logits=out.pop("seg"), heads={k: out.pop(k) for k in list(out) if k not in taps},
                           features=out, forward=lambda x: self.run_network(x, taps), network=self.network)
        return case, geometry

    def labels(self, probabilities: torch.Tensor) -> np.ndarray:
        """Postprocessed uint8 labels from class probabilities on the input grid."""
        return self.postprocessing(probabilities.argmax(0)).cpu().numpy().astype(np.uint8)

    def segment(self, volume: Volume) -> np.ndarray:
        """uint8 canonical labels on the input grid: (X, Y, Z), or (X, Y, Z, T) for a cine (every frame)."""
        frames = range(volume.array.shape[3]) if volume.is_cine else [None]
        out = [self.labels(self.probabilities(volume, t)) for t in frames]
        return np.stack(out, axis=-1) if volume.is_cine else out[0]

    def segment_and_score(self, volume: Volume, scorer: OODScorer) -> tuple[np.ndarray, dict[str, float], np.ndarray]:
        """Labels, OOD scores and the scorer's voxel-wise uncertainty map (float32, on the input grid), from
        one network pass per stack. A cine is scored frame by frame and keeps each score's worst frame."""
        frames = range(volume.array.shape[3]) if volume.is_cine else [None]
        labels, maps, scores = [], [], {}
        for t in frames:
            case, geometry = self.outputs(volume, t, scorer.taps)
            labels.append(self.labels(self.preprocessing.invert(torch.softmax(case.logits, dim=1), geometry)))
            maps.append(self.preprocessing.invert(scorer.uncertainty(case)[:, None], geometry)[0].cpu().numpy().astype(np.float32))
            for name, value in scorer.score(case).items():
                scores[name] = max(scores.get(name, -math.inf), value)
        if volume.is_cine:
            return np.stack(labels, axis=-1), scores, np.stack(maps, axis=-1)
        return labels[0], scores, maps[0]


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


def add_subject_results(records: list[dict]) -> None:
    """Where a run holds both the ED and the ES volume of a subject (manifest entries with ``subject`` and
    ``phase``), give both records the subject's ``cardiac_function`` (EDV, ESV, SV, EF of both ventricles,
    myocardial mass) and ``subject_qc`` (the anatomy of both phases and the function checks: ED above ES, EF
    in range), from the two segmentations the run wrote."""
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
            qc = check_subject(ed.array, es.array, spacing=ed.spacing)
            results = {"cardiac_function": _function(m), "subject_qc": {"passed": qc.passed, "failed": qc.failed}}
        except (CaseError, ValueError) as e:  # the volumes themselves are fine: only the subject's results are missing
            results = {"cardiac_function": None, "subject_qc": {"passed": False, "failed": [f"no subject-level results: {e}"]}}
        for record in pair.values():
            record.update(results)


def _quality(labels: np.ndarray, spacing, per_frame: dict) -> tuple[dict, dict | None]:
    """The QC verdict of a segmentation and, for a cine, its cardiac function: the LV and RV volume curves
    (ml per frame), the ED and ES frames (largest and smallest LV volume), EDV, ESV, SV and EF of both
    ventricles and the myocardial mass at ED."""
    if labels.ndim == 3:
        qc = check_volume(labels, spacing)
        return {"passed": qc.passed, "failed": qc.failed}, None
    try:
        m = subject_measurements(labels, spacing=spacing)
    except ValueError as e:  # no LV in any frame: no ED or ES
        return {"passed": False, "failed": [str(e)]}, None
    qc = check_subject(labels[..., m.ed_frame], labels[..., m.es_frame], spacing=spacing)
    function = _function(m)
    function.update(lv_volume_curve_ml=per_frame["lv_volume_ml"], rv_volume_curve_ml=per_frame["rv_volume_ml"])
    return {"passed": qc.passed, "failed": qc.failed}, function


def failure_probability(classifier: QCClassifier, labels: np.ndarray, spacing, scores: dict, function: dict | None) -> float | None:
    """The QC classifier's probability that a segmentation failed, from its checks and its OOD scores; for a cine,
    the larger of its ED and ES frames' (None where they are not known)."""
    if labels.ndim == 3:
        frames = [labels]
    elif function:
        frames = [labels[..., function["ed_frame"]], labels[..., function["es_frame"]]]
    else:
        return None
    return round(max(classifier.predict_one(check_volume(f, spacing).features(), scores) for f in frames), 4)


def segment_case(segmenter: Segmenter, case: dict, output_dir: Path, overwrite: bool, scorer: OODScorer | None = None,
                 qc_classifier: QCClassifier | None = None) -> dict:
    """Segment (and score) one case of :func:`_cases`, write its outputs and return its record; a problem
    with the case raises :class:`CaseError`. With a scorer and a QC classifier, the record's ``qc`` also holds
    the classifier's ``failure_probability``."""
    record = _record(case)
    if "error" in case:
        raise CaseError(case["image"], case["error"])
    paths = output_paths(case, Path(output_dir), scorer is not None)
    for path in paths.values():
        if path.exists() and not overwrite:
            raise CaseError(case["image"], f"output {path} exists already (not overwritten; set overwrite to replace it)")
    volume = read_case(case)
    if scorer is None:
        labels = segmenter.segment(volume)
    else:
        labels, scores, uncertainty = segmenter.segment_and_score(volume, scorer)
        default, flagged = scorer.decide(scores)
        record.update(scores={k: _json_score(v) for k, v in scores.items()}, default_score=_json_score(default),
                      default_detector=scorer.default, ood_flag=flagged)
        record["outputs"]["uncertainty"] = write_like(uncertainty, volume, paths["uncertainty"], overwrite)
    record["outputs"]["segmentation"] = write_like(labels, volume, paths["segmentation"], overwrite)
    per_frame = measurements(labels, volume.spacing)
    qc, function = _quality(labels, volume.spacing, per_frame)
    record.update(shape=list(volume.array.shape), spacing_mm=[round(s, 4) for s in volume.spacing], measurements=per_frame, qc=qc)
    if volume.is_cine:
        record["cardiac_function"] = function
    if scorer is not None and qc_classifier is not None:
        qc["failure_probability"] = failure_probability(qc_classifier, labels, volume.spacing, scores, function)
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

    def append(self, entry: dict) -> None:
        self.file.write(json.dumps(entry) + "\n")
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


def _run_case(segmenter: Segmenter, case: dict, output_dir: Path, overwrite: bool, scorer: OODScorer | None,
              qc_classifier: QCClassifier | None = None) -> dict:
    try:
        return segment_case(segmenter, case, output_dir, overwrite, scorer, qc_classifier)
    except CaseError as e:
        return _record(case, status="error", error=e.problem)
    except Exception as e:  # one broken case must not stop the batch; the record says what happened
        return _record(case, status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=3))


def run_batch(segmenter: Segmenter, output_dir: str | os.PathLike, dataset_dir: str | None = None,
              manifest: str | None = None, data_root: str | None = None, overwrite: bool = False,
              scorer: OODScorer | None = None, resume: bool = False, qc_classifier: QCClassifier | None = None) -> list[dict]:
    """Segment every case of ``dataset_dir`` (NIfTI files, DICOM series) or of a manifest; with a fitted
    ``scorer``, also score each case, flag it, and write its uncertainty map; with a ``qc_classifier`` too, give
    each record the probability that its segmentation failed (``qc.failure_probability``).

    A case that fails gets a record with ``status: error`` and the message; the others go on. Outputs
    are written to temporary names and renamed; nothing that exists is overwritten unless ``overwrite``.
    The output folder is checked and locked before any work (:class:`OutputLock`: a second run into it
    fails at once). ``resume`` finishes a run that was killed (or redoes the failed cases of a finished
    one): cases recorded as done whose outputs exist are kept, the outputs the interrupted case had begun
    and any temporary file are removed, and the rest is done again.
    """
    if (dataset_dir is None) == (manifest is None):
        raise ValueError("give exactly one of dataset_dir and manifest")
    output_dir = Path(output_dir).resolve()
    created = _prepare_output_dir(output_dir)
    try:
        with OutputLock(output_dir):
            return _run_locked(segmenter, output_dir, dataset_dir, manifest, data_root, overwrite, scorer, resume, qc_classifier)
    finally:
        if created and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()  # a run refused before any work leaves nothing behind


def _run_locked(segmenter, output_dir: Path, dataset_dir, manifest, data_root, overwrite: bool, scorer, resume: bool,
                qc_classifier) -> list[dict]:
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
    progress = _Progress(progress_file, append=resume)
    records, reused = [], 0
    try:
        for case in tqdm(cases, desc="segmenting", unit="case"):
            cid = case_id(case)
            if cid in kept:
                records.append(kept[cid])
                reused += 1
                continue
            _remove_leftovers(leftovers.get(cid, []), output_dir)
            if "error" not in case:
                paths = output_paths(case, output_dir, scorer is not None).values()
                progress.append({"started": cid, "new_outputs": [str(p) for p in paths if not p.exists()]})
            records.append(_run_case(segmenter, case, output_dir, overwrite, scorer, qc_classifier))
            progress.append(records[-1])
    finally:
        progress.close()
    add_subject_results(records)
    atomic_write(cases_file, lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1) + "\n"), overwrite=True)
    progress_file.unlink()
    failed = sum(r["status"] != "ok" for r in records)
    flagged = f", {sum(bool(r.get('ood_flag')) for r in records)} flagged as out of distribution" if scorer else ""
    resumed = f" ({reused} kept from the earlier run)" if resume else ""
    print(f"{len(records) - failed} of {len(records)} cases segmented{resumed}{flagged}; results in {cases_file}")
    return records
