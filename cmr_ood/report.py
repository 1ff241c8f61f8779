"""An HTML report of an inference run, for a person to look through.

It reads only what the run left on disk (``cases.json`` and the files it names) and writes
``<output_dir>/report/index.html`` with PNG figures beside it: a run summary, then one entry per case,
the cases that need a look first (errors, then flagged as out of distribution, then failed quality
control, then the rest, worst default OOD score first). Each entry shows representative short-axis
slices with the segmentation and the uncertainty map, the clinical measurements, the quality-control
verdict, and the default OOD score against its in-distribution reference distribution (from a fitted
:class:`~cmr_ood.ood.scorer.OODScorer`, where one is given).

The page is self-contained: inline CSS, relative links to the figures, no scripts. A case whose files
are missing or unreadable gets its entry with the problem stated; no case stops the report.

    python -m cmr_ood.report OUTPUT_DIR [--ood_state PATH]
"""

from __future__ import annotations

import argparse
import datetime
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy.stats import percentileofscore
from tqdm import tqdm

from cmr_ood.data.io import CaseError, atomic_write, nifti_stem, read_image, read_nifti
from cmr_ood.data.labels import STRUCTURES
from cmr_ood.data.preprocess import slice_axis
from cmr_ood.inference import CASES_FILE
from cmr_ood.ood.scorer import OODScorer, file_digest

REPORT_DIR = "report"
#: Overlay colours of the structures (LV red, myocardium green, RV blue).
COLOURS = {"LV": "#e8382f", "MYO": "#2fb344", "RV": "#2f7de8"}
#: In-plane margin (mm) kept around the heart in the figures, and the smallest field shown.
CROP_MARGIN_MM, MIN_FIELD_MM = 30.0, 120.0
DPI = 90
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "bundles" / "cmr_seg_ood" / "configs" / "inference.json"

# Review order: what needs a look first.
ERROR, FLAGGED, QC_FAILED, PLAIN = range(4)
GROUP_LABELS = {ERROR: "error", FLAGGED: "flagged as OOD", QC_FAILED: "failed QC", PLAIN: "ok"}


@dataclass
class CaseEntry:
    """One case of the run as the report shows it."""

    index: int  # position in cases.json
    record: dict
    name: str
    group: int
    problems: list[str] = field(default_factory=list)  # files missing or unreadable, figures not drawn
    figure: str | None = None  # file name in the report folder
    score_figure: str | None = None
    shown: str = ""  # which slices (and frame) the figure shows
    percentile: float | None = None


# ------------------------------------------------------------------------------------------ records
def load_records(output_dir: str | Path) -> list[dict]:
    """The records of ``<output_dir>/cases.json``."""
    path = Path(output_dir) / CASES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {CASES_FILE} here; give the output_dir of an inference run")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a list of case records")
    return records


def case_group(record: dict) -> int:
    if record.get("status") != "ok":
        return ERROR
    if record.get("ood_flag"):
        return FLAGGED
    if not (record.get("qc") or {}).get("passed", True):
        return QC_FAILED
    return PLAIN


def default_score(record: dict) -> float | None:
    """The case's default OOD score; ``inf`` where the run wrote null (no heart found), None where the run
    did not score."""
    if "default_score" not in record:
        return None
    value = record["default_score"]
    return math.inf if value is None else float(value)


def review_order(records: list[dict]) -> list[int]:
    """Indices of ``records`` in review order: errors, OOD-flagged, QC-failed, the rest; within each, the
    highest (most out-of-distribution) default score first, then the run's own order."""
    def key(i):
        score = default_score(records[i])
        return case_group(records[i]), -score if score is not None else math.inf, i
    return sorted(range(len(records)), key=key)


def case_name(record: dict) -> str:
    """The name the run's outputs carry (``<name>_seg.nii.gz``), else the input's name."""
    seg = (record.get("outputs") or {}).get("segmentation")
    if seg and Path(seg).name.endswith("_seg.nii.gz"):
        return Path(seg).name[: -len("_seg.nii.gz")]
    return nifti_stem(str(record.get("image", "case")).rstrip("/\\")) or "case"


