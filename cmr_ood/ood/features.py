"""Feature-space scores: Mahalanobis distance of pooled features, and the spectral signature of Karimi &
Gholipour (2020). Both fit statistics on in-distribution cases (the training data of the network is
in-distribution by definition; the scorer fits its thresholds on other, held-out cases)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmr_ood.ood.base import CaseOutputs, Detector


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean, shrunk covariance and shrinkage of samples x (n, p) (Ledoit & Wolf 2004): the sample
    covariance pulled towards a scaled identity by the amount that minimises the expected squared error,
    so that the inverse exists and is stable with fewer samples than dimensions."""
    x = x.double()
    n, p = x.shape
    mean = x.mean(0)
    xc = x - mean
    s = xc.T @ xc / n
    mu = torch.trace(s) / p
    target = mu * torch.eye(p, dtype=x.dtype, device=x.device)
    d2 = ((s - target) ** 2).sum() / p
    # (1/n^2) sum_k ||x_k x_k^T - S||_F^2, expanded so that no p x p matrix per sample is formed
    norms2 = (xc**2).sum(1)
    b2 = ((norms2**2).sum() - 2 * ((xc @ s) * xc).sum() + n * (s**2).sum()) / (n**2 * p)
    shrinkage = float(torch.clamp(b2 / d2.clamp_min(1e-30), 0.0, 1.0))
    return mean, shrinkage * target + (1 - shrinkage) * s, shrinkage


class FeatureDetector(Detector):
    """A score of the feature map at ``layer``: fitted statistics, one case score named like the detector."""

    kind = "features"

    def __init__(self, layer: str = "bottleneck"):
        self.layer = layer
        self.name = f"{self.kind}_{layer}"
        self.taps = (layer,)

    @property
    def needs_fit(self) -> bool:
        return True

    @property
    def score_names(self) -> list[str]:
        return [self.name]


class Mahalanobis(FeatureDetector):
    """Mahalanobis distance of each slice's globally pooled feature vector at ``layer`` to the
    in-distribution slices (Lee et al. 2018, with a Ledoit-Wolf covariance); case score = mean over the
    slices."""

    kind = "mahalanobis"

    def __init__(self, layer: str = "bottleneck"):
        super().__init__(layer)
        self._vectors: list[torch.Tensor] = []
        self.mean = self.precision = None
        self.shrinkage = None

    def _pooled(self, case: CaseOutputs) -> torch.Tensor:
        return case.features[self.layer].double().mean((2, 3))

    def update(self, case: CaseOutputs) -> None:
        self._vectors.append(self._pooled(case).cpu())

    def finish(self) -> None:
        if not self._vectors:
            raise ValueError(f"{self.name}: no cases to fit on")
        mean, cov, self.shrinkage = ledoit_wolf(torch.cat(self._vectors))
        self.mean, self.precision = mean, torch.linalg.inv(cov)
        self._vectors = []

    def slice_distances(self, case: CaseOutputs) -> torch.Tensor:
        if self.mean is None:
            raise RuntimeError(f"{self.name} is not fitted")
        v = self._pooled(case)
        d = v - self.mean.to(v.device)
        return ((d @ self.precision.to(v.device)) * d).sum(1).clamp_min(0).sqrt()

    def case_scores(self, case: CaseOutputs) -> dict[str, float]:
        return {self.name: float(self.slice_distances(case).mean())}

    def state_dict(self) -> dict:
        return {"mean": self.mean, "precision": self.precision, "shrinkage": self.shrinkage}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.precision, self.shrinkage = state["mean"], state["precision"], state["shrinkage"]


def singular_values(features: torch.Tensor, method: str = "auto") -> torch.Tensor:
    """Singular values (descending) of the (voxels x channels) matrices of a batch of feature maps.

    ``features`` (B, C, N) for B cases (a case's maps flattened to N positions). ``gram``: eigenvalues of
    the C x C Gram matrices in one batched ``eigvalsh`` (fast on GPUs, where a batched SVD of tall
    matrices is slow; squaring the matrix costs precision in the smallest values, which are floored
    anyway); ``svd``: batched ``svdvals``; ``loop``: one SVD per case; ``auto``: ``gram`` on CUDA, ``svd``
    elsewhere (CPU eigensolvers were the slowest here). ``benchmarks/spectral_svd.py`` compares them."""
    if method == "auto":
        method = "gram" if features.device.type == "cuda" else "svd"
    if method == "gram":
        x = features.float()
        gram = x @ x.transpose(1, 2)
        return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(-1).float()
    if method == "svd":
        values = torch.linalg.svdvals(features.float().transpose(1, 2))
    elif method == "loop":
        values = torch.stack([torch.linalg.svdvals(f.float().T) for f in features])
    else:
        raise ValueError(f"unknown method '{method}'; one of gram, svd, loop")
    # fewer positions than channels (a small crop): the missing singular values are zero, as with gram
    return F.pad(values, (0, features.shape[1] - values.shape[-1]))


def spectral_signature(features: torch.Tensor, method: str = "auto", floor: float = 1e-6) -> torch.Tensor:
    """Karimi & Gholipour's signature of a case: log singular values of its deepest feature map reshaped to
    (voxels x channels), L2-normalised. ``features`` (Z, C, h, w) for one case. Singular values below
    ``floor`` times the largest are raised to it, so that near-null directions do not dominate the log."""
    c = features.shape[1]
    matrix = features.transpose(0, 1).reshape(1, c, -1)
    s = singular_values(matrix, method)[0]
    s = s.clamp_min(floor * s[0].clamp_min(1e-30))
    return torch.nn.functional.normalize(s.log(), dim=0)


class SpectralSignature(FeatureDetector):
    """Spectral OOD score (Karimi & Gholipour 2020): distance from a case's signature to the nearest
    signature of the in-distribution fitting cases. ``threshold`` is their rule, mean + 2.5 sd of the
    fitting cases' distances to their nearest other case (kept for reference; the scorer's decision uses
    the threshold fitted on held-out validation cases like every other score)."""

    kind = "spectral"

    def __init__(self, layer: str = "bottleneck", method: str = "auto"):
        super().__init__(layer)
        self.method = method
        self._signatures: list[torch.Tensor] = []
        self.signatures = None
        self.threshold = None

    def signature(self, case: CaseOutputs) -> torch.Tensor:
        return spectral_signature(case.features[self.layer], self.method)

    def update(self, case: CaseOutputs) -> None:
        self._signatures.append(self.signature(case).cpu())

    def finish(self) -> None:
        if len(self._signatures) < 2:
            raise ValueError(f"{self.name}: at least two cases are needed to fit")
        self.signatures = torch.stack(self._signatures)
        d = torch.cdist(self.signatures, self.signatures)
        d.fill_diagonal_(float("inf"))
        nearest = d.min(1).values
        self.threshold = float(nearest.mean() + 2.5 * nearest.std())
        self._signatures = []

    def case_scores(self, case: CaseOutputs) -> dict[str, float]:
        if self.signatures is None:
            raise RuntimeError(f"{self.name} is not fitted")
        s = self.signature(case)
        return {self.name: float(torch.cdist(s[None], self.signatures.to(s.device))[0].min())}

    def state_dict(self) -> dict:
        return {"signatures": self.signatures, "threshold": self.threshold}

    def load_state_dict(self, state: dict) -> None:
        self.signatures, self.threshold = state["signatures"], state["threshold"]
