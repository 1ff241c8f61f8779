"""Small linear models for tabular evidence: robust standardisation and L2-regularised logistic regression.

Few parameters on purpose: the QC classifier and the disease-group estimate are fitted on a few hundred
cases from one centre, and must hold on scanners they were not fitted on.
"""

from __future__ import annotations

import numpy as np
import torch

#: Standardised values are clipped to this many robust standard deviations (a case with no heart found has
#: infinite OOD scores; one wild value must not dominate a linear model).
CLIP = 8.0


def robust_scaling(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column median and interquartile range / 1.349 (the sd of a normal distribution) of the finite values
    of ``x`` (cases, features); a column without spread gets scale 1."""
    finite = torch.where(torch.isfinite(x), x, torch.nan)
    centre = torch.nanmedian(finite, dim=0).values.nan_to_num(0.0)
    q = torch.tensor(np.nanquantile(finite.numpy(), [0.25, 0.75], axis=0), dtype=x.dtype)
    spread = (q[1] - q[0]).nan_to_num(0.0) / 1.349
    return centre, torch.where(spread > 0, spread, torch.ones_like(spread))


def standardise(x: torch.Tensor, centre: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Robust z-scores, clipped to +-CLIP; missing values (NaN) at the centre, infinities at the clip."""
    z = torch.nan_to_num((x - centre) / scale, nan=0.0, posinf=CLIP, neginf=-CLIP)
    return z.clamp(-CLIP, CLIP)


def fit_logistic(z: torch.Tensor, y: torch.Tensor, l2: float, classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of a logistic regression on standardised features ``z`` (cases, features), penalised by
    ``l2 * |w|^2 / cases``. Two classes: ``y`` holds 0/1, weights (features,), bias (). More: ``y`` holds class
    indices, weights (features, classes), bias (classes,) of a softmax regression."""
    binary = classes == 2
    w = torch.zeros(z.shape[1], *(() if binary else (classes,)), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(() if binary else (classes,), dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")
    data = torch.nn.functional.binary_cross_entropy_with_logits if binary else torch.nn.functional.cross_entropy
    target = y.double() if binary else y.long()

    def closure():
        optimiser.zero_grad()
        loss = data(z @ w + b, target) + l2 * (w * w).sum() / len(y)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    return w.detach(), b.detach()
