"""The OOD scorer of a model: its detectors, their combinations, the temperature, and the decision
thresholds, fitted together on in-distribution data and saved beside the network weights.

Fitting (:meth:`OODScorer.fit`) takes two in-distribution sets: ``fit`` cases for the detectors' own
statistics (feature means, training signatures; the network's training data serves), and held-out
``validation`` cases with labels for everything that must not be fitted on the training data: the
temperature, the standardisation of the combined scores, and the thresholds (each accepts ``tpr`` of
the validation cases). Nothing is fitted on OOD data: the scores stay post-hoc.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from cmr_ood.data.io import atomic_write
from cmr_ood.ood.base import CaseOutputs, Detector
from cmr_ood.ood.calibration import TemperatureScaling
from cmr_ood.ood.metrics import fit_threshold

COMBINATION_RULES = ("zsum", "zmax")
_VOXELS_PER_CASE = 200_000  # validation voxels per case kept for the temperature fit


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file (identifies the weights a scorer was fitted for)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class OODScorer:
    """Detectors + combinations + thresholds.

    ``combinations`` name case-level combinations of other scores: ``{"rule": "zsum" | "zmax", "scores":
    [score names]}``, each part standardised with its mean and sd on the validation cases (``zsum`` adds
    the z-scores, each times its entry in an optional ``"weights"`` list and capped at its entry in an
    optional ``"clip"`` list, ``null`` for no cap; ``zmax`` keeps the largest). A capped feature distance
    lifts every unfamiliar input above the familiar ones by a bounded amount and leaves the order among
    them to an output score: unfamiliar but well segmented inputs then rank below failed ones.
    ``default`` names the score behind ``ood_flag``; ``uncertainty_map`` names the detector whose voxel map
    is written beside the segmentation. ``state`` is a saved fit to load (a missing file is an error when
    scoring, not when building: the bundle's calibration config builds the same scorer before fitting it)."""

    def __init__(self, detectors: list[Detector], combinations: dict[str, dict] | None = None, default: str = "entropy_fg",
                 uncertainty_map: str = "entropy", tpr: float = 0.95, state: str | None = None):
        self.detectors = list(detectors)
        names = [d.name for d in self.detectors]
        if len(set(names)) != len(names):
            raise ValueError(f"detector names must differ: {names}")
        self.combinations = dict(combinations or {})
        for name, spec in self.combinations.items():
            if spec.get("rule") not in COMBINATION_RULES or not spec.get("scores"):
                raise ValueError(f"combination '{name}': give a rule among {COMBINATION_RULES} and a list of scores")
            weights, clip = spec.get("weights"), spec.get("clip")
            if weights is not None and (spec["rule"] != "zsum" or len(weights) != len(spec["scores"]) or min(weights) <= 0):
                raise ValueError(f"combination '{name}': weights go with rule 'zsum', one positive weight per score")
            if clip is not None and (spec["rule"] != "zsum" or len(clip) != len(spec["scores"])):
                raise ValueError(f"combination '{name}': clip goes with rule 'zsum', one cap (or null) per score")
        if uncertainty_map not in names:
            raise ValueError(f"uncertainty_map '{uncertainty_map}' is not one of the detectors {names}")
        self.default, self.uncertainty_map, self.tpr = default, uncertainty_map, tpr
        self.temperature = TemperatureScaling()
        self.standardisation: dict[str, tuple[float, float]] = {}
        self.thresholds: dict[str, float] = {}
        self.validation_scores: dict[str, list[float]] = {}
        self.model_digest: str | None = None  # of the weights the scorer was fitted for
        self.state_path = state
        if state is not None and Path(state).exists():
            self.load(state)

    @property
    def taps(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t for d in self.detectors for t in d.taps))

    @property
    def fitted(self) -> bool:
        return bool(self.thresholds)

    # scoring
    def _detector_scores(self, case: CaseOutputs) -> dict[str, float]:
        case.temperature = self.temperature.temperature
        scores = {}
        for detector in self.detectors:
            scores.update(detector.case_scores(case))
        return scores

    def combine(self, scores: dict[str, float]) -> dict[str, float]:
        """The combinations' values from the other scores of a case."""
        out = {}
        for name, spec in self.combinations.items():
            z = []
            parts = len(spec["scores"])
            for part, weight, cap in zip(spec["scores"], spec.get("weights") or [1.0] * parts, spec.get("clip") or [None] * parts):
                if part not in scores:
                    raise KeyError(f"combination '{name}': no score '{part}'; scores are {sorted(scores)}")
                mean, sd = self.standardisation[part]
                value = (scores[part] - mean) / sd if math.isfinite(scores[part]) else math.inf
                z.append(weight * (value if cap is None else min(value, cap)))
            out[name] = sum(z) if spec["rule"] == "zsum" else max(z)
        return out

    def require_fitted(self) -> None:
        if not self.fitted:
            where = f" (no fitted state at {self.state_path})" if self.state_path else ""
            raise RuntimeError(f"the OOD scorer is not calibrated{where}: run the bundle's configs/calibrate.json")

    def score(self, case: CaseOutputs) -> dict[str, float]:
        """Every score of a case, by name (detectors' scores, then combinations)."""
        self.require_fitted()
        scores = self._detector_scores(case)
        scores.update(self.combine(scores))
        return scores

    def check_model(self, checkpoint: str | Path | None) -> None:
        """Scores and thresholds hold for the weights they were fitted with only: refuse others."""
        self.require_fitted()
        if checkpoint is None or self.model_digest is None:
            return
        if file_digest(checkpoint) != self.model_digest:
            raise ValueError(f"the OOD state {self.state_path or ''} was fitted for other weights than {checkpoint}: "
                             "run configs/calibrate.json for this checkpoint (or give its own ood_state)")

    def decide(self, scores: dict[str, float]) -> tuple[float, bool]:
        """The default score and whether it flags the case (above the threshold fitted on validation)."""
        value = scores[self.default]
        return value, bool(value > self.thresholds[self.default])

    def uncertainty(self, case: CaseOutputs) -> torch.Tensor:
        """The voxel map (Z, H, W) written beside the segmentation."""
        detector = next(d for d in self.detectors if d.name == self.uncertainty_map)
        case.temperature = self.temperature.temperature
        return case.map_of(detector)

    def restricted(self, scores: list[str]) -> OODScorer:
        """The same fitted scorer computing only what ``scores`` (and the uncertainty map) need."""
        needed = set(scores)
        for name in scores:
            needed.update(self.combinations.get(name, {}).get("scores", []))
        detectors = [d for d in self.detectors if d.name == self.uncertainty_map or needed & set(d.score_names)]
        out = OODScorer(detectors, {k: v for k, v in self.combinations.items() if k in needed}, self.default,
                        self.uncertainty_map, self.tpr)
        out.load_state_dict(self.state_dict())
        return out

    # fitting
    def fit(self, fit_cases: Iterable[CaseOutputs], validation: list[tuple[CaseOutputs, torch.Tensor]]) -> OODScorer:
        """``fit_cases``: in-distribution cases for the detectors' statistics (streamed; only read when a
        detector needs fitting). ``validation``: held-out cases and their labels (Z, H, W) on the
        preprocessed grid."""
        if len(validation) < 2:
            raise ValueError("fitting thresholds needs at least two validation cases")
        logits, labels = [], []
        generator = torch.Generator().manual_seed(0)
        for case, label in validation:
            flat = case.logits.float().permute(0, 2, 3, 1).reshape(-1, case.logits.shape[1])
            keep = torch.randperm(len(flat), generator=generator)[:_VOXELS_PER_CASE].to(flat.device)
            logits.append(flat[keep].cpu())
            labels.append(label.reshape(-1)[keep].long().cpu())
        self.temperature.fit(torch.cat(logits), torch.cat(labels))
        needing = [d for d in self.detectors if d.needs_fit]
        if needing:
            for case in fit_cases:
                case.temperature = self.temperature.temperature
                for d in needing:
                    d.update(case)
            for d in needing:
                d.finish()
        per_case = [self._detector_scores(case) for case, _ in tqdm(validation, desc="scoring validation cases", unit="vol")]
        names = list(per_case[0])
        self.validation_scores = {n: [s[n] for s in per_case] for n in names}
        self.standardisation = {}
        for n, values in self.validation_scores.items():
            finite = np.array([v for v in values if math.isfinite(v)])
            sd = float(finite.std()) if len(finite) > 1 else 0.0
            self.standardisation[n] = (float(finite.mean()) if len(finite) else 0.0, sd if sd > 0 else 1.0)
        self.thresholds = {n: float(fit_threshold(np.array(v), tpr=self.tpr)) for n, v in self.validation_scores.items()}
        self._fit_combinations()
        return self

    def _fit_combinations(self) -> None:
        """Validation scores and thresholds of the combinations, from the stored validation scores of their
        parts (no network needed: a combination added to the config after calibration is fitted on load)."""
        count = len(next(iter(self.validation_scores.values())))
        per_case = [{n: v[i] for n, v in self.validation_scores.items()} for i in range(count)]
        combined = [self.combine(s) for s in per_case]
        for n in self.combinations:
            self.validation_scores[n] = [c[n] for c in combined]
            self.thresholds[n] = float(fit_threshold(np.array(self.validation_scores[n]), tpr=self.tpr))
        if self.default not in self.thresholds:
            raise ValueError(f"default score '{self.default}' is not among the scores {sorted(self.thresholds)}")

    # state
    def state_dict(self) -> dict:
        return {
            "detectors": {d.name: d.state_dict() for d in self.detectors},
            "temperature": self.temperature.state_dict(),
            "standardisation": {k: list(v) for k, v in self.standardisation.items()},
            "thresholds": dict(self.thresholds),
            "validation_scores": dict(self.validation_scores),
            "default": self.default,
            "tpr": self.tpr,
            "model_digest": self.model_digest,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = [d.name for d in self.detectors if d.name not in state["detectors"]]
        if missing:
            raise ValueError(f"the fitted state has no detector {missing}: calibrate again with these detectors")
        for d in self.detectors:
            d.load_state_dict(state["detectors"][d.name])
        self.temperature.load_state_dict(state["temperature"])
        self.standardisation = {k: tuple(v) for k, v in state["standardisation"].items()}
        self.thresholds = dict(state["thresholds"])
        self.validation_scores = dict(state["validation_scores"])
        self.tpr = state["tpr"]
        self.model_digest = state.get("model_digest")
        self._fit_combinations()

    def save(self, path: str | Path, overwrite: bool = True) -> str:
        return atomic_write(path, lambda tmp: torch.save(self.state_dict(), tmp), overwrite=overwrite)

    def load(self, path: str | Path) -> OODScorer:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a fitted OOD state ({type(e).__name__}: {e})") from e
        self.load_state_dict(state)
        return self