def _resolve(path: str, output_dir: Path) -> Path:
    """A path of ``cases.json``: absolute, or relative to the folder the run started in (tried as given,
    then against the output folder's parent)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    beside = output_dir.parent / p
    return beside if beside.exists() else p


# --------------------------------------------------------------------------------------- volumes
def _read(kind: str, path: str | None, output_dir: Path, problems: list[str], reader) -> np.ndarray | None:
    if not path:
        return None
    try:
        return reader(_resolve(path, output_dir)).array
    except CaseError as e:
        problems.append(f"{kind}: {e}")
    except Exception as e:  # an unreadable file is reported, never fatal
        problems.append(f"{kind}: {path}: {type(e).__name__}: {e}")
    return None


def _frame(array: np.ndarray | None, t: int | None) -> np.ndarray | None:
    return array[..., t] if array is not None and array.ndim == 4 and t is not None else array


def representative_slices(heart_per_slice: np.ndarray) -> list[tuple[str, int]]:
    """(label, slice index) of up to three slices: basal, mid and apical among the slices that hold the
    heart (the base is the end with the larger heart area), or the middle slices where none does.

    ``heart_per_slice``: heart area (voxel count) of every slice along the stacking axis."""
    count = len(heart_per_slice)
    holding = np.flatnonzero(heart_per_slice > 0)
    if holding.size == 0:
        picks = sorted({math.floor(q * (count - 1) + 0.5) for q in (0.25, 0.5, 0.75)})
        return [(f"slice {i} (no heart found)", i) for i in picks]
    picks = list(dict.fromkeys(int(holding[math.floor(q * (holding.size - 1) + 0.5)]) for q in (0.1, 0.5, 0.9)))
    if len(picks) < 3:
        return [(f"slice {i}", i) for i in picks]
    half = holding.size // 2
    base_first = heart_per_slice[holding[:half]].sum() >= heart_per_slice[holding[-half:]].sum()
    names = ("basal", "mid", "apical") if base_first else ("apical", "mid", "basal")
    return [(f"{name} (slice {i})", i) for name, i in zip(names, picks)]


def _crop_box(heart: np.ndarray, spacing: tuple[float, float]) -> tuple[slice, slice]:
    """In-plane box around the heart of a (S, H, W) mask, with a margin; the whole field where empty."""
    shape = heart.shape[1:]
    if not heart.any():
        return slice(0, shape[0]), slice(0, shape[1])
    box = []
    for axis, (size, mm) in enumerate(zip(shape, spacing)):
        present = np.flatnonzero(heart.any(axis=(0, 2 - axis)))
        centre = (present[0] + present[-1] + 1) / 2
        half = max((present[-1] + 1 - present[0]) / 2 + CROP_MARGIN_MM / mm, MIN_FIELD_MM / (2 * mm))
        box.append(slice(max(0, int(centre - half)), min(size, int(math.ceil(centre + half)))))
    return box[0], box[1]


def _display(panel: np.ndarray) -> np.ndarray:
    """An in-plane slice (first in-plane axis, second) as drawn: the first axis runs left to right."""
    return panel.T


def draw_case_figure(image, seg, uncertainty, spacing, path: Path, map_name: str = "uncertainty", crop: bool = True) -> str:
    """The case figure: a row of representative slices with the segmentation over the image, and below
    it the same slices of the uncertainty map with the segmentation's outlines (where there is a map).
    Arrays are 3D (X, Y, Z) on the same grid; any of them may be None. ``crop``: show the region around
    the heart rather than the whole field of view. Returns the slices shown, in words."""
    reference = next(a for a in (seg, image, uncertainty) if a is not None)
    axis = slice_axis(spacing, reference.shape)
    in_plane = tuple(float(s) for a, s in enumerate(spacing[:3]) if a != axis)

    def stack(a):
        return None if a is None else np.moveaxis(a, axis, 0)

    image, seg, uncertainty = stack(image), stack(seg), stack(uncertainty)
    heart = seg > 0 if seg is not None else np.zeros(stack(reference).shape, bool)
    picks = representative_slices(heart.sum(axis=(1, 2)))
    if seg is None:  # nothing segmented to choose by: the middle slices, without claiming there is no heart
        picks = [(f"slice {i}", i) for _, i in picks]
    box = _crop_box(heart if crop else np.zeros_like(heart), in_plane)

    def panel(a, i):
        return _display(a[i][box])

    # drawn panels: columns follow the first in-plane axis, rows the second (see _display)
    height_mm = (box[1].stop - box[1].start) * in_plane[1]
    width_mm = (box[0].stop - box[0].start) * in_plane[0]
    panel_w = 3.0
    panel_h = panel_w * min(max(height_mm / width_mm, 0.4), 2.0)
    rows = 2 if uncertainty is not None else 1
    margin_top, margin_right = 0.35, 1.0
    fig_w, fig_h = panel_w * len(picks) + 0.3 + margin_right, (panel_h + 0.1) * rows + margin_top + 0.1
    fig = Figure(figsize=(fig_w, fig_h), dpi=DPI)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, len(picks), wspace=0.04, hspace=0.04, left=0.3 / fig_w, right=1 - margin_right / fig_w,
                            top=1 - margin_top / fig_h, bottom=0.1 / fig_h)
    map_range = (0.0, 1.0)
    if uncertainty is not None:
        values = np.concatenate([uncertainty[i][box].ravel() for _, i in picks])
        values = values[np.isfinite(values)]
        if values.size:
            top = float(np.percentile(values, 99.5))
            map_range = (min(0.0, float(values.min())), top if top > 0 else 1.0)
    axes = []
    for column, (label, i) in enumerate(picks):
        ax = fig.add_subplot(grid[0, column])
        axes.append(ax)
        if image is not None:
            shown = panel(image, i).astype(np.float32)
            lo, hi = np.percentile(shown, [1, 99.5])
            ax.imshow(shown, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="bilinear")
        else:
            ax.imshow(np.zeros(panel(reference if seg is None else seg, i).shape), cmap="gray", vmin=0, vmax=1)
        if seg is not None:
            labels = panel(seg, i)
            overlay = np.zeros((*labels.shape, 4), np.float32)
            for name, value in STRUCTURES.items():
                overlay[labels == value] = (*_rgb(COLOURS[name]), 0.45)
            ax.imshow(overlay, interpolation="nearest")
        ax.set_title(label, fontsize=11, pad=4)
        if uncertainty is not None:
            ax = fig.add_subplot(grid[1, column])
            axes.append(ax)
            im = ax.imshow(panel(uncertainty, i), cmap="inferno", vmin=map_range[0], vmax=map_range[1], interpolation="nearest")
            if seg is not None:
                labels = panel(seg, i)
                for value in STRUCTURES.values():
                    if (labels == value).any():
                        ax.contour((labels == value).astype(np.float32), levels=[0.5], colors="white", linewidths=0.6, alpha=0.8)
    for ax in axes:
        ax.set_axis_off()  # no ticks to lay out: images only
        ax.set_aspect(in_plane[1] / in_plane[0])  # height / width of a drawn pixel
    right = 1 - margin_right / fig_w
    if uncertainty is not None:
        bottom_row = grid[1, 0].get_position(fig)
        bar = fig.colorbar(im, cax=fig.add_axes((right + 0.12 / fig_w, bottom_row.y0, 0.12 / fig_w, bottom_row.height)))
        bar.ax.tick_params(labelsize=8)
        bar.set_label(map_name, fontsize=9)
    if seg is not None:
        handles = [Patch(facecolor=COLOURS[n], alpha=0.8, label=n) for n in STRUCTURES]
        top_row = grid[0, 0].get_position(fig)
        fig.legend(handles=handles, loc="upper left", fontsize=10, frameon=False, bbox_to_anchor=(right + 0.05 / fig_w, top_row.y1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI), overwrite=True)
    return ", ".join(label for label, _ in picks)


def _rgb(colour: str) -> tuple[float, float, float]:
    return tuple(int(colour[k:k + 2], 16) / 255.0 for k in (1, 3, 5))


def draw_score_figure(reference: list[float], threshold: float | None, value: float | None, path: Path, name: str) -> None:
    """The in-distribution validation scores (histogram, and a strip with one tick per case), the
    threshold, and this case; an infinite case score is marked at the right edge."""
    finite = np.array([v for v in reference if v is not None and math.isfinite(v)], dtype=float)
    fig = Figure(figsize=(4.8, 2.0), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.04, 0.27, 0.92, 0.5))
    span = [*finite.tolist(), *(v for v in (threshold, value) if v is not None and math.isfinite(v))]
    lo, hi = (min(span), max(span)) if span else (0.0, 1.0)
    pad = 0.06 * (hi - lo) if hi > lo else 1.0
    lo, hi = lo - pad, hi + pad
    if finite.size:
        ax.hist(finite, bins=min(20, max(5, finite.size // 2)), color="#9bb7d4", edgecolor="white")
        top = ax.get_ylim()[1]
        ax.plot(finite, np.full(finite.size, -0.1 * top), "|", color="#35608f", markersize=7)
        ax.set_ylim(-0.2 * top, top * 1.05)
    ax.set_xlim(lo, hi)
    mid = (lo + hi) / 2
    for x, text, colour, line, height in (
        (threshold, "threshold", "#444", "--", 1.04),
        (value, "this case", "#d62728", "-", 1.3),
    ):
        if x is None:
            continue
        shown = min(x, hi)
        ax.axvline(shown, color=colour, linestyle=line, linewidth=1.3 if line == "--" else 2.2)
        label = f"{text} {'inf' if math.isinf(x) else f'{x:.3g}'}"
        ax.text(shown, height, label, transform=ax.get_xaxis_transform(), fontsize=8, color=colour, clip_on=False,
                ha="right" if shown > mid else "left", va="bottom")
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8)
    ax.set_xlabel(f"{name}: in-distribution validation cases (n = {finite.size})", fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI), overwrite=True)


# ------------------------------------------------------------------------------------------- html
def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


_UNITS = {"ml": "ml", "g": "g", "pct": "%", "mm": "mm", "mm2": "mm²"}
_WORDS = {"lv": "LV", "rv": "RV", "myo": "myocardial", "edv": "EDV", "esv": "ESV", "ef": "EF", "sv": "SV"}


def measurement_label(key: str) -> str:
    """``lv_volume_ml`` -> ``LV volume (ml)``."""
    words = key.split("_")
    unit = _UNITS.get(words[-1])
    words = words[:-1] if unit else words
    text = " ".join(_WORDS.get(w, w) for w in words)
    return f"{text} ({unit})" if unit else text


def _measurements_html(measurements: dict | None, frame: int | None) -> str:
    if not measurements:
        return "<p class='muted'>no measurements</p>"
    per_frame = any(isinstance(v, list) for v in measurements.values())
    if per_frame:
        head = f"<tr><th>measurement</th><th>frame {frame}</th><th>min</th><th>max</th></tr>"
        rows = []
        for k, v in measurements.items():
            values = [x for x in (v if isinstance(v, list) else [v]) if x is not None]
            at = v[frame] if isinstance(v, list) and frame is not None and frame < len(v) else None
            rows.append(f"<tr><td>{_e(measurement_label(k))}</td><td>{_e(_fmt(at))}</td>"
                        f"<td>{_e(_fmt(min(values) if values else None))}</td><td>{_e(_fmt(max(values) if values else None))}</td></tr>")
    else:
        head = "<tr><th>measurement</th><th>value</th></tr>"
        rows = [f"<tr><td>{_e(measurement_label(k))}</td><td>{_e(_fmt(v))}</td></tr>" for k, v in measurements.items()]
    return f"<table class='kv'>{head}{''.join(rows)}</table>"


def _qc_html(qc: dict | None) -> str:
    if not qc:
        return "<p class='muted'>no quality control</p>"
    probability = qc.get("failure_probability")
    learned = "" if probability is None else f"<p>probability of a failed segmentation (QC classifier): {100 * probability:.0f}%</p>"
    if qc.get("passed"):
        return f"<p class='pass'>passed every check</p>{learned}"
    reasons = "".join(f"<li>{_e(r)}</li>" for r in qc.get("failed") or [])
    return f"<p class='fail'>failed {len(qc.get('failed') or [])} check(s)</p>{learned}<ul class='reasons'>{reasons}</ul>"


@dataclass
class Reference:
    """The default score's in-distribution reference, from a fitted scorer."""

    name: str
    threshold: float | None
    values: list[float]
    tpr: float | None


