"""Calibration of segmentation probabilities (Karimi & Gholipour 2020): voxel-wise expected and maximum
calibration error of the top-1 class over equal-width confidence bins, reliability diagrams, and temperature
scaling fitted on validation logits.

The binned statistics here are also what the case-level calibration error (confidence vs Dice) in
``cmr_ood.ood.metrics`` uses: one definition of ECE/MCE for both.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from cmr_ood.data.io import atomic_write


def bin_sums(confidence: Tensor, target: Tensor, bins: int = 10) -> Tensor:
    """Per-bin ``(count, sum of confidence, sum of target)`` as a (3, bins) float64 tensor on the input device.

    Bins are equal-width on [0, 1]: bin b holds confidences in [b / bins, (b + 1) / bins), the last bin also
    holds 1. ``target`` is the correctness (0/1 for voxels) or any score in [0, 1] (a case's Dice). Sums, not
    the values, are kept so that any number of voxels can be accumulated in constant memory.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    confidence, target = confidence.reshape(-1), target.reshape(-1)
    if confidence.shape != target.shape:
        raise ValueError(f"confidence ({confidence.numel()} values) and target ({target.numel()} values) differ in size")
    index = (confidence.double() * bins).long().clamp_(0, bins - 1)
    counts = torch.bincount(index, minlength=bins).double()
    confidence_sum = torch.bincount(index, weights=confidence.double(), minlength=bins)
    target_sum = torch.bincount(index, weights=target.double(), minlength=bins)
    return torch.stack([counts, confidence_sum, target_sum])


def summarize_bins(sums: Tensor) -> dict[str, Tensor]:
    """ECE (count-weighted mean |confidence - accuracy| over bins), MCE (max over non-empty bins) and the
    reliability diagram data (per bin: edges, mean confidence, accuracy, count; NaN for empty bins)."""
    counts, confidence_sum, target_sum = sums
    total = counts.sum()
    if total <= 0:
        raise ValueError("no values were counted: nothing to compute a calibration error from")
    filled = counts > 0
    nan = torch.full_like(counts, float("nan"))
    confidence = torch.where(filled, confidence_sum / counts.clamp(min=1), nan)
    accuracy = torch.where(filled, target_sum / counts.clamp(min=1), nan)
    gap = (confidence - accuracy).abs()
    return {
        "ece": (counts / total * gap.nan_to_num(0.0)).sum(),
        "mce": gap[filled].max(),
        "bin_edges": torch.linspace(0.0, 1.0, counts.numel() + 1, dtype=torch.float64, device=counts.device),
        "bin_confidence": confidence,
        "bin_accuracy": accuracy,
        "bin_count": counts,
    }


class VoxelCalibration(Metric):
    """Streaming voxel-wise ECE (l1) and MCE (max) of the top-1 class, with reliability diagram data.

    torchmetrics' ``MulticlassCalibrationError`` keeps every voxel's confidence until ``compute``; whole CMR
    stacks over many cases are tens of millions of voxels, so this metric keeps only per-bin counts and sums
    (``bins`` x 3 numbers, summed across processes in distributed runs).

    ``update(probabilities (N, C, ...), labels (N, ...) or (N, 1, ...), mask=None)``: ``mask`` (same shape as
    the labels, boolean) selects the voxels to count, e.g. the predicted foreground or a band around it.
    ``compute()`` returns the dict of :func:`summarize_bins`.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, bins: int = 10, **kwargs):
        super().__init__(**kwargs)
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.bins = bins
        self.add_state("sums", default=torch.zeros(3, bins, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probabilities: Tensor, labels: Tensor, mask: Tensor | None = None) -> None:
        if probabilities.ndim < 2:
            raise ValueError(f"probabilities must be (N, C, ...), got shape {tuple(probabilities.shape)}")
        spatial = probabilities.shape[:1] + probabilities.shape[2:]
        labels = _drop_channel(labels, spatial, "labels")
        confidence, predicted = probabilities.max(dim=1)
        correct = predicted == labels.long()
        if mask is not None:
            mask = _drop_channel(mask, spatial, "mask").bool()
            confidence, correct = confidence[mask], correct[mask]
        self.sums += bin_sums(confidence, correct, self.bins).to(self.sums.device)

    def compute(self) -> dict[str, Tensor]:
        return summarize_bins(self.sums)


def _drop_channel(tensor: Tensor, spatial: torch.Size, name: str) -> Tensor:
    """``tensor`` as (N, ...) matching the probabilities' batch and spatial shape; accepts (N, 1, ...)."""
    if tensor.shape == spatial:
        return tensor
    if tensor.ndim == len(spatial) + 1 and tensor.shape[1] == 1 and tensor.shape[:1] + tensor.shape[2:] == spatial:
        return tensor[:, 0]
    raise ValueError(f"{name} of shape {tuple(tensor.shape)} does not match the (N, C, ...) input: expected (N, ...) = "
                     f"{tuple(spatial)} or (N, 1, ...)")


def plot_reliability(reliability: dict[str, Tensor], path: str | Path, title: str = "Reliability",
                     overwrite: bool = False) -> str:
    """Reliability diagram (accuracy per confidence bin against the diagonal, counts below) as a PNG; the
    title carries ECE and MCE. ``reliability`` is the dict of :func:`summarize_bins` / ``VoxelCalibration``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = reliability["bin_edges"].cpu().numpy()
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    accuracy = reliability["bin_accuracy"].cpu().nan_to_num(0.0).numpy()
    confidence = reliability["bin_confidence"].cpu().numpy()
    counts = reliability["bin_count"].cpu().numpy()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centres, accuracy, width=width, edgecolor="black", color="#0a84ff", label="accuracy")
    top.plot(confidence, confidence, "o", color="#ff3b30", markersize=3, label="mean confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
    top.set(ylim=(0, 1), ylabel="accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"{title}\nECE {float(reliability['ece']):.4f}  MCE {float(reliability['mce']):.4f}", fontsize=10)
    bottom.bar(centres, counts, width=width, edgecolor="black", color="#8e8e93")
    bottom.set(xlim=(0, 1), xlabel="confidence", ylabel="count")
    if counts.max() > 0:
        bottom.set_yscale("log")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100), overwrite=overwrite)
    finally:
        plt.close(fig)


def _voxels_by_classes(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Logits as (V, C) and labels as (V,), from (V, C)/(V,) or (N, C, ...)/(N, ...) or (N, 1, ...)."""
    if logits.ndim < 2:
        raise ValueError(f"logits must be (V, C) or (N, C, ...), got shape {tuple(logits.shape)}")
    if logits.ndim > 2:
        labels = _drop_channel(labels, logits.shape[:1] + logits.shape[2:], "labels")
        logits = logits.movedim(1, -1)
    elif labels.shape != logits.shape[:1]:
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits (V, C) = {tuple(logits.shape)}")
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


class TemperatureScaling:
    """One temperature T > 0 for all classes: calibrated probabilities are softmax(logits / T).

    ``fit`` minimises the mean NLL of the validation voxels over log T (so T stays positive) with LBFGS.
    The fitted T and the NLL before (T = 1) and after fitting are kept for reporting; the state is plain
    numbers (``state_dict`` is JSON-serialisable) and is saved with the model.
    """

    def __init__(self, temperature: float = 1.0):
        self.temperature = _check_temperature(temperature)
        self.nll_before: float | None = None
        self.nll_after: float | None = None
        self.num_voxels: int | None = None

    def fit(self, logits: Tensor, labels: Tensor, max_voxels: int = 2_000_000, seed: int = 0, max_iter: int = 100):
        """Fit T on validation ``logits`` (V, C) and ``labels`` (V,) (or (N, C, ...) and (N, ...)).

        With more than ``max_voxels`` voxels a random subset of that size is used (seeded: the same inputs
        give the same T). Works under ``torch.no_grad()``/``torch.inference_mode()`` and on inference tensors.
        """
        logits, labels = _voxels_by_classes(logits, labels)
        if logits.shape[0] == 0:
            raise ValueError("no voxels to fit the temperature on")
        if not torch.isfinite(logits).all():
            raise ValueError("logits contain non-finite values")
        if labels.min() < 0 or labels.max() >= logits.shape[1]:
            raise ValueError(f"labels must lie in [0, {logits.shape[1] - 1}], got [{int(labels.min())}, {int(labels.max())}]")
        # Gradients are switched on here, whatever the caller's mode; the clones below are ordinary tensors
        # (inference tensors cannot take part in autograd).
        with torch.inference_mode(False), torch.enable_grad():
            if logits.shape[0] > max_voxels:
                generator = torch.Generator().manual_seed(seed)
                keep = torch.randperm(logits.shape[0], generator=generator)[:max_voxels].to(logits.device)
                logits, labels = logits[keep], labels[keep]
            logits = logits.detach().clone().float()
            labels = labels.detach().clone().long()
            log_t = torch.zeros((), device=logits.device, requires_grad=True)
            optimiser = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

            def closure():
                optimiser.zero_grad()
                loss = F.cross_entropy(logits / log_t.exp(), labels)
                loss.backward()
                return loss

            optimiser.step(closure)
            with torch.no_grad():
                self.temperature = _check_temperature(float(log_t.exp()))
                self.nll_before = float(F.cross_entropy(logits, labels))
                self.nll_after = float(F.cross_entropy(logits / self.temperature, labels))
        self.num_voxels = int(labels.numel())
        return self

    def __call__(self, logits: Tensor) -> Tensor:
        """The logits divided by T (apply softmax over the class dimension for calibrated probabilities)."""
        return logits / self.temperature

    def state_dict(self) -> dict:
        return {"temperature": self.temperature, "nll_before": self.nll_before, "nll_after": self.nll_after,
                "num_voxels": self.num_voxels}

    def load_state_dict(self, state: dict) -> None:
        if "temperature" not in state:
            raise ValueError(f"temperature scaling state has no 'temperature' (keys: {sorted(state)})")
        self.temperature = _check_temperature(state["temperature"])
        self.nll_before, self.nll_after = state.get("nll_before"), state.get("nll_after")
        self.num_voxels = state.get("num_voxels")


def _check_temperature(value) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a positive finite number, got {value}")
    return value
