"""The shift suite: synthetic distribution shifts of graded severity for evaluating OOD detection.

Each shift acts on one short-axis stack (and its label volume, on the same grid) slice-wise in-plane, the
whole stack in one batched tensor operation, deterministically from a seed: the same seed draws the same
realisation (field, noise, spike position, ghost pattern, crop window, rotation sense) at every severity,
so that a severity only scales it. Intensity shifts leave the labels unchanged; geometric shifts move the
labels with the image (nearest neighbour). Intensities stay inside the input's [min, max]; images come
back as float32, labels in their own dtype; the inputs are never modified.

Severities 1 (mild) to 5 (severe), parameters in :data:`SEVERITY_TABLE`:

===============  ==========================================  ==================================  ========
shift            parameter, severity 1 .. 5                  training augmentation               in dist.
===============  ==========================================  ==================================  ========
bias_field       std of the log field 0.15 .. 1.3            log-field std ~0.35 (p 0.4)         1-2
rician_noise     noise std / (p99 - p1) 0.03 .. 0.25         Gaussian std 0 .. 0.06 of [0, 1]    1-2
gibbs_ringing    MONAI alpha 0.5 .. 0.85 (k-space disc cut)  blur only, never ringing            none
kspace_spikes    1 .. 3 spikes, stripes 0.2 .. 1.6 x mean    none                                none
motion_ghosting  periodic displacement 1 .. 12 mm along PE   none                                none
contrast_gamma   abs(log gamma) 0.25 .. 1.5, stretch 1 .. 2  gamma 0.6 .. 1.6, gain 0.75 .. 1.25  1-2
low_resolution   in-plane down-sampling factor 1.5 .. 6      factor 1 .. 2.5 (p 0.25)            1-2
fov_crop         kept fraction of each axis 0.8 .. 0.3       160 mm patches, translated          1-3
rotation         10 .. 90 degrees                            any angle                           all
===============  ==========================================  ==================================  ========

The training augmentation (:class:`cmr_ood.data.augment.BatchAugment`) draws rotations, flips, gamma,
contrast, bias fields, blur and Gaussian noise, so the mild end of those shifts is in distribution (the
last column): a detector should not flag it. Their severe end goes well beyond it (bias fields 4x the
log-std, noise 4x, gamma 4.5 or 0.22, resolution 6x coarser). Rotation is in distribution at every
severity, a control: the network assumes no orientation. Crop: ACDC's field of view is 300-400 mm, so
severities 1-3 keep 150 mm or more, about the 160 mm patches the network is trained on; 4-5 keep 90-160 mm
and can cut the heart. The k-space artefacts (ringing, spikes, ghosts) are never seen in training.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from monai.transforms import AdjustContrast, GibbsNoise, KSpaceSpikeNoise, RandBiasField, RandRicianNoise, Resize, Rotate
from monai.utils import convert_to_tensor

from cmr_ood.data.io import CaseError, Volume
from cmr_ood.data.preprocess import Preprocessing, quantiles, slice_axis

SEVERITIES = (1, 2, 3, 4, 5)

#: Parameters per severity (index 0 is severity 1). Units: ``log_std`` of the natural-log bias field over
#: the slice; noise ``std`` as a fraction of the robust intensity range the network's preprocessing maps
#: onto [0, 1]; ``alpha`` as in MONAI's GibbsNoise (k-space radius kept = (1 - alpha) * 0.71 * size);
#: spike ``amplitude`` of the stripes as a multiple of the mean signal; ghosting ``amplitude_mm`` of the
#: periodic displacement along the phase-encoding axis; ``log_gamma`` the magnitude of log(gamma) (sense
#: from the seed) and ``stretch`` a linear contrast gain about the mean, clipped to the input range;
#: resolution ``factor`` of down-sampling; crop ``keep`` fraction of each in-plane axis; rotation
#: ``degrees`` (sense from the seed).
SEVERITY_TABLE: dict[str, dict[str, tuple[float, ...]]] = {
    "bias_field": {"log_std": (0.15, 0.3, 0.6, 0.9, 1.3)},
    "rician_noise": {"std": (0.03, 0.06, 0.1, 0.16, 0.25)},
    "gibbs_ringing": {"alpha": (0.5, 0.6, 0.7, 0.78, 0.85)},
    "kspace_spikes": {"count": (1, 1, 2, 2, 3), "amplitude": (0.2, 0.4, 0.7, 1.1, 1.6)},
    "motion_ghosting": {"amplitude_mm": (1.0, 2.0, 4.0, 7.0, 12.0)},
    "contrast_gamma": {"log_gamma": (0.25, 0.45, 0.8, 1.1, 1.5), "stretch": (1.0, 1.15, 1.3, 1.6, 2.0)},
    "low_resolution": {"factor": (1.5, 2.0, 3.0, 4.0, 6.0)},
    "fov_crop": {"keep": (0.8, 0.65, 0.5, 0.4, 0.3)},
    "rotation": {"degrees": (10.0, 20.0, 40.0, 60.0, 90.0)},
}


@dataclass(frozen=True)
class _Context:
    """What a shift may use besides the slices: the stack's intensity statistics, pixel size and a seeded
    generator (one stream per shift and seed, independent of the severity)."""

    low: float  # input minimum: the floor of the value range and the background level
    high: float  # input maximum
    spacing: tuple[float, float]  # in-plane pixel size (mm) of the (Z, H, W) slices
    rng: np.random.Generator

    def monai_seed(self) -> int:
        return int(self.rng.integers(2**31))


# ------------------------------------------------------------------------------------- intensity shifts
def _bias_field(x: torch.Tensor, ctx: _Context, log_std: float) -> torch.Tensor:
    """A smooth multiplicative field (MONAI's Legendre polynomial of degree 3), one per stack as a coil's
    in-plane profile, its log centred and scaled to ``log_std``; it acts on the signal above the floor."""
    field = RandBiasField(degree=3, coeff_range=(-1.0, 1.0), prob=1.0)
    field.set_random_state(seed=ctx.monai_seed())
    log_field = torch.log(convert_to_tensor(field(np.ones((1, *x.shape[1:]), np.float32)), track_meta=False))[0]
    log_field = log_field.to(x.device, torch.float32)
    log_field = (log_field - log_field.mean()) / log_field.std().clamp_min(1e-6) * log_std
    return ctx.low + (x - ctx.low) * torch.exp(log_field)


def _rician_noise(x: torch.Tensor, ctx: _Context, std: float) -> torch.Tensor:
    """Magnitude of the signal above the floor plus complex Gaussian noise (MONAI's RandRicianNoise)."""
    noise = RandRicianNoise(prob=1.0, std=std * _robust_range(x), sample_std=False)
    noise.set_random_state(seed=ctx.monai_seed())
    return ctx.low + convert_to_tensor(noise(x - ctx.low), track_meta=False)


def _gibbs_ringing(x: torch.Tensor, ctx: _Context, alpha: float) -> torch.Tensor:
    """k-space truncated to a disc (MONAI's GibbsNoise): blur with ringing at edges."""
    return ctx.low + convert_to_tensor(GibbsNoise(alpha)(x - ctx.low), track_meta=False)


def _kspace_spikes(x: torch.Tensor, ctx: _Context, count: int, amplitude: float) -> torch.Tensor:
    """Spikes at seeded k-space positions away from the centre (MONAI's KSpaceSpikeNoise), the same in
    every slice: herringbone stripes of ``amplitude`` times the mean signal."""
    height, width = x.shape[1:]
    positions = []
    for _ in range(max(SEVERITY_TABLE["kspace_spikes"]["count"])):  # drawn alike at every severity
        radius, angle = ctx.rng.uniform(0.15, 0.6), ctx.rng.uniform(0.0, 2.0 * math.pi)
        positions.append((int(height // 2 + round(radius * math.cos(angle) * (height // 2))),
                          int(width // 2 + round(radius * math.sin(angle) * (width // 2)))))
    positions = [(min(i, height - 1), min(j, width - 1)) for i, j in positions[: int(count)]]
    # The FFT is unnormalised: a spike of magnitude m gives stripes of amplitude m / (H W) in the image.
    magnitude = amplitude * float((x - ctx.low).mean()) * height * width
    log_magnitude = math.log(max(magnitude, 1e-6))
    spikes = KSpaceSpikeNoise(loc=positions, k_intensity=[log_magnitude] * len(positions))
    return convert_to_tensor(spikes(x), track_meta=False)


def _motion_ghosting(x: torch.Tensor, ctx: _Context, amplitude_mm: float) -> torch.Tensor:
    """Periodic motion during a sequential acquisition: k-space line ``t`` along the phase-encoding (PE)
    axis sees the object displaced by ``d(t) = A sin(2 pi f t / N + phi)``, i.e. the line's phase is
    modulated by ``exp(-2 pi i k d(t) / N)``; ghosts of the moving edges appear every ``f`` pixels along PE.
    MONAI has no such transform. PE axis, ghost spacing (20-35% of the field of view) and phase are seeded."""
    pe_axis = 1 + int(ctx.rng.integers(2))  # which in-plane axis of (Z, H, W) is phase-encoded
    cycles = ctx.rng.uniform(0.2, 0.35) * x.shape[pe_axis]
    phase = ctx.rng.uniform(0.0, 2.0 * math.pi)
    n = x.shape[pe_axis]
    line = torch.arange(n, device=x.device, dtype=torch.float64)  # acquisition order of the PE lines
    displacement = amplitude_mm / ctx.spacing[pe_axis - 1] * torch.sin(2.0 * math.pi * cycles * line / n + phase)
    frequency = line - n // 2  # centred k index, as after fftshift
    modulation = torch.polar(torch.ones_like(line), -2.0 * math.pi * frequency * displacement / n).to(torch.complex64)
    modulation = modulation.view((1, n, 1) if pe_axis == 1 else (1, 1, n))
    dims = (-2, -1)
    k = torch.fft.fftshift(torch.fft.fft2(x - ctx.low, dim=dims), dim=dims) * modulation
    return ctx.low + torch.fft.ifft2(torch.fft.ifftshift(k, dim=dims), dim=dims).abs()  # a magnitude image


def _contrast_gamma(x: torch.Tensor, ctx: _Context, log_gamma: float, stretch: float) -> torch.Tensor:
    """Gamma over the stack's range (MONAI's AdjustContrast; gamma > 1 or < 1 from the seed), then a
    linear contrast gain about the mean that saturates both ends (a wrong display window)."""
    gamma = math.exp(log_gamma if ctx.rng.random() < 0.5 else -log_gamma)
    x = convert_to_tensor(AdjustContrast(gamma)(x), track_meta=False)
    mean = x.mean()
    return mean + stretch * (x - mean)


def _low_resolution(x: torch.Tensor, ctx: _Context, factor: float) -> torch.Tensor:
    """Down-sampled in-plane by ``factor`` (area average) and back (bilinear): the grid is kept."""
    size = x.shape[1:]
    small = tuple(max(1, round(s / factor)) for s in size)
    down = Resize(small, mode="area")(x)
    return convert_to_tensor(Resize(size, mode="bilinear", align_corners=False)(down), track_meta=False)


# ------------------------------------------------------------------------------------ geometric shifts
GeometricResult = tuple[torch.Tensor, torch.Tensor | None, tuple[int, int]]


def _fov_crop(x: torch.Tensor, labels: torch.Tensor | None, ctx: _Context, keep: float) -> GeometricResult:
    """A window of ``keep`` of each in-plane axis around a seeded centre in the middle 30% of the image.
    For one seed the windows of higher severities nest inside those of lower ones."""
    centres = [ctx.rng.uniform(0.35, 0.65) for _ in range(2)]
    starts, stops = [], []
    for centre, n in zip(centres, x.shape[1:]):
        size = max(1, round(keep * n))
        start = int(np.clip(round(centre * n - size / 2), 0, n - size))
        starts.append(start)
        stops.append(start + size)
    window = (slice(None), slice(starts[0], stops[0]), slice(starts[1], stops[1]))
    return x[window], None if labels is None else labels[window], (starts[0], starts[1])


def _rotation(x: torch.Tensor, labels: torch.Tensor | None, ctx: _Context, degrees: float) -> GeometricResult:
    """In-plane rotation about the slice centre on the same grid (MONAI's Rotate); what comes from outside
    the image is background (the input's minimum, label 0). Voxel space: CMR pixels are square."""
    angle = math.radians(degrees) * (1.0 if ctx.rng.random() < 0.5 else -1.0)
    image = Rotate(angle, keep_size=True, mode="bilinear", padding_mode="zeros")(x - ctx.low)
    rotated = ctx.low + convert_to_tensor(image, track_meta=False)
    if labels is not None:
        moved = Rotate(angle, keep_size=True, mode="nearest", padding_mode="zeros")(labels.float())
        labels = convert_to_tensor(moved, track_meta=False).round().to(labels.dtype)
    return rotated, labels, (0, 0)


# ---------------------------------------------------------------------------------------------- the suite
@dataclass(frozen=True)
class Shift:
    """One shift of the suite. ``transform`` maps (Z, H, W) float32 slices: intensity shifts as
    ``(slices, context, **parameters) -> slices``; geometric ones as ``(slices, labels, context,
    **parameters) -> (slices, labels, in-plane offset of the output's first voxel)``."""

    name: str
    transform: Callable
    geometric: bool
    random: bool  # whether the seed changes the result
    in_distribution: tuple[int, ...]  # severities the training augmentation covers

    def parameters(self, severity: int) -> dict[str, float]:
        if isinstance(severity, bool) or severity not in SEVERITIES:
            raise ValueError(f"severity {severity!r} of shift '{self.name}' is not one of {SEVERITIES}")
        return {key: values[severity - 1] for key, values in SEVERITY_TABLE[self.name].items()}

    def __call__(self, image: Volume, labels: Volume | None = None, severity: int = 1, seed: int = 0,
                 device: str | torch.device | None = None) -> tuple[Volume, Volume | None]:
        """The shifted image and labels (new Volumes, the inputs untouched), computed on ``device``."""
        parameters = self.parameters(severity)
        _check_inputs(image, labels, seed)
        axis = slice_axis(image.spacing, image.array.shape)
        order = (axis, *(a for a in range(3) if a != axis))  # (slice, in-plane 0, in-plane 1)
        x = torch.tensor(image.array, dtype=torch.float32, device=device).permute(order)  # a copy: never in place
        context = _context(x, [image.spacing[a] for a in order[1:]], self.name, seed)
        y = None if labels is None else torch.tensor(labels.array, device=device).permute(order)
        if self.geometric:
            out, y_out, offset = self.transform(x, y, context, **parameters)
        else:
            out, y_out, offset = self.transform(x, context, **parameters), y, (0, 0)
        out = out.clamp(context.low, context.high)
        translation = np.eye(4)
        translation[list(order[1:]), 3] = offset
        shifted = _volume_like(image, out.float(), order, translation)
        return shifted, None if labels is None else _volume_like(labels, y_out, order, translation)


SHIFTS: dict[str, Shift] = {
    shift.name: shift
    for shift in (
        Shift("bias_field", _bias_field, geometric=False, random=True, in_distribution=(1, 2)),
        Shift("rician_noise", _rician_noise, geometric=False, random=True, in_distribution=(1, 2)),
        Shift("gibbs_ringing", _gibbs_ringing, geometric=False, random=False, in_distribution=()),
        Shift("kspace_spikes", _kspace_spikes, geometric=False, random=True, in_distribution=()),
        Shift("motion_ghosting", _motion_ghosting, geometric=False, random=True, in_distribution=()),
        Shift("contrast_gamma", _contrast_gamma, geometric=False, random=True, in_distribution=(1, 2)),
        Shift("low_resolution", _low_resolution, geometric=False, random=False, in_distribution=(1, 2)),
        Shift("fov_crop", _fov_crop, geometric=True, random=True, in_distribution=(1, 2, 3)),
        Shift("rotation", _rotation, geometric=True, random=True, in_distribution=SEVERITIES),
    )
}


def apply_shift(image: Volume, labels: Volume | None, name: str, severity: int, seed: int = 0,
                device: str | torch.device | None = None) -> tuple[Volume, Volume | None]:
    """``image`` (and ``labels`` on its grid, or None) under shift ``name`` at ``severity`` (1..5), drawn
    from ``seed``; see :data:`SEVERITY_TABLE`. Computed on ``device`` (default: CPU)."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift '{name}'; known shifts: {', '.join(SHIFTS)}")
    return SHIFTS[name](image, labels, severity, seed, device)


def embed(volume: Volume, reference: Volume, fill: float = 0.0) -> np.ndarray:
    """``volume``'s voxels placed on ``reference``'s grid (``fill`` elsewhere), e.g. a cropped stack back in
    its original frame. The grids must differ by a whole-voxel translation (as after ``fov_crop``)."""
    offset = np.linalg.solve(reference.affine, volume.affine[:, 3])[:3]
    start = np.round(offset).astype(int)
    linear = np.linalg.solve(reference.affine[:3, :3], volume.affine[:3, :3])
    if not (np.allclose(offset, start, atol=1e-3) and np.allclose(linear, np.eye(3), atol=1e-6)):
        raise ValueError(f"{volume.path}: its grid is not a whole-voxel translation of the grid of {reference.path}")
    stop = start + np.asarray(volume.array.shape[:3])
    if np.any(start < 0) or np.any(stop > np.asarray(reference.array.shape[:3])):
        raise ValueError(f"{volume.path}: its grid reaches outside the grid of {reference.path}")
    out = np.full(reference.array.shape[:3], fill, dtype=volume.array.dtype)
    out[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]] = volume.array
    return out


# -------------------------------------------------------------------------------------------- plumbing
def _check_inputs(image: Volume, labels: Volume | None, seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if image.array.ndim != 3:
        raise CaseError(image.path, f"{image.array.ndim}D image (shape {image.array.shape}): shifts take one 3D "
                                    "short-axis stack (X, Y, Z); shift the frames of a cine one at a time")
    if not np.all(np.isfinite(image.array)):
        raise CaseError(image.path, "image holds NaN or infinite values")
    if labels is not None and labels.array.shape != image.array.shape:
        raise CaseError(labels.path, f"label grid {labels.array.shape} differs from the image grid "
                                     f"{image.array.shape} of {image.path}")


def _context(x: torch.Tensor, spacing, name: str, seed: int) -> _Context:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])  # one stream per shift and seed
    return _Context(float(x.min()), float(x.max()), (float(spacing[0]), float(spacing[1])), rng)


def _robust_range(x: torch.Tensor) -> float:
    """The intensity range that the network's preprocessing maps onto [0, 1] (its percentiles)."""
    pre = Preprocessing()
    lower, upper = quantiles(x, [pre.lower_percentile / 100.0, pre.upper_percentile / 100.0]).tolist()
    return max(upper - lower, 0.0)


def _volume_like(volume: Volume, slices: torch.Tensor, order, translation: np.ndarray) -> Volume:
    """(Z, H, W) slices back to ``volume``'s axis order as a new Volume, its affine moved by ``translation``
    (voxels). A NIfTI header's sform/qform get the new origin and keep their own 3x3 part: the reader takes
    directions and origin from them and the spacing from pixdim, so headers whose sform lies about the
    spacing (ACDC) still read back to the new affine."""
    array = np.ascontiguousarray(slices.permute(*np.argsort(order).tolist()).cpu().numpy())
    affine = volume.affine @ translation
    header = None
    if volume.header is not None:
        header = volume.header.copy()
        header.set_data_shape(array.shape)
        if not np.allclose(translation, np.eye(4)):
            for get, put in ((header.get_sform, header.set_sform), (header.get_qform, header.set_qform)):
                matrix, code = get(coded=True)
                if code:
                    matrix[:3, 3] = affine[:3, 3]
                    put(matrix, int(code))
    return Volume(array, tuple(volume.spacing), affine, volume.path, header)