def _reference(scorer: OODScorer | None, name: str | None) -> Reference | None:
    if scorer is None or name is None:
        return None
    return Reference(name, scorer.thresholds.get(name), list(scorer.validation_scores.get(name, [])), getattr(scorer, "tpr", None))


def _score_html(entry: CaseEntry, reference: Reference | None) -> str:
    record = entry.record
    value = default_score(record)
    if value is None:
        return "<p class='muted'>not scored (OOD scoring was off)</p>"
    name = record.get("default_detector") or "default score"
    text = "inf (no heart found)" if math.isinf(value) else f"{value:.4g}"
    parts = [f"<p><b>{_e(name)}</b> = {_e(text)}"]
    if reference is not None and reference.threshold is not None:
        side = "above" if value > reference.threshold else "not above"
        parts.append(f", {side} the threshold {_e(_fmt(reference.threshold))}")
    parts.append(": <b class='fail'>flagged as out of distribution</b>" if record.get("ood_flag") else ": accepted")
    parts.append("</p>")
    if entry.percentile is not None:
        parts.append(f"<p>percentile {entry.percentile:.0f} of the {len(reference.values)} in-distribution validation cases "
                     "(the share of them scoring at most this)</p>")
    elif reference is None:
        parts.append("<p class='muted'>no in-distribution reference (give the run's OOD state)</p>")
    elif not reference.values:
        parts.append(f"<p class='muted'>the OOD state holds no validation scores for {_e(name)}</p>")
    if entry.score_figure:
        parts.append(f"<img class='score' src='{_e(quote(entry.score_figure))}' alt='{_e(name)} against its reference'>")
    scores = record.get("scores") or {}
    if scores:
        rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_fmt(v))}</td></tr>" for k, v in scores.items())
        parts.append(f"<details><summary>all scores ({len(scores)})</summary><table class='kv'>{rows}</table></details>")
    return "".join(parts)


