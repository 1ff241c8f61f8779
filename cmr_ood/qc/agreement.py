"""Agreement of predicted clinical measurements with the ground truth's: Bland-Altman analysis (bias,
limits of agreement), mean absolute error, and a Bland-Altman figure of several measurements."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchmetrics.functional import mean_absolute_error

from cmr_ood.data.io import atomic_write

#: Measurements of :class:`~cmr_ood.qc.measurements.SubjectMeasurements` compared by default: name, unit.
CLINICAL_MEASUREMENTS = {
    "lv_edv_ml": ("LV EDV", "ml"),
    "lv_esv_ml": ("LV ESV", "ml"),
    "lv_ef_pct": ("LV EF", "%"),
    "rv_edv_ml": ("RV EDV", "ml"),
    "rv_ef_pct": ("RV EF", "%"),
    "myo_mass_g": ("Myocardial mass (ED)", "g"),
}
#: Limits of agreement: bias +- this many standard deviations of the differences (95 % of them if normal).
LOA_SD = 1.96


@dataclass(frozen=True)
class Agreement:
    """Bland-Altman statistics of predicted - reference (sd with n - 1), and the mean absolute error."""

    n: int
    bias: float
    sd: float
    lower: float  # bias - 1.96 sd
    upper: float  # bias + 1.96 sd
    mae: float

    def as_dict(self, digits: int = 3) -> dict:
        return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _finite_pairs(predicted, reference) -> tuple[np.ndarray, np.ndarray]:
    predicted = np.asarray(predicted, dtype=np.float64).ravel()
    reference = np.asarray(reference, dtype=np.float64).ravel()
    if predicted.shape != reference.shape:
        raise ValueError(f"predicted and reference differ in length: {predicted.size} vs {reference.size}")
    keep = np.isfinite(predicted) & np.isfinite(reference)  # an undefined EF (EDV 0) is left out
    return predicted[keep], reference[keep]


def bland_altman(predicted, reference) -> Agreement:
    """Bias, sd and 95 % limits of agreement of ``predicted - reference``, and the MAE, over the pairs
    where both are finite. One pair gives sd NaN; none is an error."""
    predicted, reference = _finite_pairs(predicted, reference)
    if predicted.size == 0:
        raise ValueError("no finite (predicted, reference) pairs to compare")
    diff = predicted - reference
    bias = float(diff.mean())
    sd = float(diff.std(ddof=1)) if diff.size > 1 else float("nan")
    mae = float(mean_absolute_error(torch.from_numpy(predicted), torch.from_numpy(reference)))
    return Agreement(int(diff.size), bias, sd, bias - LOA_SD * sd, bias + LOA_SD * sd, mae)


def agreement(predicted: list[dict], reference: list[dict], keys=tuple(CLINICAL_MEASUREMENTS)) -> dict[str, Agreement]:
    """:func:`bland_altman` of each measurement ``key`` over paired records (e.g. one
    ``SubjectMeasurements.scalars()`` per subject, predicted and reference in the same order)."""
    if len(predicted) != len(reference):
        raise ValueError(f"{len(predicted)} predicted records but {len(reference)} reference records")
    return {k: bland_altman([p[k] for p in predicted], [r[k] for r in reference]) for k in keys}


def plot_bland_altman(predicted: list[dict], reference: list[dict], path, keys=tuple(CLINICAL_MEASUREMENTS),
                      names: list[str] | None = None, flagged: list[bool] | None = None, title: str | None = None,
                      columns: int = 3) -> str:
    """One Bland-Altman panel per measurement (difference against mean, bias and limits of agreement) in
    one PNG at ``path`` (written atomically, replacing it). Points outside the limits are labelled with
    their ``names`` (e.g. subject ids); ``flagged`` points (e.g. failed quality control) are drawn as crosses."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    rows = -(-len(keys) // columns)
    fig = Figure(figsize=(4.2 * columns, 3.4 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        label, unit = CLINICAL_MEASUREMENTS.get(key, (key, ""))
        p = np.array([r[key] for r in predicted], dtype=float)
        t = np.array([r[key] for r in reference], dtype=float)
        stats = bland_altman(p, t)
        mean, diff = (p + t) / 2, p - t
        crossed = np.zeros(len(p), bool) if flagged is None else np.asarray(flagged, bool)
        ax.scatter(mean[~crossed], diff[~crossed], s=14, color="tab:blue", alpha=0.8, label="QC passed")
        if crossed.any():
            ax.scatter(mean[crossed], diff[crossed], s=24, color="tab:orange", marker="x", label="QC flagged")
            ax.legend(fontsize=7, loc="best")
        ax.axhline(stats.bias, color="black", lw=1)
        for limit in (stats.lower, stats.upper):
            ax.axhline(limit, color="tab:red", lw=1, ls="--")
        ax.axhline(0, color="grey", lw=0.5)
        if names is not None and np.isfinite(stats.sd):
            for x, y, name in zip(mean, diff, names):
                if np.isfinite(y) and not stats.lower <= y <= stats.upper:
                    ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(f"{label}: bias {stats.bias:+.1f}, LoA [{stats.lower:.1f}, {stats.upper:.1f}] {unit}", fontsize=9)
        ax.set_xlabel(f"mean of predicted and reference ({unit})", fontsize=8)
        ax.set_ylabel(f"predicted - reference ({unit})", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"), overwrite=True)