def _case_html(entry: CaseEntry, reference: Reference | None) -> str:
    record = entry.record
    badges = []
    if entry.group == ERROR:
        badges.append("<span class='badge error'>error</span>")
    if record.get("ood_flag"):
        badges.append("<span class='badge ood'>flagged as OOD</span>")
    if record.get("status") == "ok" and not (record.get("qc") or {}).get("passed", True):
        badges.append("<span class='badge qc'>failed QC</span>")
    if not badges:
        badges.append("<span class='badge ok'>ok</span>")
    meta = [f"input <code>{_e(record.get('image', '?'))}</code>"]
    if record.get("shape"):
        meta.append(f"shape {_e(' x '.join(map(str, record['shape'])))}")
    if record.get("spacing_mm"):
        meta.append(f"spacing {_e(' x '.join(_fmt(float(s)) for s in record['spacing_mm']))} mm")
    out = [f"<section class='case g{entry.group}' id='case-{entry.index}'>",
           f"<h2>{_e(entry.name)} {''.join(badges)}</h2>", f"<p class='meta'>{' · '.join(meta)}</p>"]
    if entry.group == ERROR:
        out.append(f"<p class='error-text'>{_e(record.get('error') or 'failed without a message')}</p>")
        if record.get("traceback"):
            out.append(f"<details><summary>traceback</summary><pre>{_e(record['traceback'])}</pre></details>")
    if entry.problems:
        out.append("<div class='problems'><b>report problems</b><ul>" + "".join(f"<li>{_e(p)}</li>" for p in entry.problems)
                   + "</ul></div>")
    if entry.figure:
        out.append(f"<figure><img src='{_e(quote(entry.figure))}' alt='slices of {_e(entry.name)}'>"
                   f"<figcaption>{_e(entry.shown)}</figcaption></figure>")
    if entry.group != ERROR:
        out.append("<div class='cols'>")
        out.append(f"<div><h3>measurements</h3>{_measurements_html(record.get('measurements'), _frame_of(record))}</div>")
        out.append(f"<div><h3>quality control</h3>{_qc_html(record.get('qc'))}</div>")
        out.append(f"<div><h3>OOD score</h3>{_score_html(entry, reference)}</div>")
        out.append("</div>")
    out.append("<p class='top'><a href='#top'>back to the summary</a></p></section>")
    return "\n".join(out)


def _frame_of(record: dict) -> int | None:
    shape = record.get("shape") or []
    return shape[3] // 2 if len(shape) == 4 else None


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;background:#f3f4f6;color:#1f2328;
 font-size:15px;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:20px 28px}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:19px;margin:0 0 4px}h3{font-size:14px;margin:6px 0;text-transform:uppercase;
 letter-spacing:.04em;color:#57606a}
.summary,.case{background:#fff;border-radius:8px;padding:16px 20px;margin:16px 0;box-shadow:0 1px 3px rgba(0,0,0,.12)}
.case{border-left:7px solid #2da44e}.case.g0{border-left-color:#cf222e}.case.g1{border-left-color:#e16f24}
.case.g2{border-left-color:#bf8700}
.counts{display:flex;flex-wrap:wrap;gap:12px;margin:10px 0}
.count{background:#f6f8fa;border-radius:6px;padding:8px 14px;min-width:110px}.count b{display:block;font-size:24px}
table{border-collapse:collapse;font-size:14px}td,th{padding:3px 10px 3px 0;text-align:left;vertical-align:top}
th{color:#57606a;font-weight:600;border-bottom:1px solid #d0d7de;white-space:nowrap}.facts th{border:0;padding-right:16px}
table.overview td,table.overview th{padding:4px 14px 4px 0;border-bottom:1px solid #eaeef2}
.kv td:nth-child(n+2){font-variant-numeric:tabular-nums;text-align:right}
.badge{font-size:12px;font-weight:600;border-radius:10px;padding:2px 9px;margin-left:6px;color:#fff;vertical-align:middle}
.badge.error{background:#cf222e}.badge.ood{background:#e16f24}.badge.qc{background:#bf8700}.badge.ok{background:#2da44e}
.meta{color:#57606a;font-size:13px;margin:0 0 8px}code{font-size:12px;word-break:break-all}
figure{margin:6px 0}figure img{max-width:100%;height:auto}figcaption{font-size:12px;color:#57606a}
.cols{display:grid;grid-template-columns:1fr 1.2fr 1.5fr;gap:22px}
img.score{max-width:100%;height:auto;display:block;margin-top:4px}
.pass{color:#1a7f37;font-weight:600}.fail{color:#cf222e;font-weight:600}.muted{color:#6e7781}
ul.reasons{margin:4px 0;padding-left:18px;font-size:13px}td.verdict{min-width:260px}
.error-text{color:#cf222e;font-weight:600;word-break:break-word}
.problems{background:#fff8c5;border-radius:6px;padding:6px 12px;font-size:13px;margin:6px 0}.problems ul{margin:4px 0}
pre{white-space:pre-wrap;font-size:12px;background:#f6f8fa;padding:8px}
details{margin-top:8px;font-size:13px}.top{font-size:12px;margin:8px 0 0}a{color:#0969da}
"""


#: Columns of the subjects' table: cardiac function keys and their headings.
FUNCTION_COLUMNS = (("lv_edv_ml", "LV EDV", "ml"), ("lv_esv_ml", "LV ESV", "ml"), ("lv_ef_pct", "LV EF", "%"),
                    ("rv_edv_ml", "RV EDV", "ml"), ("rv_ef_pct", "RV EF", "%"), ("myo_mass_g", "mass", "g"))


def subject_rows(entries: list[CaseEntry]) -> list[tuple[str, list[CaseEntry], dict, dict]]:
    """One row per subject with a cardiac function: an ED/ES pair (both records carry it; shown once) or a
    cine. (subject, its case entries, cardiac function, verdict ``subject_qc``)."""
    rows, pairs = [], {}
    for e in sorted(entries, key=lambda e: e.index):
        r = e.record
        if r.get("status") != "ok" or not r.get("cardiac_function"):
            continue
        if r.get("phase") in ("ED", "ES") and r.get("subject") in pairs:
            pairs[r["subject"]].append(e)
            continue
        cases = [e]
        if r.get("phase") in ("ED", "ES"):
            pairs[r.get("subject")] = cases
        rows.append((str(r.get("subject") or e.name), cases, r["cardiac_function"], r.get("subject_qc") or {}))
    return rows


def _subjects_html(entries: list[CaseEntry]) -> str:
    rows = subject_rows(entries)
    if not rows:
        return ""
    head = ("<th>subject</th>" + "".join(f"<th>{_e(h)}<br><span class='muted'>{_e(u)}</span></th>" for _, h, u in FUNCTION_COLUMNS)
            + "<th>group<br><span class='muted'>estimate</span></th><th>verdict</th>")
    lines = []
    for subject, cases, function, verdict in rows:
        links = " ".join(f"<a href='#case-{e.index}'>{_e(e.record.get('phase') or 'cine')}</a>" for e in cases)
        values = "".join(f"<td class='num'>{_e(_fmt(function.get(k)))}</td>" for k, _, _ in FUNCTION_COLUMNS)
        group = cases[0].record.get("group_estimate") or {}
        guess = f"{group['group']} ({100 * group['probabilities'][group['group']]:.0f}%)" if group else "–"
        if not verdict:
            says = "<span class='muted'>no verdict</span>"
        elif verdict.get("passed"):
            says = "<span class='pass'>passed</span>"
        else:
            says = ("<span class='fail'>do not use without review</span><ul class='reasons'>"
                    + "".join(f"<li>{_e(r)}</li>" for r in verdict.get("failed") or []) + "</ul>")
        lines.append(f"<tr><td>{_e(subject)} <span class='muted'>{links}</span></td>{values}<td>{_e(guess)}</td><td class='verdict'>{says}</td></tr>")
    return ("<h3 style='margin-top:14px'>subjects: cardiac function</h3><p class='muted'>from the ED and ES segmentations "
            "of each subject (or a cine's volume curve); a verdict fails when the anatomy or function checks fail or "
            "either segmentation is not trusted</p><table class='overview'><tr>" + head + "</tr>" + "".join(lines) + "</table>")


def _summary_html(entries: list[CaseEntry], output_dir: Path, reference: Reference | None, digest: tuple[str, str] | None) -> str:
    records = [e.record for e in entries]
    ok = [r for r in records if r.get("status") == "ok"]
    scored = any("default_score" in r for r in records)
    counts = [("cases", len(records)), ("segmented", len(ok)), ("errors", len(records) - len(ok)),
              ("flagged as OOD", sum(bool(r.get("ood_flag")) for r in ok) if scored else "–"),
              ("failed QC", sum(not (r.get("qc") or {}).get("passed", True) for r in ok))]
    cases_file = output_dir / CASES_FILE
    run_date = datetime.datetime.fromtimestamp(cases_file.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    detector = next((r.get("default_detector") for r in ok if r.get("default_detector")), None)
    facts = [("run folder", f"<code>{_e(output_dir)}</code>"), ("run finished", _e(run_date)), ("report written", _e(now))]
    if not scored:
        facts.append(("OOD scoring", "off"))
    else:
        facts.append(("default detector", _e(detector or "?")))
        if reference is not None and reference.threshold is not None:
            tpr = f" (accepts {reference.tpr:.0%} of in-distribution validation cases)" if reference.tpr else ""
            facts.append(("threshold", _e(_fmt(reference.threshold) + tpr)))
        else:
            facts.append(("threshold", "unknown (no OOD state given)"))
    if digest is not None:
        facts.append(("model weights", f"sha256 <code title='{_e(digest[0])}'>{_e(digest[0][:16])}…</code> {_e(digest[1])}"))
    problems = sum(bool(e.problems) for e in entries)
    if problems:
        facts.append(("report problems", f"{problems} case(s) with missing or unreadable files (stated in their entries)"))
    rows = []
    for e in entries:
        r = e.record
        score = default_score(r)
        pct = f"{e.percentile:.0f}" if e.percentile is not None else "–"
        qc = "–" if r.get("status") != "ok" else "passed" if (r.get("qc") or {}).get("passed", True) else "failed"
        probability = (r.get("qc") or {}).get("failure_probability")
        risk = "–" if probability is None else f"{100 * probability:.0f}%"
        rows.append(f"<tr><td><a href='#case-{e.index}'>{_e(e.name)}</a></td><td>{_e(GROUP_LABELS[e.group])}</td>"
                    f"<td class='num'>{_e(_fmt(score))}</td><td class='num'>{_e(pct)}</td><td>{_e(qc)}</td>"
                    f"<td class='num'>{_e(risk)}</td></tr>")
    return "\n".join([
        "<section class='summary' id='top'>",
        "<div class='counts'>" + "".join(f"<div class='count'><b>{_e(v)}</b>{_e(k)}</div>" for k, v in counts) + "</div>",
        "<table class='facts'>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts) + "</table>",
        "<h3 style='margin-top:14px'>cases in review order</h3>",
        "<table class='overview'><tr><th>case</th><th>verdict</th><th>default score</th><th>percentile</th><th>QC</th>"
        "<th title='the QC classifier&#39;s probability that the segmentation failed'>failure risk</th></tr>"
        + "".join(rows) + "</table>",
        _subjects_html(entries),
        "</section>",
    ])


# ------------------------------------------------------------------------------------------ driver
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60].strip("._") or "case"


def _draw_case(entry: CaseEntry, output_dir: Path, report_dir: Path, map_name: str) -> None:
    record, problems = entry.record, entry.problems
    outputs = record.get("outputs") or {}
    seg = _read("segmentation", outputs.get("segmentation"), output_dir, problems, lambda p: read_nifti(p, np.uint8))
    unc = _read("uncertainty map", outputs.get("uncertainty"), output_dir, problems, lambda p: read_nifti(p, np.float32))
    image = _read("image", record.get("image"), output_dir, problems, read_image)
    arrays = {"image": image, "segmentation": seg, "uncertainty map": unc}
    present = {k: a for k, a in arrays.items() if a is not None}
    if not present:
        return
    grid = (seg if seg is not None else next(iter(present.values()))).shape
    for kind, a in present.items():
        if a.shape[:3] != grid[:3]:
            problems.append(f"{kind}: shape {a.shape} does not match the segmentation grid {grid}; not drawn")
            arrays[kind] = None
    frame = grid[3] // 2 if len(grid) == 4 else None
    spacing = record.get("spacing_mm") or _spacing_of(outputs.get("segmentation") or record.get("image"), output_dir)
    entry.figure = f"case{entry.index:04d}_{_slug(entry.name)}.png"
    image, seg, unc = (_frame(arrays[k], frame) for k in ("image", "segmentation", "uncertainty map"))
    # a case flagged as out of distribution is shown whole: what it is matters more than its "heart"
    crop = not record.get("ood_flag")
    shown = [draw_case_figure(image, seg, unc, tuple(spacing), report_dir / entry.figure, map_name, crop=crop)]
    if frame is not None:
        shown.insert(0, f"cine, frame {frame} of {grid[3]}")
    shown.append("around the heart" if crop and seg is not None and seg.any() else "whole field of view")
    if seg is not None:
        shown.append("top: segmentation over the image" if image is not None else "top: segmentation (image not readable)")
    if unc is not None:
        shown.append(f"bottom: {map_name} with the segmentation's outlines, colour scale of this case")
    entry.shown = "; ".join(shown)


def _spacing_of(path: str | None, output_dir: Path) -> tuple[float, float, float]:
    try:
        return read_nifti(_resolve(path, output_dir)).spacing
    except Exception:
        return (1.0, 1.0, 1.0)


def write_report(output_dir: str | Path, scorer: OODScorer | None = None, checkpoint: str | Path | None = None,
                 progress: bool = True) -> Path:
    """Write ``<output_dir>/report/index.html`` and its figures for the run in ``output_dir``; returns the
    page's path. ``scorer``: the fitted OOD scorer of the run (for the reference distribution and the
    threshold); ``checkpoint``: the weights the run used (its digest is shown). The report's own files
    are replaced; problems with a case's files are stated in its entry."""
    output_dir = Path(output_dir).resolve()
    records = load_records(output_dir)
    report_dir = output_dir / REPORT_DIR
    report_dir.mkdir(parents=True, exist_ok=True)
    map_name = f"uncertainty ({scorer.uncertainty_map})" if scorer is not None else "uncertainty"
    entries = []
    for i in tqdm(review_order(records), desc="report", unit="case", disable=not progress):
        record = records[i]
        entry = CaseEntry(i, record, case_name(record), case_group(record))
        entries.append(entry)
        if entry.group == ERROR:
            continue
        try:
            _draw_case(entry, output_dir, report_dir, map_name)
        except Exception as e:  # a figure that cannot be drawn must not cost the other cases their entries
            entry.figure = None
            entry.problems.append(f"figure not drawn: {type(e).__name__}: {e}")
        reference = _reference(scorer, record.get("default_detector"))
        value = default_score(record)
        if reference is not None and reference.values and value is not None:
            finite = [v for v in reference.values if v is not None and math.isfinite(v)]
            entry.percentile = float(percentileofscore(finite, value, kind="weak")) if finite else None
            entry.score_figure = f"case{entry.index:04d}_{_slug(entry.name)}_score.png"
            try:
                draw_score_figure(reference.values, reference.threshold, value, report_dir / entry.score_figure, reference.name)
            except Exception as e:
                entry.score_figure = None
                entry.problems.append(f"score figure not drawn: {type(e).__name__}: {e}")
    detector = next((r.get("default_detector") for r in records if r.get("default_detector")), None)
    reference = _reference(scorer, detector)
    digest = None
    if checkpoint is not None and Path(checkpoint).is_file():
        digest = (file_digest(checkpoint), f"({Path(checkpoint).name})")
    elif scorer is not None and scorer.model_digest:
        digest = (scorer.model_digest, "(the weights the OOD state was fitted for)")
    body = [_summary_html(entries, output_dir, reference, digest)]
    body += [_case_html(e, _reference(scorer, e.record.get("default_detector"))) for e in entries]
    page = "\n".join([
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>Inference report: {_e(output_dir.name)}</title>", f"<style>{CSS}</style></head>",
        "<body><main>", f"<h1>Inference report <span class='muted'>{_e(output_dir.name)}</span></h1>",
        *body, "</main></body></html>", ""])
    index = report_dir / "index.html"
    atomic_write(index, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"), overwrite=True)
    print(f"report written to {index}")
    return index


def scorer_from_config(ood_state: str | Path, config_file: str | Path = DEFAULT_CONFIG) -> OODScorer:
    """The OOD scorer an inference config builds (``ood``), loaded from ``ood_state``."""
    from monai.bundle import ConfigParser

    if not Path(ood_state).is_file():
        raise FileNotFoundError(f"{ood_state}: OOD state not found")
    if not Path(config_file).is_file():
        raise FileNotFoundError(f"{config_file}: inference config not found (give --config_file)")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser["bundle_root"] = str(Path(config_file).resolve().parents[1])
    parser["ood_state"] = str(ood_state)
    scorer = parser.get_parsed_content("ood")
    scorer.require_fitted()
    return scorer


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m cmr_ood.report", description="HTML report of an inference run folder.")
    parser.add_argument("output_dir", help="the output_dir of an inference run (holds cases.json)")
    parser.add_argument("--ood_state", help="the fitted OOD state the run used (shows each score against its reference)")
    parser.add_argument("--config_file", default=str(DEFAULT_CONFIG), help="inference config that defines the OOD scorer")
    parser.add_argument("--checkpoint", help="the model weights the run used (their digest is shown)")
    args = parser.parse_args(argv)
    scorer = scorer_from_config(args.ood_state, args.config_file) if args.ood_state else None
    return write_report(args.output_dir, scorer, checkpoint=args.checkpoint)


if __name__ == "__main__":
    main()
